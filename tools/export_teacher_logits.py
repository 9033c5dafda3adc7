"""Export a teacher's top-k logits over a run's training samples, for `distill.schedule: offline`.

    python tools/export_teacher_logits.py --config FILE --top-k K --out DIR [section.key=value ...]
    torchrun --nproc_per_node N tools/export_teacher_logits.py --config FILE --top-k K --out DIR

It reads the same run config as training: the teacher checkpoint `distill.teacher` (in bfloat16
with `distill.teacher_bf16`), the data (`data.*`), how many samples (`train.steps *
data.global_batch`, in training order for `train.seed`), the temperature of the stored
log-sum-exp (`distill.logit.temperature`) and the tensor-parallel degree (`parallel.tp`; sequence
parallelism is not used, it would only save activation memory). The N processes form
N / parallel.tp data-parallel groups that take turns over the shards. What is written is described
in `distill/offline.py`; train from it with `distill.schedule=offline distill.offline_dir=DIR`.

Atomic: every rank writes into `.DIR.tmp` beside DIR, rank 0 writes metadata.json last and renames
the directory into place (several nodes need a shared filesystem). An existing DIR is never
overwritten. A bad config or argument stops with one `ConfigError:` line and exit code 2; a write
that fails (a full disk) stops every rank after that shard with one `ExportError:` line and exit
code 1, and `.DIR.tmp` is removed (on any failure or interrupt).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from distill.config import check_compatibility
from distill.offline import (
    FORMAT,
    METADATA,
    VERSION,
    sample_checksums,
    shard_name,
    teacher_digest,
    teacher_topk,
    tokenizer_record,
)
from distill.runconfig import (
    RunConfig,
    check_data,
    parse_run_config,
    run_export_key,
    teacher_checkpoints,
    teacher_model_config,
)
from distill.teacher import TeacherRequest
from distill.teacher_load import load_teacher
from distill.teacher_sources import ColocatedTeacher
from engine import collectives as C
from engine.checkpoint import CheckpointError, ResolvedCheckpoint, ranks_agree
from engine.checkpoint_files import file_record, fsync_dir, write_json, write_tensors
from engine.config import ConfigError, apply_overrides, check, load_yaml
from engine.data import TokenBatches, resolve_data_path
from engine.entry import EXIT_CONFIG, EXIT_RUNTIME, ensure_new_output, run_tool
from engine.log import get_logger, setup_logging
from engine.parallel import LaunchEnv, LayoutError, ParallelConfig, ParallelLayout, validate_layout
from layers.config import ModelConfig

log = get_logger("export_teacher_logits")


class ExportError(RuntimeError):
    """A write of the export failed (a full disk, ...): one line naming the file."""


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    cfg: RunConfig  # the run config the export serves
    teacher: ModelConfig  # the teacher's architecture, from its checkpoint
    checkpoint: ResolvedCheckpoint  # the teacher's checkpoint, resolved and checked at start-up
    k: int  # logits kept per position
    out: Path  # the export directory (must not exist)
    shard_samples: int  # samples per shard file

    @property
    def parallel(self) -> ParallelConfig:
        """The export's layout: the teacher alone at the run's TP degree, without SP."""
        return ParallelConfig(tp=self.cfg.parallel.tp, timeout_s=self.cfg.parallel.timeout_s)

    @property
    def samples(self) -> int:
        return self.cfg.train.steps * self.cfg.data.global_batch

    @property
    def shards(self) -> list[range]:
        """Global sample ranges of the shard files."""
        step = self.shard_samples
        return [range(first, min(first + step, self.samples))
                for first in range(0, self.samples, step)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run's YAML configuration")
    parser.add_argument("--top-k", type=int, required=True, help="logits kept per position")
    parser.add_argument("--out", required=True, help="export directory (must not exist)")
    parser.add_argument("--shard-samples", type=int, default=256, help="samples per shard file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def load_plan(args: argparse.Namespace, *, world_size: int) -> ExportPlan:
    """Validate everything before any process group exists; raises `ConfigError`."""
    cfg = parse_run_config(apply_overrides(load_yaml(args.config), args.overrides))
    try:
        validate_layout(ParallelConfig(tp=cfg.parallel.tp), world_size)
    except LayoutError as err:
        raise ConfigError(err.key, f"{err.message} (world size {world_size})") from None
    check(not cfg.distill.teachers, "distill.teachers",
          "an export holds one teacher: give it as distill.teacher")
    # The teacher a colocated run of this config would load (an offline run loads none).
    live = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, schedule="colocated"))
    teachers = teacher_checkpoints(live)
    teacher = teacher_model_config(live, teachers)
    check(teacher is not None, "distill.logit.weight", "is 0: there are no logits to export")
    check(not cfg.distill.logit.varying_temperature, "distill.logit.temperature",
          "must be a constant: the export stores the teacher's log-normalizer at one temperature")
    check_compatibility(live.distill, cfg.model, teacher, cfg.parallel.tp)
    vocab = cfg.model.vocab_size
    check(1 <= args.top_k <= vocab, "--top-k", f"must be in [1, {vocab}] (got {args.top_k})")
    check(args.shard_samples >= 1, "--shard-samples", f"must be >= 1 (got {args.shard_samples})")
    out = Path(args.out).expanduser()
    ensure_new_output(out, force=None)
    check_data(cfg)  # a missing or bad dataset stops here; builds the bundled corpus once
    return ExportPlan(cfg=cfg, teacher=teacher, checkpoint=teachers[""], k=args.top_k, out=out,
                      shard_samples=args.shard_samples)


def build_teacher(plan: ExportPlan, layout: ParallelLayout) -> ColocatedTeacher:
    cfg = plan.cfg
    model = load_teacher(plan.checkpoint.path, plan.teacher, cfg.model, layout, seed=cfg.train.seed,
                         bf16=cfg.distill.teacher_bf16)
    return ColocatedTeacher(model, TeacherRequest(head="logits"))


def training_samples(cfg: RunConfig) -> Iterator[torch.Tensor]:
    """Input ids [seq] of every training sample, in global order (TokenBatches at DP = 1)."""
    data = TokenBatches(cfg.data, seed=cfg.train.seed, vocab_size=cfg.model.vocab_size)
    for _ in range(cfg.train.steps):
        for micro_batch in data.next_step():
            yield from micro_batch["input_ids"]


def export_shard(teacher: ColocatedTeacher, input_ids: torch.Tensor, *, plan: ExportPlan,
                 layout: ParallelLayout) -> dict[str, torch.Tensor]:
    """One shard's tensors for input ids [count, seq], `data.micro_batch` samples per forward."""
    parts = []
    for chunk in input_ids.split(plan.cfg.data.micro_batch):
        logits_shard = teacher.forward(chunk.to(layout.device)).logits  # [mb, seq, vocab/tp]
        parts.append(teacher_topk(logits_shard, k=plan.k, vocab_size=plan.cfg.model.vocab_size,
                                  temperature=plan.cfg.distill.logit.temperature,
                                  group=layout.tp_group))
    values, indices, lse = (torch.cat([p[i] for p in parts]).cpu() for i in range(3))
    return {"values": values, "indices": indices, "logsumexp": lse,
            "checksum": sample_checksums(input_ids)}


def _barrier(layout: ParallelLayout) -> None:
    C.barrier(layout.role_group if layout.world_size > 1 else None)


def _prepare(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted export
    tmp.mkdir(parents=True)


def write_shards(plan: ExportPlan, teacher: ColocatedTeacher, layout: ParallelLayout, tmp: Path,
                 *, progress: bool) -> None:
    """Shard i is computed by DP group i % dp and written by its TP rank 0."""
    stream = training_samples(plan.cfg)
    bar = tqdm(total=plan.samples, desc="export", unit="sample",
               disable=not (progress and layout.is_rank0))
    for index, samples in enumerate(plan.shards):
        input_ids = torch.stack(list(itertools.islice(stream, len(samples))))  # [count, seq]
        error = None
        if index % layout.dp == layout.dp_rank:
            tensors = export_shard(teacher, input_ids, plan=plan, layout=layout)
            if layout.tp_rank == 0:
                error = _write(tmp / shard_name(index), tensors)
        if error and not layout.is_rank0:  # rank 0 prints the final line
            log.error(error, extra={"all_ranks": True})
        # Every rank learns of a failed write at once, rather than waiting for the writer in the
        # next shard's collectives; one int per shard.
        if not ranks_agree(layout, error is None):
            raise ExportError(error or f"writing shard {index} failed on another rank")
        bar.update(len(samples))
    bar.close()


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> str | None:
    """Write one shard; the error as one line, or None."""
    try:
        write_tensors(path, tensors)
    except Exception as err:  # safetensors reports a full disk as its own error type
        return f"writing {path} failed: {err}"
    return None


def metadata(plan: ExportPlan, layout: ParallelLayout, tmp: Path) -> dict:
    cfg = plan.cfg
    checkpoint = plan.checkpoint.path
    key = run_export_key(cfg)
    shards = [{"file": shard_name(i), "first": s.start, "count": len(s),
               **file_record(tmp / shard_name(i))} for i, s in enumerate(plan.shards)]
    return {"format": FORMAT, "version": VERSION, **key, "k": plan.k, "samples": plan.samples,
            "samples_per_shard": plan.shard_samples,
            "dtypes": {"values": "float32", "indices": "int32", "logsumexp": "float32"},
            "teacher": {"path": str(checkpoint), "digest": teacher_digest(checkpoint),
                        "bf16": cfg.distill.teacher_bf16},
            "data_prefixes": [prefix for _, prefix in resolve_data_path(cfg.data)],
            "tokenizer": tokenizer_record(cfg.data),
            "exported_with": {"tp": layout.tp, "dp": layout.dp, "steps": cfg.train.steps,
                              "global_batch": cfg.data.global_batch},
            "shards": shards}


def export(plan: ExportPlan, layout: ParallelLayout, *, progress: bool = True) -> Path:
    """Write the export under every rank (all ranks call it); returns the export directory."""
    tmp = plan.out.with_name(f".{plan.out.name}.tmp")
    try:
        if layout.is_rank0:
            _prepare(tmp)
        _barrier(layout)
        teacher = build_teacher(plan, layout)
        write_shards(plan, teacher, layout, tmp, progress=progress)
        _barrier(layout)
        if layout.is_rank0:
            _publish(plan, layout, tmp)
        _barrier(layout)
    finally:  # after a failure (or an interrupt) nothing half-written stays
        if layout.is_rank0:
            shutil.rmtree(tmp, ignore_errors=True)
    return plan.out


def _publish(plan: ExportPlan, layout: ParallelLayout, tmp: Path) -> None:
    """Rank 0, once every shard is written: metadata last, then the rename into place."""
    try:
        write_json(tmp / METADATA, metadata(plan, layout, tmp))
        tmp.rename(plan.out)
    except OSError as err:
        raise ExportError(f"writing {tmp / METADATA} failed: {err.strerror or err}") from None
    fsync_dir(plan.out.parent)
    log.info("exported top-%d teacher logits of %d samples to %s", plan.k, plan.samples, plan.out)


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
