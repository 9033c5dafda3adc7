"""Minitron-style structured pruning of a checkpoint, ranked by activations on calibration samples.

    torchrun --nproc_per_node N tools/prune.py --ckpt IN --out OUT --data PREFIX --calib-samples N
        [--layers L] [--hidden H] [--ffn-hidden F] [--heads Q] [--kv-heads K]
        [--seq-len S] [--micro-batch B] [--seed 1234] [--force]

One pass of forwards over `--calib-samples` windows of `--seq-len` tokens of the indexed dataset
PREFIX (its train split, drawn as training draws them) scores every prunable unit of IN at once;
then each target keeps the highest-scoring units (in their original order) and OUT is a checkpoint
of the smaller architecture that `train.init`, `distill.teacher`, tools/score.py and
`convert_hf.py export` load. Targets left out keep their size; no target at all copies the model.

Importance (Minitron, Muralidharan et al. 2024; ShortGPT, Men et al. 2024), all averaged over
every calibration token:
- **block** i (`--layers`): the cosine distance `1 - cos(h_in, h_out)` between the residual stream
  entering and leaving the block (ShortGPT's block influence). Chosen over the loss increase when
  the block is skipped because one forward scores every block (skipping needs one forward per
  block), and because it reads two residual streams the model publishes anyway (`embedding`,
  `decoder.{i}.output`, layers/buffers.py). The lowest-scoring blocks are removed in one shot.
- **attention head** (`--heads`, `--kv-heads`): the L2 norm of the head's attention output (its
  slice of the output projection's input). Grouped-query groups stay whole: a key/value head's
  score is the sum of its query heads', the `--kv-heads` best groups are kept, and in each kept
  group its `--heads / --kv-heads` best query heads (so every kept query head keeps its key/value
  head). `--kv-heads` alone keeps the group size; `--heads` alone keeps every group.
- **MLP neuron** (`--ffn-hidden`): mean |act(gate x) * up x| (the down projection's input).
- **embedding channel** (`--hidden`): mean |norm output| summed over every norm of the residual
  stream (each block's attn_norm and mlp_norm, the final norm), the input of everything that reads
  the residual stream. Slicing channels slices the embedding, every norm, the input columns of
  q/k/v/gate/up, the output rows of o/down, and the output layer (tied or not).
The residual streams come from the model's activation buffers. Per-head and per-neuron values are
sums inside the output projections, which no buffer can give back, so they are read (read only, no
collective) by forward pre-hooks on `attention.o_proj` and `mlp.down_proj`, and the norm outputs by
forward hooks on the residual norms: the model's own forward, whatever its block features.

Parallelism: the tool runs at TP = the number of ranks (`--tp`; no DP or PP). Each rank scores its
own shard of heads and neurons, gathered over TP; then the new model is filled one tensor at a time
(each parameter gathered, sliced, re-split), so no rank ever holds the whole model, and OUT is
saved at the same TP (it loads at any TP). MTP heads are sliced like the trunk's blocks (their own
head and neuron scores). A target larger than the model, a head count that breaks the groups, or
sizes that do not split over TP are one `ConfigError` line, exit 2, and nothing written. OUT also
gets `importance.json` (every score and every kept index) and the source's tokenizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402
from torch import nn  # noqa: E402

from distill.weights import save_weights  # noqa: E402
from engine import collectives as C  # noqa: E402
from engine.config import ConfigError, to_dict  # noqa: E402
from engine.data import DataConfig, TokenBatches  # noqa: E402
from engine.data.dataset import check_datasets  # noqa: E402
from engine.entry import ensure_new_output, run_tool  # noqa: E402
from engine.log import get_logger, setup_logging  # noqa: E402
from engine.parallel import LaunchEnv, ParallelConfig, ParallelLayout  # noqa: E402
from layers.buffers import block_buffer, block_name  # noqa: E402
from layers.config import ModelConfig, check_model_layout  # noqa: E402
from layers.model import TransformerLM  # noqa: E402
from layers.sharding import gather_full, shard_of  # noqa: E402
from tools.convert_hf import DTYPES, TOKENIZER_DIR, copy_files, tokenizer_files  # noqa: E402
from tools.score import checkpoint_model_config, load_model  # noqa: E402

log = get_logger("prune")

TARGETS = ("layers", "hidden", "ffn_hidden", "heads", "kv_heads")
IMPORTANCE_FILE = "importance.json"


# ------------------------------------------------------------------------------ importance

@dataclasses.dataclass
class Importance:
    """Scores of one model, summed over calibration tokens until `mean()` divides them."""

    blocks: torch.Tensor  # [layers]: cosine distance between each block's input and output
    channels: torch.Tensor  # [hidden]: |norm output| summed over the residual norms
    heads: dict[str, torch.Tensor]  # per block name ("decoder.3", "mtp.1"): [heads] norms
    neurons: dict[str, torch.Tensor]  # per block name: [ffn_hidden] mean |activation|
    tokens: int = 0

    @classmethod
    def zeros(cls, cfg: ModelConfig) -> Importance:
        blocks = [block_name(i) for i in range(cfg.layers)] + \
            [block_name(j, mtp=True) for j in range(1, cfg.mtp_heads + 1)]
        zeros = functools.partial(torch.zeros, dtype=torch.float64)
        return cls(blocks=zeros(cfg.layers), channels=zeros(cfg.hidden),
                   heads={b: zeros(cfg.heads) for b in blocks},
                   neurons={b: zeros(cfg.ffn_hidden) for b in blocks})

    def mean(self) -> Importance:
        n = self.tokens
        return Importance(self.blocks / n, self.channels / n,
                          {b: s / n for b, s in self.heads.items()},
                          {b: s / n for b, s in self.neurons.items()}, tokens=n)

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "blocks": self.blocks.tolist(),
                "channels": self.channels.tolist(),
                "heads": {b: s.tolist() for b, s in self.heads.items()},
                "neurons": {b: s.tolist() for b, s in self.neurons.items()}}


def _token_sum(x: torch.Tensor) -> torch.Tensor:
    """`[batch, seq, n]` -> float64 `[n]` summed over tokens."""
    return x.double().sum(dim=(0, 1))


class _Recorder:
    """Per-shard sums of one forward's head outputs, neuron activations and norm outputs, read by
    hooks that only look (no collective, nothing changed)."""

    def __init__(self, model: TransformerLM):
        self.handles = []
        self.head_sums: dict[str, torch.Tensor] = {}  # block -> [heads/tp]
        self.neuron_sums: dict[str, torch.Tensor] = {}  # block -> [ffn/tp]
        self.channel_sum = torch.zeros(model.config.hidden, dtype=torch.float64)
        head_dim = model.config.dim_per_head
        blocks = [(block_name(int(i)), block) for i, block in model.decoder.items()] + \
            [(block_name(int(j), mtp=True), block) for j, block in model.mtp.items()]
        for name, block in blocks:
            self._hook_input(block.attention.o_proj, lambda x, b=name: self._heads(b, x, head_dim))
            self._hook_input(block.mlp.down_proj, lambda x, b=name: self._neurons(b, x))
            for norm in (block.attn_norm, block.mlp_norm):
                self.handles.append(norm.register_forward_hook(self._norm))
        self.handles.append(model.final_norm.register_forward_hook(self._norm))

    def _hook_input(self, module: nn.Module, read: Callable[[torch.Tensor], None]) -> None:
        self.handles.append(module.register_forward_pre_hook(lambda _m, args: read(args[0])))

    def _heads(self, block: str, context: torch.Tensor, head_dim: int) -> None:
        batch, seq, width = context.shape  # [batch, seq, heads/tp * head_dim]
        norms = context.view(batch, seq, width // head_dim, head_dim).double().norm(dim=-1)
        self.head_sums[block] = self.head_sums.get(block, 0) + norms.sum(dim=(0, 1))

    def _neurons(self, block: str, inner: torch.Tensor) -> None:
        self.neuron_sums[block] = self.neuron_sums.get(block, 0) + _token_sum(inner.abs())

    def _norm(self, _module, _args, out: torch.Tensor) -> None:
        self.channel_sum += _token_sum(out.abs())  # [batch, seq, hidden], replicated over TP

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def importance(model: TransformerLM, batches: list[torch.Tensor]) -> Importance:
    """Mean scores of `model` (whole, no SP) over the token ids `[batch, seq]` of `batches`; a
    collective over TP (the head and neuron shards are gathered)."""
    cfg, layout = model.config, model.layout
    if layout.sp or not model.plan.whole:
        raise ValueError("importance() needs the whole model without sequence parallelism")
    scores = Importance.zeros(cfg)
    streams = ["embedding", *(block_buffer(block_name(i), "output") for i in range(cfg.layers))]
    recorder = _Recorder(model)
    try:
        for ids in batches:
            out = model(ids, buffers=streams, compute_logits=False)
            hidden = [out.buffers[name].tensor for name in streams]  # [batch, seq, hidden] each
            for i in range(cfg.layers):
                distance = 1 - torch.cosine_similarity(hidden[i].double(), hidden[i + 1].double(), dim=-1)
                scores.blocks[i] += distance.sum()
            scores.tokens += ids.numel()
    finally:
        recorder.close()
    scores.channels += recorder.channel_sum
    for block in scores.heads:  # this rank's shards, gathered over TP in rank order
        scores.heads[block] += C.all_gather(recorder.head_sums[block], layout.tp_group)
        scores.neurons[block] += C.all_gather(recorder.neuron_sums[block], layout.tp_group)
    return scores.mean()


# ------------------------------------------------------------------------------ what to keep

def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` highest scores (ties: the lower index), in ascending order."""
    order = torch.argsort(-scores, stable=True)
    return order[:k].sort().values


@dataclasses.dataclass(frozen=True)
class Kept:
    """What the pruned model keeps of the source: indices into the source's dimensions."""

    layers: torch.Tensor  # source block index of each new block
    channels: torch.Tensor  # [new hidden]
    heads: dict[str, torch.Tensor]  # per source block: [new heads] query head indices
    kv_heads: dict[str, torch.Tensor]  # per source block: [new kv_heads]
    neurons: dict[str, torch.Tensor]  # per source block: [new ffn_hidden]

    def to_json(self) -> dict:
        return {"layers": self.layers.tolist(), "channels": self.channels.tolist(),
                "heads": {b: t.tolist() for b, t in self.heads.items()},
                "kv_heads": {b: t.tolist() for b, t in self.kv_heads.items()},
                "neurons": {b: t.tolist() for b, t in self.neurons.items()}}


def _grouped_heads(scores: torch.Tensor, cfg: ModelConfig, new: ModelConfig
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(query heads, key/value heads) kept of one block: the best groups, and in each the best
    query heads; query head h of the source uses key/value head h // group."""
    group, new_group = cfg.heads // cfg.num_kv_heads, new.heads // new.num_kv_heads
    by_group = scores.view(cfg.num_kv_heads, group)  # [kv_heads, group]
    kv = _top(by_group.sum(dim=1), new.num_kv_heads)
    queries = [g * group + _top(by_group[g], new_group) for g in kv.tolist()]
    return torch.cat(queries), kv


def choose(scores: Importance, cfg: ModelConfig, new: ModelConfig) -> Kept:
    """The units the targets `new` keep of `cfg`, by `scores`."""
    heads, kv_heads = {}, {}
    for block, head_scores in scores.heads.items():
        heads[block], kv_heads[block] = _grouped_heads(head_scores, cfg, new)
    return Kept(layers=_top(scores.blocks, new.layers), channels=_top(scores.channels, new.hidden),
                heads=heads, kv_heads=kv_heads,
                neurons={b: _top(s, new.ffn_hidden) for b, s in scores.neurons.items()})


def pruned_config(cfg: ModelConfig, targets: dict[str, int | None]) -> ModelConfig:
    """`cfg` with the given target sizes (None: keep); a target that cannot be met is a one-line
    `ConfigError` naming its flag."""
    for key, value in targets.items():
        current = cfg.num_kv_heads if key == "kv_heads" else getattr(cfg, key)
        flag = "--" + key.replace("_", "-")
        if value is not None and not 1 <= value <= current:
            raise ConfigError(flag, f"must be between 1 and the model's {key}={current} (got {value})")
    group = cfg.heads // cfg.num_kv_heads
    if targets["kv_heads"] is not None:  # alone: the group size stays
        kv, heads = targets["kv_heads"], targets["heads"] or targets["kv_heads"] * group
    else:  # --heads alone: every group stays while there are enough heads to go round
        heads = targets["heads"] or cfg.heads
        kv = min(cfg.num_kv_heads, heads)
    if heads % kv or heads // kv > group:
        raise ConfigError("--heads", f"{heads} query heads do not form {kv} grouped-query groups of "
                                     f"the model's groups of {group} (a kept query head keeps its "
                                     f"key/value head: --heads must be --kv-heads x 1..{group})")
    hidden = targets["hidden"] or cfg.hidden
    head_dim = None if cfg.head_dim is None and hidden == heads * cfg.dim_per_head else cfg.dim_per_head
    return dataclasses.replace(cfg, layers=targets["layers"] or cfg.layers, hidden=hidden,
                               ffn_hidden=targets["ffn_hidden"] or cfg.ffn_hidden, heads=heads,
                               kv_heads=None if kv == heads and cfg.kv_heads is None else kv,
                               head_dim=head_dim)


# ------------------------------------------------------------------------------ slicing

# How each block parameter's dimensions are indexed: c = embedding channels, q = query-head rows,
# k = key/value-head rows, f = MLP neurons, None = kept whole.
_BLOCK_DIMS = {
    "attention.q_proj.weight": ("q", "c"), "attention.q_proj.bias": ("q",),
    "attention.k_proj.weight": ("k", "c"), "attention.k_proj.bias": ("k",),
    "attention.v_proj.weight": ("k", "c"), "attention.v_proj.bias": ("k",),
    "attention.o_proj.weight": ("c", "q"), "attention.o_proj.bias": ("c",),
    "mlp.gate_proj.weight": ("f", "c"), "mlp.gate_proj.bias": ("f",),
    "mlp.up_proj.weight": ("f", "c"), "mlp.up_proj.bias": ("f",),
    "mlp.down_proj.weight": ("c", "f"), "mlp.down_proj.bias": ("c",),
    "attn_norm.weight": ("c",), "attn_norm.bias": ("c",),
    "mlp_norm.weight": ("c",), "mlp_norm.bias": ("c",),
    "post_attn_norm.weight": ("c",), "post_mlp_norm.weight": ("c",),  # Gemma's branch-output norms
    "attention.q_norm.weight": (None,), "attention.k_norm.weight": (None,),  # per head_dim: whole
}
_MODEL_DIMS = {"embedding.weight": (None, "c"), "lm_head.weight": (None, "c"),
               "position_embedding.weight": (None, "c"), "final_norm.weight": ("c",),
               "final_norm.bias": ("c",)}


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The weight rows of `heads` (each head is `head_dim` consecutive rows)."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def source_of(name: str, kept: Kept, head_dim: int) -> tuple[str, tuple[torch.Tensor | None, ...]]:
    """(source parameter name, index per dimension) of the pruned model's parameter `name`."""
    trunk, _, rest = name.partition(".")
    if trunk in ("decoder", "mtp"):
        index, _, suffix = rest.partition(".")
        block = block_name(kept.layers[int(index)].item()) if trunk == "decoder" else f"{trunk}.{index}"
        dims, source = _BLOCK_DIMS.get(suffix), f"{block}.{suffix}"
    else:
        block, dims, source = None, _MODEL_DIMS.get(name), name
    if dims is None:
        raise ValueError(f"tools/prune.py does not know how to slice parameter {name!r}")
    by_kind = {"c": kept.channels, None: None}
    if block is not None:
        by_kind.update(q=_rows(kept.heads[block], head_dim), k=_rows(kept.kv_heads[block], head_dim),
                       f=kept.neurons[block])
    return source, tuple(by_kind[kind] for kind in dims)


@torch.no_grad()
def pruned_model(model: TransformerLM, new_cfg: ModelConfig, kept: Kept) -> TransformerLM:
    """A model of `new_cfg` at `model`'s layout holding the kept slices of `model`'s weights, one
    full tensor at a time (every TP rank calls it)."""
    layout, cfg = model.layout, model.config
    new = TransformerLM(new_cfg, layout).to(next(model.parameters()).dtype)
    params = dict(model.named_parameters())
    for name, param in new.named_parameters():
        source, index = source_of(name, kept, cfg.dim_per_head)
        full = gather_full(params[source], layout=layout, vocab_size=cfg.vocab_size)
        for dim, rows in enumerate(index):
            if rows is not None:
                full = full.index_select(dim, rows)
        param.copy_(shard_of(param, full, layout=layout, padded_vocab=new_cfg.padded_vocab(layout.tp)))
    return new.eval()


# ------------------------------------------------------------------------------ the tool

def calibration_batches(args: argparse.Namespace, cfg: ModelConfig) -> list[torch.Tensor]:
    """`--calib-samples` windows of the train split, `--micro-batch` per forward."""
    stream = TokenBatches(_data_config(args), seed=args.seed, vocab_size=cfg.vocab_size)
    return [mb["input_ids"] for _ in range(args.calib_samples // args.micro_batch)
            for mb in stream.next_step()]


def _data_config(args: argparse.Namespace) -> DataConfig:
    return DataConfig(path=args.data, seq_len=args.seq_len, micro_batch=args.micro_batch,
                      global_batch=args.micro_batch)


def prune(args: argparse.Namespace, layout: ParallelLayout) -> None:
    """Score, slice and save (every rank); rank 0 finishes OUT."""
    step_dir, run_config, cfg = checkpoint_model_config(args.ckpt)
    dtype = DTYPES[(run_config.get("hf_import") or {}).get("dtype", "float32")]
    model = load_model(step_dir, cfg, layout)  # scored in fp32 (exact for bf16 weights)
    scores = importance(model, calibration_batches(args, cfg))
    new_cfg = pruned_config(cfg, {key: getattr(args, key) for key in TARGETS})
    kept = choose(scores, cfg, new_cfg)
    new = pruned_model(model, new_cfg, kept).to(dtype)
    del model
    out_config = {"model": to_dict(new_cfg), "prune": {
        "source": str(step_dir), "data": args.data, "calib_samples": args.calib_samples,
        "seq_len": args.seq_len, "targets": {k: getattr(args, k) for k in TARGETS}}}
    if "hf_import" in run_config:  # dtype and special token ids, for export
        out_config["hf_import"] = run_config["hf_import"]
    write_output(args, layout, lambda stage: save_weights(stage, new, layout, config=out_config),
                 details={"importance": scores.to_json(), "kept": kept.to_json()},
                 tokenizer=tokenizer_files(step_dir / TOKENIZER_DIR))
    log.info("pruned %s (%s) into %s (%s)", step_dir, _sizes(cfg), args.out, _sizes(new_cfg))


def write_output(args: argparse.Namespace, layout: ParallelLayout, save: Callable[[Path], Path], *,
                 details: dict, tokenizer: list[Path]) -> None:
    """`save(stage)` on every rank into a stage directory next to `--out`, which rank 0 completes
    (importance.json, tokenizer) and renames into place; a failure leaves no `--out`."""
    stage = args.out.with_name(f".{args.out.name}.prune-partial")
    if layout.is_rank0:
        shutil.rmtree(stage, ignore_errors=True)
        stage.parent.mkdir(parents=True, exist_ok=True)
    C.barrier(layout.tp_group)
    try:
        step = save(stage)
        if layout.is_rank0:
            copy_files(tokenizer, step / TOKENIZER_DIR)
            (stage / IMPORTANCE_FILE).write_text(json.dumps(details) + "\n")
            ensure_new_output(args.out, force=args.force)
            if args.out.exists():
                shutil.rmtree(args.out)
            stage.rename(args.out)
    finally:
        if layout.is_rank0:
            shutil.rmtree(stage, ignore_errors=True)
    C.barrier(layout.tp_group)


def _sizes(cfg: ModelConfig) -> str:
    return (f"layers {cfg.layers}, hidden {cfg.hidden}, ffn {cfg.ffn_hidden}, heads {cfg.heads}/"
            f"{cfg.num_kv_heads}")


def check_args(args: argparse.Namespace, cfg: ModelConfig, world: int) -> ParallelConfig:
    """Everything that needs no process group (run identically on every rank)."""
    tp = world if args.tp is None else args.tp
    if tp != world:
        raise ConfigError("--tp", f"must equal the number of ranks ({world}; the tool runs "
                                  f"without data or pipeline parallelism) (got {tp})")
    for key in ("calib_samples", "micro_batch", "seq_len"):
        if getattr(args, key) < 1:
            raise ConfigError("--" + key.replace("_", "-"), f"must be >= 1 (got {getattr(args, key)})")
    args.micro_batch = min(args.micro_batch, args.calib_samples)
    if args.calib_samples % args.micro_batch:
        raise ConfigError("--calib-samples", f"must be a multiple of --micro-batch="
                                             f"{args.micro_batch} (got {args.calib_samples})")
    if args.seq_len > cfg.max_seq_len:
        raise ConfigError("--seq-len", f"{args.seq_len} exceeds model.max_seq_len={cfg.max_seq_len}")
    try:
        check_model_layout(pruned_config(cfg, {key: getattr(args, key) for key in TARGETS}), tp)
    except ConfigError as err:
        if err.key.startswith("--"):
            raise
        flag = "--" + err.key.removeprefix("model.").replace("_", "-")
        raise ConfigError(flag, f"the pruned model: {err.message}") from None
    check_datasets(_data_config(args), vocab_size=cfg.vocab_size)
    ensure_new_output(args.out, force=args.force)
    return ParallelConfig(tp=tp)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint to prune (or a root with `latest`)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to create")
    parser.add_argument("--data", required=True, help="indexed-dataset prefix (or `default`) to "
                                                      "calibrate on (its train split)")
    parser.add_argument("--calib-samples", type=int, default=64, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per window (default: min(256, model.max_seq_len))")
    parser.add_argument("--micro-batch", type=int, default=4, help="windows per forward")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the windows' order")
    for key in TARGETS:
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                            help=f"target model.{key} (default: keep)")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default and "
                                                             "only value: the number of ranks)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)

    def prepare(launch: LaunchEnv) -> tuple[ParallelConfig, Callable[[ParallelLayout], None]]:
        _, _, cfg = checkpoint_model_config(args.ckpt)
        args.seq_len = min(256, cfg.max_seq_len) if args.seq_len is None else args.seq_len
        return check_args(args, cfg, launch.world_size), lambda layout: prune(args, layout)

    return run_tool(prepare)


if __name__ == "__main__":
    sys.exit(main())
