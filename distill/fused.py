"""Fused LM head + losses: the per-token LM loss and divergence straight from hidden states.

The logits of student and teacher are computed tile by tile (`hidden[rows] @ weight[cols].T`,
in fp32) and reduced at once, so no `[tokens, vocab]` logits of either model ever exist; the
backward recomputes each tile and folds its gradient into the hidden-state and weight gradients.
The statistics, their communication (one all_gather for the KL kinds and the LM loss) and the
exactness are those of `distill.divergence`, which this shares its kernels with.

Tensor parallelism: `student_hidden` is replicated over the TP group and this rank's logits are
its vocabulary shard `hidden @ weight_shard.T`, so the gradient of `student_hidden` returned here
is only THIS RANK'S PARTIAL SUM. The caller must route the hidden states through
`engine.mappings.copy_to_tp` before this call (the model's `head_hidden` output already is), whose
backward all-reduces the partial sums; this function never all-reduces it itself. The weight
gradient is this rank's shard, complete.
"""

from __future__ import annotations

import torch

from distill._plan import LossPlan, TokenStats, label_columns, make_plan, reduce_stats
from engine.collectives import Group


def _tile_source(plan: LossPlan, hidden, weight, teacher_hidden, teacher_weight, teacher_logits):
    cdt = plan.compute_dtype

    def logits(rows: slice, cols: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        student = hidden[rows].to(cdt) @ weight[cols].to(cdt).T  # [rows, cols]
        if teacher_logits is not None:
            return student, teacher_logits[rows, cols]
        if teacher_hidden is not None:
            return student, teacher_hidden[rows].to(cdt) @ teacher_weight[cols].to(cdt).T
        return student, None

    return logits


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, teacher_logits, label_cols,
                ignored, plan: LossPlan, group):
        logits = _tile_source(plan, hidden, weight, teacher_hidden, teacher_weight, teacher_logits)
        tok = reduce_stats(plan, logits, n_tokens=hidden.shape[0], label_cols=label_cols,
                           ignored=ignored, group=group)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, teacher_hidden, teacher_weight, teacher_logits,
                              label_cols, ignored, *tok.tensors())
        empty = hidden.new_empty(0, dtype=plan.compute_dtype)
        return (empty if tok.ce is None else tok.ce), (empty if tok.div is None else tok.div)

    @staticmethod
    def backward(ctx, g_ce, g_div):
        plan: LossPlan = ctx.plan
        hidden, weight, t_hidden, t_weight, t_logits, label_cols, ignored, *saved = \
            ctx.saved_tensors
        if g_ce is None and g_div is None:
            return (None,) * 9
        cdt, tok = plan.compute_dtype, TokenStats(*saved)
        g_ce = None if g_ce is None else g_ce.to(cdt).masked_fill(ignored, 0.0)
        g_div = None if g_div is None else g_div.to(cdt)
        logits = _tile_source(plan, hidden, weight, t_hidden, t_weight, t_logits)
        grad_hidden = torch.zeros(hidden.shape, dtype=cdt)
        grad_weight = torch.zeros_like(weight)
        for cols in plan.col_tiles():
            w_tile = weight[cols].to(cdt)  # [cols, H]
            g_w = grad_weight[cols] if weight.dtype == cdt else torch.zeros(w_tile.shape, dtype=cdt)
            for rows in plan.row_tiles(hidden.shape[0]):
                g_logits = plan.tile_grad(
                    *logits(rows, cols), label_cols[rows] - cols.start, tok.rows(rows),
                    None if g_div is None else g_div[rows], None if g_ce is None else g_ce[rows])
                grad_hidden[rows].addmm_(g_logits, w_tile)
                g_w.addmm_(g_logits.T, hidden[rows].to(cdt))
            if weight.dtype != cdt:
                grad_weight[cols] = g_w
        return grad_hidden.to(hidden.dtype), grad_weight, None, None, None, None, None, None, None


def _check_head(student_hidden, student_weight_shard, teacher_hidden, teacher_weight_shard,
                teacher_logits, labels) -> None:
    n, h = student_hidden.shape if student_hidden.dim() == 2 else (None, None)
    if n is None or student_weight_shard.dim() != 2 or student_weight_shard.shape[1] != h:
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} and student_weight_shard "
                         f"{tuple(student_weight_shard.shape)} must be [tokens, H] and [V/tp, H]")
    if (teacher_hidden is None) != (teacher_weight_shard is None):
        raise ValueError("teacher_hidden and teacher_weight_shard go together")
    if teacher_hidden is not None and teacher_logits is not None:
        raise ValueError("give the teacher as teacher_hidden + teacher_weight_shard OR teacher_logits")
    shard = student_weight_shard.shape[0]
    if teacher_hidden is not None and (
            teacher_hidden.dim() != 2 or teacher_hidden.shape[0] != n
            or teacher_weight_shard.shape != (shard, teacher_hidden.shape[1])):
        raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} and teacher_weight_shard "
                         f"{tuple(teacher_weight_shard.shape)} must be [{n}, H_t] and [{shard}, H_t]")
    if teacher_logits is not None and teacher_logits.shape != (n, shard):
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} must be [{n}, {shard}]")
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"labels shape {tuple(labels.shape)} must be [{n}]")


def fused_lm_and_divergence(
        student_hidden: torch.Tensor, student_weight_shard: torch.Tensor, *,
        teacher_hidden: torch.Tensor | None = None,
        teacher_weight_shard: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None, labels: torch.Tensor | None = None,
        kind: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
        ignore_index: int = -100, vocab_size: int | None = None, group: Group = None,
        chunk_tokens: int = 256, chunk_vocab: int = 8192,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(per-token LM cross-entropy or None without labels, per-token divergence or None without
    a teacher) of the head `student_hidden [tokens, H] @ student_weight_shard[V/tp, H].T`.

    The teacher is `teacher_hidden [tokens, H_t]` with `teacher_weight_shard [V/tp, H_t]`, or its
    logits shard `teacher_logits [tokens, V/tp]`; it gets no gradient. Gradients go to
    `student_hidden` (this rank's partial sum: see the module docstring) and
    `student_weight_shard`. Working memory: a few fp32 tiles of chunk_tokens x chunk_vocab.
    """
    _check_head(student_hidden, student_weight_shard, teacher_hidden, teacher_weight_shard,
                teacher_logits, labels)
    has_teacher = teacher_hidden is not None or teacher_logits is not None
    if not has_teacher and labels is None:
        raise ValueError("nothing to compute: give labels, a teacher, or both")
    plan = make_plan(kind=kind if has_teacher else None, with_ce=labels is not None,
                     shard_vocab=student_weight_shard.shape[0], dtype=student_weight_shard.dtype,
                     vocab_size=vocab_size, group=group, temperature=temperature, beta=beta,
                     skew=skew, tile_tokens=chunk_tokens, tile_vocab=chunk_vocab)
    if labels is None:
        label_cols = ignored = torch.zeros(0, dtype=torch.long)
    else:
        label_cols, ignored = label_columns(plan, labels, ignore_index)
    teacher = [None if x is None else x.detach()
               for x in (teacher_hidden, teacher_weight_shard, teacher_logits)]
    ce, div = _FusedHeadLoss.apply(student_hidden, student_weight_shard, *teacher, label_cols,
                                   ignored, plan, group)
    return (ce if labels is not None else None), (div if has_teacher else None)
