"""The `train` config section and what interprets it besides the optimizer: seeding, and where a
run resumes from (`train.resume`).

The optimizer step itself (AdamW, schedule, clipping, non-finite skipping) is `engine.optim`; the
distillation step is `distill.trainer`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from engine.checkpoint import (
    CheckpointError,
    checkpoint_metadata,
    latest_checkpoint,
    newest_intact_checkpoint,
    resolve_checkpoint,
)
from engine.config import ConfigError, check


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100  # optimizer steps in the whole run
    lr: float = 3e-4  # peak learning rate
    min_lr: float = 3e-5  # learning rate at the end of the decay
    warmup_steps: int = 10  # linear warmup steps
    decay: Literal["cosine", "linear", "constant"] = "cosine"  # schedule after warmup
    weight_decay: float = 0.1  # AdamW decoupled weight decay (matrices only)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    seed: int = 1234  # seeds init, data order and dropout
    run_dir: str = "runs/default"  # metrics, config and checkpoints go here
    save_interval: int = 0  # save every N steps (0: only at the end and on preemption)
    keep: int = 2  # how many checkpoints to keep
    resume: str = "auto"  # auto | none | path to a checkpoint directory
    # with resume=none over an earlier run's checkpoints: move its files to run_dir/replaced-TIME/
    overwrite: bool = False
    init: str | None = None  # checkpoint to initialize the student from (weights only)
    log_interval: int = 1  # steps between metric records
    eval_interval: int = 0  # steps between validation passes (0: only at the end)
    eval_batches: int = 4  # micro-batches per validation pass
    max_skipped_steps: int = 5  # consecutive non-finite steps tolerated before stopping
    bf16: bool = True  # bf16 autocast for the forward when running on GPU (ignored on CPU)
    # student activations recomputed in the backward: none | selective (attention core) | full (blocks)
    recompute: Literal["none", "selective", "full"] = "none"
    # ZeRO-1: AdamW states sharded over DP, gradients reduce-scattered, parameters all-gathered
    distributed_optimizer: bool = False
    progress: bool = True  # tqdm progress bar on rank 0
    # comm_bytes/<group> per step in metrics.jsonl from the collective counters (auto: on CPU)
    comm_metrics: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self):
        check(self.steps >= 1, "train.steps", f"must be >= 1 (got {self.steps})")
        check(self.lr > 0, "train.lr", f"must be > 0 (got {self.lr})")
        check(0 <= self.min_lr <= self.lr, "train.min_lr",
              f"must be between 0 and train.lr={self.lr} (got {self.min_lr})")
        check(self.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0 (got {self.warmup_steps})")
        check(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0 (got {self.weight_decay})")
        check(0 <= self.beta1 < 1, "train.beta1", f"must be in [0, 1) (got {self.beta1})")
        check(0 <= self.beta2 < 1, "train.beta2", f"must be in [0, 1) (got {self.beta2})")
        check(self.eps > 0, "train.eps", f"must be > 0 (got {self.eps})")
        check(self.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (got {self.grad_clip})")
        check(self.save_interval >= 0, "train.save_interval",
              f"must be >= 0 (got {self.save_interval})")
        check(self.keep >= 1, "train.keep", f"must be >= 1 (got {self.keep})")
        check(self.log_interval >= 1, "train.log_interval", f"must be >= 1 (got {self.log_interval})")
        check(self.eval_interval >= 0, "train.eval_interval",
              f"must be >= 0 (got {self.eval_interval})")
        check(self.eval_batches >= 1, "train.eval_batches", f"must be >= 1 (got {self.eval_batches})")
        check(self.max_skipped_steps >= 1, "train.max_skipped_steps",
              f"must be >= 1 (got {self.max_skipped_steps})")
        check(self.comm_metrics in ("auto", "on", "off"), "train.comm_metrics",
              f"must be auto, on or off (got {self.comm_metrics!r})")
        check(self.recompute in ("none", "selective", "full"), "train.recompute",
              f"must be none, selective or full (got {self.recompute!r})")
        check(bool(self.run_dir), "train.run_dir", "must not be empty")
        check(bool(self.resume), "train.resume", "must be auto, none or a checkpoint path")
        check(not self.overwrite or self.resume == "none", "train.overwrite",
              f"needs train.resume=none (got {self.resume!r})")


def seed_everything(seed: int) -> None:
    """Seed every generator the run draws from (same seed on all ranks: init is TP-independent)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resume_path(cfg: TrainConfig) -> Path | None:
    """The checkpoint this run resumes from, or None: `train.resume` auto (the run directory's
    newest), none, or a path (a checkpoint, or a directory of them: its newest)."""
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        return latest_checkpoint(Path(cfg.run_dir) / "checkpoints")
    return resolve_checkpoint(cfg.resume, key="train.resume")


def resume_failure(path: Path, err: CheckpointError, *, search: bool) -> ConfigError:
    """The error for a resume checkpoint that fails to load (a file that fails its digest, ...):
    with `search` (on the rank that reports it), it also names the newest older checkpoint that
    is intact, which costs reading them, so only here."""
    hint = ""
    if search:
        intact = newest_intact_checkpoint(path.parent, before=int(checkpoint_metadata(path)["step"]))
        hint = (f"; the newest intact checkpoint is {intact}: resume from it with "
                f"train.resume={intact}") if intact else "; no older checkpoint is intact"
    return ConfigError("train.resume", f"{err}{hint}")
