"""Export a teacher's top-k over a dataset's sample map: the store of `distill.schedule: offline`.

    python tools/export_teacher_logits.py --config FILE --top-k K --out DIR [--split train|valid|all]
                                          [--samples N] [--value-bits B] [section.key=value ...]
    torchrun --nproc_per_node N tools/export_teacher_logits.py --config FILE --top-k K --out DIR

It reads a run config for the teacher checkpoint `distill.teacher` (in bfloat16 with
`distill.teacher_bf16`), the data (`data.*`: datasets, split, seq_len; not the seed nor the batch
sizes: the store is keyed by the dataset's sample map, engine/data/dataset.py), the temperature of
the stored log-probabilities (`distill.logit.temperature`) and the tensor-parallel degree
(`parallel.tp`). It covers every sample of the split's sample map, or the first N with --samples
N (`--first F`, a multiple of --shard-samples, starts there instead: `tools/offline_store.py
merge` joins exports of disjoint ranges). The N processes form N / parallel.tp data-parallel
groups; shard i of a split is computed by group i % dp and written by its TP rank 0, so ranks
write disjoint files. The format is distill/offline.py's and distill/offline_codec.py's (ids
compressed, log-probabilities at --value-bits, 32 = float32; each shard is encoded and written
in a thread while the teacher runs the next); train from it with
`distill.schedule=offline distill.offline_dir=DIR`.

Resumable: shards go into `.DIR.tmp` beside DIR, each written under a temporary name and renamed
when complete, with the export's settings in `.DIR.tmp/export.json`. A cut export (SIGTERM, a
lost node, a full disk) leaves `.DIR.tmp`; the same command again computes only the missing shards
and gives the same store byte for byte (other settings: one ConfigError naming --out). Rank 0
writes metadata.json last and renames the directory into place (several nodes need a shared
filesystem). An existing DIR is never overwritten. A bad config or argument stops with one
`ConfigError:` line and exit code 2; a write that fails stops every rank after that round with
one `ExportError:` line and exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from distill.config import check_compatibility
from distill.cross_tokenizer import CrossTokenizerTerm
from distill.offline import (
    FORMAT,
    METADATA,
    VERSION,
    cross_store_key,
    sample_checksums,
    shard_name,
    store_key,
    teacher_topk,
    topk_logprobs,
)
from distill.offline_codec import CHUNK_STATS, FLOAT_VALUES, VALUE_BITS, Codec, encode_chunk_stats
from distill.runconfig import (
    RunConfig,
    check_cross_tokenizer,
    check_cross_tokenizer_teacher,
    check_data,
    parse_run_config,
    teacher_checkpoints,
    teacher_model_config,
)
from distill.teacher import TeacherRequest
from distill.teacher_load import load_teacher
from distill.teacher_sources import ChunkStatsTeacher, ColocatedTeacher
from engine import collectives as C
from engine.checkpoint import CheckpointError, ResolvedCheckpoint, ranks_agree
from engine.checkpoint_files import file_record, fsync_dir, read_json, write_json, write_tensors
from engine.config import ConfigError, apply_overrides, check, load_yaml
from engine.data import TokenBatches
from engine.entry import EXIT_CONFIG, EXIT_RUNTIME, ensure_new_output, run_tool
from engine.log import get_logger, setup_logging
from engine.parallel import LaunchEnv, LayoutError, ParallelConfig, ParallelLayout, validate_layout
from layers.config import ModelConfig

log = get_logger("export_teacher_logits")
SETTINGS = "export.json"  # in .DIR.tmp: what a resumed export must match


class ExportError(RuntimeError):
    """A write of the export failed (a full disk, ...): one line naming the file."""


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    cfg: RunConfig  # the run config whose data and teacher the export covers
    teacher: ModelConfig  # the teacher's architecture, from its checkpoint
    checkpoint: ResolvedCheckpoint  # the teacher's checkpoint, resolved and checked at start-up
    codec: Codec  # vocabulary, k and value width
    out: Path  # the store directory (must not exist)
    shard_samples: int  # samples per shard file
    ranges: dict[str, range]  # per split, the sample-map indices exported
    map_samples: dict[str, int]  # per split, the samples of its whole sample map
    header: dict  # metadata.json without the shard records

    @property
    def parallel(self) -> ParallelConfig:
        """The export's layout: the teacher alone at the run's TP degree, without SP."""
        return ParallelConfig(tp=self.cfg.parallel.tp, timeout_s=self.cfg.parallel.timeout_s)

    @property
    def tmp(self) -> Path:
        return self.out.with_name(f".{self.out.name}.tmp")

    def shards(self, split: str) -> list[range]:
        """The sample ranges of the split's shard files; shard i is [i * S, (i + 1) * S)."""
        step, ids = self.shard_samples, self.ranges[split]
        return [range(first, min(first + step, ids.stop)) for first in range(ids.start, ids.stop, step)]


@dataclasses.dataclass
class ExportStats:
    """Where this rank's export time went, for the log and tools/bench/offline_store.py."""

    tokens: int = 0  # tokens this rank exported
    forward_s: float = 0.0  # teacher forward
    topk_s: float = 0.0  # the teacher's top-k, log-sum-exp and log-probabilities
    wait_s: float = 0.0  # waiting for the writer thread (encoding and writing not hidden)
    seconds: float = 0.0  # the whole export, wall clock


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run's YAML configuration")
    parser.add_argument("--top-k", type=int, required=True, help="logits kept per position")
    parser.add_argument("--out", required=True, help="store directory (must not exist)")
    parser.add_argument("--split", default="train", help="train | valid | all (both)")
    parser.add_argument("--samples", type=int, default=None,
                        help="samples of each split's sample map (default: all)")
    parser.add_argument("--first", type=int, default=0, help="first sample (a multiple of "
                        "--shard-samples; for exports to merge)")
    parser.add_argument("--shard-samples", type=int, default=64, help="samples per shard file")
    parser.add_argument("--value-bits", type=int, default=6,
                        help=f"bits per log-probability, 2..16, or {FLOAT_VALUES} (float32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def _check_args(args: argparse.Namespace, vocab: int) -> None:
    check(args.split in ("train", "valid", "all"), "--split",
          f"must be train, valid or all (got {args.split})")
    check(1 <= args.top_k <= vocab, "--top-k", f"must be in [1, {vocab}] (got {args.top_k})")
    check(args.shard_samples >= 1, "--shard-samples", f"must be >= 1 (got {args.shard_samples})")
    check(args.samples is None or args.samples >= 1, "--samples",
          f"must be >= 1 (got {args.samples})")
    check(args.first >= 0 and args.first % args.shard_samples == 0, "--first",
          f"must be a multiple of --shard-samples={args.shard_samples} (got {args.first})")
    check(args.value_bits == FLOAT_VALUES or args.value_bits in VALUE_BITS, "--value-bits",
          f"must be in 2..16 or {FLOAT_VALUES} (got {args.value_bits})")


def load_plan(args: argparse.Namespace, *, world_size: int) -> ExportPlan:
    """Validate everything before any process group exists; raises `ConfigError`."""
    cfg = parse_run_config(apply_overrides(load_yaml(args.config), args.overrides))
    try:
        validate_layout(ParallelConfig(tp=cfg.parallel.tp), world_size)
    except LayoutError as err:
        raise ConfigError(err.key, f"{err.message} (world size {world_size})") from None
    check(not cfg.distill.teachers, "distill.teachers",
          "a store holds one teacher: give it as distill.teacher")
    # The teacher a colocated run of this config would load (an offline run loads none).
    live = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, schedule="colocated"))
    teachers = teacher_checkpoints(live)
    teacher = teacher_model_config(live, teachers)
    check(teacher is not None, "distill.logit.weight", "is 0: there are no logits to export")
    check(not cfg.distill.logit.varying_temperature, "distill.logit.temperature",
          "must be a constant: the store holds log-probabilities at one temperature")
    check_compatibility(live.distill, cfg.model, teacher, cfg.parallel.tp)
    cross = cfg.distill.cross_tokenizer
    if cross.on:  # the store holds the teacher's chunk statistics of each student sample
        check(cross.loss != "mapped_kl", "distill.cross_tokenizer.loss",
              "mapped_kl cannot train offline (it forms the teacher's logits from its output "
              "layer): export for likelihood or uld")
        check_cross_tokenizer(live)
        check_cross_tokenizer_teacher(live, teacher)
    _check_args(args, cfg.model.vocab_size if not cross.on else teacher.vocab_size)
    out = Path(args.out).expanduser()
    ensure_new_output(out, force=None)
    check_data(cfg)  # a missing or bad dataset stops here; builds the bundled corpus once
    splits = ("train", "valid") if args.split == "all" else (args.split,)
    map_samples = {split: _split_map(cfg, split).map_samples for split in splits}
    ranges = {}
    for split, total in map_samples.items():
        check(args.first < total, "--first", f"is past the {total} samples of the {split} split")
        stop = total if args.samples is None else min(total, args.first + args.samples)
        ranges[split] = range(args.first, stop)
    codec = Codec(cfg.model.vocab_size, args.top_k, args.value_bits)
    plan = ExportPlan(cfg=cfg, teacher=teacher, checkpoint=teachers[""], codec=codec, out=out,
                      shard_samples=args.shard_samples, ranges=ranges, map_samples=map_samples,
                      header={})
    plan = dataclasses.replace(plan, header=header(plan))
    _check_resumable(plan)
    return plan


def _split_map(cfg: RunConfig, split: str) -> TokenBatches:
    """The split's samples (its sample map; the seed only orders a stream, unused here), with
    another tokenizer their teacher windows and alignment."""
    cross = cfg.distill.cross_tokenizer
    return TokenBatches(cfg.data, seed=0, split=split, vocab_size=cfg.model.vocab_size,
                        teacher_len=cross.teacher_tokens(cfg.data.seq_len) if cross.on else None)


def header(plan: ExportPlan) -> dict:
    cfg, codec = plan.cfg, plan.codec
    key = store_key(cfg.data, temperature=cfg.distill.logit.temperature,
                    vocab_size=cfg.model.vocab_size)
    cross = cfg.distill.cross_tokenizer
    if cross.on:
        key["cross_tokenizer"] = cross_store_key(
            cfg.data, teacher_tokens=cross.teacher_tokens(cfg.data.seq_len))
    return {"format": FORMAT, "version": VERSION, **key, "k": codec.k,
            "value_bits": codec.value_bits, "samples_per_shard": plan.shard_samples,
            "teacher": {"path": str(plan.checkpoint.path),
                        "digest": plan.checkpoint.weights_digest,
                        "bf16": cfg.distill.teacher_bf16},
            "exported": {split: [ids.start, ids.stop] for split, ids in plan.ranges.items()}}


def _check_resumable(plan: ExportPlan) -> None:
    """An interrupted export in .DIR.tmp is resumed only with the same settings."""
    path = plan.tmp / SETTINGS
    if not path.is_file():
        return
    try:
        saved = read_json(path)
    except CheckpointError:
        return  # cut while writing its settings: nothing was exported yet
    differ = sorted(k for k in set(saved) | set(plan.header) if saved.get(k) != plan.header.get(k))
    check(not differ, "--out", f"{plan.tmp} holds an interrupted export with other settings "
                               f"({', '.join(differ)}): remove it, or resume with the same ones")


def build_teacher(plan: ExportPlan, layout: ParallelLayout) -> ColocatedTeacher | ChunkStatsTeacher:
    """The teacher at the export's layout; with another tokenizer, giving its chunk statistics
    (those of every loss the store serves, uld's top-k at --top-k)."""
    cfg = plan.cfg
    model = load_teacher(plan.checkpoint.path, plan.teacher, cfg.model, layout, seed=cfg.train.seed,
                         bf16=cfg.distill.teacher_bf16)
    cross = cfg.distill.cross_tokenizer
    if not cross.on:
        return ColocatedTeacher(model, TeacherRequest(head="logits"))
    term = CrossTokenizerTerm(loss=cross.loss, divergence=cross.divergence,
                              kind=cfg.distill.logit.kind, student_vocab=cfg.model.vocab_size,
                              teacher_vocab=plan.teacher.vocab_size, group=layout.tp_group,
                              uld_top_k=plan.codec.k)
    return ChunkStatsTeacher(ColocatedTeacher(model, TeacherRequest(head="hidden")), term,
                             temperature=cfg.distill.logit.temperature, names=CHUNK_STATS)


def chunk_stat_rows(teacher: ChunkStatsTeacher, batch: dict[str, torch.Tensor], *,
                    plan: ExportPlan, layout: ParallelLayout,
                    stats: ExportStats) -> dict[str, np.ndarray]:
    """The teacher's CHUNK_STATS of the samples of `batch` (`TokenBatches.map_batch`),
    `data.micro_batch` samples per forward: each [count, seq, ...] float32."""
    rows: dict[str, list[np.ndarray]] = {name: [] for name in CHUNK_STATS}
    count = batch["input_ids"].shape[0]
    for first in range(0, count, plan.cfg.data.micro_batch):
        started = time.perf_counter()
        micro = {k: v[first:first + plan.cfg.data.micro_batch].to(layout.device)
                 for k, v in batch.items()}
        (out,) = teacher(micro).values()
        for name in CHUNK_STATS:
            rows[name].append(out.chunk_stats[name].float().cpu().numpy())
        stats.forward_s += time.perf_counter() - started
    return {name: np.concatenate(parts) for name, parts in rows.items()}


def teacher_rows(teacher: ColocatedTeacher, input_ids: torch.Tensor, *, plan: ExportPlan,
                 layout: ParallelLayout, stats: ExportStats) -> tuple[np.ndarray, ...]:
    """(ids, log-probs, leftover) of input ids [count, seq], `data.micro_batch` samples per
    forward: [count, seq, k] int32, [count, seq, k] float64, [count, seq] float64."""
    cfg, codec = plan.cfg, plan.codec
    temperature = cfg.distill.logit.temperature
    ids, logp, leftover = [], [], []
    for chunk in input_ids.split(cfg.data.micro_batch):
        started = time.perf_counter()
        logits_shard = teacher.forward(chunk.to(layout.device)).logits  # [mb, seq, vocab/tp]
        middle = time.perf_counter()
        values, indices, lse = (t.cpu() for t in teacher_topk(
            logits_shard, k=codec.k, vocab_size=codec.vocab_size, temperature=temperature,
            group=layout.tp_group))
        chunk_logp, chunk_leftover = topk_logprobs(values, lse, temperature=temperature,
                                                   vocab_size=codec.vocab_size)
        ids.append(indices.numpy())
        logp.append(chunk_logp)
        leftover.append(chunk_leftover)
        stats.forward_s += middle - started
        stats.topk_s += time.perf_counter() - middle
    return np.concatenate(ids), np.concatenate(logp), np.concatenate(leftover)


def encode_and_write(path: Path, codec: Codec, rows: tuple[np.ndarray, ...] | dict[str, np.ndarray],
                     input_ids: torch.Tensor) -> str | None:
    """Encode one shard (top-k rows, or a dict of chunk statistics) and write it (in the writer
    thread); the error as one line, or None."""
    arrays = encode_chunk_stats(rows) if isinstance(rows, dict) else codec.encode(*rows)
    tensors = {name: torch.from_numpy(array) for name, array in arrays.items()}
    tensors["checksum"] = sample_checksums(input_ids)
    return _write(path, tensors)


def _barrier(layout: ParallelLayout) -> None:
    C.barrier(layout.role_group if layout.world_size > 1 else None)


def _prepare(plan: ExportPlan) -> None:
    """Rank 0: .DIR.tmp with the export's settings, or the interrupted one to resume."""
    plan.tmp.mkdir(parents=True, exist_ok=True)
    for partial in plan.tmp.glob("*.partial"):
        partial.unlink()  # a shard cut while being written
    if not (plan.tmp / SETTINGS).is_file():
        write_json(plan.tmp / SETTINGS, plan.header)


def write_shards(plan: ExportPlan, split: str, teacher: ColocatedTeacher | ChunkStatsTeacher,
                 layout: ParallelLayout, *, bar: tqdm, stats: ExportStats) -> None:
    """Round r: DP group g computes shard r * dp + g unless it is already written (a resumed
    export), and its TP rank 0 encodes and writes it in a writer thread while the teacher runs
    the next round; every rank learns of a failed write one round later, all in the same round."""
    shards = plan.shards(split)
    data = _split_map(plan.cfg, split)
    first_index = plan.ranges[split].start // plan.shard_samples
    done = {i for i, _ in enumerate(shards)
            if (plan.tmp / shard_name(split, first_index + i)).is_file()}
    _barrier(layout)  # every rank has listed the written shards before any new one appears
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending: Future | None = None
        for start in range(0, len(shards), layout.dp):
            index, submitted = start + layout.dp_rank, None
            if index < len(shards) and index not in done:
                if plan.cfg.distill.cross_tokenizer.on:
                    batch = data.map_batch(shards[index])
                    input_ids = batch["input_ids"]
                    rows = chunk_stat_rows(teacher, batch, plan=plan, layout=layout, stats=stats)
                else:
                    input_ids = data.map_inputs(shards[index])
                    rows = teacher_rows(teacher, input_ids, plan=plan, layout=layout, stats=stats)
                stats.tokens += input_ids.numel()
                if layout.tp_rank == 0:
                    path = plan.tmp / shard_name(split, first_index + index)
                    submitted = writer.submit(encode_and_write, path, plan.codec, rows, input_ids)
            _agree(layout, pending, split, stats)
            pending = submitted
            bar.update(sum(len(s) for s in shards[start:start + layout.dp]) * plan.cfg.data.seq_len)
        _agree(layout, pending, split, stats)


def _agree(layout: ParallelLayout, pending: Future | None, split: str, stats: ExportStats) -> None:
    """Wait for this rank's write in flight, then stop every rank if any rank's write failed."""
    started = time.perf_counter()
    error = pending.result() if pending is not None else None
    stats.wait_s += time.perf_counter() - started
    if error and not layout.is_rank0:  # rank 0 prints the final line
        log.error(error, extra={"all_ranks": True})
    if not ranks_agree(layout, error is None):
        raise ExportError(error or f"writing a {split} shard failed on another rank")


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> str | None:
    """Write one shard under a temporary name, then rename; the error as one line, or None."""
    partial = path.with_name(path.name + ".partial")
    try:
        write_tensors(partial, tensors)
        os.replace(partial, path)
    except Exception as err:  # safetensors reports a full disk as its own error type
        partial.unlink(missing_ok=True)
        return f"writing {path} failed: {err}"
    return None


def metadata(plan: ExportPlan) -> dict:
    splits = {}
    for split, ids in plan.ranges.items():
        first_index = ids.start // plan.shard_samples
        records = [{"file": shard_name(split, first_index + i), "index": first_index + i,
                    "first": s.start, "count": len(s),
                    **file_record(plan.tmp / shard_name(split, first_index + i))}
                   for i, s in enumerate(plan.shards(split))]
        splits[split] = {"map_samples": plan.map_samples[split], "shards": records}
    meta = {k: v for k, v in plan.header.items() if k != "exported"}
    return {**meta, "splits": splits}


def export(plan: ExportPlan, layout: ParallelLayout, *, progress: bool = True) -> ExportStats:
    """Write the store under every rank (all ranks call it); returns this rank's timings."""
    if layout.is_rank0:
        _prepare(plan)
    _barrier(layout)
    teacher = build_teacher(plan, layout)
    stats = ExportStats()
    started = time.perf_counter()
    total = sum(len(ids) for ids in plan.ranges.values()) * plan.cfg.data.seq_len
    with tqdm(total=total, desc="export", unit="tok", unit_scale=True,
              disable=not (progress and layout.is_rank0)) as bar:
        for split in plan.ranges:
            write_shards(plan, split, teacher, layout, bar=bar, stats=stats)
    stats.seconds = time.perf_counter() - started
    _barrier(layout)
    if layout.is_rank0:
        _publish(plan)
        _log_stats(stats)
    _barrier(layout)
    return stats


def _log_stats(stats: ExportStats) -> None:
    if stats.seconds > 0:
        log.info("rank 0: %d tokens in %.2f s, %.0f tokens/s; teacher forward %.2f s, top-k "
                 "%.2f s, waiting for the writer thread %.2f s", stats.tokens, stats.seconds,
                 stats.tokens / stats.seconds, stats.forward_s, stats.topk_s, stats.wait_s)


def _publish(plan: ExportPlan) -> None:
    """Rank 0, once every shard is written: metadata last, then the rename into place."""
    try:
        write_json(plan.tmp / METADATA, metadata(plan))
        (plan.tmp / SETTINGS).unlink()
        plan.tmp.rename(plan.out)
    except OSError as err:
        raise ExportError(f"writing {plan.tmp / METADATA} failed: {err.strerror or err}") from None
    fsync_dir(plan.out.parent)
    samples = sum(len(ids) for ids in plan.ranges.values())
    log.info("exported the top-%d teacher log-probabilities of %d samples to %s", plan.codec.k,
             samples, plan.out)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)

    def prepare(launch: LaunchEnv) -> tuple[ParallelConfig, Callable[[ParallelLayout], None]]:
        plan = load_plan(args, world_size=launch.world_size)
        return plan.parallel, lambda layout: export(plan, layout, progress=not args.no_progress)

    # Reading the teacher can still find bad input (NaN weights); a failed write is a run-time error.
    return run_tool(prepare, failures=((ConfigError, EXIT_CONFIG),
                                       ((ExportError, CheckpointError, OSError), EXIT_RUNTIME)))


if __name__ == "__main__":
    sys.exit(main())
