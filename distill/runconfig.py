"""The whole run's configuration: YAML file + `section.key=value` overrides -> `RunConfig`.

Sections: `model` (layers.config.ModelConfig), `parallel` (engine.parallel.ParallelConfig), `data`
(engine.data.DataConfig), `distill` (distill.config.DistillConfig), `train`
(engine.train_config.TrainConfig). `load_run_config` also runs every cross-section check that can be done
before any process group exists (layout against the world size, heads against TP, batch sizes
against DP, the teacher checkpoint and its compatibility with the student, an offline teacher
export against the run), so a bad config stops with one `ConfigError: <key>: <problem>` line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from distill.config import DistillConfig, check_compatibility
from distill.offline import check_offline_dir, export_key
from engine.checkpoint import checkpoint_run_config, resolve_checkpoint
from engine.config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from engine.data import DataConfig, DataError, check_batch_layout, check_datasets
from engine.data.config import DEFAULT_PATH
from engine.parallel import LayoutError, ParallelConfig, validate_layout
from engine.train_config import TrainConfig
from layers.config import ModelConfig, check_model_layout


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the student (or the model trained)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # TP/SP/teacher ranks
    data: DataConfig = field(default_factory=DataConfig)  # corpus and batch sizes
    distill: DistillConfig = field(default_factory=DistillConfig)  # loss terms and teacher
    train: TrainConfig = field(default_factory=TrainConfig)  # optimizer, schedule, run dir


def parse_run_config(data: dict) -> RunConfig:
    return from_dict(RunConfig, data)


def check_layout(cfg: RunConfig, world_size: int) -> None:
    """Every check that needs the world size but no process group."""
    par = cfg.parallel
    try:
        validate_layout(world_size=world_size, tp=par.tp, sp=par.sp, teacher_ranks=par.teacher_ranks)
    except LayoutError as err:
        raise ConfigError(err.key, f"{err.message} (world size {world_size})") from None
    check_model_layout(cfg.model, par.tp)
    if par.sp and cfg.data.seq_len % par.tp:
        raise ConfigError("data.seq_len", f"{cfg.data.seq_len} does not split over parallel.tp="
                                          f"{par.tp} ranks (sequence parallelism)")
    check_batch_layout(cfg.data, (world_size - par.teacher_ranks) // par.tp)
    wants_ranks = cfg.distill.schedule == "teacher_ranks"
    if wants_ranks != (par.teacher_ranks > 0):
        raise ConfigError("parallel.teacher_ranks",
                          "must be > 0 exactly when distill.schedule is teacher_ranks "
                          f"(got {par.teacher_ranks} with schedule {cfg.distill.schedule})")
    check_model_data(cfg)
    check_data(cfg)
    check_paths(cfg)


def check_model_data(cfg: RunConfig) -> None:
    """The model must cover the tokenizer's ids and the sequence length."""
    if cfg.data.path == DEFAULT_PATH and cfg.model.vocab_size < cfg.data.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the bundled "
                                              f"corpus tokenizer's {cfg.data.vocab_size} tokens "
                                              "(data.vocab_size)")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError("data.seq_len", f"{cfg.data.seq_len} is longer than model.max_seq_len="
                                          f"{cfg.model.max_seq_len}")


def check_data(cfg: RunConfig) -> None:
    """The datasets as far as start-up can afford (engine.data.check_datasets: indexes, splits,
    token ids of small datasets); builds the bundled corpus on first use, before any process group
    exists, so no collective waits on it."""
    try:
        check_datasets(cfg.data, vocab_size=cfg.model.vocab_size)
    except DataError as err:
        raise ConfigError("data.path", str(err)) from None


def check_paths(cfg: RunConfig) -> None:
    """Files the run will read must exist before any process starts working."""
    if cfg.train.init:
        resolve_checkpoint(cfg.train.init, key="train.init")
    if cfg.train.resume not in ("auto", "none"):
        resolve_checkpoint(cfg.train.resume, key="train.resume")


def teacher_model_config(cfg: RunConfig) -> ModelConfig | None:
    """The teacher's architecture, read from its checkpoint's metadata (None without a teacher)."""
    if not cfg.distill.needs_teacher:
        return None
    if not cfg.distill.teacher:
        raise ConfigError("distill.teacher", "a teacher checkpoint is needed for logit or "
                                             "activation distillation")
    saved = checkpoint_run_config(resolve_checkpoint(cfg.distill.teacher, key="distill.teacher"),
                                  key="distill.teacher")
    teacher = from_dict(ModelConfig, saved["model"], prefix="distill.teacher(model)")
    if cfg.data.seq_len > teacher.max_seq_len:
        raise ConfigError("distill.teacher", f"the teacher's max_seq_len={teacher.max_seq_len} is "
                                             f"shorter than data.seq_len={cfg.data.seq_len}")
    return teacher


def load_run_config(path: str | Path, overrides: list[str], *,
                    world_size: int) -> tuple[RunConfig, ModelConfig | None]:
    """Load, override, validate; return the run config and the teacher's model config."""
    cfg = parse_run_config(apply_overrides(load_yaml(path), overrides))
    check_layout(cfg, world_size)
    teacher = teacher_model_config(cfg)
    check_compatibility(cfg.distill, cfg.model, teacher, cfg.parallel.tp)
    if cfg.distill.schedule == "offline":
        check_offline_dir(cfg.distill.offline_dir, wanted=run_export_key(cfg),
                          samples=cfg.train.steps * cfg.data.global_batch,
                          teacher=cfg.distill.teacher)
    return cfg, teacher


def run_export_key(cfg: RunConfig) -> dict:
    """The settings an offline teacher export must have been made with to serve this run."""
    return export_key(cfg.data, seed=cfg.train.seed, temperature=cfg.distill.logit.temperature,
                      vocab_size=cfg.model.vocab_size)


def resolved_dict(cfg: RunConfig) -> dict:
    return to_dict(cfg)
