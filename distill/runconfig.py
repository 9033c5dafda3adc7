"""The whole run's configuration: YAML file + `section.key=value` overrides -> `RunConfig`.

Sections: `model` (layers.config.ModelConfig), `parallel` (engine.parallel.ParallelConfig), `data`
(engine.data.DataConfig), `distill` (distill.config.DistillConfig), `train`
(engine.train_config.TrainConfig). `load_run_config` also runs every cross-section check that can be done
before any process group exists (layout against the world size, heads against TP, batch sizes
against DP, the datasets' indexes, splits and token ids, the run directory, the checkpoints the
run starts from and the teacher checkpoint and its compatibility with the student, an offline
teacher export against the run), so a bad config stops with one `ConfigError: <key>: <problem>`
line. It reads metadata, indexes and small files only (see engine.data.check_datasets).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from distill.config import DistillConfig, ResolvedPair, check_compatibility, named_teachers, teacher_key
from distill.offline import check_offline_dir, cross_store_key, store_key
from engine.checkpoint import ResolvedCheckpoint, checkpoints_after, is_intact, open_checkpoint
from engine.config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from engine.data import (
    DataConfig,
    DataError,
    IndexedTokens,
    TokenBatches,
    check_batch_layout,
    check_datasets,
    resolve_data_path,
)
from engine.data.config import DEFAULT_PATH
from engine.data.curriculum import curriculum_order, read_scores
from engine.data.dataset import check_token_ids
from engine.data.paired import PairedDocuments, read_shared_vocab
from engine.log import get_logger
from engine.parallel import STUDENT, LayoutError, ParallelConfig, validate_layout
from engine.rundir import check_run_dir
from engine.train_config import TrainConfig, resume_path
from layers.config import ModelConfig, check_model_layout, saved_model_config, shape_differences
from layers.stages import StagePlan

log = get_logger(__name__)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the student (or the model trained)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # TP/SP/PP/teacher ranks
    data: DataConfig = field(default_factory=DataConfig)  # corpus and batch sizes
    distill: DistillConfig = field(default_factory=DistillConfig)  # loss terms and teacher
    train: TrainConfig = field(default_factory=TrainConfig)  # optimizer, schedule, run dir


# The teacher's model config; with distill.teachers, each teacher's by name; None without one.
TeacherConfigs = ModelConfig | dict[str, ModelConfig] | None


@dataclass(frozen=True)
class RunCheckpoints:
    """Every checkpoint a run reads, each resolved and checked once at start-up."""

    init: ResolvedCheckpoint | None = None  # train.init
    resume: ResolvedCheckpoint | None = None  # train.resume
    teachers: dict[str, ResolvedCheckpoint] = field(default_factory=dict)
    """The teachers' by name (distill.teachers), {"": ...} for distill.teacher, {} without one."""

    @property
    def resume_step(self) -> int:
        """The step training resumes at (0 for a fresh run)."""
        return 0 if self.resume is None else self.resume.step


class StartUp(NamedTuple):
    """What start-up hands the run: the validated config, the teacher's architecture and the
    checkpoints, all read before any process group exists."""

    cfg: RunConfig
    teacher: TeacherConfigs
    checkpoints: RunCheckpoints


def parse_run_config(data: dict) -> RunConfig:
    return from_dict(RunConfig, data)


def check_layout(cfg: RunConfig, world_size: int) -> None:
    """Every check that needs the world size but no process group."""
    par = cfg.parallel
    try:
        validate_layout(par, world_size)
    except LayoutError as err:
        raise ConfigError(err.key, f"{err.message} (world size {world_size})") from None
    check_model_layout(cfg.model, par.tp, par.ep, par.etp)
    check_experts(cfg)
    check_sequence_layout(cfg)
    if par.sp and cfg.data.seq_len % par.tp:
        raise ConfigError("data.seq_len", f"{cfg.data.seq_len} does not split over parallel.tp="
                                          f"{par.tp} ranks (sequence parallelism)")
    dp = par.rank_order(STUDENT, world_size).dp
    check_batch_layout(cfg.data, dp)
    check_pipeline(cfg, dp)
    wants_ranks = cfg.distill.schedule == "teacher_ranks"
    if wants_ranks != (par.teacher_ranks > 0):
        raise ConfigError("parallel.teacher_ranks",
                          "must be > 0 exactly when distill.schedule is teacher_ranks "
                          f"(got {par.teacher_ranks} with schedule {cfg.distill.schedule})")
    if wants_ranks:
        check_teacher_ranks(cfg)
    check_model_data(cfg)
    check_data(cfg)
    if cfg.distill.cross_tokenizer.on:
        check_cross_tokenizer(cfg)


def check_cross_tokenizer(cfg: RunConfig) -> None:
    """A teacher with another tokenizer: the layouts it runs under, and the paired data of every
    dataset (the same documents and bytes in both tokenizations)."""
    par, key = cfg.parallel, "distill.cross_tokenizer.loss"
    for name, used in {"parallel.pp": par.pp > 1, "parallel.cp": par.cp > 1,
                       "data.attention_within_documents": cfg.data.attention_within_documents,
                       "model.mtp_heads": cfg.model.mtp_heads > 0}.items():
        if used:
            raise ConfigError(key, f"does not combine with {name} yet")
    tokens = cfg.distill.cross_tokenizer.teacher_tokens(cfg.data.seq_len)
    tps = {"parallel.tp": par.tp}
    if cfg.distill.schedule == "teacher_ranks":
        tps["parallel.teacher_tp"] = par.teacher_tp_degree
    for name, tp in tps.items():
        if par.sp and tokens % tp:
            raise ConfigError("distill.cross_tokenizer.teacher_seq_len",
                              f"{tokens} teacher tokens per window do not split over {name}="
                              f"{tp} ranks (sequence parallelism)")
    for tokenizer in cfg.distill.paired_tokenizers:
        for _, prefix in resolve_data_path(cfg.data):
            try:
                PairedDocuments(IndexedTokens(prefix), tokenizer)
            except DataError as err:
                raise ConfigError(_tokenizer_key(cfg, tokenizer), str(err)) from None
    shared_vocab(cfg)


def _tokenizer_key(cfg: RunConfig, tokenizer: str) -> str:
    """The config key that names paired tokenization `tokenizer` (data.path for the unnamed)."""
    names = [e.tokenizer for e in cfg.distill.teachers]
    return f"distill.teachers[{names.index(tokenizer)}].tokenizer" if tokenizer else "data.path"


def shared_vocab(cfg: RunConfig) -> torch.Tensor | dict[str, torch.Tensor] | None:
    """mapped_kl: the [K, 2] shared vocabulary of the paired data (every dataset's the same),
    with distill.teachers each teacher's by name; None for the other losses."""
    if cfg.distill.cross_tokenizer.loss != "mapped_kl":
        return None
    if cfg.distill.teachers:
        return {e.name: _shared_vocab(cfg, e.tokenizer) for e in cfg.distill.teachers}
    return _shared_vocab(cfg, "")


def _shared_vocab(cfg: RunConfig, tokenizer: str) -> torch.Tensor:
    found = []
    for _, prefix in resolve_data_path(cfg.data):
        try:
            found.append(read_shared_vocab(prefix, tokenizer))
        except DataError as err:
            raise ConfigError(_tokenizer_key(cfg, tokenizer), str(err)) from None
        if not np.array_equal(found[0], found[-1]):
            raise ConfigError("data.path", f"{prefix} was paired with other tokenizers than "
                                           f"{resolve_data_path(cfg.data)[0][1]}")
    return torch.from_numpy(found[0])


def check_cross_tokenizer_teacher(cfg: RunConfig, teacher: ModelConfig | dict[str, ModelConfig],
                                  ) -> None:
    """Each teacher must take a whole teacher window, and know every id of its paired data."""
    tokens = cfg.distill.cross_tokenizer.teacher_tokens(cfg.data.seq_len)
    teachers = {e.name: (teacher[e.name], e.tokenizer, teacher_key(cfg.distill, e.name))
                for e in cfg.distill.teachers} if cfg.distill.teachers else \
        {"": (teacher, "", "distill.teacher")}
    pairs = shared_vocab(cfg)
    for name, (model, tokenizer, key) in teachers.items():
        if tokens > model.max_seq_len:
            raise ConfigError("distill.cross_tokenizer.teacher_seq_len",
                              f"{tokens} teacher tokens per window exceed the teacher's "
                              f"max_seq_len {model.max_seq_len}")
        for _, prefix in resolve_data_path(cfg.data):
            try:
                check_token_ids(PairedDocuments(IndexedTokens(prefix), tokenizer).teacher,
                                model.vocab_size)
            except DataError as err:
                raise ConfigError(key, f"{err} (the teacher's)") from None
        if pairs is not None:
            shared = pairs[name] if isinstance(pairs, dict) else pairs
            _check_unshared(cfg.distill.logit.kind, len(shared), cfg.model.vocab_size,
                            model.vocab_size)


def _check_unshared(kind: str, shared: int, student_vocab: int, teacher_vocab: int) -> None:
    """mapped_kl is infinite when the distribution it is taken under (the teacher's for
    forward_kl) has unshared mass and the other side no unshared token (a vocabulary inside the
    other's, as BPEs of two sizes trained on the same text are)."""
    first, second = (teacher_vocab, student_vocab) if kind == "forward_kl" else \
        (student_vocab, teacher_vocab)
    if first > shared and second == shared:
        names = ("student", "teacher") if kind == "forward_kl" else ("teacher", "student")
        other = "reverse_kl" if kind == "forward_kl" else "forward_kl"
        raise ConfigError("distill.logit.kind",
                          f"{kind} is infinite for mapped_kl here: every {names[0]} token is in "
                          f"the {names[1]}'s vocabulary, so the {names[1]}'s unshared mass has "
                          f"nowhere to go (use {other}, or the likelihood loss)")


def check_sequence_layout(cfg: RunConfig) -> None:
    """Context parallelism and packed-document attention: the shapes they need, and what they do
    not combine with yet (each a one-line ConfigError naming the setting)."""
    par, data, distill = cfg.parallel, cfg.data, cfg.distill
    if par.cp > 1:
        chunk = data.seq_len // (2 * par.cp)
        if data.seq_len % (2 * par.cp) or (par.sp and (2 * chunk) % par.tp):
            raise ConfigError("data.seq_len", f"{data.seq_len} does not split into 2 x parallel.cp="
                                              f"{par.cp} chunks (of a length that splits over "
                                              f"parallel.tp={par.tp} under SP)")
        if distill.on_policy.on:
            raise ConfigError("distill.on_policy", f"does not combine with parallel.cp={par.cp} yet "
                                                   "(context parallelism runs colocated and offline "
                                                   "teachers, teacher ranks, TP/SP, PP, DP, EP, the "
                                                   "distributed optimizer and MTP heads)")
    if data.attention_within_documents:
        later = {"parallel.teacher_ranks": par.teacher_ranks > 0,
                 "distill.schedule": distill.schedule == "offline", "distill.on_policy": distill.on_policy.on}
        for key, used in later.items():
            if used:
                raise ConfigError(key, "does not combine with data.attention_within_documents yet")


def check_experts(cfg: RunConfig) -> None:
    """Expert (tensor) parallelism needs experts; split experts need the tokens split over TP."""
    par = cfg.parallel
    for key, degree in (("parallel.ep", par.ep), ("parallel.etp", par.etp)):
        if degree > 1 and cfg.model.moe is None:
            raise ConfigError(key, f"{key}={degree} needs a mixture-of-experts student (model.moe)")
    if par.etp > 1 and not par.sp and cfg.data.seq_len % par.tp:
        # each TP rank's expert shard sees every TP rank's tokens once: the tokens must split
        raise ConfigError("parallel.etp", f"parallel.etp={par.etp} needs parallel.sp or data.seq_len"
                                          f"={cfg.data.seq_len} divisible by parallel.tp={par.tp}")


def check_teacher_experts(cfg: RunConfig, teacher: ModelConfig | dict[str, ModelConfig] | None) -> None:
    """`parallel.teacher_ep` splits the experts of an MoE teacher on teacher ranks."""
    ep = cfg.parallel.teacher_ep
    if ep == 1 or teacher is None:
        return
    for model in (teacher.values() if isinstance(teacher, dict) else [teacher]):
        if model.moe is None:
            raise ConfigError("parallel.teacher_ep", f"parallel.teacher_ep={ep} needs a "
                                                     "mixture-of-experts teacher (its checkpoint's "
                                                     "model.moe)")
        if model.moe.experts % ep:
            raise ConfigError("parallel.teacher_ep", f"the teacher's {model.moe.experts} experts do "
                                                     f"not split over parallel.teacher_ep={ep}")


def check_pipeline(cfg: RunConfig, dp: int) -> None:
    """Stages of whole, equal numbers of decoder blocks, and what pipelining cannot do yet."""
    par, layers = cfg.parallel, cfg.model.layers
    if layers % par.pp:
        raise ConfigError("parallel.pp", f"parallel.pp={par.pp} does not divide the student's "
                                         f"model.layers={layers}")
    if (layers // par.pp) % par.virtual_stages:
        raise ConfigError("parallel.virtual_stages",
                          f"parallel.virtual_stages={par.virtual_stages} does not divide the "
                          f"{layers // par.pp} decoder blocks of each of the parallel.pp={par.pp} "
                          "stages")
    micro_batches = cfg.data.micro_batches(dp)
    if par.virtual_stages > 1 and micro_batches % par.pp:
        raise ConfigError("parallel.virtual_stages",
                          f"the interleaved schedule needs the {micro_batches} micro-batches of a "
                          f"step (per DP rank) to be a multiple of parallel.pp={par.pp}")
    distill = cfg.distill
    if par.pp == 1 or not (distill.logit.on or distill.activations):
        return
    if distill.schedule == "teacher_ranks" and distill.prefetch < micro_batches:
        # The stages ask for a micro-batch at different times; with a step's worth in flight the
        # teacher never waits, within a step, on an acknowledgement that needs another stage.
        raise ConfigError("distill.prefetch", f"must be >= the {micro_batches} micro-batches of a "
                                              f"step with parallel.pp={par.pp} and teacher ranks "
                                              f"(got {distill.prefetch})")


def check_pipeline_pairs(cfg: RunConfig, teacher: ModelConfig | dict[str, ModelConfig] | None,
                         pairs: list[ResolvedPair]) -> None:
    """Under PP each activation pair lives on one virtual stage: the colocated teacher is cut at
    the student's depth fractions, and both buffers must fall on the same stage. (A teacher on its
    own ranks sends each buffer to the stage that owns the student's.)"""
    par = cfg.parallel
    if par.pp == 1 or teacher is None or cfg.distill.schedule != "colocated":
        return
    # (any rank's plan: where a buffer is published does not depend on the rank asking)
    student_plan = StagePlan.every_rank(cfg.model.layers, par)[0]
    teachers = named_teachers(cfg.distill, teacher)
    for pair in pairs:
        teacher_plan = StagePlan.every_rank(teachers[pair.source].layers, par)[0]
        stages = student_plan.buffer_stage(pair.student), teacher_plan.buffer_stage(pair.teacher)
        if stages[0] != stages[1]:
            raise ConfigError("distill.activations",
                              f"{pair.student} -> {pair.teacher}: with parallel.pp={par.pp} x "
                              f"parallel.virtual_stages={par.virtual_stages} the student buffer is "
                              f"on virtual stage {stages[0]} and the teacher's on {stages[1]} "
                              "(the teacher's layers are cut at the student's depth fractions); "
                              "pair buffers of the same stage")


def check_teacher_ranks(cfg: RunConfig) -> None:
    """The teacher ranks' own TP degree against the sequence and the stream kind."""
    par, teacher_tp = cfg.parallel, cfg.parallel.teacher_tp_degree
    if par.sp and teacher_tp > 1 and cfg.data.seq_len % teacher_tp:
        raise ConfigError("parallel.teacher_tp", f"data.seq_len={cfg.data.seq_len} does not split "
                                                 f"over {teacher_tp} teacher ranks (sequence "
                                                 "parallelism)")
    if par.teacher_cp > 1:
        chunk = cfg.data.seq_len // (2 * par.teacher_cp)
        if cfg.data.seq_len % (2 * par.teacher_cp) or (par.sp and (2 * chunk) % teacher_tp):
            raise ConfigError("parallel.teacher_cp", f"data.seq_len={cfg.data.seq_len} does not "
                                                     f"split into 2 x {par.teacher_cp} chunks (of a "
                                                     f"length that splits over {teacher_tp} teacher "
                                                     "TP ranks under SP)")
        if cfg.distill.on_policy.on:
            raise ConfigError("parallel.teacher_cp", "does not combine with distill.on_policy yet")
    if cfg.distill.teacher_stream == "logits" and teacher_tp != par.tp:
        raise ConfigError("distill.teacher_stream", "logits streams logit shards, which needs "
                                                    f"parallel.teacher_tp={teacher_tp} equal to "
                                                    f"parallel.tp={par.tp}")


def check_model_data(cfg: RunConfig) -> None:
    """The model must cover the tokenizer's ids and the sequence length."""
    if cfg.data.path == DEFAULT_PATH and cfg.model.vocab_size < cfg.data.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the bundled "
                                              f"corpus tokenizer's {cfg.data.vocab_size} tokens "
                                              "(data.vocab_size)")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError("data.seq_len", f"{cfg.data.seq_len} is longer than model.max_seq_len="
                                          f"{cfg.model.max_seq_len}")
    new_tokens = cfg.distill.on_policy.max_new_tokens
    if cfg.distill.on_policy.on and new_tokens >= cfg.data.seq_len:
        raise ConfigError("distill.on_policy.max_new_tokens",
                          f"{new_tokens} leaves no prompt in data.seq_len={cfg.data.seq_len} tokens")


def check_data(cfg: RunConfig) -> None:
    """The datasets as far as start-up can afford (engine.data.check_datasets: indexes, splits,
    token ids of small datasets); builds the bundled corpus on first use, before any process group
    exists, so no collective waits on it."""
    try:
        check_datasets(cfg.data, vocab_size=cfg.model.vocab_size)
    except DataError as err:
        raise ConfigError("data.path", str(err)) from None


def check_checkpoints(cfg: RunConfig) -> tuple[ResolvedCheckpoint | None, ResolvedCheckpoint | None]:
    """The run directory, and the checkpoints the run starts from (train.init, train.resume),
    resolved once: complete, files at their recorded sizes, a model of this run's shape, and a
    resume point that has optimizer state and would not overwrite later intact checkpoints.
    Reads metadata and stats only, except the files of later checkpoints an explicit resume
    point would replace."""
    train = cfg.train
    check_run_dir(train.run_dir, resume=train.resume, overwrite=train.overwrite)
    init = open_checkpoint(train.init, key="train.init") if train.init else None
    if init is not None:
        check_start_checkpoint(cfg, init)
    path = resume_path(train)
    if path is None:
        return init, None
    resume = open_checkpoint(path, key="train.resume")
    check_start_checkpoint(cfg, resume, needs_optimizer=True)
    if train.resume != "auto":  # auto resumes from `latest`, which nothing follows
        check_later_checkpoints(train, resume)
    return init, resume


def check_later_checkpoints(train: TrainConfig, resume: ResolvedCheckpoint) -> None:
    """An explicit `train.resume` older than the run directory's newest checkpoints replaces
    them, which is refused unless every one of them is damaged (fails its size or digest: the
    advice after a damaged newest checkpoint is to resume from the newest intact one)."""
    later = checkpoints_after(Path(train.run_dir) / "checkpoints", resume.step)
    if not later:
        return
    intact = [path for path in later if is_intact(path)]
    if intact:
        raise ConfigError("train.resume", f"{resume.path} is at step {resume.step}, but "
                                          f"{train.run_dir} holds later checkpoints "
                                          f"({intact[-1].name}) that this run would replace: move "
                                          "them away or choose another train.run_dir")
    log.warning("train.resume: the later checkpoints %s fail their digests; resuming from %s, "
                "this run's saves replace them", ", ".join(p.name for p in later), resume.path)


def check_start_checkpoint(cfg: RunConfig, checkpoint: ResolvedCheckpoint, *,
                           needs_optimizer: bool = False) -> None:
    """A checkpoint the student starts from: its optimizer state (to resume) and its model's
    shape."""
    path, key = checkpoint.path, checkpoint.key
    if needs_optimizer and not checkpoint.has_optimizer:
        raise ConfigError(key, f"{path} holds model weights only (no optimizer state, like an "
                               f"imported model): start from it with train.init={path}")
    differences = shape_differences(saved_model_config(checkpoint), cfg.model)
    if differences:
        raise ConfigError(key, f"{path} holds a model of another shape than this run's "
                               f"({', '.join(differences)})")


def teacher_checkpoints(cfg: RunConfig) -> dict[str, ResolvedCheckpoint]:
    """The teachers' checkpoints, resolved and checked once: by name with `distill.teachers`,
    {"": ...} for `distill.teacher`, {} when the run needs no teacher."""
    if not cfg.distill.needs_teacher:
        return {}
    if cfg.distill.teachers:
        return {e.name: open_checkpoint(e.checkpoint, key=teacher_key(cfg.distill, e.name))
                for e in cfg.distill.teachers}
    if not cfg.distill.teacher:
        raise ConfigError("distill.teacher", "a teacher checkpoint is needed for logit or "
                                             "activation distillation")
    return {"": open_checkpoint(cfg.distill.teacher, key="distill.teacher")}


def teacher_model_config(cfg: RunConfig, teachers: dict[str, ResolvedCheckpoint]) -> TeacherConfigs:
    """The teacher's architecture from its checkpoint (None without a teacher); with
    `distill.teachers`, each teacher's by name."""
    if not teachers:
        return None
    configs = {name: teacher_config(cfg, checkpoint) for name, checkpoint in teachers.items()}
    return configs if cfg.distill.teachers else configs[""]


def teacher_config(cfg: RunConfig, checkpoint: ResolvedCheckpoint) -> ModelConfig:
    """One teacher's architecture, checked against the run's sequence length."""
    teacher = saved_model_config(checkpoint)
    if cfg.data.seq_len > teacher.max_seq_len:
        raise ConfigError(checkpoint.key, f"the teacher's max_seq_len={teacher.max_seq_len} is "
                                          f"shorter than data.seq_len={cfg.data.seq_len}")
    return teacher


def load_run_config(path: str | Path, overrides: list[str], *, world_size: int) -> StartUp:
    """Load, override, validate; the run config, the teacher's model config (with
    `distill.teachers`, each teacher's by name) and the checkpoints the run reads."""
    cfg = parse_run_config(apply_overrides(load_yaml(path), overrides))
    check_layout(cfg, world_size)
    init, resume = check_checkpoints(cfg)
    teachers = teacher_checkpoints(cfg)
    teacher = teacher_model_config(cfg, teachers)
    check_teacher_experts(cfg, teacher)
    pairs = check_compatibility(cfg.distill, cfg.model, teacher, cfg.parallel.teacher_tp_degree)
    check_pipeline_pairs(cfg, teacher, pairs)
    if cfg.distill.cross_tokenizer.on and teacher is not None:
        check_cross_tokenizer_teacher(cfg, teacher)
    curriculum(cfg)
    if cfg.distill.schedule == "offline":
        check_offline_dirs(cfg)
    return StartUp(cfg, teacher, RunCheckpoints(init=init, resume=resume, teachers=teachers))


def check_offline_dirs(cfg: RunConfig) -> None:
    """Each offline store (`distill.offline_dir`, or each of `distill.teachers`) against the
    run; an error names the teacher's key."""
    wanted = run_store_key(cfg)

    def needed() -> np.ndarray:  # the sample-map indices of every train sample the run draws
        data = TokenBatches(cfg.data, seed=cfg.train.seed, order=curriculum(cfg))
        return data.stream_sample_ids(cfg.train.steps * cfg.data.global_batch)

    k = cfg.distill.offline_top_k
    cross = cfg.distill.cross_tokenizer
    if not cfg.distill.teachers:
        check_offline_dir(cfg.distill.offline_dir, wanted=wanted, needed=needed,
                          teacher=cfg.distill.teacher, k=k,
                          cross=cross_store_key(cfg.data,
                                                teacher_tokens=cross.teacher_tokens(cfg.data.seq_len))
                          if cross.on else None,
                          uld_top_k=cross.uld_top_k if cross.loss == "uld" else 0)
    for i, entry in enumerate(cfg.distill.teachers):
        try:
            check_offline_dir(entry.offline_dir, wanted=wanted, needed=needed,
                              teacher=entry.checkpoint or None, k=k)
        except ConfigError as err:
            raise ConfigError(f"distill.teachers[{i}].offline_dir", err.message) from None


def curriculum_key(cfg: RunConfig) -> dict:
    """The run settings curriculum scores must have been made with (the sample stream's: its
    sample map, seed and blend weights)."""
    key = store_key(cfg.data, temperature=1.0, vocab_size=cfg.model.vocab_size)
    del key["temperature"], key["tokenizer"]
    weights = [weight for weight, _ in resolve_data_path(cfg.data)]
    return {**key, "seed": cfg.train.seed, "blend_weights": weights}


def curriculum(cfg: RunConfig) -> np.ndarray | None:
    """The order of the curriculum's samples (TokenBatches' `order`), None without one; reads
    and checks the scores (`ConfigError` naming data.curriculum_scores)."""
    if cfg.data.curriculum == "none":
        return None
    scores = read_scores(cfg.data.curriculum_scores, wanted=curriculum_key(cfg),
                         samples=cfg.data.curriculum_samples)
    return curriculum_order(scores, mode=cfg.data.curriculum_mode, seed=cfg.train.seed)


def run_store_key(cfg: RunConfig) -> dict:
    """The settings an offline teacher store must have been made with to serve this run."""
    return store_key(cfg.data, temperature=cfg.distill.logit.temperature,
                     vocab_size=cfg.model.vocab_size)


def resolved_dict(cfg: RunConfig) -> dict:
    return to_dict(cfg)
