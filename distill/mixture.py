"""The weighted mixture of several teachers' distributions, on vocabulary shards.

    m = sum_k w_k softmax(t_k / T),   w_k >= 0, sum_k w_k = 1

`mixture_log_probs` returns log m on this rank's contiguous vocabulary shard, exactly (to the
compute dtype's round-off), without gathering the vocabulary: each teacher's log-probabilities
need only its global log-normalizer, and those of all K teachers come from ONE all_gather of
[tokens, 2K] floats (each shard's max and sum of exp((t - max) / T), merged by the log-sum-exp
rule of distill/_plan.py). The mixture then is a per-column log-sum-exp of log w_k + log q_k,
local to the shard. It is a normalized distribution, so a divergence to it (distill.divergence,
one all_gather for the KL kinds, one more all_reduce for the others) is the divergence to the
mixture: two collectives in all for the KL kinds, three for the others. Memory: one
[tokens, V/tp] tensor in the compute dtype beside the teachers' logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from distill._plan import merge_max, shift_
from engine import collectives as C
from engine.collectives import Group


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.no_grad()
def mixture_log_probs(teacher_logits: Sequence[torch.Tensor], weights: Sequence[float], *,
                      temperature: float = 1.0, vocab_size: int | None = None,
                      group: Group = None) -> torch.Tensor:
    """log sum_k w_k softmax(teacher_logits[k] / T) on this rank's shard [..., V/tp].

    `teacher_logits`: K logit shards of one shape; `weights`: K numbers >= 0, normalized here.
    Columns at or past `vocab_size` (padding) are -inf. No gradient (teachers are constants).
    """
    if len(teacher_logits) != len(weights) or not teacher_logits:
        raise ValueError(f"{len(teacher_logits)} teacher logit shards for {len(weights)} weights")
    shape = teacher_logits[0].shape
    if any(t.shape != shape for t in teacher_logits):
        raise ValueError(f"teacher logit shards differ in shape: "
                         f"{[tuple(t.shape) for t in teacher_logits]}")
    if min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"mixture weights must be >= 0 with a positive sum (got {weights})")
    width = shape[-1]
    vocab_size = width * C.group_size(group) if vocab_size is None else vocab_size
    valid = min(max(vocab_size - C.group_rank(group) * width, 0), width)
    cdt = _compute_dtype(teacher_logits[0])
    used = [(t.reshape(-1, width)[:, :valid].to(cdt, copy=True), w / sum(weights))
            for t, w in zip(teacher_logits, weights) if w > 0]
    # [tokens, 2K]: each teacher's raw max over this shard, and sum exp((t - max) / T)
    local = []
    for x, _ in used:
        top = x.amax(-1) if valid else x.new_full(x.shape[:1], float("-inf"))
        local += [top, shift_(x.clone(), top, temperature).exp().sum(-1)]
    gathered = C.all_gather(torch.stack(local, -1)[None], group, dim=0)  # [tp, tokens, 2K]
    out = torch.full((gathered.shape[1], width), float("-inf"), dtype=cdt,
                     device=teacher_logits[0].device)
    mix = out[:, :valid]
    for k, (x, w) in enumerate(used):
        top, shift = merge_max(gathered[..., 2 * k], temperature)
        log_norm = (shift.exp() * gathered[..., 2 * k + 1]).sum(0).log()
        log_q = shift_(x, top, temperature).sub_(log_norm[:, None])  # x is a fresh copy
        torch.logaddexp(mix, log_q.add_(math.log(w)), out=mix)
    return out.reshape(shape)
