"""Fused LM head + losses: the per-token LM loss and divergence straight from hidden states.

The logits of student and teacher are computed tile by tile (`hidden[rows] @ weight[cols].T`,
with an fp32 result) and reduced at once, so no `[tokens, vocab]` logits of either model ever
exist. Two paths:

- `fused_head_loss` with the per-token weights of the loss (the objective's: mask / global token
  count x term weight) computes the gradient in the forward ("grad_in_forward"): row blocks whose
  [rows, V/tp] logits of both models are kept while their statistics cross the TP group, then
  turned into the logits' gradient and folded into the hidden-state and weight gradients. Four
  [tokens, H] x [H, V/tp] matrix products in all; the backward scales by one scalar.
- `fused_lm_and_divergence` returns per-token values for any later use ("recompute"): the
  forward streams tiles, and the backward recomputes each tile of both models (six products).

The statistics, their communication (one all_gather for the KL kinds and the LM loss, per call or
per row block) and the exactness are those of `distill.divergence`, whose kernels this shares.

Soft-capping (`softcap`, `teacher_softcap`: a model's `final_logit_softcap`): each tile of logits
computed from hidden states becomes c * tanh(tile / c) as it is made, so the losses see the logits
the model's own LM head gives; the gradient of the student's tile is multiplied by the cap's
derivative 1 - tanh^2 before it is folded into the hidden-state and weight gradients. Teacher
logits given as `teacher_logits` are taken as they are (a model's logits are capped already).

Tensor parallelism: `student_hidden` is replicated over the TP group and this rank's logits are
its vocabulary shard `hidden @ weight_shard.T`, so the gradient of `student_hidden` returned here
is only THIS RANK'S PARTIAL SUM. The caller must route the hidden states through
`engine.mappings.copy_to_tp` before this call (the model's `head_hidden` output already is), whose
backward all-reduces the partial sums; this function never all-reduces it itself. The weight
gradient is this rank's shard, complete.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from distill._plan import (
    KDDiagnostics,
    LossPlan,
    TokenStats,
    Upstream,
    global_stats,
    label_columns,
    make_plan,
    reduce_stats,
)
from engine.collectives import Group
from engine.data import IGNORE_INDEX
from layers.softcap import softcap, softcap_grad


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
        student = softcap(_mm(hidden[rows], weight[cols].T, cdt), plan.softcap,
                          inplace=True)  # [rows, cols]
        if teacher_logits is not None:
            return student, plan.copy_tile(teacher_logits[rows, cols])
        if teacher_hidden is not None:
            return student, softcap(_mm(teacher_hidden[rows], teacher_weight[cols].T, cdt),
                                    plan.teacher_softcap, inplace=True)
        return student, None

    return logits


def _uncapped_grad(plan: LossPlan, s, t, label_cols, tok: TokenStats,
                   upstream: Upstream) -> torch.Tensor:
    """`plan.tile_grad` of a tile whose student logits `s` are capped, turned into the gradient
    of the logits before the cap (hidden @ weight.T) by the cap's derivative."""
    factor = None if plan.softcap is None else softcap_grad(s, plan.softcap)
    grad = plan.tile_grad(s, t, label_cols, tok, upstream)
    return grad if factor is None else grad.mul_(factor)


def _recomputed_grads(plan: LossPlan, hidden, weight, t_hidden, t_weight, t_logits, label_cols,
                      tok: TokenStats, upstream: Upstream) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad hidden [tokens, H] in the compute dtype, grad weight shard [V/tp, H]) for `upstream`,
    recomputing both models' logits tile by tile."""
    cdt = plan.compute_dtype
    logits = _tile_source(plan, hidden, weight, t_hidden, t_weight, t_logits)
    grad_hidden = hidden.new_zeros(hidden.shape, dtype=cdt)
    grad_weight = torch.zeros_like(weight)
    # Like the model's own LM head, the gradient matmuls run in the weights' dtype.
    mm_dtype = weight.dtype if weight.is_cuda else cdt
    for cols in plan.col_tiles():
        g_w = grad_weight[cols] if weight.dtype == cdt else \
            weight.new_zeros(weight[cols].shape, dtype=cdt)  # [cols, H]
        for rows in plan.row_tiles(hidden.shape[0]):
            g_logits = _uncapped_grad(plan, *logits(rows, cols), label_cols[rows] - cols.start,
                                      tok.rows(rows), upstream.rows(rows)).to(mm_dtype)
            _add_mm_(grad_hidden[rows], g_logits, weight[cols])
            _add_mm_(g_w, g_logits.T, hidden[rows])
        if weight.dtype != cdt:
            grad_weight[cols] = g_w
    return grad_hidden, grad_weight


class _FusedHeadLoss(torch.autograd.Function):
    """Forward: per-token (ce, div) from tiles, no gradient work. Backward: recomputes the tiles."""

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
        diag = _diagnostics_output(ctx, tok, hidden, plan)
        return (*tok.outputs(hidden.new_empty(0, dtype=plan.compute_dtype)), diag)

    @staticmethod
    def backward(ctx, g_ce, g_div, _g_diag):
        plan: LossPlan = ctx.plan
        hidden, weight, t_hidden, t_weight, t_logits, label_cols, ignored, *saved = \
            ctx.saved_tensors
        upstream = Upstream.of(g_ce, g_div, ignored, plan.compute_dtype)
        if upstream.empty:
            return (None,) * 9
        grad_hidden, grad_weight = _recomputed_grads(plan, hidden, weight, t_hidden, t_weight,
                                                     t_logits, label_cols, TokenStats(*saved),
                                                     upstream)
        return grad_hidden.to(hidden.dtype), grad_weight, None, None, None, None, None, None, None


def _diagnostics_output(ctx, tok: TokenStats, hidden: torch.Tensor,
                        plan: LossPlan) -> torch.Tensor:
    """The per-token diagnostics [tokens, 3] as an output without gradient ([0, 3] if none)."""
    diag = tok.diag if tok.diag is not None else hidden.new_empty(0, 3, dtype=plan.compute_dtype)
    ctx.mark_non_differentiable(diag)
    return diag


# Bytes per rank that one row block of the grad-in-forward path may keep: its [rows, V/tp]
# compute-dtype logits of both models, and the derivative of a capped student's cap
# (DEFAULT_BLOCK_BYTES by device type, or `block_bytes`).
DEFAULT_BLOCK_BYTES = {"cpu": 96 * 2**20, "cuda": 2 * 2**30}


def block_rows(*, n_tokens: int, shard_vocab: int, arrays: int, itemsize: int,
               budget: int) -> int:
    """Rows of one row block: as many as keep `arrays` x [rows, shard_vocab] (each model's logits,
    and the derivative of a capped student's) within `budget` bytes, a multiple of 8 where that is
    at least 8, at least 1 and at most `n_tokens`. Every rank of a TP group gets the same number
    (its shards are alike), so the blocks' collectives pair."""
    rows = budget // max(1, arrays * shard_vocab * itemsize)
    rows = rows - rows % 8 if rows >= 8 else max(rows, 1)
    return max(1, min(rows, n_tokens))


def _block_forward(plan: LossPlan, hidden, weight, t_hidden, t_weight, t_logits, label_cols,
                   ignored, upstream: Upstream, group, rows_per_block: int):
    """(TokenStats, grad hidden, grad weight shard) of sum(upstream.ce * ce + upstream.div * div),
    row block by row block: a block's logits of both models are kept (as one [rows, cols] tensor
    per column tile) while its statistics cross the TP group (one all_gather, plus one
    all_reduce for the two-pass kinds), then turned into the gradient of the block's student
    logits in place (times the derivative of the soft-cap, kept per block, when capped), which
    two matrix products per tile fold into the hidden and weight gradients. Results in the
    compute dtype."""
    cdt, n, col_tiles = plan.compute_dtype, hidden.shape[0], plan.col_tiles()
    weight_c = weight[:plan.valid].to(cdt)  # [valid, H]; a copy only for low-precision weights
    t_weight_c = None if t_weight is None else t_weight[:plan.valid].to(cdt)
    grad_hidden = hidden.new_zeros(hidden.shape, dtype=cdt)
    grad_weight = weight.new_zeros(weight.shape, dtype=cdt)
    blocks: list[TokenStats] = []
    for r0 in range(0, n, rows_per_block):
        rows = slice(r0, min(r0 + rows_per_block, n))
        h = hidden[rows].to(cdt)
        # the block's student logits tiles, and the derivatives of their caps
        s = [softcap(h @ weight_c[cols].T, plan.softcap, inplace=True) for cols in col_tiles]
        caps = [None if plan.softcap is None else softcap_grad(x, plan.softcap) for x in s]
        if t_weight_c is not None:
            t_h = t_hidden[rows].to(cdt)
            t = [softcap(t_h @ t_weight_c[cols].T, plan.teacher_softcap, inplace=True)
                 for cols in col_tiles]
        else:
            t = [None if t_logits is None else plan.copy_tile(t_logits[rows, cols])
                 for cols in col_tiles]
        grad_ = _exp_block_grad_ if plan.keeps_exps else _block_grad_
        blocks.append(grad_(plan, s, t, label_cols[rows], ignored[rows], upstream.rows(rows),
                            group))
        for cols, g_logits, cap in zip(col_tiles, s, caps, strict=True):  # d loss / d logits
            if cap is not None:  # of the logits before the cap
                g_logits.mul_(cap)
            grad_hidden[rows].addmm_(g_logits, weight_c[cols])
            grad_weight[cols].addmm_(g_logits.T, h)
        del s, t, caps  # before the next block's are made: one block in memory at a time
    return TokenStats(*(None if f[0] is None else torch.cat(f) for f in
                        zip(*(b.tensors() for b in blocks), strict=True))), \
        grad_hidden, grad_weight


def _block_grad_(plan: LossPlan, s: list[torch.Tensor], t: list[torch.Tensor | None],
                 label_cols: torch.Tensor, ignored: torch.Tensor, upstream: Upstream,
                 group) -> TokenStats:
    """The block's statistics (reduce_stats), then its student logits tiles `s` overwritten
    with d loss / d logits (and `t` with scratch). Every kind."""
    def logits(rows: slice, cols: slice):  # copies: tile_stats overwrites its tiles
        j = cols.start // plan.tile_vocab
        return s[j][rows].clone(), None if t[j] is None else t[j][rows].clone()

    n = s[0].shape[0] if s else label_cols.shape[0]
    tok = reduce_stats(plan, logits, n_tokens=n, label_cols=label_cols, ignored=ignored,
                       group=group, device=label_cols.device)
    for j, rows, cols in plan.tiles(n):
        tile = s[j][rows]
        grad = plan.tile_grad(tile, None if t[j] is None else t[j][rows],
                              label_cols[rows] - cols.start, tok.rows(rows), upstream.rows(rows))
        if grad.data_ptr() != tile.data_ptr():
            tile.copy_(grad)
    return tok


def _exp_block_grad_(plan: LossPlan, s: list[torch.Tensor], t: list[torch.Tensor | None],
                     label_cols: torch.Tensor, ignored: torch.Tensor, upstream: Upstream,
                     group) -> TokenStats:
    """`_block_grad_` for plans that keep exponentials (forward KL, the cross-entropy): each
    tile's logits become exp(a') (and exp(b')) while its statistics are taken, and that becomes
    the gradient, so a tile is read by four elementwise passes less and no tile is copied."""
    n = s[0].shape[0] if s else label_cols.shape[0]
    stats = plan.identity(plan.n_col_tiles(), n, device=label_cols.device)
    for j, cols in enumerate(plan.col_tiles()):
        stats[j] = plan.tile_stats_exp_(s[j], t[j], label_cols - cols.start, cols.start)
    tok = global_stats(plan, stats, ignored, group)
    for j, cols in enumerate(plan.col_tiles()):
        plan.tile_grad_exp_(s[j], t[j], label_cols - cols.start, stats[j], tok, upstream)
    return tok


class _GradInForward(torch.autograd.Function):
    """Forward: per-token (ce, div), `loss` = sum(w_ce * ce + w_div * div) and its gradient for
    the hidden states and the weight shard (_block_forward). Backward: that gradient times the
    scalar arriving at `loss`; gradients arriving at the per-token outputs (any use besides
    `loss`) are added by recomputing the tiles, so every use is exact."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, teacher_logits, label_cols,
                ignored, w_ce, w_div, plan: LossPlan, group, rows_per_block: int):
        upstream = Upstream.of(w_ce, w_div, ignored, plan.compute_dtype)
        tok, grad_hidden, grad_weight = _block_forward(
            plan, hidden, weight, teacher_hidden, teacher_weight, teacher_logits, label_cols,
            ignored, upstream, group, rows_per_block)
        loss = hidden.new_zeros((), dtype=plan.compute_dtype)
        for w, x in ((upstream.ce, tok.ce), (upstream.div, tok.div)):
            if w is not None:
                loss += (w * x).sum()
        ctx.plan, ctx.grads = plan, (grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, teacher_hidden, teacher_weight, teacher_logits,
                              label_cols, ignored, *tok.tensors())
        diag = _diagnostics_output(ctx, tok, hidden, plan)
        return (loss, *tok.outputs(hidden.new_empty(0, dtype=plan.compute_dtype)), diag)

    @staticmethod
    def backward(ctx, g_loss, g_ce, g_div, _g_diag):
        grad_hidden = grad_weight = None
        if g_loss is not None:
            if ctx.grads is None:
                raise RuntimeError("the fused head loss's gradient was computed in its forward "
                                   "and handed to an earlier backward; a second backward through "
                                   "`loss` needs a new forward")
            grad_hidden, grad_weight = ctx.grads
            ctx.grads = None  # handed over: the callers' gradient buffers own them now
            if not bool(g_loss == 1):
                grad_hidden.mul_(g_loss)
                grad_weight.mul_(g_loss)
        if g_ce is not None or g_div is not None:
            hidden, weight, t_hidden, t_weight, t_logits, label_cols, ignored, *saved = \
                ctx.saved_tensors
            upstream = Upstream.of(g_ce, g_div, ignored, ctx.plan.compute_dtype)
            more_hidden, more_weight = _recomputed_grads(
                ctx.plan, hidden, weight, t_hidden, t_weight, t_logits, label_cols,
                TokenStats(*saved), upstream)
            grad_hidden = more_hidden if grad_hidden is None else grad_hidden.add_(more_hidden)
            grad_weight = more_weight if grad_weight is None else \
                grad_weight.add_(more_weight.to(grad_weight.dtype))
        if grad_hidden is None:
            return (None,) * 12
        return (grad_hidden.to(ctx.dtypes[0]), grad_weight.to(ctx.dtypes[1])) + (None,) * 10


def _check_head(student_hidden, student_weight_shard, teacher_hidden, teacher_weight_shard,
                teacher_logits, labels, teacher_softcap) -> None:
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
    if teacher_softcap is not None and teacher_hidden is None:
        raise ValueError("teacher_softcap caps the logits of teacher_hidden; teacher_logits are "
                         "taken as given (a model's logits are capped already)")


@dataclass(frozen=True)
class _Call:
    """A validated call: its plan and the autograd inputs after the student's two tensors."""

    plan: LossPlan
    teacher: tuple  # (teacher_hidden, teacher_weight_shard, teacher_logits), detached or None
    label_cols: torch.Tensor
    ignored: torch.Tensor
    has_teacher: bool
    has_labels: bool


def _prepare(student_hidden, student_weight_shard, *, teacher_hidden, teacher_weight_shard,
             teacher_logits, labels, kind, temperature, beta, skew, ignore_index, vocab_size,
             group, chunk_tokens, chunk_vocab, diagnostics, softcap, teacher_softcap) -> _Call:
    _check_head(student_hidden, student_weight_shard, teacher_hidden, teacher_weight_shard,
                teacher_logits, labels, teacher_softcap)
    has_teacher = teacher_hidden is not None or teacher_logits is not None
    if not has_teacher and labels is None:
        raise ValueError("nothing to compute: give labels, a teacher, or both")
    plan = make_plan(kind=kind if has_teacher else None, with_ce=labels is not None,
                     shard_vocab=student_weight_shard.shape[0], dtype=student_weight_shard.dtype,
                     vocab_size=vocab_size, group=group, device=student_hidden.device,
                     temperature=temperature, beta=beta, skew=skew, tile_tokens=chunk_tokens,
                     tile_vocab=chunk_vocab, diagnostics=diagnostics, softcap=softcap,
                     teacher_softcap=teacher_softcap)
    if labels is None:
        label_cols = ignored = torch.zeros(0, dtype=torch.long, device=student_hidden.device)
    else:
        label_cols, ignored = label_columns(plan, labels, ignore_index)
    teacher = tuple(None if x is None else x.detach()
                    for x in (teacher_hidden, teacher_weight_shard, teacher_logits))
    return _Call(plan, teacher, label_cols, ignored, has_teacher, labels is not None)


def fused_lm_and_divergence(
        student_hidden: torch.Tensor, student_weight_shard: torch.Tensor, *,
        teacher_hidden: torch.Tensor | None = None,
        teacher_weight_shard: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None, labels: torch.Tensor | None = None,
        kind: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
        ignore_index: int = IGNORE_INDEX, vocab_size: int | None = None, group: Group = None,
        chunk_tokens: int | None = None, chunk_vocab: int | None = None,
        diagnostics: bool = False, softcap: float | None = None,
        teacher_softcap: float | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """(per-token LM cross-entropy or None without labels, per-token divergence or None without
    a teacher) of the head `student_hidden [tokens, H] @ student_weight_shard[V/tp, H].T`; with
    `diagnostics` (and a teacher) a third element, the per-token `KDDiagnostics`, from the same
    statistics (no extra collective).

    The teacher is `teacher_hidden [tokens, H_t]` with `teacher_weight_shard [V/tp, H_t]`, or its
    logits shard `teacher_logits [tokens, V/tp]`; it gets no gradient. `softcap` (the student's)
    and `teacher_softcap` (with `teacher_hidden`) soft-cap the logits formed here, as the
    models' `final_logit_softcap` does (None: off). Gradients go to
    `student_hidden` (this rank's partial sum: see the module docstring) and
    `student_weight_shard`, by recomputing the tiles in the backward (the upstream gradient is
    not known here: `fused_head_loss` avoids that when it is). Working memory: a few fp32 tiles of
    chunk_tokens x chunk_vocab (default 256 x 8192 on CPU, 4096 x 16384 on GPU).
    """
    call = _prepare(student_hidden, student_weight_shard, teacher_hidden=teacher_hidden,
                    teacher_weight_shard=teacher_weight_shard, teacher_logits=teacher_logits,
                    labels=labels, kind=kind, temperature=temperature, beta=beta, skew=skew,
                    ignore_index=ignore_index, vocab_size=vocab_size, group=group,
                    chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab,
                    diagnostics=diagnostics, softcap=softcap, teacher_softcap=teacher_softcap)
    ce, div, diag = _FusedHeadLoss.apply(student_hidden, student_weight_shard, *call.teacher,
                                         call.label_cols, call.ignored, call.plan, group)
    out = (ce if call.has_labels else None), (div if call.has_teacher else None)
    return (*out, _diagnostics(call, diag)) if diagnostics else out


def _diagnostics(call: _Call, diag: torch.Tensor) -> KDDiagnostics | None:
    return KDDiagnostics.of(diag, diag.shape[:1]) if call.plan.diagnostics else None


@dataclass
class FusedHeadLoss:
    """What `fused_head_loss` computed, and how."""

    loss: torch.Tensor  # sum(ce_weight * ce) + sum(div_weight * div), 0-dim, with graph
    ce: torch.Tensor | None  # per-token cross-entropy [tokens] (differentiable too), or None
    div: torch.Tensor | None  # per-token divergence [tokens] (differentiable too), or None
    path: str  # "grad_in_forward" or "recompute" (see fused_head_loss)
    block_rows: int | None  # tokens per row block of the grad-in-forward path
    diag: KDDiagnostics | None = None  # per-token, with `diagnostics=True` and a teacher


def _token_weight(weight: torch.Tensor | None, n: int, name: str, needed: bool):
    if weight is None:
        return None
    if not needed:
        raise ValueError(f"{name} given for a term this call does not compute (no "
                         f"{'labels' if name == 'ce_weight' else 'teacher'})")
    if weight.shape != (n,):
        raise ValueError(f"{name} shape {tuple(weight.shape)} must be [{n}]")
    return weight.detach()


def fused_head_loss(student_hidden: torch.Tensor, student_weight_shard: torch.Tensor, *,
                    ce_weight: torch.Tensor | None = None, div_weight: torch.Tensor | None = None,
                    block_bytes: int | None = None, **kwargs) -> FusedHeadLoss:
    """`loss = sum(ce_weight * ce) + sum(div_weight * div)` over tokens, with `ce`, `div` the
    per-token outputs of `fused_lm_and_divergence(student_hidden, student_weight_shard,
    **kwargs)`; the weights [tokens] are constants (None: the term is left out of `loss`).

    Path, chosen here and reported in `.path`: when a gradient is wanted (grad mode on, the
    student's hidden states or weight shard require it), "grad_in_forward" computes the gradient
    of `loss` during the forward, in row blocks (`block_rows`: the most tokens whose [tokens,
    V/tp] compute-dtype logits of both models, and the derivative of the student's soft-cap
    when capped, fit `block_bytes` per rank, default
    DEFAULT_BLOCK_BYTES, 96 MiB on CPU), with one all_gather per row block (plus one all_reduce
    per block for the two-pass kinds) of a few floats per token instead of one per call; the
    backward only multiplies it by the scalar arriving at `loss`, so its four matrix products
    ([tokens, H] x [H, V/tp]: both models' logits, and the gradients of hidden states and weight)
    all run in the forward and none is repeated. A `loss` backpropagated twice raises (the
    gradient is handed over the first time). Gradients that reach `ce` or `div` directly are
    recomputed as in "recompute", so any use of the outputs is exact. Otherwise "recompute":
    `fused_lm_and_divergence`, whose backward recomputes the tiles.
    """
    call = _prepare(student_hidden, student_weight_shard, **{**_DEFAULTS, **kwargs})
    n, plan = student_hidden.shape[0], call.plan
    w_ce = _token_weight(ce_weight, n, "ce_weight", call.has_labels)
    w_div = _token_weight(div_weight, n, "div_weight", call.has_teacher)
    wants_grad = torch.is_grad_enabled() and (student_hidden.requires_grad
                                              or student_weight_shard.requires_grad)
    if not wants_grad:
        ce, div, diag = _FusedHeadLoss.apply(student_hidden, student_weight_shard,
                                             *call.teacher, call.label_cols, call.ignored, plan,
                                             kwargs.get("group"))
        ce, div = (ce if call.has_labels else None), (div if call.has_teacher else None)
        loss = sum(((w * x.to(w.dtype)).sum() for w, x in ((w_ce, ce), (w_div, div))
                    if w is not None), student_hidden.new_zeros((), dtype=plan.compute_dtype))
        return FusedHeadLoss(loss, ce, div, "recompute", None, _diagnostics(call, diag))
    budget = DEFAULT_BLOCK_BYTES.get(student_hidden.device.type, DEFAULT_BLOCK_BYTES["cpu"]) \
        if block_bytes is None else block_bytes
    rows = block_rows(n_tokens=n, shard_vocab=student_weight_shard.shape[0],
                      arrays=1 + call.has_teacher + (plan.softcap is not None), budget=budget,
                      itemsize=torch.empty(0, dtype=plan.compute_dtype).element_size())
    loss, ce, div, diag = _GradInForward.apply(student_hidden, student_weight_shard,
                                               *call.teacher, call.label_cols, call.ignored, w_ce,
                                               w_div, plan, kwargs.get("group"), rows)
    return FusedHeadLoss(loss, ce if call.has_labels else None,
                         div if call.has_teacher else None, "grad_in_forward", rows,
                         _diagnostics(call, diag))


# The keyword arguments of fused_lm_and_divergence and their defaults (fused_head_loss forwards
# them).
_DEFAULTS = {name: p.default for name, p in
             inspect.signature(fused_lm_and_divergence).parameters.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY}
