"""Exact vocab-parallel divergences and cross-entropy on sharded logits.

Inputs are this rank's contiguous vocabulary shard (rank r of `group` holds global columns
r*V/tp .. (r+1)*V/tp - 1) of `[..., V/tp]` logits in any float dtype. The math runs in fp32 (fp64
for fp64 inputs) and the outputs are per-token, in nats, in that dtype. Nothing of size
tokens x vocab crosses processes: `forward_kl`, `reverse_kl`, `cross_entropy` and
`lm_and_divergence` with either KL take one all_gather of a few floats per token; `jsd`, `tvd` and
the skew kinds add one all_reduce of two floats per token. Diagnostics (`diagnostics=True`:
teacher and student entropy, top-1 agreement) add four floats per token to the same all_gather
and no collective. The backward is analytic, recomputes
the logits tile by tile from the saved inputs and per-token statistics, and communicates nothing.
Gradients reach the student logits only; the teacher is a constant.

Logits may hold -inf (a zero-probability column). Columns at or past `vocab_size` (padding of the
last shards) are excluded from both distributions and get a zero gradient. A divergence that is
infinite mathematically (forward KL where the teacher has mass on a student -inf column, reverse
KL the other way round) comes out as inf; every bounded kind stays finite.
"""

from __future__ import annotations

import torch

from distill._plan import (
    KDDiagnostics,
    LossPlan,
    TokenStats,
    Upstream,
    label_columns,
    make_plan,
    reduce_stats,
)
from distill._topk import topk_divergence
from distill.kinds import KINDS
from engine.collectives import Group
from engine.data import IGNORE_INDEX

__all__ = ["KDDiagnostics", "KINDS", "cross_entropy", "divergence", "lm_and_divergence",
           "topk_divergence"]


class _ShardedLoss(torch.autograd.Function):
    """Per-token cross-entropy and divergence of [tokens, V/tp] logit shards (see LossPlan)."""

    @staticmethod
    def forward(ctx, student, teacher, label_cols, ignored, plan: LossPlan, group):
        def logits(rows, cols):
            return plan.copy_tile(student[rows, cols]), \
                None if teacher is None else plan.copy_tile(teacher[rows, cols])

        tok = reduce_stats(plan, logits, n_tokens=student.shape[0], label_cols=label_cols,
                           ignored=ignored, group=group, device=student.device)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(student, teacher, label_cols, ignored, *tok.tensors())
        empty = student.new_empty(0, dtype=plan.compute_dtype)
        ce, div = tok.outputs(empty)
        diag = empty if tok.diag is None else tok.diag
        ctx.mark_non_differentiable(diag)
        return ce, div, diag

    @staticmethod
    def backward(ctx, g_ce, g_div, _g_diag):
        plan: LossPlan = ctx.plan
        student, teacher, label_cols, ignored, *saved = ctx.saved_tensors
        tok, upstream = TokenStats(*saved), Upstream.of(g_ce, g_div, ignored, plan.compute_dtype)
        if upstream.empty:
            return (None,) * 6
        grad = torch.empty_like(student)
        grad[:, plan.valid:] = 0
        for _, rows, cols in plan.tiles(student.shape[0]):
            t = None if teacher is None else plan.copy_tile(teacher[rows, cols])
            grad[rows, cols] = plan.tile_grad(plan.copy_tile(student[rows, cols]), t,
                                              label_cols[rows] - cols.start, tok.rows(rows),
                                              upstream.rows(rows))
        return grad, None, None, None, None, None


def _check_pair(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if teacher.shape != student.shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher.shape)} differs from student_logits "
                         f"shape {tuple(student.shape)}")


def _check_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must be logits shape without the "
                         f"vocabulary dim {tuple(logits.shape[:-1])}")


def _run(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None, *,
         kind: str | None, temperature: float, beta: float, skew: float, ignore_index: int,
         vocab_size: int | None, group: Group, chunk_tokens: int | None,
         chunk_vocab: int | None, diagnostics: bool = False,
         ) -> tuple[torch.Tensor | None, torch.Tensor | None, KDDiagnostics | None]:
    plan = make_plan(kind=kind, with_ce=labels is not None, shard_vocab=student.shape[-1],
                     dtype=student.dtype, vocab_size=vocab_size, group=group,
                     device=student.device,
                     temperature=temperature, beta=beta, skew=skew, tile_tokens=chunk_tokens,
                     tile_vocab=chunk_vocab, diagnostics=diagnostics)
    lead = student.shape[:-1]
    student_2d = student.reshape(-1, student.shape[-1])  # [tokens, V/tp]
    teacher_2d = None if teacher is None else teacher.detach().reshape(student_2d.shape)
    if labels is None:
        label_cols = ignored = torch.zeros(0, dtype=torch.long, device=student.device)
    else:
        label_cols, ignored = label_columns(plan, labels.reshape(-1), ignore_index)
    ce, div, diag = _ShardedLoss.apply(student_2d, teacher_2d, label_cols, ignored, plan, group)
    return (None if labels is None else ce.reshape(lead),
            None if teacher is None else div.reshape(lead),
            KDDiagnostics.of(diag, lead) if plan.diagnostics else None)


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
               kind: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
               skew: float = 0.1, vocab_size: int | None = None, group: Group = None,
               chunk_tokens: int | None = None, chunk_vocab: int | None = None,
               diagnostics: bool = False) -> torch.Tensor | tuple[torch.Tensor, KDDiagnostics]:
    """Per-token divergence between softmax(teacher/T) and softmax(student/T), in nats.

    Kinds (p_t teacher, p_s student): `forward_kl` KL(p_t||p_s), `reverse_kl` KL(p_s||p_t), `jsd`
    beta KL(p_t||m) + (1-beta) KL(p_s||m) with m = beta p_t + (1-beta) p_s, `tvd`
    0.5 sum|p_t - p_s|, `skew_forward_kl` KL(p_t || skew p_t + (1-skew) p_s), `skew_reverse_kl`
    KL(p_s || skew p_s + (1-skew) p_t). No temperature-squared factor (the objective applies it).
    Shape: logits.shape[:-1]. Working memory: a few fp32 tiles of chunk_tokens x chunk_vocab
    (default 256 x 8192 on CPU, 4096 x 16384 on GPU). With `diagnostics`, returns
    (divergence, KDDiagnostics): entropies and top-1 agreement from the same statistics, in the
    same collectives.
    """
    _check_pair(student_logits, teacher_logits)
    _, div, diag = _run(student_logits, teacher_logits, None, kind=kind, temperature=temperature,
                        beta=beta, skew=skew, ignore_index=IGNORE_INDEX, vocab_size=vocab_size,
                        group=group, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab,
                        diagnostics=diagnostics)
    return (div, diag) if diagnostics else div


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX,
                  vocab_size: int | None = None, group: Group = None,
                  chunk_tokens: int | None = None,
                  chunk_vocab: int | None = None) -> torch.Tensor:
    """Per-token cross-entropy of vocab-sharded logits against global label ids; 0 where ignored."""
    _check_labels(logits, labels)
    return _run(logits, None, labels, kind=None, temperature=1.0, beta=0.5, skew=0.1,
                ignore_index=ignore_index, vocab_size=vocab_size, group=group,
                chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)[0]


def lm_and_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor, *, kind: str = "forward_kl", temperature: float = 1.0,
                      beta: float = 0.5, skew: float = 0.1, ignore_index: int = IGNORE_INDEX,
                      vocab_size: int | None = None, group: Group = None,
                      chunk_tokens: int | None = None, chunk_vocab: int | None = None,
                      diagnostics: bool = False) -> tuple[torch.Tensor, ...]:
    """(per-token cross-entropy at temperature 1, per-token divergence) from one pass, and with
    `diagnostics` a third element, the `KDDiagnostics`.

    The same communication as `divergence` alone: one all_gather for the KL kinds. Either output
    may feed the loss alone or both in any weighted sum; the gradient is right in every case.
    """
    _check_pair(student_logits, teacher_logits)
    _check_labels(student_logits, labels)
    ce, div, diag = _run(student_logits, teacher_logits, labels, kind=kind,
                         temperature=temperature, beta=beta, skew=skew,
                         ignore_index=ignore_index, vocab_size=vocab_size, group=group,
                         chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab,
                         diagnostics=diagnostics)
    return (ce, div, diag) if diagnostics else (ce, div)
