"""Optimizer, learning-rate schedule and a gradient norm that is correct under TP and SP.

`OptimizerStep` is what the trainer calls once per step: AdamW, the schedule, clipping by the global
norm, and skipping of non-finite steps.

Parameters carry the tag `tp_split_dim` (engine/param_tags.py; None when replicated over TP). The
global norm sums squares of every shard once: split parameters contribute their local shard and the
partial sums are all-reduced over TP; replicated parameters (identical on every TP rank once their
gradients are finalized) are counted once, on every rank, outside that reduction. Data-parallel
replicas hold equal gradients after DDP, so no DP reduction is needed. With
`train.distributed_optimizer` the optimizer is `ShardedAdamW` (engine/dist_optim.py): gradients are
reduce-scattered instead, each DP rank sums the squares of its slices, and the same rule applies to
the sums over DP. Pipeline stages hold disjoint parameters: their sums of squares are added over the
pipeline group; a parameter tagged `pp_duplicate` (the last stage's copy of a tied embedding, whose
gradient equals the first stage's) is left out, by both optimizers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from engine import collectives as C
from engine.dist_optim import ShardedAdamW
from engine.log import get_logger
from engine.parallel import ParallelLayout
from engine.param_tags import param_tags
from engine.train_config import TrainConfig

log = get_logger(__name__)


def adamw_groups(params: Iterable[torch.nn.Parameter], *, weight_decay: float) -> list[dict]:
    """No weight decay on 1-D parameters (norms, biases), as is usual for LMs."""
    params = [p for p in params if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def build_adamw(params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float,
                betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    """AdamW over `adamw_groups`."""
    # foreach=False keeps the update order, and so the bits, identical across runs and resumes.
    return torch.optim.AdamW(adamw_groups(params, weight_decay=weight_decay), lr=lr, betas=betas,
                             eps=eps, foreach=False)


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup to `lr`, then cosine or linear decay to `min_lr` at `total_steps`."""

    lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    decay: str = "cosine"  # cosine | linear | constant

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return self.lr
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.decay == "linear":
            return self.min_lr + (self.lr - self.min_lr) * (1.0 - progress)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def grad_norm(params: Iterable[torch.nn.Parameter], layout: ParallelLayout) -> torch.Tensor:
    """Global L2 norm of the gradients of the full (unsharded) model, same on all ranks.

    Squares are summed in float64: the norm then does not depend on how the gradients are cut
    (whole parameters here, DP slices in the distributed optimizer) beyond float64 round-off,
    where fp32 sums in another order differ in the last bits and clipping passes that on."""
    device = layout.device
    split_sq = torch.zeros((), dtype=torch.float64, device=device)
    replicated_sq = torch.zeros((), dtype=torch.float64, device=device)
    expert_sq = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        tags = param_tags(p)
        if p.grad is None or tags.pp_duplicate:
            continue
        sq = p.grad.detach().double().pow(2).sum()
        if tags.expert:  # each EP rank holds other experts (whole, or split over TP with etp)
            expert_sq += sq
        elif tags.tp_split_dim is None:
            replicated_sq += sq
        else:
            split_sq += sq
    if layout.ep > 1:
        C.all_reduce(expert_sq, layout.ep_group)
    if layout.etp > 1:  # the experts' TP slices: summed over TP with the other split parameters
        return _combine(split_sq + expert_sq, replicated_sq, layout)
    return _combine(split_sq, replicated_sq + expert_sq, layout)


def reduce_expert_gradients(params: Iterable[torch.nn.Parameter], layout: ParallelLayout, *,
                            scale: float = 1.0) -> None:
    """Sum the routed experts' gradients over the expert-DP group (one flat all-reduce) and
    multiply them by `scale`: the data-parallel reductions of the dense parameters (DDP, the
    pipeline's DP sum) leave the experts out, since other DP ranks hold other experts."""
    grads = [p.grad for p in params if param_tags(p).expert and p.grad is not None]
    if not grads or (C.group_size(layout.expert_dp_group) == 1 and scale == 1.0):
        return
    flat = C.all_reduce(_flatten_dense_tensors(grads), layout.expert_dp_group)
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced * scale if scale != 1.0 else synced)


def _combine(split_sq: torch.Tensor, replicated_sq: torch.Tensor,
             layout: ParallelLayout) -> torch.Tensor:
    """The global norm from the squares of TP-split (summed over TP here) and TP-replicated
    gradients."""
    C.all_reduce(split_sq, layout.tp_group)
    total_sq = split_sq + replicated_sq
    C.all_reduce(total_sq, layout.pp_group)
    return total_sq.sqrt()


def clip_scale(norm: torch.Tensor, max_norm: float) -> float | None:
    """The factor that brings the global norm down to `max_norm`; None when nothing is scaled."""
    if max_norm <= 0 or not torch.isfinite(norm):
        return None
    scale = max_norm / (norm.item() + 1e-6)
    return scale if scale < 1.0 else None


def clip_grads(params: list[torch.nn.Parameter], norm: torch.Tensor, max_norm: float) -> None:
    """Scale gradients in place so that their global norm is at most `max_norm` (0 = no clipping)."""
    scale = clip_scale(norm, max_norm)
    if scale is not None:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class StepStats:
    grad_norm: float
    lr: float
    skipped: bool


class OptimizerStep:
    """AdamW + schedule + TP-correct clipping; a non-finite loss or gradient skips the step.

    With `cfg.distributed_optimizer` the AdamW is `ShardedAdamW`, which reduces the gradients
    over DP itself (the trainer then uses no DDP)."""

    def __init__(self, cfg: TrainConfig, layout: ParallelLayout,
                 params: list[torch.nn.Parameter]):
        self.cfg, self.layout = cfg, layout
        self.params = [p for p in params if p.requires_grad]
        self.sharded = cfg.distributed_optimizer
        betas = (cfg.beta1, cfg.beta2)
        self.optimizer = ShardedAdamW(
            adamw_groups(self.params, weight_decay=cfg.weight_decay), lr=cfg.lr, betas=betas,
            eps=cfg.eps, layout=layout) if self.sharded else build_adamw(
            self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=betas, eps=cfg.eps)
        self.schedule = LRSchedule(lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                                   total_steps=cfg.steps, decay=cfg.decay)
        self.skipped_total = 0
        self.skipped_in_a_row = 0

    def __call__(self, step: int, *, loss: float) -> StepStats:
        """Apply the optimizer for `step` (0-based); `loss` must already agree across ranks."""
        if self.sharded:
            self.optimizer.reduce_gradients()
            norm = _combine(*self.optimizer.grad_squares(), self.layout)
        else:
            norm = grad_norm(self.params, self.layout)
        lr = self.schedule(step)
        if not (torch.isfinite(norm) and np.isfinite(loss)):
            return self._skip(step, loss, norm, lr)
        self.skipped_in_a_row = 0
        if not self.sharded:
            clip_grads(self.params, norm, self.cfg.grad_clip)
        elif (scale := clip_scale(norm, self.cfg.grad_clip)) is not None:
            self.optimizer.scale_grads(scale)
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
