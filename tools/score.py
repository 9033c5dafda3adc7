"""Per-token log-probabilities of given token ids, or validation perplexity, under a checkpoint.

    torchrun --nproc_per_node N tools/score.py --ckpt CKPT_DIR --tokens TOKENS.npy --out LOGPROBS.npy
    torchrun --nproc_per_node N tools/score.py --ckpt CKPT_DIR --data PREFIX [--seq-len L] [--batches N]
                                                [--bpb [--tokenizer TOKENIZER.json]]

`--tokens` holds integer ids `[batch, seq]`; `--out` gets float32 `log p(token[t+1] | token[..t])`
`[batch, seq-1]`, the way to check a converted checkpoint against another framework. `--data`
(an indexed-dataset prefix, or `default` for the bundled corpus) prints one JSON line with the mean
next-token loss and the perplexity over `--batches` batches of its validation split, drawn exactly
as training draws them (engine.data.TokenBatches), so teacher, student and baseline scored with the
same flags see the same tokens whatever their TP degree.

`--bpb` adds `bits_per_byte`: the same loss in bits over the bytes of the labels scored, the unit
that compares models with different tokenizers. A label's bytes are those of the UTF-8 text its
token stands for, the end-of-document token counting one byte (as paired data counts them):
from the data's own byte offsets when it is paired data (`PREFIX.offsets`, written by
tools/preprocess_data.py --teacher-tokenizer; the number `val_bpb` logs), else from the
tokenizer's vocabulary (`--tokenizer`, default the `tokenizer.json` beside the dataset, as the
bundled corpus keeps it; a byte-level BPE). Both give the same bytes for the same tokens.

The model runs at TP = `--tp` (default: every rank over `--pp`), in `--pp` pipeline stages
(default 1; the sequences go through the pipeline's forwards) and data parallel over the remaining
ranks; plain `python tools/score.py` is one process. Logits stay sharded over the vocabulary: log p is
`-distill.cross_entropy` on the shards (no vocabulary gather). Checkpoints saved at any TP degree
load (they are resharded on the fly).

Exit codes (engine/entry.py): 0 done, 2 bad input (one `ConfigError: ...` line, or the error's own
kind, on stderr; nothing written).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import numpy as np
import torch
from tokenizers import Tokenizer

from distill import cross_entropy
from distill.evaluate import validation
from distill.pipeline_step import StudentStage, run_pipeline
from distill.weights import load_weights
from engine import collectives as C
from engine.checkpoint import open_checkpoint
from engine.config import ConfigError
from engine.data import DataConfig, DataError, resolve_data_path
from engine.data.encode import find_eod_id
from engine.data.paired import PAIRED_SUFFIXES, token_bytes
from engine.entry import ensure_new_output, run_tool
from engine.log import get_logger, setup_logging
from engine.parallel import STUDENT, LaunchEnv, LayoutError, ParallelConfig, ParallelLayout, validate_layout
from layers.config import ModelConfig, check_model_layout, saved_model_config
from layers.model import TransformerLM

log = get_logger("score")


# ------------------------------------------------------------------------------ checkpoints

def checkpoint_model_config(path: str | Path, *, key: str = "--ckpt") -> tuple[Path, dict, ModelConfig]:
    """(step directory, saved run config, model config) of a checkpoint or a root of them."""
    checkpoint = open_checkpoint(path, key=key)
    return checkpoint.path, checkpoint.run_config, saved_model_config(checkpoint)


def load_model(step_dir: Path, cfg: ModelConfig, layout: ParallelLayout, *,
               dtype: torch.dtype = torch.float32) -> TransformerLM:
    """The checkpoint's weights in a `TransformerLM` at `layout`'s TP degree, in eval mode."""
    model = TransformerLM(cfg, layout).to(device=layout.device, dtype=dtype)
    load_weights(step_dir, model, layout)
    return model.eval()


# ------------------------------------------------------------------------------ log-probs

def token_log_probs(model: TransformerLM, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) as float32 `[batch, seq-1]` (a collective over TP)."""
    logits_shard = model(ids).logits[:, :-1]  # [batch, seq-1, padded_vocab/tp]
    nll = cross_entropy(logits_shard, ids[:, 1:], vocab_size=model.config.vocab_size,
                        group=model.layout.tp_group)
    return -nll.float()


@torch.no_grad()
def score_tokens(model: TransformerLM, ids: torch.Tensor, *, micro_batch: int) -> torch.Tensor:
    """`token_log_probs` of every row, rows split over DP ranks; the full result on every rank."""
    layout = model.layout
    rows = ids.shape[0]
    per_rank = -(-rows // layout.dp)
    padded = torch.cat([ids, ids.new_zeros(per_rank * layout.dp - rows, ids.shape[1])])
    mine = padded[layout.dp_rank * per_rank:(layout.dp_rank + 1) * per_rank].to(layout.device)
    if layout.pp > 1:
        local = _pipeline_log_probs(model, mine, micro_batch)
    else:
        parts = [token_log_probs(model, chunk) for chunk in mine.split(micro_batch)]
        local = torch.cat(parts) if parts else \
            mine.new_zeros(0, ids.shape[1] - 1, dtype=torch.float32)
    return C.all_gather(local, layout.dp_group, dim=0)[:rows].cpu()


def _pipeline_log_probs(model: TransformerLM, ids: torch.Tensor, micro_batch: int) -> torch.Tensor:
    """`token_log_probs` of `ids` through the pipeline's forwards (micro-batches of equal size:
    the rows padded with copies of the first); the last stage's result, broadcast over the
    pipeline group."""
    layout, rows = model.layout, ids.shape[0]
    result = torch.zeros(rows, ids.shape[1] - 1, dtype=torch.float32, device=layout.device)
    if rows == 0:
        return result
    chunks = -(-rows // micro_batch)
    padded = torch.cat([ids, ids[:1].expand(chunks * micro_batch - rows, -1)])
    batches = [{"input_ids": chunk} for chunk in padded.split(micro_batch)]
    parts: dict[int, torch.Tensor] = {}

    def last(i: int, out, _teacher) -> None:
        ids_i = batches[i]["input_ids"]
        parts[i] = -cross_entropy(out.logits[:, :-1], ids_i[:, 1:], vocab_size=model.config.vocab_size,
                                  group=layout.tp_group).float()

    run_pipeline(StudentStage(model, batches, last=last), layout, train=False)
    if parts:  # the last stage
        result.copy_(torch.cat([parts[i] for i in range(chunks)])[:rows])
    return C.broadcast(result, layout.pp_group, src=layout.pp_ranks[-1])


def read_tokens(path: Path, cfg: ModelConfig, *, min_seq: int = 2) -> torch.Tensor:
    """The int64 `[batch, seq]` ids of a .npy file, checked against the model (`seq >= min_seq`)."""
    if not path.is_file():
        raise ConfigError("--tokens", f"no such file: {path}")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:  # EOFError: an empty file
        raise ConfigError("--tokens", f"{path} is not a readable .npy array ({err})") from None
    if not isinstance(array, np.ndarray):  # np.load opens an .npz archive as a mapping
        array.close()
        raise ConfigError("--tokens", f"{path} is an .npz archive; save the one array of ids "
                                      "with numpy.save (.npy)")
    if array.ndim != 2 or array.dtype.kind not in "iu":
        raise ConfigError("--tokens", f"{path} must hold integer ids [batch, seq] "
                                      f"(got {array.dtype} of shape {list(array.shape)})")
    if array.shape[0] == 0:
        raise ConfigError("--tokens", f"{path} holds no rows (shape {list(array.shape)})")
    if not min_seq <= array.shape[1] <= cfg.max_seq_len:
        raise ConfigError("--tokens", f"sequence length {array.shape[1]} must be between {min_seq} and "
                                      f"model.max_seq_len={cfg.max_seq_len}")
    if array.size and (array.min() < 0 or array.max() >= cfg.vocab_size):
        raise ConfigError("--tokens", f"ids must be in [0, {cfg.vocab_size}) "
                                      f"(got {array.min()}..{array.max()})")
    return torch.from_numpy(array.astype(np.int64))


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write `array` to `path` atomically (a sibling temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb") as handle:
        np.save(handle, array)
    os.replace(partial, path)


# ------------------------------------------------------------------------------ command line

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--micro-batch", type=int, default=8, help="rows per forward on one DP rank")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--tokens", type=Path, help=".npy of int ids [batch, seq] to score")
    mode.add_argument("--data", help="indexed-dataset prefix (or `default`): validation perplexity")
    parser.add_argument("--out", type=Path, help="with --tokens: .npy of float32 log-probs [batch, seq-1]")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--seq-len", type=int, default=256, help="with --data: tokens per sample")
    parser.add_argument("--batches", type=int, default=8, help="with --data: batches to score")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="with --data: samples per batch over all DP ranks")
    parser.add_argument("--split", default="98,2", help="with --data: train,valid document split")
    parser.add_argument("--seed", type=int, default=1234, help="with --data: the data order's seed "
                                                               "(train.seed of the runs compared)")
    parser.add_argument("--bpb", action="store_true", help="with --data: also bits per byte")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="with --bpb on data without byte offsets: its tokenizer.json "
                             "(default: the one beside the dataset)")
    return parser.parse_args(argv)


def _check_args(args: argparse.Namespace, cfg: ModelConfig, world: int) -> None:
    """Every check that needs no process group (run identically on every rank)."""
    check_tool_layout(args, cfg, world)
    for key in ("micro_batch", "batches", "batch_size", "seq_len"):
        if getattr(args, key) < 1:
            raise ConfigError("--" + key.replace("_", "-"), f"must be >= 1 (got {getattr(args, key)})")
    if args.tokens is not None:
        if args.out is None:
            raise ConfigError("--out", "is required with --tokens")
        ensure_new_output(args.out, force=args.force)
    elif args.seq_len > cfg.max_seq_len:
        raise ConfigError("--seq-len", f"{args.seq_len} exceeds model.max_seq_len={cfg.max_seq_len}")
    elif args.batch_size % (dp := tool_parallel(args).rank_order(STUDENT, world).dp):
        raise ConfigError("--batch-size", f"{args.batch_size} does not split over {dp} "
                                          "data-parallel ranks")
    if args.bpb and args.data is None:
        raise ConfigError("--bpb", "needs --data")


def byte_source(args: argparse.Namespace, cfg: ModelConfig) -> dict:
    """`validation`'s keyword for bits per byte (`--bpb`): paired data's offsets
    ({"teacher_len"}), or the bytes of each token id of the tokenizer ({"byte_lengths"})."""
    prefixes = [prefix for _, prefix in resolve_data_path(_data_config(args, 1))]
    if all(Path(p + s + ".idx").is_file() for p in prefixes for s in PAIRED_SUFFIXES):
        return {"teacher_len": 2 * args.seq_len}  # (the teacher's window: unused for the bytes)
    path = args.tokenizer or Path(prefixes[0]).parent / "tokenizer.json"
    if not path.is_file():
        raise ConfigError("--tokenizer", f"{path} not found: --bpb on data without byte offsets "
                                         "needs the tokenizer that made it")
    try:
        tokenizer = Tokenizer.from_file(str(path))
        try:
            eod = find_eod_id(tokenizer)
        except DataError:
            eod = None  # no end-of-document token: none in the data either
        table = token_bytes(tokenizer, eod_id=eod)
    except Exception as err:  # a DataError, or the tokenizers library's own (a bad file)
        raise ConfigError("--tokenizer", f"{path}: {err}") from None
    if len(table) > cfg.vocab_size:
        raise ConfigError("--tokenizer", f"{path} has {len(table)} tokens, the model "
                                         f"{cfg.vocab_size}")
    lengths = torch.zeros(cfg.vocab_size, dtype=torch.int64)
    lengths[:len(table)] = torch.tensor([len(b) for b in table], dtype=torch.int64)
    return {"byte_lengths": lengths}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """`--ckpt`, `--tp` and `--pp`: the checkpoint a tool runs and its layout (`tool_degrees`)."""
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (or a root with `latest`)")
    parser.add_argument("--tp", type=int, default=None,
                        help="tensor-parallel degree (default: all ranks over --pp)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages (model.layers must "
                                                          "divide by it)")


def tool_degrees(args: argparse.Namespace, world: int) -> ParallelConfig:
    """`--tp` (default: every rank over `--pp`) and `--pp` as `init_parallel`'s layout."""
    if args.pp < 1:
        raise ConfigError("--pp", f"must be >= 1 (got {args.pp})")
    args.tp = max(1, world // args.pp) if args.tp is None else args.tp
    return tool_parallel(args)


def tool_parallel(args: argparse.Namespace) -> ParallelConfig:
    """The layout of `--tp` and `--pp`; a bad degree is an error naming its flag."""
    try:
        return ParallelConfig(tp=args.tp, pp=args.pp)
    except ConfigError as err:
        raise _as_flag(err) from None


def _as_flag(err: ConfigError) -> ConfigError:
    """A layout error named by the tool's flag (`parallel.tp` -> `--tp`)."""
    return ConfigError("--" + err.key.removeprefix("parallel."), err.message)


def check_tool_layout(args: argparse.Namespace, cfg: ModelConfig, world: int) -> None:
    """`--tp` x `--pp` against the world and the model; errors name the flags."""
    try:
        validate_layout(tool_parallel(args), world)
    except LayoutError as err:
        raise _as_flag(err) from None
    check_model_layout(cfg, args.tp)
    if cfg.layers % args.pp:
        raise ConfigError("--pp", f"{args.pp} does not divide the model's {cfg.layers} decoder "
                                  "blocks")


def _data_config(args: argparse.Namespace, dp: int) -> DataConfig:
    per_rank = args.batch_size // dp
    return DataConfig(path=args.data, seq_len=args.seq_len, micro_batch=per_rank,
                      global_batch=args.batch_size, split=args.split)


def run(args: argparse.Namespace, step_dir: Path, cfg: ModelConfig, layout: ParallelLayout, *,
        ids: torch.Tensor | None, bytes_from: dict | None = None) -> None:
    """Score `ids` (or `--data`) on every rank; rank 0 writes `--out` or prints the perplexity line."""
    model = load_model(step_dir, cfg, layout)
    if ids is not None:
        log_probs = score_tokens(model, ids, micro_batch=args.micro_batch)
        if layout.is_rank0:
            save_npy(args.out, log_probs.numpy())
            log.info("wrote log-probs %s to %s", list(log_probs.shape), args.out)
        return
    scores = validation(model, _data_config(args, layout.dp), micro_batches=args.batches,
                        seed=args.seed, **(bytes_from or {}))
    if layout.is_rank0:
        loss = scores.loss
        perplexity = math.exp(loss) if loss < 700 else math.inf  # exp overflows past ~709
        line = {"ckpt": str(step_dir), "data": args.data, "tokens": scores.labels,
                "loss": loss, "perplexity": perplexity}
        if args.bpb:
            line["bits_per_byte"] = scores.bits_per_byte
        print(json.dumps(line), flush=True)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)

    def prepare(launch: LaunchEnv) -> tuple[ParallelConfig, Callable[[ParallelLayout], None]]:
        degrees = tool_degrees(args, launch.world_size)
        step_dir, _, cfg = checkpoint_model_config(args.ckpt)
        _check_args(args, cfg, launch.world_size)
        ids = read_tokens(args.tokens, cfg) if args.tokens is not None else None
        bytes_from = byte_source(args, cfg) if args.bpb else None  # (before any process group)
        return degrees, lambda layout: run(args, step_dir, cfg, layout, ids=ids,
                                           bytes_from=bytes_from)

    return run_tool(prepare)


if __name__ == "__main__":
    sys.exit(main())
