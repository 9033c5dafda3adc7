"""Forward and reverse KL stay exact when the two models' logits sit at different offsets.

Softmax ignores a constant added to a row, so a teacher whose logits sit near -2250 and a student
near +750 are ordinary distributions. `divergence`, `lm_and_divergence`, the fused LM-head path
(both: recomputing, gradient in the forward) and `topk_divergence` (k = the whole vocabulary, its
log-sum-exp given in float64) must give the float64 full-vocabulary reference's values and
gradients at a gap of 0, 100 and 3000 between the models, TP 1, 2 and 4, temperatures 1 and 1.7:
rtol 1e-5 + atol 1e-6.

Inputs are exact in fp32 at every offset: the logits are multiples of 1/256 below 2^12, and the
fused path's hidden states and weights are multiples of 1/16 whose products sum exactly in fp32
in any order, so the reference sees the very logits the losses see. The fused path carries each
model's offset in a constant last hidden column (1) times a weight column (the offset); that
column's hidden gradient, offset x sum_v dL/dlogit_v, is 0 exactly and comes out as offset x
fp32 round-off, so the check leaves it out (every other hidden column and the whole weight
gradient are checked).
"""

from __future__ import annotations

import torch

from distill import divergence, fused_lm_and_divergence, lm_and_divergence, topk_divergence
from distill.fused import fused_head_loss
from engine import collectives as C
from engine.mappings import copy_to_tp
from engine.spawn import run_ranks
from tests.references import reference, reference_ce, vocab_shard, world_group

TOKENS, HIDDEN, FULL_V, VOCAB = 6, 8, 48, 45  # 48 columns over 1, 2 or 4 ranks; 3 of padding
GAPS = (0, 100, 3000)
TEMPERATURES = (1.0, 1.7)
KL_KINDS = ("forward_kl", "reverse_kl")
TOL = dict(rtol=1e-5, atol=1e-6)


def _offsets(gap: int) -> tuple[int, int]:
    """(student, teacher) offsets `gap` apart, on both sides of 0."""
    return gap // 4, gap // 4 - gap


def _grid(shape, gen, std, step) -> torch.Tensor:
    """Normal values rounded to multiples of `step` (exact in fp32), as float64."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * std / step).round() * step


def _logits(gap: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Full [TOKENS, FULL_V] fp32 student and teacher logits, NaN in the padding."""
    g = torch.Generator().manual_seed(seed)
    s_off, t_off = _offsets(gap)
    s, t = _grid((TOKENS, FULL_V), g, 2.0, 1 / 256) + s_off, _grid((TOKENS, FULL_V), g, 2.0,
                                                                    1 / 256) + t_off
    s[:, VOCAB:] = t[:, VOCAB:] = float("nan")
    return s.float(), t.float()


def _weights(seed: int = 0) -> torch.Tensor:
    return 0.5 + torch.rand(TOKENS, generator=torch.Generator().manual_seed(seed + 2),
                            dtype=torch.float64)


def _labels() -> torch.Tensor:
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(4))
    labels[1] = -100
    return labels


def _reference(kind: str, temperature: float, s: torch.Tensor, t: torch.Tensor,
               labels: torch.Tensor | None, w_ce: torch.Tensor, w_div: torch.Tensor):
    """(ce or None, div, d(sum w_ce ce + w_div div)/d s) on the full float64 logits."""
    x = s.double().requires_grad_()
    div = reference(kind, x, t, temperature=temperature)
    ce = None if labels is None else reference_ce(x, labels)
    loss = (div * w_div).sum() + (0 if ce is None else (ce * w_ce).sum())
    (grad,) = torch.autograd.grad(loss, x)
    return (None if ce is None else ce.detach()), div.detach(), grad


def _check_logits(kind: str, gap: int, temperature: float, group) -> None:
    s_full, t_full = _logits(gap)
    labels, w_ce, w_div = _labels(), _weights(1), _weights(2)
    _, ref_div, ref_grad = _reference(kind, temperature, s_full, t_full, None, w_ce, w_div)
    s = vocab_shard(s_full, group).requires_grad_()
    div = divergence(s, vocab_shard(t_full, group), kind=kind, temperature=temperature,
                     vocab_size=VOCAB, group=group, chunk_tokens=4, chunk_vocab=5)
    (div * w_div).sum().backward()
    torch.testing.assert_close(div.double(), ref_div, **TOL)
    torch.testing.assert_close(s.grad.double(), vocab_shard(ref_grad, group), **TOL)

    ref_ce, ref_div, ref_grad = _reference(kind, temperature, s_full, t_full, labels, w_ce, w_div)
    s = vocab_shard(s_full, group).requires_grad_()
    ce, div = lm_and_divergence(s, vocab_shard(t_full, group), labels, kind=kind,
                                temperature=temperature, vocab_size=VOCAB, group=group,
                                chunk_tokens=4, chunk_vocab=5)
    ((ce * w_ce).sum() + (div * w_div).sum()).backward()
    torch.testing.assert_close(ce.double(), ref_ce, **TOL)
    torch.testing.assert_close(div.double(), ref_div, **TOL)
    torch.testing.assert_close(s.grad.double(), vocab_shard(ref_grad, group), **TOL)


def _check_topk(kind: str, gap: int, temperature: float, group) -> None:
    """k = the whole vocabulary, the log-sum-exp given in float64: exactly `divergence`."""
    s_full, t_full = _logits(gap)
    w_div = _weights(2)
    _, ref_div, ref_grad = _reference(kind, temperature, s_full, t_full, None, w_div, w_div)
    values, indices = t_full[:, :VOCAB].sort(-1, descending=True)
    lse = (t_full[:, :VOCAB].double() / temperature).logsumexp(-1)
    s = vocab_shard(s_full, group).requires_grad_()
    div = topk_divergence(s, values, indices, lse, kind=kind, temperature=temperature,
                          vocab_size=VOCAB, group=group, chunk_tokens=4, chunk_vocab=5)
    (div * w_div).sum().backward()
    torch.testing.assert_close(div.double(), ref_div, **TOL)
    torch.testing.assert_close(s.grad.double(), vocab_shard(ref_grad, group), **TOL)


def _head(gen, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden [TOKENS, HIDDEN] and weight [FULL_V, HIDDEN] (float64, exact in fp32) whose
    product is the model's logits at `offset`; NaN weight rows in the padding."""
    hidden, weight = _grid((TOKENS, HIDDEN), gen, 1.0, 1 / 16), _grid((FULL_V, HIDDEN), gen, 0.7,
                                                                       1 / 16)
    hidden[:, -1], weight[:, -1] = 1.0, float(offset)
    weight[VOCAB:] = float("nan")
    return hidden, weight


def _check_fused(kind: str, gap: int, temperature: float, group) -> None:
    g = torch.Generator().manual_seed(7)
    s_off, t_off = _offsets(gap)
    hidden, weight = _head(g, s_off)
    t_hidden, t_weight = _head(g, t_off)
    labels, w_ce, w_div = _labels(), _weights(1), _weights(2)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    # float64, equal to the fp32 products (padding columns left out, as the losses do)
    s_full, t_full = h @ w[:VOCAB].T, t_hidden @ t_weight[:VOCAB].T
    ref_ce, ref_div, _ = _reference(kind, temperature, s_full.detach(), t_full, labels, w_ce,
                                    w_div)
    loss = (reference_ce(s_full, labels) * w_ce).sum() + \
        (reference(kind, s_full, t_full, temperature=temperature) * w_div).sum()
    ref_gh, ref_gw = torch.autograd.grad(loss, (h, w))

    for path in ("recompute", "grad_in_forward"):
        h32 = hidden.float().requires_grad_()
        w32 = C.split_along(weight.float(), group, dim=0).clone().requires_grad_()
        kwargs = dict(teacher_hidden=t_hidden.float(), teacher_weight_shard=C.split_along(
            t_weight.float(), group, dim=0).clone(), labels=labels, kind=kind,
            temperature=temperature, vocab_size=VOCAB, group=group, chunk_tokens=4, chunk_vocab=5)
        if path == "recompute":
            ce, div = fused_lm_and_divergence(copy_to_tp(h32, group), w32, **kwargs)
            ((ce * w_ce).sum() + (div * w_div).sum()).backward()
        else:  # row blocks of 2 tokens
            out = fused_head_loss(copy_to_tp(h32, group), w32, ce_weight=w_ce, div_weight=w_div,
                                  block_bytes=2 * 2 * w32.shape[0] * 4, **kwargs)
            assert (out.path, out.block_rows) == (path, 2)
            out.loss.backward()
            ce, div = out.ce, out.div
        torch.testing.assert_close(ce.double(), ref_ce, **TOL)
        torch.testing.assert_close(div.double(), ref_div, **TOL)
        torch.testing.assert_close(h32.grad[:, :-1].double(), ref_gh[:, :-1], **TOL)
        torch.testing.assert_close(w32.grad.double(), C.split_along(ref_gw, group, dim=0), **TOL)


def _offset_grid() -> int:
    group, checks = world_group(), 0
    for kind in KL_KINDS:
        for gap in GAPS:
            for temperature in TEMPERATURES:
                _check_logits(kind, gap, temperature, group)
                _check_fused(kind, gap, temperature, group)
                _check_topk(kind, gap, temperature, group)
                checks += 1
    return checks


def test_offsets_tp1():
    assert _offset_grid() == 2 * 3 * 2


def test_offsets_tp2():
    assert run_ranks(_offset_grid, 2, timeout_s=240) == [2 * 3 * 2] * 2


def test_offsets_tp4():
    assert run_ranks(_offset_grid, 4, timeout_s=240) == [2 * 3 * 2] * 4
