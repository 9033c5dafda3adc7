"""What `launch/pretrain_distill.py` and `launch/pretrain.py` run.

    parse args -> load and validate the config (before any process group) -> init the layout ->
    build data, student, teacher source, objective -> train (or serve the teacher) -> exit code

Exit codes: 0 done, 2 bad configuration, 3 non-finite training stopped the run, 124 preempted after a
checkpoint (the SLURM script requeues on it).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import yaml

from distill.config import aligned_teacher_config
from distill.objective import DistillObjective
from distill.runconfig import RunConfig, load_run_config, resolve_checkpoint, resolved_dict
from distill.teacher import ColocatedTeacher, RemoteTeacher, serve_teacher
from distill.trainer import DistillTrainer, resume_step
from distill.weights import load_weights
from engine.config import ConfigError
from engine.data import TokenBatches, resolve_data_path
from engine.log import get_logger, setup_logging
from engine.parallel import ParallelLayout, destroy_parallel, init_parallel
from engine.signals import PreemptionFlag
from engine.trainer import NonFiniteError, seed_everything
from layers.config import ModelConfig
from layers.model import TransformerLM

log = get_logger(__name__)

EXIT_CONFIG, EXIT_NONFINITE, EXIT_PREEMPTED = 2, 3, 124


def parse_args(argv: list[str] | None, *, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML run configuration")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, *, distill: bool = True) -> int:
    setup_logging()
    args = parse_args(argv, description="distill a student" if distill else "train an LM")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        overrides = list(args.overrides) + ([] if distill else _lm_only_overrides())
        cfg, teacher_cfg = load_run_config(args.config, overrides, world_size=world)
    except ConfigError as err:
        print(f"ConfigError: {err}", file=sys.stderr)
        return EXIT_CONFIG
    layout = init_parallel(tp=cfg.parallel.tp, sp=cfg.parallel.sp,
                           teacher_ranks=cfg.parallel.teacher_ranks,
                           timeout_s=cfg.parallel.timeout_s)
    try:
        return _run(cfg, teacher_cfg, layout)
    except NonFiniteError as err:
        log.error("%s", err)
        return EXIT_NONFINITE
    finally:
        destroy_parallel()


def _lm_only_overrides() -> list[str]:
    """`pretrain.py` is the same engine with every distillation term off."""
    return ["distill.logit.weight=0", "distill.activations=[]", "distill.schedule=colocated"]


def _run(cfg: RunConfig, teacher_cfg: ModelConfig | None, layout: ParallelLayout) -> int:
    seed_everything(cfg.train.seed)
    run_dir = Path(cfg.train.run_dir)
    if layout.is_rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved_dict(cfg), sort_keys=False))
    resolve_data_path(cfg.data)  # builds the bundled corpus on first use
    objective = DistillObjective(cfg.distill, cfg.model, teacher_cfg, layout,
                                 seed=cfg.train.seed).to(layout.device)
    teacher_model = _load_teacher(cfg, teacher_cfg, layout)
    if layout.is_teacher:
        return _serve(cfg, layout, teacher_model, objective)
    student = _build_student(cfg, layout)
    data = TokenBatches(cfg.data, seed=cfg.train.seed, dp_rank=layout.dp_rank, dp=layout.dp)

    def valid():
        return TokenBatches(cfg.data, seed=cfg.train.seed, dp_rank=layout.dp_rank,
                            dp=layout.dp, split="valid")

    trainer = DistillTrainer(cfg=cfg.train, layout=layout, student=student, objective=objective,
                             data=data, valid_data=valid,
                             teacher=_teacher_source(cfg, layout, teacher_model, objective, data),
                             run_config=resolved_dict(cfg), vocab_size=cfg.model.vocab_size)
    last = trainer.run()
    return 0 if last >= cfg.train.steps else EXIT_PREEMPTED


def _build_student(cfg: RunConfig, layout: ParallelLayout) -> TransformerLM:
    model = TransformerLM(cfg.model, layout, seed=cfg.train.seed).to(layout.device)
    if cfg.train.init:
        load_weights(resolve_checkpoint(cfg.train.init, key="train.init"), model, layout)
    return model


def _load_teacher(cfg: RunConfig, teacher_cfg: ModelConfig | None,
                  layout: ParallelLayout) -> TransformerLM | None:
    if teacher_cfg is None or cfg.distill.schedule == "offline":
        return None
    if cfg.distill.schedule == "teacher_ranks" and not layout.is_teacher:
        return None
    aligned = aligned_teacher_config(cfg.model, teacher_cfg)  # padded like the student
    model = TransformerLM(aligned, layout, seed=cfg.train.seed).to(layout.device)
    load_weights(resolve_checkpoint(cfg.distill.teacher, key="distill.teacher"), model, layout)
    if cfg.distill.teacher_bf16:
        model.to(torch.bfloat16)
    return model


def _teacher_names(objective: DistillObjective) -> list[str]:
    head = ["head_hidden", "output_weight"] if objective.fused else ["logits"]
    return head + [f"buffer:{n}" for n in sorted(objective.teacher_buffer_names())]


def _teacher_source(cfg: RunConfig, layout: ParallelLayout, teacher_model, objective,
                    data: TokenBatches):
    schedule = cfg.distill.schedule
    if schedule == "teacher_ranks":
        per_step = cfg.data.global_batch // (cfg.data.micro_batch * layout.dp)
        remaining = cfg.train.steps - resume_step(cfg.train)
        return RemoteTeacher(layout, names=_teacher_names(objective), prefetch=cfg.distill.prefetch,
                             total=per_step * remaining)
    if schedule == "offline":
        from distill.offline import OfflineTeacher
        return OfflineTeacher(cfg.distill.offline_dir, data=data, device=layout.device)
    return None if teacher_model is None else _colocated(teacher_model, objective)


def _colocated(teacher_model: TransformerLM, objective: DistillObjective) -> ColocatedTeacher:
    """The teacher forward the objective needs: its buffers, and logits unless fused."""
    return ColocatedTeacher(teacher_model, buffer_names=objective.teacher_buffer_names(),
                            compute_logits=not objective.fused)


def _serve(cfg: RunConfig, layout: ParallelLayout, teacher_model, objective) -> int:
    teacher = _colocated(teacher_model, objective)

    def batches_for(student_dp_rank: int):
        student_dp = layout.student_world // layout.tp
        data = TokenBatches(cfg.data, seed=cfg.train.seed, dp_rank=student_dp_rank,
                            dp=student_dp)
        start = resume_step(cfg.train)  # the students resume here: skip what they have seen
        for _ in range(start):
            data.next_step()
        for _ in range(start, cfg.train.steps):
            yield from data.next_step()

    # SLURM signals every task: the teacher only records it and follows the students' decision,
    # which arrives with their acknowledgements.
    with PreemptionFlag():
        sent = serve_teacher(teacher, layout, names=_teacher_names(objective),
                             batches_for=batches_for, prefetch=cfg.distill.prefetch)
    log.info("teacher rank %d streamed %d micro-batches", layout.rank, sent)
    return 0
