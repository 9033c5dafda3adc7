"""What `launch/pretrain_distill.py` and `launch/pretrain.py` run.

    parse the launcher's environment and the config, validate everything (before any process
    group) -> init the layout -> build data, student, teacher source, objective -> train (or
    serve the teacher) -> exit code

Exit codes: 0 done, 1 a run-time failure (a teacher stream that does not match the data, a
checkpoint or metrics.jsonl that cannot be written, a lost or hung peer), 2 bad configuration,
environment or input files (a dataset, a checkpoint), 3 non-finite training stopped the run, 124
stopped by SIGTERM/SIGUSR1/SIGINT to any rank after a checkpoint (the SLURM script requeues on
it), 130 interrupted before the process groups exist or twice (nothing saved). Every
failure a user can act on is one line on stderr, printed by one rank (a lost peer: by each rank
that waited on it).
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import Callable
from pathlib import Path

import yaml

from distill.config import aligned_teacher_config, teacher_key
from distill.cross_tokenizer import STATS
from distill.objective import DistillObjective
from distill.offline import OfflineTeacher, OfflineTeacherError
from distill.on_policy import OnPolicy, on_policy_at
from distill.runconfig import (
    RunCheckpoints,
    RunConfig,
    StartUp,
    TeacherConfigs,
    curriculum,
    load_run_config,
    resolved_dict,
    shared_vocab,
)
from distill.teacher import TeacherRequest, TeacherSource
from distill.teacher_load import load_teacher, load_teacher_head
from distill.teacher_sources import ChunkStatsTeacher, ColocatedTeacher, OtherTokenizerTeacher, TeacherList
from distill.teacher_wire import (
    RemoteTeacher,
    TeacherStreamError,
    serve_teacher,
    stage_request,
    stream_request,
)
from distill.trainer import DistillTrainer
from distill.weights import load_weights
from engine import collectives
from engine.checkpoint import CheckpointError
from engine.config import ConfigError
from engine.data import DataError, TokenBatches
from engine.entry import (
    EXIT_CONFIG,
    EXIT_INTERRUPTED,
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    EXIT_RUNTIME,
    peer_lost,
    report,
    start_up,
)
from engine.log import error_line, get_logger, setup_logging
from engine.metrics import MetricsError
from engine.optim import NonFiniteError
from engine.parallel import LaunchEnv, ParallelLayout, destroy_parallel, init_parallel, is_peer_failure
from engine.rundir import RunDirLock, claim_run_dir
from engine.signals import PreemptionFlag
from engine.train_config import seed_everything
from layers.config import ModelConfig
from layers.model import TransformerLM
from layers.stages import StagePlan

log = get_logger(__name__)

# Run-time failures that every rank of a role meets alike (the stop votes, checksums and data are
# the same on all of them), or that only its first rank can meet (metrics.jsonl is rank 0's):
# reported once, by the role's first rank.
RUN_ERRORS = (TeacherStreamError, OfflineTeacherError, CheckpointError, NonFiniteError,
              MetricsError)


def parse_args(argv: list[str] | None, *, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML run configuration")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, *, distill: bool = True, exits: bool = False) -> int:
    """The entry point of `launch/pretrain_distill.py` (`distill`) and `launch/pretrain.py`: the
    exit code. `exits`: the process ends right after (the launch scripts), so a stopped run may
    leave SIGTERM ignored on its way out; an in-process caller keeps its handler."""
    setup_logging()
    args = parse_args(argv, description="distill a student" if distill else "train an LM")
    started = start_up(lambda launch: _start(args, launch, distill=distill))
    if isinstance(started, int):
        return started
    launch, (start, lock) = started
    try:
        code = _train(start, launch)  # reports its own failures
        if code == EXIT_PREEMPTED and exits:
            # Saved and done. Once one rank exits, torchrun SIGTERMs the rest: that must not turn
            # a rank still on its way out into a signal death instead of its 124.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return code
    except ConfigError as err:  # the layout, checked again as the groups are made
        return report(err, EXIT_CONFIG, show=launch.rank == 0)
    except KeyboardInterrupt:  # Ctrl-C while the groups are made (then the flag takes it)
        error_line(KeyboardInterrupt("outside the training loop, nothing saved"),
                   show=launch.rank == 0, prefix="interrupted")
        return EXIT_INTERRUPTED
    finally:
        if lock is not None:
            lock.release()


def _start(args: argparse.Namespace, launch: LaunchEnv, *, distill: bool,
           ) -> tuple[StartUp, RunDirLock | None]:
    """The validated run (config, teacher's model config, checkpoints), and rank 0's claim on
    the run directory (one run per directory, decided before any process group exists)."""
    overrides = list(args.overrides) + ([] if distill else _lm_only_overrides())
    start = load_run_config(args.config, overrides, world_size=launch.world_size)
    if launch.rank != 0:
        return start, None
    return start, claim_run_dir(start.cfg.train.run_dir, overwrite=start.cfg.train.overwrite)


def _train(start: StartUp, launch: LaunchEnv) -> int:
    """Everything after start-up validation, with each failure mapped to its one line and code."""
    cfg = start.cfg
    layout = init_parallel(cfg.parallel, launch=launch)
    first_of_role = layout.tp_rank == 0 and layout.dp_rank == 0
    # From the moment the groups exist: a signal while the run loads (as one in the loop) stops
    # the run at the end of its first step, saved, instead of killing this rank and leaving its
    # peers to find it gone. Not earlier: a rank waiting to join the groups for a peer that has
    # exited must still die by the SIGTERM with which torchrun ends it.
    preempted = PreemptionFlag()
    try:
        return _run(*start, layout, preempted)
    except ConfigError as err:  # bad input only reading the files shows (e.g. NaN teacher weights)
        return report(err, EXIT_CONFIG, show=first_of_role)
    except DataError as err:  # a bad window of a dataset too large to scan at start-up
        return report(err, EXIT_CONFIG, show=layout.tp_rank == 0)  # DP ranks read different windows
    except RUN_ERRORS as err:
        code = EXIT_NONFINITE if isinstance(err, NonFiniteError) else EXIT_RUNTIME
        return report(err, code, show=first_of_role)
    except RuntimeError as err:
        if not is_peer_failure(err):
            raise
        return peer_lost(err, layout)
    finally:
        destroy_parallel()
        preempted.close()  # last: see main on a stopped run's exit


def _lm_only_overrides() -> list[str]:
    """`pretrain.py` is the same engine with every distillation term off."""
    return ["distill.logit.weight=0", "distill.activations=[]", "distill.schedule=colocated"]


def _run(cfg: RunConfig, teacher_cfg: TeacherConfigs, ckpts: RunCheckpoints,
         layout: ParallelLayout, preempted: PreemptionFlag) -> int:
    seed_everything(cfg.train.seed)
    run_dir = Path(cfg.train.run_dir)
    if layout.is_rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved_dict(cfg), sort_keys=False))
    objective = DistillObjective(cfg.distill, cfg.model, teacher_cfg, layout,
                                 seed=cfg.train.seed, shared_vocab=shared_vocab(cfg)
                                 ).to(layout.device)
    if layout.is_teacher:
        return _serve(cfg, teacher_cfg, ckpts, layout, objective, preempted)
    student = _build_student(cfg, ckpts, layout)
    cross = cfg.distill.cross_tokenizer
    data = TokenBatches(cfg.data, seed=cfg.train.seed, dp_rank=layout.dp_rank, dp=layout.dp,
                        vocab_size=cfg.model.vocab_size, order=curriculum(cfg),
                        teacher_len=cross.teacher_tokens(cfg.data.seq_len) if cross.on else None,
                        teacher_tokenizers=cfg.distill.paired_tokenizers)
    trainer = DistillTrainer(cfg=cfg.train, layout=layout, student=student, objective=objective,
                             data=data, data_cfg=cfg.data,
                             teacher=_teacher_source(cfg, teacher_cfg, ckpts, layout, objective,
                                                     data, preempted),
                             run_config=resolved_dict(cfg), vocab_size=cfg.model.vocab_size,
                             on_policy=OnPolicy(cfg.distill.on_policy, student, layout,
                                                seed=cfg.train.seed)
                             if cfg.distill.on_policy.on else None)
    last = trainer.run(preempted)
    return 0 if last >= cfg.train.steps else _stopped(layout)


def _stopped(layout: ParallelLayout) -> int:
    """The exit code of a run stopped before its last step, returned once every rank is done:
    with teacher ranks the roles finish at different times, and the launcher ends every rank as
    soon as one exits non-zero, which could cut the students' save short."""
    if layout.teacher_ranks:
        collectives.barrier()
    return EXIT_PREEMPTED


def _build_student(cfg: RunConfig, ckpts: RunCheckpoints, layout: ParallelLayout) -> TransformerLM:
    model = TransformerLM(cfg.model, layout, seed=cfg.train.seed,
                          recompute=cfg.train.recompute).to(layout.device)
    if ckpts.init is not None:
        load_weights(ckpts.init.path, model, layout)
    return model


def _colocated(cfg: RunConfig, teacher_cfg: TeacherConfigs, ckpts: RunCheckpoints,
               layout: ParallelLayout, request: TeacherRequest,
               objective: DistillObjective | None = None) -> TeacherSource:
    """The frozen teacher at this layout, producing `request`; with `distill.teachers`, each of
    them, producing what `objective` asks of it."""
    if not cfg.distill.teachers:
        model = load_teacher(ckpts.teachers[""].path, teacher_cfg, cfg.model, layout,
                             seed=cfg.train.seed, bf16=cfg.distill.teacher_bf16)
        return ColocatedTeacher(model, request)
    sources = []
    for entry in cfg.distill.teachers:
        key = teacher_key(cfg.distill, entry.name)
        model = load_teacher(ckpts.teachers[entry.name].path, teacher_cfg[entry.name],
                             cfg.model, layout, seed=cfg.train.seed, bf16=cfg.distill.teacher_bf16,
                             key=key)
        sources.append(ColocatedTeacher(model, objective.teacher_request(entry.name),
                                        name=entry.name))
    return TeacherList(sources)


def _teacher_source(cfg: RunConfig, teacher_cfg: TeacherConfigs, ckpts: RunCheckpoints,
                    layout: ParallelLayout, objective: DistillObjective, data: TokenBatches,
                    preempted: PreemptionFlag) -> TeacherSource | None:
    schedule = cfg.distill.schedule
    if schedule == "teacher_ranks":
        per_step = cfg.data.micro_batches(layout.dp)
        remaining = cfg.train.steps - ckpts.resume_step
        # under PP each stage asks for its own part: the head on the last, its pairs' buffers
        request = stage_request(objective.teacher_request(), objective.pairs,
                                StagePlan.of(cfg.model.layers, layout))
        stream = cfg.distill.teacher_stream
        head = None
        cross = cfg.distill.cross_tokenizer
        if cross.on and cross.loss == "mapped_kl":  # the logits of the pairs at single chunks
            head = load_teacher_head(ckpts.teachers[""].path, teacher_cfg,
                                     aligned_teacher_config(cfg.model, teacher_cfg), layout,
                                     bf16=cfg.distill.teacher_bf16)
        elif not cross.on and stream_request(objective.teacher_request(), stream).head == "hidden":
            head = load_teacher_head(ckpts.teachers[""].path, teacher_cfg, cfg.model, layout,
                                     bf16=cfg.distill.teacher_bf16,
                                     here=stream_request(request, stream).head == "hidden")
        remote = RemoteTeacher(layout, request, prefetch=cfg.distill.prefetch,
                               total=per_step * remaining, stream=stream, head=head,
                               on_policy=_on_policy_stream(cfg, per_step, ckpts.resume_step),
                               preempted=preempted)
        return OtherTokenizerTeacher(remote, prepared=True) if cross.on else remote
    if schedule == "offline":
        temperature = cfg.distill.logit.temperature
        if cfg.distill.teachers:
            return TeacherList([OfflineTeacher(e.offline_dir, data=data, temperature=temperature,
                                               device=layout.device, name=e.name,
                                               key=f"distill.teachers[{i}].offline_dir",
                                               layout=layout)
                                for i, e in enumerate(cfg.distill.teachers)])
        cross = cfg.distill.cross_tokenizer
        if cross.on:  # the teacher's chunk statistics of each sample
            return OtherTokenizerTeacher(OfflineTeacher(
                cfg.distill.offline_dir, data=data, temperature=temperature,
                device=layout.device, chunk_stats=STATS[cross.loss], uld_top_k=cross.uld_top_k),
                prepared=True)
        return OfflineTeacher(cfg.distill.offline_dir, data=data, temperature=temperature,
                              device=layout.device, layout=layout)
    if teacher_cfg is None:
        return None
    source = _colocated(cfg, teacher_cfg, ckpts, layout, objective.teacher_request(), objective)
    if not cfg.distill.cross_tokenizer.on:
        return source
    if isinstance(source, TeacherList):  # each teacher on its own paired tokenization
        tokenizers = {e.name: e.tokenizer for e in cfg.distill.teachers}
        return TeacherList([OtherTokenizerTeacher(s, tokenizer=tokenizers[s.name])
                            for s in source.sources])
    return OtherTokenizerTeacher(source)


def _on_policy_stream(cfg: RunConfig, per_step: int, resume_step: int,
                      ) -> Callable[[int], bool] | None:
    """Whether the k-th micro-batch of a replica's stream (counted from where this run starts)
    is one the students continue themselves (OnPolicy's choice); None without on-policy."""
    if not cfg.distill.on_policy.on:
        return None
    start, fraction = resume_step, cfg.distill.on_policy.fraction
    return lambda k: on_policy_at(start, k, per_step=per_step, fraction=fraction)


def _serve(cfg: RunConfig, teacher_cfg: ModelConfig, ckpts: RunCheckpoints, layout: ParallelLayout,
           objective: DistillObjective, preempted: PreemptionFlag) -> int:
    teacher = _colocated(cfg, teacher_cfg, ckpts, layout,
                         stream_request(objective.teacher_request(), cfg.distill.teacher_stream))
    cross = cfg.distill.cross_tokenizer
    if cross.on:  # the teacher's chunk statistics instead of its head output
        teacher = ChunkStatsTeacher(teacher, objective.chunk_term,
                                    temperature=cfg.distill.logit.temperature)

    order = curriculum(cfg)

    def batches_for(student_dp_rank: int):
        data = TokenBatches(cfg.data, seed=cfg.train.seed, dp_rank=student_dp_rank,
                            dp=layout.students.dp, vocab_size=cfg.model.vocab_size,
                            order=order,
                            teacher_len=cross.teacher_tokens(cfg.data.seq_len) if cross.on
                            else None)
        start = ckpts.resume_step  # the students resume here: skip what they have seen
        for _ in range(start):
            data.next_step()
        for _ in range(start, cfg.train.steps):
            yield from data.next_step()

    # A signal here travels to the students with the stream; their decision to stop comes back
    # with their acknowledgements.
    stages = StagePlan.every_rank(cfg.model.layers, cfg.parallel)
    sent, early = serve_teacher(teacher, layout, batches_for=batches_for,
                                prefetch=cfg.distill.prefetch, student_sp=cfg.parallel.sp,
                                stage_requests=[stage_request(teacher.request, objective.pairs,
                                                              plan) for plan in stages],
                                on_policy=_on_policy_stream(
                                    cfg, cfg.data.micro_batches(layout.students.dp),
                                    ckpts.resume_step),
                                preempted=preempted)
    log.info("teacher rank %d streamed %d micro-batches", layout.rank, sent)
    return _stopped(layout) if early else 0
