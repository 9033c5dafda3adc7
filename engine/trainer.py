"""Model-agnostic training machinery: the `train` config section, seeding, and the optimizer step
that clips by a TP-correct global norm and skips non-finite steps.

The distillation step itself (teacher outputs, student forward, objective, backward) lives in
`distill.trainer`; this module only knows parameters, gradients and numbers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from engine.config import check
from engine.log import get_logger
from engine.optim import LRSchedule, build_adamw, clip_grads, grad_norm, set_lr
from engine.parallel import ParallelLayout

log = get_logger(__name__)


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
    init: str | None = None  # checkpoint to initialize the student from (weights only)
    log_interval: int = 1  # steps between metric records
    eval_interval: int = 0  # steps between validation passes (0: only at the end)
    eval_batches: int = 4  # micro-batches per validation pass
    max_skipped_steps: int = 5  # consecutive non-finite steps tolerated before stopping
    bf16: bool = True  # bf16 autocast for the forward when running on GPU (ignored on CPU)
    progress: bool = True  # tqdm progress bar on rank 0

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
        check(bool(self.run_dir), "train.run_dir", "must not be empty")
        check(bool(self.resume), "train.resume", "must be auto, none or a checkpoint path")


def seed_everything(seed: int) -> None:
    """Seed every generator the run draws from (same seed on all ranks: init is TP-independent)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class StepStats:
    grad_norm: float
    lr: float
    skipped: bool


class OptimizerStep:
    """AdamW + schedule + TP-correct clipping; a non-finite loss or gradient skips the step."""

    def __init__(self, cfg: TrainConfig, layout: ParallelLayout,
                 params: list[torch.nn.Parameter]):
        self.cfg, self.layout = cfg, layout
        self.params = [p for p in params if p.requires_grad]
        self.optimizer = build_adamw(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        self.schedule = LRSchedule(lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                                   total_steps=cfg.steps, decay=cfg.decay)
        self.skipped_total = 0
        self.skipped_in_a_row = 0

    def __call__(self, step: int, *, loss: float) -> StepStats:
        """Apply the optimizer for `step` (0-based); `loss` must already agree across ranks."""
        norm = grad_norm(self.params, self.layout)
        lr = self.schedule(step)
        if not (torch.isfinite(norm) and np.isfinite(loss)):
            return self._skip(step, loss, norm, lr)
        self.skipped_in_a_row = 0
        clip_grads(self.params, norm, self.cfg.grad_clip)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(grad_norm=norm.item(), lr=lr, skipped=False)

    def _skip(self, step: int, loss: float, norm: torch.Tensor, lr: float) -> StepStats:
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_total += 1
        self.skipped_in_a_row += 1
        log.warning("step %d skipped: loss=%s grad_norm=%s (%d in a row)", step, loss,
                    norm.item(), self.skipped_in_a_row)
        if self.skipped_in_a_row > self.cfg.max_skipped_steps:
            raise NonFiniteError(
                f"{self.skipped_in_a_row} consecutive steps had a non-finite loss or gradient "
                f"(last at step {step}); lower train.lr or check the data "
                f"(train.max_skipped_steps={self.cfg.max_skipped_steps})")
        return StepStats(grad_norm=float("nan"), lr=lr, skipped=True)

    def state_dict(self) -> dict:
        return {"skipped_total": self.skipped_total, "skipped_in_a_row": self.skipped_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_total = int(state["skipped_total"])
        self.skipped_in_a_row = int(state["skipped_in_a_row"])
