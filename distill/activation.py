"""Activation distillation on buffers in their sharded layout, never gathered.

A buffer (`layers.buffers.ActivationBuffer`) is [batch, seq, width] or [seq, batch, width] (its
`seq_dim` says which), full width per token, and either sequence-sharded over the TP group (under
SP) or replicated on every TP rank. Per token (fp32 math):

    mse     mean over the width of (S - T)^2       (its token mean is the mean over elements)
    l2      ||S - T||_2                            (the form L + lambda * mean_i ||T_i - S_i||)
    cosine  1 - cos(S, T)
    router  KL(softmax(T) || softmax(S))           (router logits [.., experts]: the routing
                                                    distributions; never projected)

Each pair's value is the sum over valid tokens divided by the *global* number of valid tokens
(`num_tokens`: all micro-batches and DP ranks of the step). On sequence-sharded buffers each rank
sums its own tokens and the pairs' partial sums cross the TP group in ONE all-reduce
(`reduce_from_tp`: forward sum, backward identity), so every rank holds the full value while each
token's gradient is produced once, by the rank that owns it. Replicated buffers are computed whole
on every rank, with no communication: counted once, gradient not duplicated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from engine import collectives as C
from engine.collectives import Group
from engine.mappings import reduce_from_tp
from layers.buffers import ActivationBuffer

if TYPE_CHECKING:
    from distill.config import ResolvedPair
    from distill.projection import ActivationProjection


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token loss [...] between [..., width] activations, in fp32 (or wider)."""
    student, teacher = at_least_fp32(student), at_least_fp32(teacher)
    if kind == "mse":
        return (student - teacher).square().mean(dim=-1)
    if kind == "l2":
        return torch.linalg.vector_norm(student - teacher, dim=-1)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    if kind == "router":
        log_t, log_s = F.log_softmax(teacher, dim=-1), F.log_softmax(student, dim=-1)
        return (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    raise ValueError(f"unknown activation loss {kind!r} (use mse, l2, cosine or router)")


def _local_mask(mask: torch.Tensor | None, buf: ActivationBuffer,
                group: Group) -> torch.Tensor | None:
    """The [batch, seq] token mask in the buffer's token layout, for the tokens this rank holds."""
    if mask is None:
        return None
    mask = mask if buf.seq_dim == 1 else mask.t()
    return C.split_along(mask, group, dim=buf.seq_dim) if buf.seq_sharded else mask


def _teacher_like(teacher: ActivationBuffer | torch.Tensor, student: ActivationBuffer,
                  group: Group, name: str) -> torch.Tensor:
    """The teacher's activation in the student buffer's layout (a bare tensor is taken as such)."""
    if isinstance(teacher, torch.Tensor):
        out = teacher
    else:
        if teacher.seq_dim != student.seq_dim:
            raise ValueError(f"teacher buffer {name!r} has seq_dim {teacher.seq_dim}, "
                             f"the student's {student.seq_dim}")
        out = teacher.tensor
        if teacher.seq_sharded and not student.seq_sharded:
            out = C.all_gather(out, group, dim=teacher.seq_dim)
        elif student.seq_sharded and not teacher.seq_sharded:
            out = C.split_along(out, group, dim=teacher.seq_dim)
    if out.shape[:-1] != student.tensor.shape[:-1]:
        raise ValueError(f"teacher buffer {name!r} holds tokens {tuple(out.shape[:-1])}, the "
                         f"student's buffer {tuple(student.tensor.shape[:-1])}")
    return out


def _check_projection_layout(buf: ActivationBuffer, projection: ActivationProjection,
                             name: str) -> None:
    if buf.seq_sharded != (projection.layout.sp and projection.layout.tp > 1):
        raise ValueError(f"student buffer {name!r} is seq_sharded={buf.seq_sharded} under "
                         f"parallel.sp={projection.layout.sp}: the projection's gradients "
                         "rely on buffers being sequence-sharded exactly under SP")


def _masked_sum(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_token.sum()
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum()


def _combine_over_tp(sums: torch.Tensor, sharded: list[bool], group: Group) -> torch.Tensor:
    """Whole values from per-rank sums: ONE all-reduce for the sharded pairs, none otherwise."""
    flags = torch.tensor(sharded, device=sums.device)
    if not flags.any() or C.group_size(group) == 1:
        return sums
    reduced = reduce_from_tp(torch.where(flags, sums, torch.zeros_like(sums)), group)
    return torch.where(flags, reduced, sums)


def activation_pair_means(pairs: Sequence[ResolvedPair], student: Mapping[str, ActivationBuffer],
                          teacher: Mapping[str, ActivationBuffer | torch.Tensor], *,
                          token_mask: torch.Tensor | None, num_tokens: float,
                          projection: ActivationProjection | None = None,
                          pair_indices: list[int] | None = None,
                          group: Group = None) -> torch.Tensor:
    """Each pair's loss summed over valid tokens / `num_tokens`: [len(pairs)] fp32, equal on all
    TP ranks, with gradients to the student buffers (and projection) of this rank's tokens.

    `token_mask` [batch, seq] (full sequence, batch first) marks the tokens that count, None = all;
    `num_tokens` is their global count; `group` is the TP group. A teacher entry may be a bare
    tensor, taken to be in the student buffer's layout. `pair_indices`: each projected pair's
    index among the run's projected pairs (the projection's per-pair weights; `router` pairs are
    not projected and not counted) when `pairs` is some of them.
    """
    if not pairs:
        return torch.zeros(0)
    bufs = [student[p.student] for p in pairs]
    hidden = [at_least_fp32(b.tensor) for b in bufs]
    projected = [i for i, p in enumerate(pairs) if p.loss != "router"]
    if projection is not None and projected:
        for i in projected:
            _check_projection_layout(bufs[i], projection, pairs[i].student)
        outs = projection([hidden[i] for i in projected], pair_indices)
        for i, out in zip(projected, outs):
            hidden[i] = out
    sums = []
    for pair, buf, h in zip(pairs, bufs, hidden):
        target = _teacher_like(teacher[pair.teacher], buf, group, pair.teacher)
        if h.shape[-1] != target.shape[-1]:
            raise ValueError(f"activation pair {pair.student} -> {pair.teacher}: widths "
                             f"{h.shape[-1]} and {target.shape[-1]} differ without a projection")
        per_token = token_loss(h, target, pair.loss)
        sums.append(_masked_sum(per_token, _local_mask(token_mask, buf, group)))
    totals = _combine_over_tp(torch.stack(sums), [b.seq_sharded for b in bufs], group)
    return totals / max(num_tokens, 1)
