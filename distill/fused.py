"""Fused LM head + losses: the per-token LM loss and divergence straight from hidden states.

The logits of student and teacher are computed tile by tile (`hidden[rows] @ weight[cols].T`,
with an fp32 result) and reduced at once, so no `[tokens, vocab]` logits of either model ever
exist; the backward recomputes each tile and folds its gradient into the hidden-state and weight
gradients. The statistics, their communication (one all_gather for the KL kinds and the LM loss) and the
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

from distill._plan import (KDDiagnostics, LossPlan, TokenStats, Upstream, label_columns,
                          make_plan, reduce_stats)
from engine.collectives import Group


def _on_tensor_cores(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16)


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b as `dtype` (fp32): bf16/fp16 CUDA operands stay on the tensor cores, accumulating in
    fp32 (their products are exact in fp32); elsewhere both are cast up first."""
    if _on_tensor_cores(a, b):
        return torch.mm(a, b, out_dtype=dtype)
    return torch.mm(a.to(dtype), b.to(dtype))


def _add_mm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b, in place where the operands allow it."""
    if _on_tensor_cores(a, b):
        out += torch.mm(a, b, out_dtype=out.dtype)
    else:
        out.addmm_(a.to(out.dtype), b.to(out.dtype))


def _tile_source(plan: LossPlan, hidden, weight, teacher_hidden, teacher_weight, teacher_logits):
    cdt = plan.compute_dtype

    def logits(rows: slice, cols: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        student = _mm(hidden[rows], weight[cols].T, cdt)  # [rows, cols]
        if teacher_logits is not None:
            return student, plan.copy_tile(teacher_logits[rows, cols])
        if teacher_hidden is not None:
            return student, _mm(teacher_hidden[rows], teacher_weight[cols].T, cdt)
        return student, None

    return logits


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, teacher_logits, label_cols,
                ignored, plan: LossPlan, group):
        logits = _tile_source(plan, hidden, weight, teacher_hidden, teacher_weight, teacher_logits)
        tok = reduce_stats(plan, logits, n_tokens=hidden.shape[0], label_cols=label_cols,
                           ignored=ignored, group=group, device=hidden.device)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, teacher_hidden, teacher_weight, teacher_logits,
                              label_cols, ignored, *tok.tensors())
        ce, div, diag = tok.outputs(hidden.new_empty(0, dtype=plan.compute_dtype))
        ctx.mark_non_differentiable(diag)
        return ce, div, diag

    @staticmethod
    def backward(ctx, g_ce, g_div, _g_diag):
        plan: LossPlan = ctx.plan
        hidden, weight, t_hidden, t_weight, t_logits, label_cols, ignored, *saved = \
            ctx.saved_tensors
        cdt, tok = plan.compute_dtype, TokenStats(*saved)
        upstream = Upstream.of(g_ce, g_div, ignored, cdt)
        if upstream.empty:
            return (None,) * 9
        logits = _tile_source(plan, hidden, weight, t_hidden, t_weight, t_logits)
        grad_hidden = hidden.new_zeros(hidden.shape, dtype=cdt)
        grad_weight = torch.zeros_like(weight)
        # Like the model's own LM head, the gradient matmuls run in the weights' dtype.
        mm_dtype = weight.dtype if weight.is_cuda else cdt
        for cols in plan.col_tiles():
            g_w = grad_weight[cols] if weight.dtype == cdt else \
                weight.new_zeros(weight[cols].shape, dtype=cdt)  # [cols, H]
            for rows in plan.row_tiles(hidden.shape[0]):
                g_logits = plan.tile_grad(*logits(rows, cols), label_cols[rows] - cols.start,
                                          tok.rows(rows), upstream.rows(rows)).to(mm_dtype)
                _add_mm_(grad_hidden[rows], g_logits, weight[cols])
                _add_mm_(g_w, g_logits.T, hidden[rows])
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
        raise ValueError("give the teacher as teacher_hidden + teacher_weight_shard, or as "
                         "teacher_logits, not both")
    shard = student_weight_shard.shape[0]
    if teacher_hidden is not None and (
            teacher_hidden.dim() != 2 or teacher_hidden.shape[0] != n
            or teacher_weight_shard.shape != (shard, teacher_hidden.shape[1])):
        raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} and teacher_weight_shard "
                         f"{tuple(teacher_weight_shard.shape)} must be [{n}, H_t] and "
                         f"[{shard}, H_t]")
    if teacher_logits is not None and teacher_logits.shape != (n, shard):
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} must be "
                         f"[{n}, {shard}]")
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"labels shape {tuple(labels.shape)} must be [{n}]")


def fused_lm_and_divergence(
        student_hidden: torch.Tensor, student_weight_shard: torch.Tensor, *,
        teacher_hidden: torch.Tensor | None = None,
        teacher_weight_shard: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None, labels: torch.Tensor | None = None,
        kind: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
        ignore_index: int = -100, vocab_size: int | None = None, group: Group = None,
        chunk_tokens: int | None = None, chunk_vocab: int | None = None,
        diagnostics: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """(per-token LM cross-entropy or None without labels, per-token divergence or None without
    a teacher) of the head `student_hidden [tokens, H] @ student_weight_shard[V/tp, H].T`.

    The teacher is `teacher_hidden [tokens, H_t]` with `teacher_weight_shard [V/tp, H_t]`, or its
    logits shard `teacher_logits [tokens, V/tp]`; it gets no gradient. Gradients go to
    `student_hidden` (this rank's partial sum: see the module docstring) and
    `student_weight_shard`. Working memory: a few fp32 tiles of chunk_tokens x chunk_vocab
    (default 256 x 8192 on CPU, 4096 x 16384 on GPU). With `diagnostics` (and a teacher) a third
    element, the `KDDiagnostics` per token, from the same statistics and collectives.
    """
    _check_head(student_hidden, student_weight_shard, teacher_hidden, teacher_weight_shard,
                teacher_logits, labels)
    has_teacher = teacher_hidden is not None or teacher_logits is not None
    if not has_teacher and labels is None:
        raise ValueError("nothing to compute: give labels, a teacher, or both")
    plan = make_plan(kind=kind if has_teacher else None, with_ce=labels is not None,
                     shard_vocab=student_weight_shard.shape[0], dtype=student_weight_shard.dtype,
                     vocab_size=vocab_size, group=group, device=student_hidden.device,
                     temperature=temperature, beta=beta, skew=skew, tile_tokens=chunk_tokens,
                     tile_vocab=chunk_vocab, diagnostics=diagnostics)
    if labels is None:
        label_cols = ignored = torch.zeros(0, dtype=torch.long, device=student_hidden.device)
    else:
        label_cols, ignored = label_columns(plan, labels, ignore_index)
    teacher = [None if x is None else x.detach()
               for x in (teacher_hidden, teacher_weight_shard, teacher_logits)]
    ce, div, diag = _FusedHeadLoss.apply(student_hidden, student_weight_shard, *teacher,
                                         label_cols, ignored, plan, group)
    out = (ce if labels is not None else None), (div if has_teacher else None)
    if not diagnostics:
        return out
    return *out, KDDiagnostics.of(diag, diag.shape[:1]) if plan.diagnostics else None
