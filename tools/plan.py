"""Will this distillation job fit, and what will it cost? A planner run before the launch.

    python tools/plan.py --config FILE [section.key=value ...] [--student-hf DIR] [--teacher-hf DIR]
        [--gpus N --gpu-mem-gib M --gpus-per-node G --intra-node-gbps B1 --inter-node-gbps B2
         --flops T --efficiency E] [--search] [--json]

For the run the config describes (the student is `model`; the teacher's architecture comes from
its checkpoint's saved config, or from a Hugging Face `config.json` with `--teacher-hf`), per rank:

- memory: parameters, gradients (and DDP's flat buckets), AdamW state (sharded over DP with
  `train.distributed_optimizer`), the activations the backward keeps (by `train.recompute`, times
  the micro-batches the PP schedule holds at once), teacher weights and the teacher outputs in
  flight, the loss's working set (fused head or logits), and their sum, the peak;
- communication per optimizer step, per group and collective kind, in the bytes the engine's own
  counters record (engine/collectives.py: the payload this rank hands to each collective), which is
  what a CPU run logs as `comm_bytes/<group>`;
- with hardware flags: a step-time estimate (compute from FLOPs at an achieved fraction of the
  peak, communication from bus bytes over the link a group spans, the pipeline bubble from the
  schedule), tokens/s and MFU; `--search` ranks every layout of `--gpus` GPUs that fits.

Exact parts (tested against a real run on CPU, tests/test_plan.py): parameter, gradient and
optimizer bytes (counted from the model classes built on the meta device at each rank's layout),
and the communication of dense Llama/GPT-2 students with a colocated teacher or teacher ranks,
under TP, SP, PP (1F1B and interleaved), DP (DDP or the distributed optimizer), the fused head,
every recompute mode, an offline top-k teacher. Modelled, not exact: activation memory (the
tensors saved for the backward, by formula: equal on CPU for the blocks tested; bf16 linear outputs
assumed on GPU), the loss's working set, expert traffic and activations (they follow the routing),
and all times. Not modelled: activation-pair losses' communication, on-policy sampling, several
teachers, the teacher's transient forward memory (a plan's notes say which apply). Steady state:
the teacher stream's first step also carries the header and the prefetched micro-batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from distill._plan import make_plan  # noqa: E402
from distill.config import aligned_teacher_config  # noqa: E402
from distill.objective import DistillObjective  # noqa: E402
from distill.runconfig import RunConfig, check_model_data, check_pipeline, parse_run_config, shared_vocab  # noqa: E402
from engine.checkpoint import open_checkpoint  # noqa: E402
from engine.config import ConfigError, apply_overrides, from_dict, load_yaml  # noqa: E402
from engine.data import check_batch_layout  # noqa: E402
from engine.optim import adamw_groups  # noqa: E402
from engine.parallel import ParallelLayout, validate_layout  # noqa: E402
from engine.param_tags import param_tags
from layers.config import ModelConfig, check_model_layout, saved_model_config  # noqa: E402
from layers.hf import hf_config_to_model_config  # noqa: E402
from layers.model import TransformerLM  # noqa: E402
from layers.norm import LayerNorm, RMSNorm  # noqa: E402
from layers.tensor_parallel import RowParallelLinear  # noqa: E402

GIB = 2**30
FP32, BF16, INT64, FP64, INT32 = 4, 2, 8, 8, 4
META = torch.device("meta")


# ------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class Hardware:
    """The cluster the plan is for; None fields leave the matching estimate out."""

    gpus: int | None = None  # GPUs in the job (default: the config's world, tp x pp x dp)
    gpu_mem_gib: float | None = None  # memory per GPU
    gpus_per_node: int = 8  # a group within one node talks over the intra-node links
    intra_node_gbps: float = 450.0  # GB/s per GPU inside a node (H100 NVLink, one direction)
    inter_node_gbps: float = 50.0  # GB/s per GPU across nodes (400 Gb/s InfiniBand)
    flops: float | None = None  # peak TFLOP/s per GPU at the compute dtype (H100 bf16: 989)
    efficiency: float = 0.5  # fraction of the peak the kernels achieve (compute time only)

    @property
    def gpu(self) -> bool:
        """Numbers for GPUs (bf16 autocast, CUDA tiles) rather than for this CPU engine."""
        return self.gpu_mem_gib is not None or self.flops is not None


@dataclass(frozen=True)
class Job:
    """The run: its validated config, the teacher's architecture, and its world size."""

    cfg: RunConfig
    teacher: ModelConfig | None
    world: int

    @property
    def par(self):
        return self.cfg.parallel

    @property
    def students(self) -> int:
        return self.world - self.par.teacher_ranks

    @property
    def dp(self) -> int:
        return self.students // (self.par.tp * self.par.pp)

    @property
    def micro_batches(self) -> int:
        return self.cfg.data.micro_batches(self.dp)


def read_model_config(path: str, key: str) -> ModelConfig:
    """A model's architecture from a Hugging Face directory or config.json, a run config YAML (its
    `model` section), or one of this engine's checkpoints (its saved run config)."""
    source = Path(path)
    hf = source / "config.json" if source.is_dir() else source
    if hf.name == "config.json" and hf.is_file():
        return hf_config_to_model_config(json.loads(hf.read_text()))
    if source.suffix in (".yaml", ".yml"):  # a run config (the teacher's own training run)
        return from_dict(ModelConfig, load_yaml(source).get("model", {}), prefix="model")
    return saved_model_config(open_checkpoint(path, key=key))


def load_job(config: str, overrides: list[str], *, world: int | None = None,
             student_hf: str | None = None, teacher_hf: str | None = None) -> Job:
    """The run config as the entry point reads it (YAML + overrides), with the student's model from
    `student_hf` and the teacher's from `teacher_hf` or its checkpoint; `world`: the GPUs (default:
    the smallest world the layout fills, tp x pp (+ teacher ranks) with DP 1)."""
    data = load_yaml(config)
    if student_hf:  # the overrides still apply to it
        data["model"] = dataclasses.asdict(read_model_config(student_hf, "--student-hf"))
    cfg = parse_run_config(apply_overrides(data, overrides))
    teacher = None
    if cfg.distill.needs_teacher and cfg.distill.schedule != "offline":
        if teacher_hf:
            teacher = read_model_config(teacher_hf, "--teacher-hf")
        elif cfg.distill.teacher:
            teacher = read_model_config(cfg.distill.teacher, "distill.teacher")
    par = cfg.parallel
    world = world or par.tp * par.pp + par.teacher_ranks
    return Job(cfg, teacher, world)


def check_job(job: Job) -> None:
    """The engine's own start-up checks that need no file: layout, model split, batch split,
    pipeline cut, sequence length (a `ConfigError` naming the key)."""
    cfg = job.cfg
    validate_layout(cfg.parallel, job.world)
    check_model_layout(cfg.model, cfg.parallel.tp, cfg.parallel.ep, cfg.parallel.etp)
    if job.teacher is not None:
        check_model_layout(job.teacher, cfg.parallel.teacher_tp_degree)
    if cfg.parallel.sp and cfg.data.seq_len % cfg.parallel.tp:
        raise ConfigError("data.seq_len", f"{cfg.data.seq_len} does not split over parallel.tp="
                                          f"{cfg.parallel.tp} ranks (sequence parallelism)")
    check_batch_layout(cfg.data, job.dp)
    check_pipeline(cfg, job.dp)
    check_model_data(cfg)
    if job.teacher is not None and cfg.data.seq_len > job.teacher.max_seq_len:
        raise ConfigError("distill.teacher", f"the teacher's max_seq_len={job.teacher.max_seq_len}"
                                             f" is shorter than data.seq_len={cfg.data.seq_len}")


# ----------------------------------------------------------------------- models at a layout
class _Shapes(TransformerLM):
    """The model's parameters on the meta device: shapes only, nothing filled or allocated."""

    def reset_parameters(self) -> None:
        pass


def rank_layout(job: Job, *, pp_rank: int, tp: int | None = None, sp: bool | None = None,
                pp: int | None = None, chunks: int | None = None,
                ep: int | None = None) -> ParallelLayout:
    """A student rank's layout (TP rank 0, DP rank 0: every rank of a stage has equal shapes) on
    the meta device, without process groups (`tp`, `sp`, `pp`, `chunks`, `ep`: another layout's)."""
    par = job.par
    tp = par.tp if tp is None else tp
    pp = par.pp if pp is None else pp
    etp = par.etp if ep is None else 1  # (the teacher ranks': whole experts)
    ep = par.ep if ep is None else ep
    # shapes do not depend on DP beyond the experts' split: DP = EP keeps the cache small
    return ParallelLayout(world_size=tp * pp * ep, rank=0, tp=tp, dp=ep,
                          sp=par.sp if sp is None else sp, tp_rank=0, dp_rank=0,
                          pp=pp, pp_rank=pp_rank,
                          virtual_stages=par.virtual_stages if chunks is None else chunks,
                          ep=ep, etp=etp if tp == par.tp else 1, device=META)


@functools.lru_cache(maxsize=256)
def _model(config: ModelConfig, layout: ParallelLayout, recompute: str = "none") -> _Shapes:
    return _Shapes(config, layout, recompute=recompute)


def student_model(job: Job, pp_rank: int) -> _Shapes:
    return _model(job.cfg.model, rank_layout(job, pp_rank=pp_rank))


def teacher_model(job: Job, pp_rank: int) -> _Shapes | None:
    """The colocated teacher (cut like the student), or one teacher rank's (no PP, teacher_tp)."""
    if job.teacher is None:
        return None
    aligned = aligned_teacher_config(job.cfg.model, job.teacher)
    if job.cfg.distill.schedule == "teacher_ranks":
        return _model(aligned, rank_layout(job, pp_rank=0, tp=job.par.teacher_tp_degree,
                                           sp=False, pp=1, chunks=1, ep=job.par.teacher_ep))
    return _model(aligned, rank_layout(job, pp_rank=pp_rank))


def _objective(job: Job, layout: ParallelLayout) -> DistillObjective:
    return DistillObjective(job.cfg.distill, job.cfg.model, job.teacher, layout,
                            shared_vocab=shared_vocab(job.cfg))


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def trainable(job: Job, pp_rank: int) -> list[torch.nn.Parameter]:
    """The parameters this rank's optimizer steps, in its order (student, then the objective's
    projections)."""
    objective = _objective(job, rank_layout(job, pp_rank=pp_rank))
    params = [*student_model(job, pp_rank).parameters(), *objective.parameters()]
    return [p for g in adamw_groups(params, weight_decay=1.0) for p in g["params"]]


# ----------------------------------------------------------------------------- memory
@dataclass
class RankMemory:
    """Bytes one rank holds; `peak` is their sum (each term at its own largest)."""

    rank: str  # "student stage 0", "teacher rank"
    params: int = 0
    grads: int = 0
    grad_buckets: int = 0  # DDP's flat gradient buckets (no DDP: 0)
    optimizer: int = 0
    teacher_weights: int = 0
    teacher_outputs: int = 0  # the teacher outputs held at once (micro-batches in flight)
    activations: int = 0  # saved for the backward, all micro-batches in flight
    loss: int = 0  # the loss's working set for one micro-batch (logits or fused tiles)
    in_flight: int = 1  # micro-batches whose activations this rank holds at once

    @property
    def peak(self) -> int:
        return (self.params + self.grads + self.grad_buckets + self.optimizer
                + self.teacher_weights + self.teacher_outputs + self.activations + self.loss)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "peak": self.peak}


def dp_buckets(params: list[torch.nn.Parameter], dp: int,
               ep: int = 1) -> list[tuple[list, int, int]]:
    """The distributed optimizer's buckets (engine/dist_optim.py): per (decay group, dtype, and
    under EP routed expert or not) the parameters in optimizer order, S, the elements per rank, and
    the ranks it is sliced over (DP; dp / ep for the experts' under EP; padded to S x ranks)."""
    buckets: dict[tuple[bool, torch.dtype, bool], list] = {}
    for p in params:
        buckets.setdefault((p.ndim >= 2, p.dtype, ep > 1 and param_tags(p).expert), []).append(p)
    return [(members, -(-sum(p.numel() for p in members) // ranks), ranks)
            for (_, _, expert), members in buckets.items() for ranks in [dp // ep if expert else dp]]


def optimizer_bytes(params: list[torch.nn.Parameter], *, dp: int, sharded: bool, ep: int = 1) -> int:
    """AdamW's two moments and one fp32 step counter per stepped tensor; sharded: the moments of
    each bucket's 1/DP slice, one step counter per parameter overlapping DP rank 0's slice."""
    if not sharded:
        return sum(2 * p.numel() * p.element_size() + FP32 for p in params)
    total = 0
    for members, shard, _ in dp_buckets(params, dp, ep):
        total += 2 * shard * members[0].element_size()
        start = 0
        for p in members:  # DP rank 0 owns elements [0, shard)
            total += FP32 if start < shard else 0
            start += p.numel()
    return total


def in_flight(job: Job, pp_rank: int) -> int:
    """Micro-batches (of whole-stage activations, rounded up) pipeline rank `pp_rank` holds at
    once: 1 without PP; 1F1B pp - rank; interleaved (2 (pp - rank - 1) + (v - 1) pp + 1) chunk
    micro-batches of 1/v of the stage each (engine/pipeline.py)."""
    par, m = job.par, job.micro_batches
    if par.pp == 1:
        return 1
    if par.virtual_stages == 1:
        return min(m, par.pp - pp_rank)
    v = par.virtual_stages
    chunks = min(m * v, 2 * (par.pp - pp_rank - 1) + (v - 1) * par.pp + 1)
    return math.ceil(chunks / v)


def _dtypes(job: Job, hw: Hardware) -> tuple[int, int]:
    """(residual stream / norm bytes, linear-layer output bytes): fp32 on CPU; bf16 linear
    outputs under GPU autocast (`train.bf16`), with the residual stream kept in fp32."""
    return FP32, (BF16 if hw.gpu and job.cfg.train.bf16 else FP32)


def norm_bytes(config: ModelConfig, tokens: int, res: int) -> int:
    """What one norm of the residual stream saves: RMSNorm its input, the normalized values and
    1/rms; LayerNorm its input, mean and 1/std."""
    if config.family == "llama":
        return tokens * (config.hidden * (res + FP32) + FP32)
    return tokens * (config.hidden * res + 2 * FP32)


def layer_activation_bytes(config: ModelConfig, *, tokens: int, batch: int, seq: int, tp: int,
                           sp: bool, recompute: str, res: int, lin: int,
                           moe_layer: bool = False) -> int:
    """Bytes one decoder block saves for the backward for one micro-batch of `tokens` tokens:
    the norms' inputs, normalized values and 1/rms; the TP-region inputs of the projections; q, k
    (after RoPE), v, the attention output and its log-sum-exp; the MLP's inner tensors.
    `full` keeps only the block input, `selective` drops the attention core's own (the LSE)."""
    h, d = config.hidden, config.dim_per_head
    res_tokens = tokens // tp if sp else tokens
    if recompute == "full":
        return res_tokens * h * res
    norms = norm_bytes(config, res_tokens, res) * (4 if config.post_norms else 2)
    inputs = 2 * tokens * h * lin
    qkvo = tokens * (2 * config.heads + 2 * config.num_kv_heads) // tp * d * lin
    lse = 0 if recompute == "selective" else batch * config.heads // tp * seq * FP32
    if config.qk_norm:  # RMSNorm over each head of q and k: input, normalized, 1/rms per head
        heads = (config.heads + config.num_kv_heads) // tp
        qkvo += tokens * heads * (2 * d * lin + FP32)
    inner = (4 if config.gated_mlp else 2) * tokens * config.ffn_hidden // tp * lin
    if moe_layer:  # modelled, uniform routing: each TP rank routes 1/tp of the tokens (layers/
        moe = config.moe  # moe.py); the router's fp32 logits, each routed copy's input and combine
        local = tokens // tp  # weight, the experts' inner tensors, the shared experts'
        routed = local * moe.top_k
        inner = local * moe.experts * FP32 + routed * (2 * h * lin + FP32) \
            + 4 * routed * moe.expert_ffn_hidden * lin + 4 * local * moe.shared_ffn_hidden * lin
    return norms + inputs + qkvo + lse + inner


def activation_bytes(job: Job, model: TransformerLM, hw: Hardware) -> int:
    """One micro-batch's saved tensors on this stage: its blocks, the embedding's ids and the rope
    tables (first stage), the final norm and the head's input (last stage; the fused loss keeps
    the head input itself)."""
    cfg, par = job.cfg, job.par
    res, lin = _dtypes(job, hw)
    b, s = cfg.data.micro_batch, cfg.data.seq_len
    tokens, config = b * s, cfg.model
    layer = functools.partial(layer_activation_bytes, config, tokens=tokens, batch=b, seq=s,
                              tp=par.tp, sp=par.sp, recompute=cfg.train.recompute, res=res,
                              lin=lin)
    total = sum(layer(moe_layer=config.is_moe_layer(int(i))) for i in model.decoder)
    res_tokens = tokens // par.tp if par.sp else tokens
    if model.plan.has_embedding:
        total += tokens * INT64
    if model.rotary is not None and cfg.train.recompute == "none":  # else the core recomputes
        total += 2 * s * (config.rotary_dim // 2) * FP32
    if model.plan.has_head:
        norm = norm_bytes(config, res_tokens, res)
        head_input = 0 if cfg.distill.fused_lm_head else tokens * config.hidden * res
        # each MTP block reads the trunk's output, which the final norm keeps already
        shared_input = res_tokens * config.hidden * res
        total += (1 + config.mtp_heads) * (norm + head_input) + config.mtp_heads * (
            layer() - shared_input)
    return total


def logits_bytes(job: Job, *, itemsize: int) -> int:
    cfg = job.cfg
    return cfg.data.micro_batch * cfg.data.seq_len * cfg.model.padded_vocab(job.par.tp) \
        // job.par.tp * itemsize


def loss_bytes(job: Job, hw: Hardware) -> int:
    """The last stage's loss working set for one micro-batch: without the fused head the student's
    logits shard, its gradient and the teacher's; fused, one row block of both models' logits
    (distill/fused.py's budget)."""
    cfg, teacher_item = job.cfg, _teacher_item(job)
    if cfg.distill.fused_lm_head:
        from distill.fused import DEFAULT_BLOCK_BYTES, block_rows

        vocab = cfg.model.padded_vocab(job.par.tp) // job.par.tp
        # each model's logits, and a soft-capped student's derivative of the cap
        arrays = (2 if job.teacher is not None else 1) + (cfg.model.final_logit_softcap is not None)
        rows = block_rows(n_tokens=cfg.data.micro_batch * cfg.data.seq_len, shard_vocab=vocab,
                          arrays=arrays, itemsize=FP32,
                          budget=DEFAULT_BLOCK_BYTES["cuda" if hw.gpu else "cpu"])
        return rows * vocab * arrays * FP32
    student = 2 * logits_bytes(job, itemsize=FP32)
    teacher = logits_bytes(job, itemsize=teacher_item) if job.teacher is not None else 0
    return student + teacher


def _teacher_item(job: Job) -> int:
    return BF16 if job.cfg.distill.teacher_bf16 else FP32


def teacher_output_bytes(job: Job, last: bool) -> int:
    """The teacher outputs a student rank holds at once: one micro-batch's (colocated; the logits
    are counted with the loss, the fused head keeps the teacher's head input), `prefetch` + 1
    posted and in use (teacher ranks), the top-k rows (offline)."""
    cfg = job.cfg
    tokens, item = cfg.data.micro_batch * cfg.data.seq_len, _teacher_item(job)
    schedule = cfg.distill.schedule
    if schedule == "offline" and cfg.distill.cross_tokenizer.on:  # the chunk statistics
        return cross_tokenizer_payload(job) if last else 0
    if schedule == "offline":  # fp32 values, int32 ids, one fp32 log-sum-exp per token
        return tokens * (offline_k(job) * (FP32 + INT32) + FP32) if last else 0
    if job.teacher is None or not last:
        return 0
    if schedule == "teacher_ranks":
        return (cfg.distill.prefetch + 1) * stream_payload(job)
    return tokens * job.teacher.hidden * item if cfg.distill.fused_lm_head else 0


def stream_payload(job: Job) -> int:
    """One micro-batch's tensors on the wire from a teacher rank to a student rank: the teacher's
    final hidden states (this rank's sequence shard under SP) or its logit shard; with
    cross_tokenizer its chunk statistics instead (`cross_tokenizer_payload`)."""
    cfg, item = job.cfg, _teacher_item(job)
    if cfg.distill.cross_tokenizer.on:
        return cross_tokenizer_payload(job)
    if cfg.distill.teacher_stream == "logits":
        return logits_bytes(job, itemsize=item)
    hidden = cfg.data.micro_batch * cfg.data.seq_len * job.teacher.hidden * item
    return hidden // job.par.tp if job.par.sp else hidden


def cross_tokenizer_payload(job: Job) -> int:
    """The teacher's chunk statistics of one micro-batch (distill/cross_tokenizer.py STATS), as
    teacher ranks stream them and an offline store's reader holds them: fp32 [micro_batch, seq]
    values each but for uld's [.., uld_top_k] top probabilities and mapped_kl's [.., hidden_t]
    head input in the teacher's dtype."""
    cfg = job.cfg
    cross, rows = cfg.distill.cross_tokenizer, cfg.data.micro_batch * cfg.data.seq_len
    width = {"likelihood": FP32, "uld": cross.uld_top_k * FP32,
             "mapped_kl": job.teacher.hidden * _teacher_item(job)}[cross.loss]
    return rows * (FP32 + width)


def student_memory(job: Job, pp_rank: int, hw: Hardware) -> RankMemory:
    cfg, par = job.cfg, job.par
    model = student_model(job, pp_rank)
    params = trainable(job, pp_rank)
    sharded = cfg.train.distributed_optimizer
    ddp = job.dp > 1 and par.pp == 1 and not sharded
    flight = in_flight(job, pp_rank)
    teacher = teacher_model(job, pp_rank) if cfg.distill.schedule == "colocated" else None
    teacher_weights = nbytes(teacher.parameters()) * _teacher_item(job) // FP32 if teacher else 0
    if cfg.distill.schedule == "teacher_ranks" and model.plan.has_head and job.teacher:
        # hidden streaming: this rank's [padded_vocab/tp, teacher hidden] output-layer shard
        teacher_weights = cfg.model.padded_vocab(par.tp) // par.tp * job.teacher.hidden \
            * _teacher_item(job)
    last = model.plan.has_head
    weights = nbytes(model.parameters()) + nbytes(
        _objective(job, rank_layout(job, pp_rank=pp_rank)).parameters())
    if sharded:  # the parameters live in the padded buckets
        weights += sum(shard * ranks * m[0].element_size() for m, shard, ranks in
                       dp_buckets(params, job.dp, par.ep)) - nbytes(params)
    return RankMemory(
        rank=f"student stage {pp_rank}", params=weights,
        grads=nbytes(params), grad_buckets=nbytes(params) if ddp else 0,
        optimizer=optimizer_bytes(params, dp=job.dp, sharded=sharded, ep=par.ep),
        teacher_weights=teacher_weights, teacher_outputs=teacher_output_bytes(job, last),
        activations=flight * activation_bytes(job, model, hw),
        loss=loss_bytes(job, hw) if last else 0, in_flight=flight)


def teacher_rank_memory(job: Job) -> RankMemory:
    """A teacher rank: its weights at teacher_tp, and the sends in flight (`prefetch` micro-batches
    to each student rank it serves); no gradients, nothing kept for a backward."""
    cfg, item = job.cfg, _teacher_item(job)
    served = job.students // job.par.teacher_ranks  # student ranks per teacher rank
    return RankMemory(rank="teacher rank", params=nbytes(teacher_model(job, 0).parameters())
                      * item // FP32,
                      teacher_outputs=cfg.distill.prefetch * served * stream_payload(job),
                      in_flight=0)


def memory(job: Job, hw: Hardware) -> list[RankMemory]:
    ranks = [student_memory(job, p, hw) for p in range(job.par.pp)]
    if job.par.teacher_ranks and job.teacher is not None:
        ranks.append(teacher_rank_memory(job))
    return ranks


# ---------------------------------------------------------------------- communication
Comm = Counter  # (group, kind) -> bytes per optimizer step


def _tp_forward(comm: Comm, model: TransformerLM, *, tokens: int, hidden: int, tp: int, sp: bool,
                res: int, lin: int, recompute_full: bool = False) -> None:
    """One forward of this stage's part of `model` over `tokens` tokens (the entry point's
    collectives, engine/mappings.py): the vocab-parallel embedding, each block's two TP regions,
    the head's input; a fully recomputed block re-runs its forward up to its last saved tensor
    (both entries, the attention's exit: not the MLP's exit)."""
    if tp == 1:
        return
    full, shard = tokens * hidden, tokens * hidden // tp
    exit_kind = "reduce_scatter" if sp else "all_reduce"
    blocks = len(model.decoder) + len(model.mtp)
    if model.plan.has_embedding:
        comm[("tp", exit_kind)] += full * res
    comm[("tp", exit_kind)] += 2 * blocks * full * lin
    if sp:
        comm[("tp", "all_gather")] += 2 * blocks * shard * res
    if recompute_full:
        comm[("tp", exit_kind)] += blocks * full * lin
        if sp:
            comm[("tp", "all_gather")] += 2 * blocks * shard * res
    if model.plan.has_head and sp:
        comm[("tp", "all_gather")] += (1 + len(model.mtp)) * shard * res


def _tp_backward(comm: Comm, model: TransformerLM, *, tokens: int, hidden: int, tp: int,
                 sp: bool, res: int, lin: int) -> None:
    """The student's backward: the mirror of each forward collective, and the TP sum of the
    gradients of replicated parameters used on sequence shards (norms, row biases, learned
    positions: `sp_shared`)."""
    if tp == 1:
        return
    full, shard = tokens * hidden, tokens * hidden // tp
    blocks = len(model.decoder) + len(model.mtp)
    heads = (1 + len(model.mtp)) if model.plan.has_head else 0
    if sp:
        comm[("tp", "reduce_scatter")] += (2 * blocks + heads) * full * res
        comm[("tp", "all_gather")] += (2 * blocks + model.plan.has_embedding) * shard * lin
        comm[("tp", "all_reduce")] += _sp_shared_bytes(model)
    else:
        comm[("tp", "all_reduce")] += (2 * blocks + heads) * full * res
    comm[("tp", "all_reduce")] += _head_norm_bytes(model)


def _sp_shared_bytes(model: TransformerLM) -> int:
    """Gradient bytes of the replicated parameters applied to sequence shards, per backward."""
    total = 0
    for module in model.modules():
        if isinstance(module, RMSNorm) and not module.on_head_shards:
            total += nbytes([module.weight])
        elif isinstance(module, LayerNorm):
            total += nbytes([module.weight, module.bias])
        elif isinstance(module, RowParallelLinear) and module.bias is not None:
            total += nbytes([module.bias])
    return total  # (learned positions: the rows used, see student_comm)


def _head_norm_bytes(model: TransformerLM) -> int:
    """QK-norm weights on head shards: copied into the TP region, their gradients summed."""
    return sum(nbytes([m.weight]) for m in model.modules()
               if isinstance(m, RMSNorm) and m.on_head_shards)


def _loss_comm(comm: Comm, job: Job, *, tokens: int) -> None:
    """The last stage's vocab-parallel loss statistics (distill/_plan.py): one all_gather of
    [tokens, width] per call, plus [tokens, 2] all_reduced by the two-pass kinds; MTP heads'
    cross-entropies each their own call."""
    cfg = job.cfg
    if job.par.tp == 1:
        return
    distill, lm_on = cfg.distill, cfg.distill.lm_on
    if distill.schedule == "offline":  # the cross-entropy, then the top-k divergence's own
        _offline_loss_comm(comm, job, tokens=tokens)
        return
    kind = distill.logit.kind if distill.logit.on and job.teacher is not None else None
    plan = make_plan(kind=kind, with_ce=lm_on, shard_vocab=1, dtype=torch.float32, vocab_size=1,
                     group=None, device=torch.device("cpu"), temperature=distill.logit.temperature,
                     diagnostics=distill.diagnostics and distill.schedule != "offline")
    if kind is not None or lm_on:
        comm[("tp", "all_gather")] += tokens * len(plan.columns) * FP32
    if kind is not None and not plan.one_pass:
        comm[("tp", "all_reduce")] += tokens * 2 * FP32
    if lm_on:
        ce = make_plan(kind=None, with_ce=True, shard_vocab=1, dtype=torch.float32, vocab_size=1,
                       group=None, device=torch.device("cpu"))
        comm[("tp", "all_gather")] += cfg.model.mtp_heads * tokens * len(ce.columns) * FP32


def offline_k(job: Job) -> int:
    """The top-k of the offline export (`distill.offline_dir`'s metadata)."""
    from distill.offline import read_metadata

    return int(read_metadata(job.cfg.distill.offline_dir)["k"])


def _offline_loss_comm(comm: Comm, job: Job, *, tokens: int) -> None:
    """An offline teacher: the LM loss's cross-entropy statistics, and the top-k divergence's one
    all_gather of [tokens, k + 3] (distill/_topk.py)."""
    cfg = job.cfg
    if cfg.distill.lm_on:
        ce = make_plan(kind=None, with_ce=True, shard_vocab=1, dtype=torch.float32, vocab_size=1,
                       group=None, device=torch.device("cpu"))
        comm[("tp", "all_gather")] += (1 + cfg.model.mtp_heads) * tokens * len(ce.columns) * FP32
    if cfg.distill.logit.on:
        comm[("tp", "all_gather")] += tokens * (offline_k(job) + 3) * FP32


def _pipeline_comm(comm: Comm, job: Job, pp_rank: int, *, hidden_bytes: int,
                   teacher_bytes: int) -> None:
    """Point-to-point per micro-batch and chunk: the residual stream (and a colocated teacher's,
    in lockstep) to the next virtual stage, its gradient back (engine/pipeline.py)."""
    par, m = job.par, job.micro_batches
    last = par.pp * par.virtual_stages - 1
    for chunk in range(par.virtual_stages):
        virtual = chunk * par.pp + pp_rank
        if virtual > 0:
            comm[("pp", "recv")] += m * (hidden_bytes + teacher_bytes)
            comm[("pp", "send")] += m * hidden_bytes
        if virtual < last:
            comm[("pp", "send")] += m * (hidden_bytes + teacher_bytes)
            comm[("pp", "recv")] += m * hidden_bytes


def _dp_comm(comm: Comm, job: Job, params: list[torch.nn.Parameter]) -> None:
    """Gradient sums over DP: DDP's bucketed all_reduce, the pipeline's one flat all_reduce, or
    the distributed optimizer's reduce_scatter of each padded bucket, the all_gather of the
    updated slices and its has-gradient vote and norm squares."""
    cfg, dp = job.cfg, job.dp
    if dp == 1:
        return
    if not cfg.train.distributed_optimizer:
        # routed experts are summed over their expert-DP group (dp / ep ranks), not by DDP
        experts = [p for p in params if param_tags(p).expert]
        comm[("dp", "all_reduce")] += nbytes([p for p in params if not param_tags(p).expert])
        if experts and dp // job.par.ep > 1:
            comm[("expert_dp", "all_reduce")] += nbytes(experts)
        return
    ep = job.par.ep
    for members, shard, ranks in dp_buckets(params, dp, ep):
        if ranks > 1:  # the experts' buckets under EP: over the expert-DP group
            group = "dp" if ranks == dp else "expert_dp"
            comm[(group, "reduce_scatter")] += shard * ranks * members[0].element_size()
            comm[(group, "all_gather")] += shard * members[0].element_size()
    # the has-gradient vote (under EP each EP rank's copy of the expert entries) and norm squares
    comm[("dp", "all_reduce")] += len(params) * ep * INT32 + 2 * FP64


def _step_comm(comm: Comm, job: Job) -> None:
    """What every step adds: the token counts and the loss terms summed over DP (and the terms over
    the pipeline), the gradient-norm squares over TP and PP, the stop vote over the students."""
    cfg, par = job.cfg, job.par
    objective = _objective(job, rank_layout(job, pp_rank=0))
    moe_terms = 2 if cfg.model.moe is not None else 0  # moe_aux_loss, moe_z_loss
    terms = (4 + len(objective.metric_names()) + moe_terms) * FP64
    if job.dp > 1:
        # the token counts (distill/objective.py count_tokens: tokens, one per head, distilled,
        # and four cross-tokenizer chunk counts, four more per named teacher tokenization) and
        # the step's terms
        named = sum(1 for t in cfg.distill.paired_tokenizers if t)
        comm[("dp", "all_reduce")] += (7 + cfg.model.mtp_heads + 4 * named) * INT64 + terms
    if par.pp > 1:
        comm[("pp", "all_reduce")] += terms + FP64
    if par.tp > 1:
        comm[("tp", "all_reduce")] += FP64
    if job.students > 1:
        comm[("role", "all_reduce")] += INT32


def _teacher_stream(comm: Comm, job: Job, last: bool) -> None:
    """Teacher ranks: per micro-batch a tag (checksum, signal), the payload, and an
    acknowledgement back (distill/teacher_wire.py), steady state."""
    m = job.micro_batches
    payload = stream_payload(job) if last else 0
    comm[("teacher", "recv")] += m * (2 * INT64 + payload)
    comm[("teacher", "send")] += m * INT64


def student_comm(job: Job, pp_rank: int, hw: Hardware) -> Comm:
    """Bytes per optimizer step of one student rank of pipeline stage `pp_rank`, per (group,
    kind), as engine/collectives.py counts them (`comm_bytes/<group>` sums the kinds)."""
    cfg, par, comm = job.cfg, job.par, Comm()
    res, lin = _dtypes(job, hw)
    model, m = student_model(job, pp_rank), job.micro_batches
    tokens = cfg.data.micro_batch * cfg.data.seq_len
    shape = dict(tokens=tokens, tp=par.tp, sp=par.sp, res=res, lin=lin)
    for _ in range(m):
        _tp_forward(comm, model, hidden=cfg.model.hidden,
                    recompute_full=cfg.train.recompute == "full", **shape)
        _tp_backward(comm, model, hidden=cfg.model.hidden, **shape)
        teacher = teacher_model(job, pp_rank) if cfg.distill.schedule == "colocated" else None
        if teacher is not None:
            t_item = _teacher_item(job)
            _tp_forward(comm, teacher, hidden=job.teacher.hidden,
                        **{**shape, "res": t_item, "lin": t_item})
        if model.plan.has_head:
            _loss_comm(comm, job, tokens=tokens)
    if model.position_embedding is not None and par.sp:
        comm[("tp", "all_reduce")] += m * cfg.data.seq_len * cfg.model.hidden * FP32
    if par.pp > 1:
        res_tokens = tokens // par.tp if par.sp else tokens
        colocated = job.teacher is not None and cfg.distill.schedule == "colocated"
        _pipeline_comm(comm, job, pp_rank, hidden_bytes=res_tokens * cfg.model.hidden * res,
                       teacher_bytes=res_tokens * job.teacher.hidden * _teacher_item(job)
                       if colocated else 0)
        if cfg.model.tie_embeddings and (model.plan.has_embedding or model.plan.has_head):
            comm[("embedding", "all_reduce")] += nbytes([model.embedding.weight])
    if cfg.distill.schedule == "teacher_ranks" and job.teacher is not None:
        _teacher_stream(comm, job, model.plan.has_head)
    _expert_comm(comm, job, model, tokens=tokens, lin=lin)
    _dp_comm(comm, job, trainable(job, pp_rank))
    _step_comm(comm, job)
    return Comm({k: v for k, v in comm.items() if v})


def _expert_comm(comm: Comm, job: Job, model: TransformerLM, *, tokens: int, lin: int) -> None:
    """MoE blocks under EP: the per-expert row counts, then dispatch and combine all_to_all forward
    and backward, assuming every token's top-k copies stay as many as they are (the real split
    follows the routing: measured within 1% at EP 2, 4 experts top-2). With experts split over TP
    (`etp`): the counts all-gathered over TP, every rank's rows to every TP rank and the partial
    outputs back, forward and backward."""
    moe, par = job.cfg.model.moe, job.par
    if moe is None or (par.ep == 1 and par.etp == 1):
        return
    layers = sum(job.cfg.model.is_moe_layer(int(i)) for i in model.decoder)
    per_pass = tokens // par.tp * moe.top_k * job.cfg.model.hidden * lin  # 1/tp routed here
    counts = moe.experts * INT64  # the rows per expert, exchanged before the dispatch
    if par.etp > 1:
        comm[("tp", "all_to_all")] += job.micro_batches * layers * 4 * par.etp * per_pass
        comm[("tp", "all_gather")] += job.micro_batches * layers * counts
    if par.ep == 1:
        return
    comm[("ep", "all_to_all")] += job.micro_batches * layers * (4 * per_pass + counts)
    if not job.cfg.train.distributed_optimizer:  # (whose norm sums the experts' slices over DP)
        comm[("ep", "all_reduce")] += 8  # the gradient norm's float64 sum of the experts' squares


def teacher_rank_comm(job: Job) -> Comm:
    """One teacher rank per student step: its TP forward of every micro-batch it serves and the
    stream to its students (modelled, not counted by the trainer)."""
    cfg, comm = job.cfg, Comm()
    model, item = teacher_model(job, 0), _teacher_item(job)
    tokens = cfg.data.micro_batch * cfg.data.seq_len
    replicas = job.dp // (job.par.teacher_ranks // job.par.teacher_tp_degree)
    for _ in range(job.micro_batches * replicas):
        _tp_forward(comm, model, tokens=tokens, hidden=job.teacher.hidden,
                    tp=job.par.teacher_tp_degree, sp=False, res=item, lin=item)
    moe = job.teacher.moe
    if moe is not None and job.par.teacher_ep > 1:  # dispatch and combine, forward only
        layers = sum(job.teacher.is_moe_layer(int(i)) for i in model.decoder)
        tokens_here = tokens // job.par.teacher_tp_degree  # each TP rank routes its 1/tp share
        per_pass = tokens_here * moe.top_k * job.teacher.hidden * item
        comm[("ep", "all_to_all")] += job.micro_batches * replicas * layers * (
            2 * per_pass + moe.experts * INT64)
    stream = Comm()
    _teacher_stream(stream, job, True)
    served = job.students // job.par.teacher_ranks  # student ranks per teacher rank
    comm[("teacher", "send")] += stream[("teacher", "recv")] * served
    comm[("teacher", "recv")] += stream[("teacher", "send")] * served
    return comm


# ------------------------------------------------------------------------------ time
def group_span(job: Job, group: str, hw: Hardware) -> tuple[int, bool]:
    """(ranks in `group`, whether they span nodes) under the engine's rank order: TP innermost,
    then PP, then DP (engine/parallel.py RankOrder)."""
    par = job.par
    size, stride = {"tp": (par.tp, 1), "pp": (par.pp, par.tp), "dp": (job.dp, par.tp * par.pp),
                    "embedding": (2, par.tp * (par.pp - 1)), "ep": (par.ep, par.tp * par.pp),
                    "role": (job.students, 1), "teacher": (2, job.students)}[group]
    return size, (size - 1) * stride + 1 > hw.gpus_per_node


def bus_bytes(kind: str, nbytes_: int, size: int) -> float:
    """Bytes each rank moves over its link for a payload of `nbytes_` (ring algorithms)."""
    if kind == "all_reduce":
        return 2 * (size - 1) / size * nbytes_
    if kind == "all_gather":
        return (size - 1) * nbytes_
    if kind in ("reduce_scatter", "all_to_all"):
        return (size - 1) / size * nbytes_
    return nbytes_  # send / recv


def comm_seconds(job: Job, comm: Comm, hw: Hardware) -> dict[str, float]:
    seconds: Counter = Counter()
    for (group, kind), nb in comm.items():
        size, cross = group_span(job, group, hw)
        gbps = hw.inter_node_gbps if cross else hw.intra_node_gbps
        seconds[group] += bus_bytes(kind, nb, max(size, 2)) / (gbps * 1e9)
    return dict(seconds)


def model_flops(config: ModelConfig, *, tokens: int, seq: int, forward_only: bool = False) -> float:
    """Matmul FLOPs of a forward (x3 with the backward) over `tokens` tokens: 2 per active
    parameter per token plus causal attention's scores and values (2 * 2 * seq/2 * hidden per
    token per layer)."""
    h, f = config.hidden, config.ffn_hidden
    kv = config.num_kv_heads * config.dim_per_head
    attn = h * config.heads * config.dim_per_head * 2 + 2 * h * kv
    dense = (3 if config.gated_mlp else 2) * h * f
    moe = config.moe
    sparse = 0 if moe is None else 3 * h * (moe.expert_ffn_hidden * moe.top_k
                                              + moe.shared_ffn_hidden) + h * moe.experts
    mlp = sum(sparse if config.is_moe_layer(i) else dense for i in range(config.layers))
    per_token = 2 * (config.layers * attn + mlp + h * config.vocab_size)
    per_token += config.layers * 2 * seq * config.heads * config.dim_per_head
    return per_token * tokens * (1 if forward_only else 3)


@dataclass
class StepTime:
    compute_s: float
    exposed_comm_s: dict[str, float]
    bubble: float  # fraction of the step the pipeline idles
    step_s: float
    tokens_per_s: float
    mfu: float


def step_time(job: Job, comms: list[Comm], hw: Hardware) -> StepTime | None:
    """Compute at `efficiency` x peak, TP/SP/PP/EP traffic exposed, DP and the teacher stream
    overlapped with compute (only their excess shows), times the pipeline's (m + pp - 1) / m."""
    if hw.flops is None:
        return None
    cfg, par = job.cfg, job.par
    s = cfg.data.seq_len
    tokens = cfg.data.global_batch * s
    recompute = {"none": 1.0, "selective": 1.0, "full": 4 / 3}[cfg.train.recompute]
    student = model_flops(cfg.model, tokens=tokens, seq=s) * recompute
    teacher = model_flops(job.teacher, tokens=tokens, seq=s, forward_only=True) \
        if job.teacher is not None else 0.0
    local = teacher if cfg.distill.schedule == "colocated" else 0.0
    rate = hw.flops * 1e12 * hw.efficiency
    compute = (student + local) / job.students / rate
    worst = max(comms, key=lambda c: sum(c.values()))
    seconds = comm_seconds(job, worst, hw)
    exposed = {g: t for g, t in seconds.items() if g in ("tp", "pp", "ep", "role", "embedding")}
    exposed.update({g: max(0.0, seconds[g] - compute) for g in ("dp", "teacher") if g in seconds})
    m, v = job.micro_batches, par.virtual_stages
    bubble = (par.pp - 1) / (v * m + par.pp - 1) if par.pp > 1 else 0.0
    busy = compute + sum(exposed.values())
    step = busy / (1 - bubble)
    if cfg.distill.schedule == "teacher_ranks" and job.teacher is not None:
        step = max(step, teacher / par.teacher_ranks / rate)
    useful = student / recompute + teacher
    return StepTime(compute, exposed, bubble, step, tokens / step,
                    useful / (step * job.world * hw.flops * 1e12))


# ------------------------------------------------------------------------------ the plan
@dataclass
class Plan:
    layout: dict
    memory: list[RankMemory]
    comm: dict[str, dict[str, int]]  # rank -> "group/kind" -> bytes per step
    time: StepTime | None = None
    fits: bool | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"layout": self.layout, "memory": [m.as_dict() for m in self.memory],
                "comm_bytes_per_step": self.comm,
                "time": dataclasses.asdict(self.time) if self.time else None, "fits": self.fits,
                "notes": self.notes}


def layout_of(job: Job) -> dict:
    cfg, par = job.cfg, job.par
    return {"gpus": job.world, "tp": par.tp, "sp": par.sp, "pp": par.pp,
            "virtual_stages": par.virtual_stages, "dp": job.dp, "ep": par.ep,
            "teacher_ranks": par.teacher_ranks, "teacher_tp": par.teacher_tp_degree,
            "schedule": cfg.distill.schedule, "recompute": cfg.train.recompute,
            "distributed_optimizer": cfg.train.distributed_optimizer,
            "fused_lm_head": cfg.distill.fused_lm_head, "teacher_bf16": cfg.distill.teacher_bf16,
            "micro_batch": cfg.data.micro_batch, "micro_batches": job.micro_batches}


def plan(job: Job, hw: Hardware) -> Plan:
    check_job(job)
    comms = {f"student stage {p}": student_comm(job, p, hw) for p in range(job.par.pp)}
    if job.par.teacher_ranks and job.teacher is not None:
        comms["teacher rank"] = teacher_rank_comm(job)
    mem = memory(job, hw)
    result = Plan(layout_of(job), mem,
                  {rank: {f"{g}/{k}": b for (g, k), b in sorted(c.items())}
                   for rank, c in comms.items()},
                  time=step_time(job, list(comms.values()), hw))
    if hw.gpu_mem_gib is not None:
        result.fits = max(m.peak for m in mem) <= hw.gpu_mem_gib * GIB
    result.notes = caveats(job)
    return result


def caveats(job: Job) -> list[str]:
    """What this run uses that the plan leaves out or only estimates."""
    cfg, notes = job.cfg, []
    distill = cfg.distill
    if distill.activations:
        notes.append("activation-pair losses: their collectives and buffers are not modelled")
    if distill.on_policy.on:
        notes.append("on-policy sampling: its generation is not modelled")
    if distill.teachers:
        notes.append("several teachers: only one teacher is modelled")
    if cfg.model.dropout > 0:
        notes.append("dropout > 0: attention's unfused path keeps [seq, seq] tensors, not modelled")
    if cfg.model.moe is not None or (job.teacher is not None and job.teacher.moe is not None):
        notes.append("experts: MoE blocks' traffic (tokens split over TP, expert gradients "
                     "summed over TP, all_to_all) and activations are estimates (uniform routing)")
    return notes


# ---------------------------------------------------------------------------- search
def candidate_overrides(job: Job, gpus: int, hw: Hardware) -> list[list[str]]:
    """Every layout of `gpus` GPUs worth trying: TP within a node (with SP), PP over the layers
    (interleaved x2 too), DP the rest, the distributed optimizer, each recompute mode, and the
    teacher colocated or on a quarter / half of the GPUs at TP 8."""
    layers = job.cfg.model.layers
    teacher_shares = [0]
    if job.cfg.distill.schedule in ("colocated", "teacher_ranks") and job.teacher is not None:
        teacher_shares += [gpus // share for share in (4, 2) if gpus // share >= 1]
    tps = [t for t in (1, 2, 4, 8) if t <= hw.gpus_per_node]
    pps = [(p, v) for p in (1, 2, 4, 8) if layers % p == 0 for v in ((1, 2) if p > 1 else (1,))]
    out = []
    for tp, (pp, v), dist_opt, recompute, ranks in itertools.product(
            tps, pps, (False, True), ("none", "selective", "full"), teacher_shares):
        out.append([f"parallel.tp={tp}", f"parallel.sp={tp > 1}", f"parallel.pp={pp}",
                    f"parallel.virtual_stages={v}", f"train.distributed_optimizer={dist_opt}",
                    f"train.recompute={recompute}",
                    *_teacher_overrides(job, ranks, hw, students=(gpus - ranks, tp * pp))])
    return out


def _teacher_overrides(job: Job, ranks: int, hw: Hardware, *,
                       students: tuple[int, int]) -> list[str]:
    """Colocated (`ranks` 0), or on `ranks` GPUs at TP up to a node; under PP the stream keeps a
    step's micro-batches in flight (runconfig.check_pipeline). `students`: (student ranks, TP x
    PP)."""
    if ranks == 0:
        return ["distill.schedule=colocated", "parallel.teacher_ranks=0"]
    data, (ranks_left, model_parallel) = job.cfg.data, students
    micro_batches = data.global_batch // (data.micro_batch * max(1, ranks_left // model_parallel))
    prefetch = max(job.cfg.distill.prefetch, micro_batches if model_parallel > 1 else 0)
    return ["distill.schedule=teacher_ranks", f"parallel.teacher_ranks={ranks}",
            f"parallel.teacher_tp={min(hw.gpus_per_node, ranks)}", f"distill.prefetch={prefetch}"]


def search(config: str, overrides: list[str], hw: Hardware, *, student_hf=None,
           teacher_hf=None) -> tuple[list[Plan], list[str]]:
    """(the fitting layouts, fastest first; one line per rejected layout)."""
    base = load_job(config, overrides, world=hw.gpus, student_hf=student_hf, teacher_hf=teacher_hf)
    fitting, rejected = [], []
    for extra in candidate_overrides(base, hw.gpus, hw):
        name = " ".join(o for o in extra if not o.startswith("distill.prefetch"))
        try:
            job = load_job(config, [*overrides, *extra], world=hw.gpus, student_hf=student_hf,
                           teacher_hf=teacher_hf)
            result = plan(job, hw)
        except ConfigError as err:
            rejected.append(f"{name}: {err}")
            continue
        worst = max(result.memory, key=lambda m: m.peak)
        if result.fits:
            fitting.append(result)
        else:
            rejected.append(f"{name}: {worst.rank} needs {worst.peak / GIB:.1f} GiB > "
                            f"{hw.gpu_mem_gib:g} GiB")
    fitting.sort(key=lambda p: -(p.time.tokens_per_s if p.time else 0.0))
    return fitting, rejected


# --------------------------------------------------------------------------- report
def _gib(n: int) -> str:
    return f"{n / GIB:8.2f}" if n >= 2**24 else f"{n / 2**20:7.2f}M"


def report(result: Plan) -> str:
    lines = ["layout: " + " ".join(f"{k}={v}" for k, v in result.layout.items()), "",
             "memory per rank (GiB, M = MiB)  params    grads  buckets optimizer t.weights "
             "t.outputs activations(in flight)   loss     peak"]
    for m in result.memory:
        lines.append(f"  {m.rank:28s} {_gib(m.params)} {_gib(m.grads)} {_gib(m.grad_buckets)} "
                     f"{_gib(m.optimizer)}  {_gib(m.teacher_weights)}  {_gib(m.teacher_outputs)}"
                     f"    {_gib(m.activations)} ({m.in_flight})   {_gib(m.loss)} {_gib(m.peak)}")
    lines += ["", "communication per step (bytes, as engine/collectives.py counts them)"]
    for rank, comm in result.comm.items():
        lines.append(f"  {rank}: " + ", ".join(f"{k} {v:,}" for k, v in comm.items()))
    if result.time is not None:
        t = result.time
        lines += ["", f"step {t.step_s:.3f} s (compute {t.compute_s:.3f} s, exposed comm "
                      + ", ".join(f"{g} {s:.3f} s" for g, s in t.exposed_comm_s.items())
                      + f", bubble {t.bubble:.1%}): {t.tokens_per_s:,.0f} tokens/s, "
                        f"MFU {t.mfu:.1%}"]
    if result.fits is not None:
        lines.append(f"fits: {'yes' if result.fits else 'NO'}")
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="memory, communication and step time of a "
                                            "distillation run, before it is launched")
    p.add_argument("--config", required=True, help="YAML run configuration")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--student-hf", help="the student's Hugging Face config.json (or its "
                                        "directory), or a run config YAML with its model section")
    p.add_argument("--teacher-hf", help="the teacher's, likewise (default: its checkpoint's)")
    p.add_argument("--gpus", type=int, help="GPUs in the job (default: the layout's minimum)")
    p.add_argument("--gpu-mem-gib", type=float, help="memory per GPU")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--intra-node-gbps", type=float, default=450.0, help="GB/s per GPU in a node")
    p.add_argument("--inter-node-gbps", type=float, default=50.0, help="GB/s per GPU across nodes")
    p.add_argument("--flops", type=float, help="peak TFLOP/s per GPU (H100 bf16 dense: 989)")
    p.add_argument("--efficiency", type=float, default=0.5,
                   help="fraction of the peak the kernels achieve")
    p.add_argument("--search", action="store_true", help="rank the layouts that fit --gpus")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    if args.search and (args.gpus is None or args.gpu_mem_gib is None):
        p.error("--search needs --gpus and --gpu-mem-gib")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hw = Hardware(gpus=args.gpus, gpu_mem_gib=args.gpu_mem_gib, gpus_per_node=args.gpus_per_node,
                  intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps,
                  flops=args.flops, efficiency=args.efficiency)
    models = dict(student_hf=args.student_hf, teacher_hf=args.teacher_hf)
    try:
        if args.search:
            fitting, rejected = search(args.config, args.overrides, hw, **models)
            if args.json:
                print(json.dumps({"fitting": [p.as_dict() for p in fitting],
                                  "rejected": rejected}, indent=1))
            else:
                print(f"{len(fitting)} layouts fit, fastest first:")
                for p in fitting:
                    tps = f"{p.time.tokens_per_s:,.0f} tokens/s" if p.time else ""
                    peak = max(m.peak for m in p.memory) / GIB
                    print(f"  {tps:>18s} peak {peak:5.1f} GiB  "
                          + " ".join(f"{k}={v}" for k, v in p.layout.items()))
                print(f"{len(rejected)} rejected:")
                print("\n".join(f"  {line}" for line in rejected))
            return 0
        result = plan(load_job(args.config, args.overrides, world=args.gpus, **models), hw)
    except ConfigError as err:
        print(f"ConfigError: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict(), indent=1) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
