"""The fused LM head + losses against float64 references built from materialized logits.

The reference computes `hidden @ weight.T` in float64 and applies the definitions of
test_divergence.py; the fused path must match its outputs (rtol=atol=1e-5), the gradient of the
hidden states (summed over TP by `copy_to_tp`, as the model does) and this rank's weight-shard
gradient (rtol=atol=1e-5; bf16 inputs get their gradients in bf16: rtol 8e-3, atol 8e-3 of the
largest gradient, since the partial sums are rounded before the TP sum). Padding rows of the
weights hold NaN, so reading one would show. Small tiles (3 tokens x 5 columns) make every call
cross tile and shard boundaries. The memory contract (no [tokens, vocab] allocation but the
unfused path's returned gradient) is checked by recording every allocation.

Soft-capped logits (student, teacher, both; teacher as hidden states or as capped logits): both
fused paths and the unfused one (the model's LM head, then the vocab-parallel losses) against the
float64 reference of the capped logits, values and gradients through the cap, every kind, at
TP 1/2/4: float64 inputs at rtol 1e-10 / atol 1e-12, float32 at FP32_RTOL / FP32_ATOL. The
vocabularies 262,208 (Gemma 3) and 151,936 (Qwen3), padded at TP 2 and 4, through the three
paths in float64 at the same tolerance.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distill import KINDS, cross_entropy, divergence, fused_lm_and_divergence, lm_and_divergence
from distill.fused import fused_head_loss
from engine import collectives as C
from engine.mappings import copy_to_tp, scatter_to_tp
from engine.parallel import ParallelLayout
from engine.spawn import run_ranks
from layers.tensor_parallel import VocabParallelLMHead
from tests.helpers import FP32_ATOL, FP32_RTOL
from tests.references import reference, reference_ce, reference_diagnostics, vocab_shard, world_group

TOKENS, HIDDEN, T_HIDDEN, FULL_V, VOCAB = 7, 6, 5, 48, 45


def _inputs(dtype=torch.float32, seed=0, *, tokens=TOKENS, full_v=FULL_V, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, HIDDEN, generator=g, dtype=torch.float64)
    weight = torch.randn(full_v, HIDDEN, generator=g, dtype=torch.float64)
    t_hidden = torch.randn(tokens, T_HIDDEN, generator=g, dtype=torch.float64)
    t_weight = torch.randn(full_v, T_HIDDEN, generator=g, dtype=torch.float64) * 2
    weight[vocab:] = t_weight[vocab:] = float("nan")
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[1], labels[-1] = -100, vocab - 1  # an ignored label, and the last real column
    return [x.to(dtype) for x in (hidden, weight, t_hidden, t_weight)] + [labels]


def _rows(weight: torch.Tensor, group) -> torch.Tensor:
    return C.split_along(weight, group, dim=0).clone()


def _reference(kind, temperature, hidden, weight, t_logits, labels, w_ce, w_div):
    """(ce, div, grad hidden, grad weight) with materialized float64 logits."""
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    logits = h @ w[:VOCAB].T
    ce = reference_ce(logits, labels) if labels is not None else None
    div = reference(kind, logits, t_logits, temperature=temperature) if t_logits is not None \
        else None
    loss = sum((x * c).sum() for x, c in ((ce, w_ce), (div, w_div)) if x is not None)
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    return ce, div, grad_h, grad_w


BLOCK = 3  # tokens per row block of the grad-in-forward path: 7 tokens make blocks of 3, 3, 1


def _run_path(path, h, w_shard, teacher, labels, w_ce, w_div, **kwargs):
    """(ce, div, loss, KD diagnostics or None) of one call through `path`, the loss being
    sum(w_ce * ce + w_div * div)."""
    if path == "recompute":
        ce, div, *diag = fused_lm_and_divergence(h, w_shard, **teacher, labels=labels, **kwargs)
        return ce, div, sum((x * c).sum() for x, c in ((ce, w_ce), (div, w_div))
                            if x is not None), (diag or [None])[0]
    # the block's logits of each model, and the derivative of the student's cap
    arrays = 1 + bool(teacher) + (kwargs.get("softcap") is not None)
    itemsize = 8 if w_shard.dtype == torch.float64 else 4  # of the compute dtype
    out = fused_head_loss(h, w_shard, **teacher, labels=labels, **kwargs,
                          ce_weight=None if labels is None else w_ce,
                          div_weight=w_div if teacher else None,
                          block_bytes=BLOCK * arrays * w_shard.shape[0] * itemsize)
    assert (out.path, out.block_rows) == ("grad_in_forward", BLOCK)
    return out.ce, out.div, out.loss, out.diag


def _check(kind, temperature, *, teacher_as, with_labels, dtype, group):
    """Both paths against the float64 reference; returns their gradients (hidden, weight)."""
    hidden, weight, t_hidden, t_weight, labels = _inputs(dtype)
    t_logits = t_hidden.double() @ t_weight.double().T  # [tokens, FULL_V], NaN in the padding
    labels = labels if with_labels else None
    teacher = {"hidden": dict(teacher_hidden=t_hidden, teacher_weight_shard=_rows(t_weight, group)),
               "logits": dict(teacher_logits=vocab_shard(t_logits.to(dtype), group)),
               None: {}}[teacher_as]
    w_ce, w_div = torch.rand(2, TOKENS, generator=torch.Generator().manual_seed(9),
                             dtype=torch.float64)  # the same on every rank
    ref_t = None if teacher_as is None else \
        (t_logits if teacher_as == "hidden" else t_logits.to(dtype).double())
    ref_ce, ref_div, ref_gh, ref_gw = _reference(kind, temperature, hidden, weight, ref_t, labels,
                                                 w_ce, w_div)
    # bf16: each rank's partial hidden gradient is rounded before the TP sum, so the error scales
    # with the partials, not with the (possibly cancelling) total.
    grad_tol = dict(rtol=8e-3, atol=8e-3 * ref_gh.abs().max().item()) if dtype == torch.bfloat16 \
        else dict(rtol=1e-5, atol=1e-5)
    one_pass = kind in ("forward_kl", "reverse_kl") or teacher_as is None
    grads, gathered = {}, {}
    for path in ("recompute", "grad_in_forward"):
        h = hidden.clone().requires_grad_()
        w_shard = _rows(weight, group).requires_grad_()
        args = dict(kind=kind, temperature=temperature, vocab_size=VOCAB, group=group,
                    chunk_tokens=3, chunk_vocab=5)
        with C.count_collectives() as fwd:
            ce, div, loss, _ = _run_path(path, copy_to_tp(h, group), w_shard, teacher, labels,
                                         w_ce, w_div, **args)
        assert (ce is None) == (labels is None) and (div is None) == (teacher_as is None)
        with C.count_collectives() as bwd:
            loss.backward()
        if C.group_size(group) > 1:  # one round per row block (3) on the grad-in-forward path
            rounds = 1 if path == "recompute" else 3
            assert dict(fwd.calls) == ({"all_gather": rounds} if one_pass else
                                       {"all_gather": rounds, "all_reduce": rounds}), fwd.calls
            assert dict(bwd.calls) == {"all_reduce": 1}  # copy_to_tp's, summing the partial grads
            gathered[path] = dict(fwd.bytes)  # the same bytes in all, split over the blocks
        for out, ref in ((ce, ref_ce), (div, ref_div)):
            if ref is not None:
                torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        ref_loss = sum((x * c).sum() for x, c in ((ref_ce, w_ce), (ref_div, w_div))
                       if x is not None)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
        assert h.grad.dtype == w_shard.grad.dtype == dtype
        torch.testing.assert_close(h.grad.double(), ref_gh, **grad_tol)
        torch.testing.assert_close(w_shard.grad.double(), _rows(ref_gw, group), **grad_tol)
        grads[path] = h.grad, w_shard.grad
        if teacher_as is not None and dtype == torch.float32:
            _check_diagnostics(path, hidden, weight, teacher, labels, w_ce, w_div, ref_t, args,
                               (ce, div, loss, h.grad, w_shard.grad), fwd.calls)
    assert len(set(map(str, gathered.values()))) <= 1, gathered
    for a, b in zip(grads["recompute"], grads["grad_in_forward"], strict=True):
        torch.testing.assert_close(b.double(), a.double(), **grad_tol)


def _check_diagnostics(path, hidden, weight, teacher, labels, w_ce, w_div, ref_t, args, plain,
                       plain_calls) -> None:
    """The same call with `diagnostics=True`: the KD diagnostics equal the float64 definitions
    on the full vocabulary (tests/test_diagnostics.py), from the same collectives, and every
    output and gradient is bitwise the call's without them."""
    group = args["group"]
    h = hidden.clone().requires_grad_()
    w_shard = _rows(weight, group).requires_grad_()
    with C.count_collectives() as fwd:
        ce, div, loss, diag = _run_path(path, copy_to_tp(h, group), w_shard, teacher, labels,
                                        w_ce, w_div, **args, diagnostics=True)
    loss.backward()
    assert dict(fwd.calls) == dict(plain_calls), (fwd.calls, plain_calls)
    # exact: the diagnostics only read the loss's intermediates, which run as without them
    for got, want in zip((ce, div, loss, h.grad, w_shard.grad), plain, strict=True):
        assert (got is None and want is None) or torch.equal(got, want), path
    ref = reference_diagnostics(hidden.double() @ weight.double().T, ref_t, args["temperature"],
                                VOCAB)
    got = torch.stack([diag.teacher_entropy, diag.student_entropy, diag.top1_agreement], -1)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"{path} {args['kind']}: {m}")


# ---- soft-capped logits (Gemma 2's final_logit_softcap) ---------------------------------------

CAPS = (3.0, 4.0)  # student, teacher: below the largest logits here (about 8), so the caps bend


def _cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """The reference's soft-cap, written out (not the library's helper)."""
    return x if cap is None else cap * torch.tanh(x / cap)


def _head_layout(group) -> ParallelLayout:
    """This rank's place for a VocabParallelLMHead (whose forward communicates nothing)."""
    world, rank = C.group_size(group), C.group_rank(group)
    return ParallelLayout(world_size=world, rank=rank, tp=world, dp=1, sp=False, tp_rank=rank,
                          dp_rank=0, tp_group=group)


def _capped_call(path, hidden, w_shard, teacher, labels, w_ce, w_div, *, softcap,
                 teacher_softcap, full_v, vocab, group, **kwargs):
    """(ce, div, loss, grad hidden, grad weight shard) of one capped call through `path`:
    "unfused" is the model's LM head (VocabParallelLMHead: capped, padding masked) and the
    vocab-parallel losses on its logits; the fused paths cap their tiles themselves."""
    h = hidden.clone().requires_grad_()
    if path == "unfused":
        head = VocabParallelLMHead(vocab_size=vocab, padded_vocab=full_v, hidden=h.shape[1],
                                   layout=_head_layout(group), softcap=softcap)
        head.weight = weight = torch.nn.Parameter(w_shard.clone())
        logits = head(copy_to_tp(h, group))
        t_logits = teacher.get("teacher_logits")
        if "teacher_hidden" in teacher:
            t_head = VocabParallelLMHead(vocab_size=vocab, padded_vocab=full_v,
                                         hidden=teacher["teacher_hidden"].shape[1],
                                         layout=_head_layout(group), softcap=teacher_softcap)
            t_head.weight = torch.nn.Parameter(teacher["teacher_weight_shard"],
                                               requires_grad=False)
            t_logits = t_head(teacher["teacher_hidden"])
        losses = dict(vocab_size=vocab, group=group)
        kd = dict(kind=kwargs["kind"], temperature=kwargs["temperature"], **losses)
        if t_logits is None:
            ce, div = cross_entropy(logits, labels, **losses), None
        elif labels is None:
            ce, div = None, divergence(logits, t_logits, **kd)
        else:
            ce, div = lm_and_divergence(logits, t_logits, labels, **kd)
        loss = sum((x * c).sum() for x, c in ((ce, w_ce), (div, w_div)) if x is not None)
    else:
        weight = w_shard.clone().requires_grad_()
        ts = {} if "teacher_hidden" not in teacher else dict(teacher_softcap=teacher_softcap)
        ce, div, loss, _ = _run_path(path, copy_to_tp(h, group), weight, teacher, labels, w_ce,
                                     w_div, softcap=softcap, vocab_size=vocab, group=group,
                                     **ts, **kwargs)
    loss.backward()
    return ce, div, loss, h.grad, weight.grad


def _check_capped(kind, temperature, caps, *, teacher_as, with_labels, dtype, group, tol,
                  tokens=TOKENS, full_v=FULL_V, vocab=VOCAB, chunks=(3, 5)) -> None:
    """Every path with the student's logits capped at caps[0] and the teacher's at caps[1]
    (None: uncapped) against the float64 reference of the capped logits: values, and gradients
    of the hidden states and this rank's weight shard through the cap. `full_v` columns of
    which `vocab` are real, `chunks` = (chunk_tokens, chunk_vocab)."""
    hidden, weight, t_hidden, t_weight, labels = _inputs(dtype, tokens=tokens, full_v=full_v,
                                                         vocab=vocab)
    weight[vocab:] = t_weight[vocab:] = 0  # a model's padding rows (the head reads them)
    s_cap, t_cap = caps
    t_logits = _cap(t_hidden.double() @ t_weight.double().T, t_cap)  # [tokens, FULL_V]
    labels = labels if with_labels else None
    teacher = {"hidden": dict(teacher_hidden=t_hidden,
                              teacher_weight_shard=_rows(t_weight, group)),
               "logits": dict(teacher_logits=vocab_shard(t_logits.to(dtype), group)),
               None: {}}[teacher_as]
    ref_t = None if teacher_as is None else \
        (t_logits if teacher_as == "hidden" else t_logits.to(dtype).double())
    w_ce, w_div = torch.rand(2, tokens, generator=torch.Generator().manual_seed(9),
                             dtype=torch.float64)
    h, w = (x.double().clone().requires_grad_() for x in (hidden, weight))
    logits = _cap(h @ w[:vocab].T, s_cap)
    ref_ce = None if labels is None else reference_ce(logits, labels, vocab_size=vocab)
    ref_div = None if ref_t is None else reference(kind, logits, ref_t, temperature=temperature,
                                                   vocab_size=vocab)
    ref_loss = sum((x * c).sum() for x, c in ((ref_ce, w_ce), (ref_div, w_div)) if x is not None)
    ref_gh, ref_gw = torch.autograd.grad(ref_loss, (h, w))
    for path in ("unfused", "recompute", "grad_in_forward"):
        ce, div, loss, g_h, g_w = _capped_call(
            path, hidden, _rows(weight, group), teacher, labels, w_ce, w_div, softcap=s_cap,
            teacher_softcap=t_cap, full_v=full_v, vocab=vocab, group=group, kind=kind,
            temperature=temperature, chunk_tokens=chunks[0], chunk_vocab=chunks[1])
        msg = f"{path} {kind} T={temperature} caps={caps} teacher as {teacher_as}"
        for got, want in ((ce, ref_ce), (div, ref_div), (loss, ref_loss), (g_h, ref_gh),
                          (g_w, _rows(ref_gw, group))):
            assert (got is None) == (want is None), msg
            if want is not None:
                torch.testing.assert_close(got.double(), want, **tol, msg=lambda m: f"{msg}: {m}")


# float64 inputs run the same math in float64: only the operation order differs from the
# reference. float32 inputs (exact in float64, so the reference sees the same values): fp32
# round-off of the logits and of sums over 48 columns.
CAPPED_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12),
              torch.float32: dict(rtol=FP32_RTOL, atol=FP32_ATOL)}


def _capped_grid(kinds=KINDS) -> int:
    """Every kind with the student capped, the teacher capped, and both (teacher as hidden
    states, capped inside the fused path; and as its capped logits)."""
    group, checks = world_group(), 0
    for i, kind in enumerate(kinds):
        temperature = (0.5, 1.0, 2.0)[i % 3]
        for caps in ((CAPS[0], None), (None, CAPS[1]), CAPS):
            _check_capped(kind, temperature, caps, teacher_as="hidden", with_labels=i % 2 == 0,
                          dtype=torch.float64, group=group, tol=CAPPED_TOL[torch.float64])
            checks += 1
        _check_capped(kind, temperature, CAPS, teacher_as="logits", with_labels=True,
                      dtype=torch.float64, group=group, tol=CAPPED_TOL[torch.float64])
        checks += 1
    _check_capped("forward_kl", 1.0, CAPS, teacher_as="hidden", with_labels=True,
                  dtype=torch.float32, group=group, tol=CAPPED_TOL[torch.float32])
    _check_capped("jsd", 2.0, CAPS, teacher_as="hidden", with_labels=False,
                  dtype=torch.float32, group=group, tol=CAPPED_TOL[torch.float32])
    _check_capped(None, 1.0, (CAPS[0], None), teacher_as=None, with_labels=True,
                  dtype=torch.float64, group=group, tol=CAPPED_TOL[torch.float64])
    return checks + 3


# Gemma 3's default vocabulary and Qwen3's: neither a multiple of 64 x 4, so the last TP=4 shard
# ends in padding (192 and 128 columns; 262,208 also leaves 64 at TP=2).
LARGE_VOCABS = (262_208, 151_936)


def _padded(vocab: int, tp: int) -> int:
    return -(-vocab // (64 * tp)) * 64 * tp


# (kind, temperature, (student cap, teacher cap), teacher as, with labels) at a large vocabulary
LARGE_CASES = (("forward_kl", 1.0, CAPS, "hidden", True), ("reverse_kl", 1.0, (None, None),
               "hidden", True), ("jsd", 1.0, CAPS, "hidden", False),
               ("tvd", 2.0, (None, CAPS[1]), "logits", True))


def _large_vocab(cases=LARGE_CASES) -> int:
    """The three paths at the real vocabularies, 4 tokens, default tiles, in float64, where a
    column misplaced by the index math or read from the padding shows at the tight tolerance.
    (In float32 the hidden-state gradient, a sum over 10^5 columns, rounds at about 1e-6 of its
    largest entry: above FP32_ATOL.)"""
    group, checks = world_group(), 0
    tp = C.group_size(group)
    for vocab in LARGE_VOCABS:
        shape = dict(tokens=4, full_v=_padded(vocab, tp), vocab=vocab, chunks=(None, None))
        for kind, temperature, caps, teacher_as, with_labels in cases:
            _check_capped(kind, temperature, caps, teacher_as=teacher_as, with_labels=with_labels,
                          dtype=torch.float64, group=group, tol=CAPPED_TOL[torch.float64],
                          **shape)
            checks += 1
    return checks


def _fused_grid() -> int:
    group, checks = world_group(), 0
    for kind in KINDS:
        for temperature in (0.5, 4.0):
            for teacher_as in ("hidden", "logits"):
                _check(kind, temperature, teacher_as=teacher_as, with_labels=temperature == 4.0,
                       dtype=torch.float32, group=group)
                checks += 1
    for teacher_as, with_labels in (("hidden", True), ("logits", False), (None, True)):
        _check("forward_kl", 1.0, teacher_as=teacher_as, with_labels=with_labels,
               dtype=torch.bfloat16, group=group)
        checks += 1
    return checks


def _gradcheck() -> bool:
    group = world_group()
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t_hidden = torch.randn(3, 3, generator=g, dtype=torch.float64)
    t_weight = _rows(torch.randn(8, 3, generator=g, dtype=torch.float64), group)
    labels = torch.tensor([6, -100, 2])
    for kind in KINDS:
        def fn(h, w, kind=kind):  # the full weight scattered by rows, hidden copied to every rank
            return fused_lm_and_divergence(
                copy_to_tp(h, group), scatter_to_tp(w.T, group).T, teacher_hidden=t_hidden,
                teacher_weight_shard=t_weight, labels=labels, kind=kind, temperature=1.5,
                vocab_size=7, group=group, chunk_tokens=2, chunk_vocab=3)
        assert torch.autograd.gradcheck(fn, (hidden, weight))
    return True


def test_fused_tp1():
    assert _fused_grid() == 6 * 2 * 2 + 3
    assert _gradcheck()


def _tp2_suite() -> list:
    return [_fused_grid(), _gradcheck(), _capped_grid(), _large_vocab(LARGE_CASES[:1])]


def test_fused_tp2_gradcheck_softcap_and_large_vocab():
    assert run_ranks(_tp2_suite, 2, timeout_s=240) == [[6 * 2 * 2 + 3, True, 6 * 4 + 3, 2]] * 2


def _tp4_suite() -> list:
    group, checks = world_group(), 0
    for kind, temperature, teacher_as, with_labels in (
            ("forward_kl", 2.0, "hidden", True), ("forward_kl", 1.0, "hidden", True),
            ("reverse_kl", 1.0, "logits", False),
            ("jsd", 0.5, "hidden", True), ("skew_reverse_kl", 4.0, "logits", True)):
        _check(kind, temperature, teacher_as=teacher_as, with_labels=with_labels,
               dtype=torch.float32, group=group)
        checks += 1
    _check("tvd", 1.0, teacher_as="hidden", with_labels=True, dtype=torch.bfloat16, group=group)
    return [checks + 1, _capped_grid(), _large_vocab(LARGE_CASES[::3])]


def test_fused_tp4():
    """TP=4: the last rank's shard is 9 real columns and 3 of padding; soft-capped logits; the
    vocabularies of 262,208 and 151,936."""
    assert run_ranks(_tp4_suite, 4, timeout_s=240) == [[6, 6 * 4 + 3, 4]] * 4


def _weighted_call(fn, **kwargs):
    """fn(h, w, **call) with h, w fresh float64 leaves and `call` a jsd + LM call at T=2."""
    hidden, weight, t_hidden, t_weight, labels = _inputs(torch.float64)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    call = dict(teacher_hidden=t_hidden, teacher_weight_shard=t_weight, labels=labels, kind="jsd",
                temperature=2.0, vocab_size=VOCAB, chunk_tokens=3, chunk_vocab=5)
    return fn(h, w, **{**call, **kwargs}), h, w


def test_grad_in_forward_other_upstreams():
    """Any row block size; a scaled loss plus gradients reaching the per-token outputs directly
    (exact); a second backward through `loss` (a clear error); the outputs alone afterwards."""
    w_ce, w_div = torch.rand(2, TOKENS, generator=torch.Generator().manual_seed(3),
                             dtype=torch.float64)
    (ce, div), h_ref, w_ref = _weighted_call(fused_lm_and_divergence)

    def ref_grads(loss):
        return torch.autograd.grad(loss, (h_ref, w_ref), retain_graph=True)

    announced = (w_ce * ce).sum() + (w_div * div).sum()
    for block_bytes, rows in ((1, 1), (None, TOKENS)):
        out, h, w = _weighted_call(fused_head_loss, ce_weight=w_ce, div_weight=w_div,
                                   block_bytes=block_bytes)
        assert (out.path, out.block_rows) == ("grad_in_forward", rows)
        out.loss.backward()
        for got, want in zip((h.grad, w.grad), ref_grads(announced), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    out, h, w = _weighted_call(fused_head_loss, ce_weight=w_ce, div_weight=w_div)
    (2.5 * out.loss + out.ce.sum() + 3 * out.div[0]).backward(retain_graph=True)
    want = ref_grads(2.5 * announced + ce.sum() + 3 * div[0])
    for got, want_one in zip((h.grad, w.grad), want, strict=True):
        torch.testing.assert_close(got, want_one, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="second backward"):
        out.loss.backward()
    h.grad = w.grad = None
    out.div.sum().backward()
    for got, want_one in zip((h.grad, w.grad), ref_grads(div.sum()), strict=True):
        torch.testing.assert_close(got, want_one, rtol=1e-10, atol=1e-12)


def test_fused_head_loss_picks_its_path():
    """Without a gradient to compute it runs the plain forward; bad weights are named."""
    w_ce = torch.ones(TOKENS, dtype=torch.float64)
    with torch.no_grad():
        out, _, _ = _weighted_call(fused_head_loss, ce_weight=w_ce)
    (ce, _), _, _ = _weighted_call(fused_lm_and_divergence)
    assert (out.path, out.block_rows) == ("recompute", None)
    torch.testing.assert_close(out.loss, ce.detach().sum())
    for kwargs, message in ((dict(ce_weight=torch.ones(3)), "ce_weight shape"),
                            (dict(div_weight=torch.ones(TOKENS), teacher_hidden=None,
                                  teacher_weight_shard=None), "div_weight given")):
        with pytest.raises(ValueError, match=message):
            _weighted_call(fused_head_loss, **kwargs)


def test_fused_bad_arguments():
    h, w = torch.randn(4, 3), torch.randn(10, 3)
    cases = [
        (dict(), "nothing to compute"),
        (dict(teacher_hidden=h), "go together"),
        (dict(teacher_logits=torch.randn(4, 9)), "teacher_logits shape"),
        (dict(teacher_hidden=h, teacher_weight_shard=torch.randn(9, 3)), "teacher_hidden"),
        (dict(labels=torch.tensor([1, 2])), "labels shape"),
        (dict(labels=torch.tensor([1, 2, 3, 10])), "labels must be in"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            fused_lm_and_divergence(h, w, **kwargs)
    with pytest.raises(ValueError, match="student_hidden"):
        fused_lm_and_divergence(h[None], w, labels=torch.tensor([1, 2, 3, 4]))



def _on(device: str, dtype: torch.dtype, *tensors):
    return [x.to(device) if not x.is_floating_point() else x.to(device, dtype) for x in tensors]


def _run_and_grads(fn, device, dtype, *tensors):
    """Outputs of `fn` and the gradients of their sum with respect to its first argument(s)."""
    args = [x.clone().requires_grad_(i < 2 and x.is_floating_point())
            for i, x in enumerate(_on(device, dtype, *tensors))]
    outs = [o for o in fn(*args) if o is not None]
    sum(o.sum() for o in outs).backward()
    grads = [a.grad for a in args if a.grad is not None]
    return [x.detach().float().cpu() for x in outs + grads]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    """Each entry point on CUDA against the same call on CPU, fp32 and bf16 inputs. (The fused
    path's bf16 gradient matmuls run on tensor cores with bf16 operands: bf16 tolerance.)"""
    from distill import cross_entropy, divergence, lm_and_divergence, topk_divergence

    hidden, weight, t_hidden, t_weight, labels = _inputs()
    weight, t_weight = weight[:VOCAB], t_weight[:VOCAB]
    logits, t_logits = hidden @ weight.T, t_hidden @ t_weight.T
    values, indices = t_logits.topk(5, -1)
    lse = t_logits.logsumexp(-1)
    calls = [(lambda x, _, lab: (cross_entropy(x, lab),), (logits, t_logits, labels))]
    for kind in KINDS:
        calls += [
            (lambda x, t, lab, k=kind: lm_and_divergence(
                x, t, lab, kind=k, temperature=2.0, chunk_vocab=7), (logits, t_logits, labels)),
            (lambda x, _, v, i, k=kind: (topk_divergence(x, v, i, lse.to(x.device), kind=k),),
             (logits, t_logits, values, indices)),  # the log-sum-exp stays fp32
            (lambda h, w, th, tw, lab, k=kind: fused_lm_and_divergence(
                h, w, teacher_hidden=th, teacher_weight_shard=tw, labels=lab, kind=k,
                chunk_tokens=3, chunk_vocab=7), (hidden, weight, t_hidden, t_weight, labels))]
    calls.append((lambda x, t: (divergence(x, t),), (logits, t_logits)))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for fn, tensors in calls:
            cpu = _run_and_grads(fn, "cpu", dtype, *tensors)
            cuda = _run_and_grads(fn, "cuda", dtype, *tensors)
            for a, b in zip(cpu, cuda, strict=True):
                torch.testing.assert_close(b, a, rtol=tol, atol=tol)


class _Allocations(TorchDispatchMode):
    """Bytes of every new storage an op produces (views and in-place results are not new)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr()
                  for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        self.sizes += [t.untyped_storage().nbytes() for t in tree_flatten(out)[0]
                       if isinstance(t, torch.Tensor)
                       and t.untyped_storage().data_ptr() not in inputs]
        return out


def test_memory_is_bounded_by_tiles():
    """No allocation of [tokens, vocab] size, except the gradient of the unfused path's logits."""
    tokens, vocab, width, tile = 64, 512, 8, (16, 128)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, width, generator=g, requires_grad=True)
    weight = torch.randn(vocab, width, generator=g, requires_grad=True)
    t_hidden, t_weight = torch.randn(tokens, width, generator=g), torch.randn(vocab, width,
                                                                            generator=g)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    full = tokens * vocab * 4  # bytes of one fp32 [tokens, vocab] tensor
    logits = (hidden @ weight.T).detach().requires_grad_()
    t_logits = (t_hidden @ t_weight.T).detach()
    for kind in ("forward_kl", "jsd"):
        with _Allocations() as fwd:
            ce, div = lm_and_divergence(logits, t_logits, labels, kind=kind, chunk_tokens=tile[0],
                                        chunk_vocab=tile[1])
        with _Allocations() as bwd:
            (ce + div).sum().backward()
        assert max(fwd.sizes) < full / 4, kind
        assert sorted(bwd.sizes)[-1] == full and sorted(bwd.sizes)[-2] < full / 4, kind

        for caps in ({}, dict(softcap=3.0, teacher_softcap=4.0)):
            with _Allocations() as fwd:
                ce, div = fused_lm_and_divergence(
                    hidden, weight, teacher_hidden=t_hidden, teacher_weight_shard=t_weight,
                    labels=labels, kind=kind, chunk_tokens=tile[0], chunk_vocab=tile[1], **caps)
            with _Allocations() as bwd:
                (ce + div).sum().backward()
            assert max(fwd.sizes + bwd.sizes) < full / 4, (kind, caps)

            # grad-in-forward, row blocks of 8 tokens: the largest block allocation is [8, vocab]
            arrays = 2 + bool(caps)  # both models' logits, and the student's cap's derivative
            with _Allocations() as fwd:
                out = fused_head_loss(
                    hidden, weight, teacher_hidden=t_hidden, teacher_weight_shard=t_weight,
                    labels=labels, kind=kind, chunk_tokens=tile[0], chunk_vocab=tile[1],
                    ce_weight=torch.ones(tokens), div_weight=torch.ones(tokens),
                    block_bytes=8 * arrays * vocab * 4, **caps)
            with _Allocations() as bwd:
                out.loss.backward()
            assert out.block_rows == 8 and max(fwd.sizes + bwd.sizes) <= full / 8, (kind, caps)


def test_softcapped_tp1():
    assert _capped_grid() == 6 * 4 + 3


def test_large_vocabularies_tp1():
    assert _large_vocab() == 8
