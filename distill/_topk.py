"""Divergence against a teacher stored as its top-k logits plus its log-sum-exp (offline teacher).

Both distributions are compared over k + 1 buckets: the teacher's k columns, and one leftover
bucket for the rest of the vocabulary. The teacher's leftover mass is 1 - sum of its top-k
probabilities (a leftover below what that difference resolves, ~1e-7, is floored at the least
normal float so that the divergence stays finite); the student's is the sum of its probabilities
off the top-k columns, summed directly (no 1 - x cancellation). With k = the whole vocabulary
there is no leftover bucket and the result is `divergence(...)` on the full logits.

Temperature: the teacher's probabilities at temperature T are exp(value / T - lse_T), where lse_T
is the log-sum-exp of teacher_logits / T over the real vocabulary. It cannot be rebuilt from the
top-k alone, so `teacher_logsumexp` must be given AT THE RUN'S TEMPERATURE: an exporter stores raw
top-k logits and logsumexp(logits / T) for the temperature the run will use (at T = 1, the plain
log-sum-exp).

Communication: one all_gather of [tokens, k + 3] per call (this rank's max, sum of exp and
leftover sum, and the student logits at the top-k columns it owns); the backward communicates
nothing. Bytes grow with k, which is small for a stored teacher.
"""

from __future__ import annotations

import torch

from distill import _pointwise
from distill._plan import LossPlan, log_normalize_, make_plan, merge_max, owned_columns, shift_
from engine import collectives as C
from engine.collectives import Group

_M, _S, _REST, _PICKED = 0, 1, 2, 3  # statistics columns; the k student logits start at _PICKED


def _tile_stats(plan: LossPlan, s: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """[rows, 3 + k]: raw max and sum of exp((s - max) / T), the same sum off the top-k, and the
    raw logits s at the top-k columns (raw, so that their distance to the max stays exact)."""
    s = plan.copy_tile(s)
    owned, at = owned_columns(local, s.shape[-1])
    picked = torch.where(owned, s.gather(-1, at), float("-inf"))
    m = s.amax(-1)
    e = shift_(s, m, plan.temperature).exp_()
    total = e.sum(-1)
    hits = torch.zeros_like(e).scatter_add_(-1, at, owned.to(e.dtype))
    rest = e.masked_fill_(hits > 0, 0.0).sum(-1)
    return torch.cat([m[:, None], total[:, None], rest[:, None], picked], -1)


def _merge(plan: LossPlan, stats: torch.Tensor) -> torch.Tensor:
    """Merge [parts, tokens, 3 + k] statistics of tiles or ranks into [tokens, 3 + k]."""
    top, shift = merge_max(stats[..., _M], plan.temperature)
    sums = (shift.exp()[..., None] * stats[..., _S:_PICKED]).sum(0)
    return torch.cat([top[:, None], sums, stats[..., _PICKED:].amax(0)], -1)


def _finish(plan: LossPlan, merged: torch.Tensor, values: torch.Tensor,
            teacher_lse: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(divergence, student log-normalizer, sum_c pi_c g_c, leftover g, top-k corrections)."""
    a_norm = torch.stack([merged[:, _M], merged[:, _S].log()], -1)  # as in TokenStats
    logp_top = log_normalize_(merged[:, _PICKED:].clone(), a_norm, plan.temperature)
    logp_rest = merged[:, _REST].log() - a_norm[:, 1]
    # In float64: the values and their log-sum-exp are both of the size of the teacher's logits,
    # and their difference must not round at that size.
    logq_top = (values.double() / plan.temperature - teacher_lse.double()[:, None]).to(
        plan.compute_dtype)
    if values.shape[-1] == plan.vocab_size:  # the whole vocabulary: no leftover bucket
        logq_rest = torch.full_like(logp_rest, float("-inf"))
    else:  # a leftover that 1 - sum(top-k) cannot resolve is kept at the least normal float,
        # so that a student with mass there gets a large, finite divergence
        tiny = torch.finfo(plan.compute_dtype).tiny
        logq_rest = (-torch.expm1(logq_top.logsumexp(-1))).clamp_min(tiny).log()
    ell, pg = _pointwise.terms(plan.kind, torch.cat([logp_top, logp_rest[:, None]], -1),
                               torch.cat([logq_top, logq_rest[:, None]], -1),
                               beta=plan.beta, skew=plan.skew)
    p_rest = logp_rest.exp()
    rest_g = torch.where(p_rest > 0, pg[:, -1] / p_rest, 0.0)  # dL/dpi_rest
    # Off the top-k, grad_j = p_j (rest_g - aux); on it, pg_j - p_j aux: store the difference.
    correction = pg[:, :-1] - logp_top.exp() * rest_g[:, None]
    return ell.sum(-1), a_norm, pg.sum(-1), rest_g, correction


class _TopKDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, values, local, teacher_lse, plan: LossPlan, group):
        n = student.shape[0]
        stats = student.new_zeros(plan.n_col_tiles(), n, _PICKED + values.shape[-1],
                                  dtype=plan.compute_dtype)
        stats[..., _M] = stats[..., _PICKED:] = float("-inf")
        for j, rows, cols in plan.tiles(n):
            stats[j, rows] = _tile_stats(plan, student[rows, cols], local[rows] - cols.start)
        merged = _merge(plan, C.all_gather(_merge(plan, stats)[None], group, dim=0))
        div, a_norm, aux, rest_g, correction = _finish(plan, merged, values, teacher_lse)
        ctx.plan = plan
        ctx.save_for_backward(student, local, a_norm, aux, rest_g, correction)
        return div

    @staticmethod
    def backward(ctx, g):
        plan: LossPlan = ctx.plan
        student, local, a_norm, aux, rest_g, correction = ctx.saved_tensors
        scale = g.to(plan.compute_dtype) / plan.temperature
        grad = torch.empty_like(student)
        grad[:, plan.valid:] = 0
        for _, rows, cols in plan.tiles(student.shape[0]):
            p = log_normalize_(plan.copy_tile(student[rows, cols]), a_norm[rows],
                               plan.temperature).exp_()
            tile = p.mul_((rest_g[rows] - aux[rows])[:, None])
            owned, at = owned_columns(local[rows] - cols.start, tile.shape[-1])
            tile.scatter_add_(-1, at, torch.where(owned, correction[rows], 0.0))
            grad[rows, cols] = tile.mul_(scale[rows, None])
        return grad, None, None, None, None, None


def topk_divergence(student_logits: torch.Tensor, teacher_topk_values: torch.Tensor,
                    teacher_topk_indices: torch.Tensor, teacher_logsumexp: torch.Tensor, *,
                    kind: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
                    skew: float = 0.1, vocab_size: int | None = None, group: Group = None,
                    chunk_tokens: int | None = None,
                    chunk_vocab: int | None = None) -> torch.Tensor:
    """Per-token divergence of the student's shard against a top-k teacher (every kind).

    `teacher_topk_values` [..., k]: raw teacher logits at `teacher_topk_indices` [..., k]
    (distinct global vocabulary ids, the same on every rank); `teacher_logsumexp` [...]:
    logsumexp(teacher_logits / temperature) over the real vocabulary, at the run's temperature.
    """
    lead, k = student_logits.shape[:-1], teacher_topk_values.shape[-1]
    if teacher_topk_indices.shape != teacher_topk_values.shape or \
            teacher_topk_values.shape[:-1] != lead or teacher_logsumexp.shape != lead:
        raise ValueError(
            f"teacher top-k shapes values {tuple(teacher_topk_values.shape)}, indices "
            f"{tuple(teacher_topk_indices.shape)}, logsumexp {tuple(teacher_logsumexp.shape)} "
            f"do not match student tokens {tuple(lead)}")
    plan = make_plan(kind=kind, with_ce=False, shard_vocab=student_logits.shape[-1],
                     dtype=student_logits.dtype, vocab_size=vocab_size, group=group,
                     device=student_logits.device,
                     temperature=temperature, beta=beta, skew=skew, tile_tokens=chunk_tokens,
                     tile_vocab=chunk_vocab)
    indices = teacher_topk_indices.reshape(-1, k)
    if not 0 < k <= plan.vocab_size or ((indices < 0) | (indices >= plan.vocab_size)).any():
        raise ValueError(f"teacher_topk_indices must be k <= {plan.vocab_size} distinct ids in "
                         f"[0, {plan.vocab_size})")
    div = _TopKDivergence.apply(
        student_logits.reshape(-1, student_logits.shape[-1]),
        teacher_topk_values.detach().reshape(-1, k), indices - plan.vocab_offset,
        teacher_logsumexp.detach().reshape(-1), plan, group)
    return div.reshape(lead)
