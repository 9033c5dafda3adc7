"""Vocab-parallel divergences and cross-entropy against single-process float64 references.

Every check compares this rank's output and this rank's gradient shard with the same function on
the gathered full vocabulary in float64 (`reference`), at TP 1, 2 and 4, for every kind,
temperatures 0.5/1/4, fp32 and bf16 inputs, extreme logits (+-1e4, -inf columns), and a padded
vocabulary whose padding holds NaN (so a read of a padding column cannot go unnoticed).
Tolerances: outputs rtol=atol=1e-5 (fp32 round-off at the logits' scale); gradients 1e-5 in fp32
and bf16 round-off (rtol 8e-3) for bf16 inputs, whose gradients come back in bf16.

Soft-capped logits (as a model's LM head caps them, on each shard) through every kind, student,
teacher or both capped, and a capped teacher's exported top-k, in float64 (rtol 1e-10); the
vocabularies 262,208 and 151,936 with NaN padding through every kind, the cross-entropy and a
top-k teacher, float32 at FP32_RTOL / FP32_ATOL; all at TP 1, 2 and 4.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distill import KINDS, cross_entropy, divergence, lm_and_divergence, topk_divergence
from distill.offline import teacher_topk
from engine import collectives as C
from engine.mappings import scatter_to_tp
from engine.spawn import run_ranks
from layers.softcap import softcap
from tests.helpers import FP32_ATOL, FP32_RTOL
from tests.references import (
    NEG,
    ROWS,
    VOCAB,
    log_probs,
    make_labels,
    make_logits,
    reference,
    reference_ce,
    reference_grad,
    vocab_shard,
    world_group,
)

TEMPERATURES = (0.5, 1.0, 4.0)


def _weights(seed=0) -> torch.Tensor:
    return 0.5 + torch.rand(ROWS, generator=torch.Generator().manual_seed(seed + 2),
                            dtype=torch.float64)


def _tols(dtype):
    grad = dict(rtol=8e-3, atol=1e-6) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    return dict(rtol=1e-5, atol=1e-5), grad


def _expected_calls(kind: str | None, world: int) -> dict:
    if world == 1:
        return {}
    one_pass = kind in (None, "forward_kl", "reverse_kl")
    return {"all_gather": 1} if one_pass else {"all_gather": 1, "all_reduce": 1}


# ---- the exactness grid -----------------------------------------------------------------------

def _check_divergence(kind, temperature, dtype, extreme, group, world):
    s_full, t_full = make_logits(kind, extreme=extreme, dtype=dtype)
    w = _weights()
    s = vocab_shard(s_full, group).requires_grad_()
    with C.count_collectives() as fwd:
        out = divergence(s, vocab_shard(t_full, group), kind=kind, temperature=temperature,
                         vocab_size=VOCAB, group=group, chunk_tokens=3, chunk_vocab=5)
    with C.count_collectives() as bwd:
        (out * w.to(out.dtype)).sum().backward()
    assert dict(fwd.calls) == _expected_calls(kind, world), (kind, fwd.calls)
    assert bwd.total_calls == 0
    ref, ref_grad = reference_grad(
        lambda x: reference(kind, x, t_full, temperature=temperature), s_full, w)
    out_tol, grad_tol = _tols(dtype)
    assert out.dtype == torch.float32 and s.grad.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(s.grad).all()
    torch.testing.assert_close(out.double(), ref, **out_tol)
    torch.testing.assert_close(s.grad.double(), vocab_shard(ref_grad, group), **grad_tol)


def _check_lm_and_divergence(kind, temperature, group, world):
    """Both outputs, and the gradient of each alone and of a weighted sum."""
    s_full, t_full = make_logits(kind, extreme=True)
    labels, w = make_labels(s_full), _weights()
    ref_ce, ref_ce_grad = reference_grad(lambda x: reference_ce(x, labels), s_full, w)
    ref_div, ref_div_grad = reference_grad(
        lambda x: reference(kind, x, t_full, temperature=temperature), s_full, w)
    for a, b in ((1.0, 0.0), (0.0, 1.0), (0.7, 0.3)):  # CE alone, divergence alone, both
        s = vocab_shard(s_full, group).requires_grad_()
        with C.count_collectives() as fwd:
            ce, div = lm_and_divergence(s, vocab_shard(t_full, group), labels, kind=kind,
                                        temperature=temperature, vocab_size=VOCAB, group=group,
                                        chunk_tokens=5)
        assert dict(fwd.calls) == _expected_calls(kind, world), (kind, fwd.calls)
        terms = [x * (c * w) for x, c in ((ce, a), (div, b)) if c]  # an unused output gets no grad
        sum(terms).sum().backward()
        torch.testing.assert_close(ce.double(), ref_ce, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(div.double(), ref_div, rtol=1e-5, atol=1e-5)
        expected = vocab_shard(a * ref_ce_grad + b * ref_div_grad, group)
        torch.testing.assert_close(s.grad.double(), expected, rtol=1e-5, atol=1e-5)


def _check_cross_entropy(dtype, group, world):
    s_full, _ = make_logits("forward_kl", extreme=True, dtype=dtype)
    labels, w = make_labels(s_full), _weights()
    s = vocab_shard(s_full, group).requires_grad_()
    with C.count_collectives() as fwd:
        ce = cross_entropy(s, labels, vocab_size=VOCAB, group=group, chunk_vocab=7)
    with C.count_collectives() as bwd:
        (ce * w.to(ce.dtype)).sum().backward()
    assert dict(fwd.calls) == _expected_calls(None, world) and bwd.total_calls == 0
    ref, ref_grad = reference_grad(lambda x: reference_ce(x, labels), s_full, w)
    out_tol, grad_tol = _tols(dtype)
    assert (ce[labels == -100] == 0).all()
    torch.testing.assert_close(ce.double(), ref, **out_tol)
    torch.testing.assert_close(s.grad.double(), vocab_shard(ref_grad, group), **grad_tol)


def _exactness_grid() -> int:
    group = world_group()
    world = C.group_size(group)
    checks = 0
    for kind in KINDS:
        for temperature in TEMPERATURES:
            for dtype in (torch.float32, torch.bfloat16):
                for extreme in (False, True):
                    _check_divergence(kind, temperature, dtype, extreme, group, world)
                    checks += 1
            _check_lm_and_divergence(kind, temperature, group, world)
            checks += 1
    for dtype in (torch.float32, torch.bfloat16):
        _check_cross_entropy(dtype, group, world)
        checks += 1
    _check_all_padding_shard(group)
    return checks


def _check_all_padding_shard(group):
    """vocab_size=10 leaves the upper shards pure padding (at TP 4: ranks 1..3 own no column)."""
    s_full, t_full = make_logits("jsd", extreme=False)
    labels = make_labels(s_full) % 10
    for kind in KINDS:
        s = vocab_shard(s_full, group).requires_grad_()
        ce, div = lm_and_divergence(s, vocab_shard(t_full, group), labels, kind=kind, vocab_size=10,
                                    group=group, temperature=2.0)
        (ce + div).sum().backward()
        ref, grad = reference_grad(
            lambda x: reference(kind, x, t_full, temperature=2.0, vocab_size=10)
            + reference_ce(x, labels, vocab_size=10), s_full, torch.ones(ROWS, dtype=torch.float64))
        torch.testing.assert_close((ce + div).double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.grad.double(), vocab_shard(grad, group), rtol=1e-5, atol=1e-5)


def test_exact_tp1():
    assert _exactness_grid() == 6 * 3 * 5 + 2


# ---- gradcheck in float64 (the full input scattered over TP, so every rank perturbs alike) ----

def _gradcheck_all() -> bool:
    group = world_group()
    g = torch.Generator().manual_seed(3)
    s_full = torch.randn(3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t_full = torch.randn(3, 8, generator=g, dtype=torch.float64)
    labels = torch.tensor([4, -100, 6])
    t = vocab_shard(t_full, group)

    def shard(x):  # backward all-gathers the shard gradients, so gradcheck sees the full input
        return scatter_to_tp(x, group)
    for kind in KINDS:
        assert torch.autograd.gradcheck(
            lambda x, kind=kind: divergence(shard(x), t, kind=kind, temperature=1.5, beta=0.3,
                                            skew=0.2, vocab_size=7, group=group, chunk_tokens=2),
            (s_full,))
        assert torch.autograd.gradcheck(
            lambda x, kind=kind: lm_and_divergence(shard(x), t, labels, kind=kind, temperature=0.7,
                                                   vocab_size=7, group=group), (s_full,))
    assert torch.autograd.gradcheck(
        lambda x: cross_entropy(shard(x), labels, vocab_size=7, group=group), (s_full,))
    values, indices = t_full[:, :7].topk(3, -1)
    lse = (t_full[:, :7] / 2.0).logsumexp(-1)
    for kind in KINDS:
        assert torch.autograd.gradcheck(
            lambda x, kind=kind: topk_divergence(shard(x), values, indices, lse, kind=kind,
                                                 temperature=2.0, vocab_size=7, group=group),
            (s_full,))
    return True


def test_gradcheck_float64_tp1():
    assert _gradcheck_all()


# ---- against megatron-core and torch.nn.functional --------------------------------------------

def _against_libraries() -> bool:
    from megatron.core import parallel_state, tensor_parallel

    group = world_group()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    try:
        g = torch.Generator().manual_seed(5)
        seq, batch, vocab = 6, 2, 64
        logits = torch.randn(seq, batch, vocab, generator=g) * 3
        teacher = torch.randn(seq, batch, vocab, generator=g) * 3
        target = torch.randint(0, vocab, (seq, batch), generator=g)

        mine = vocab_shard(logits, group).requires_grad_()
        ce = cross_entropy(mine, target, group=group)
        ce.sum().backward()
        theirs = vocab_shard(logits, group).requires_grad_()
        ref = tensor_parallel.vocab_parallel_cross_entropy(theirs.clone(), target)
        ref.sum().backward()
        torch.testing.assert_close(ce, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-6)

        full = logits.clone().requires_grad_()
        F.cross_entropy(full.reshape(-1, vocab), target.reshape(-1), reduction="sum").backward()
        torch.testing.assert_close(ce, F.cross_entropy(logits.permute(0, 2, 1), target,
                                                       reduction="none"), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.grad, vocab_shard(full.grad, group), rtol=1e-5, atol=1e-6)

        for temperature in TEMPERATURES:
            mine = vocab_shard(logits, group).requires_grad_()
            kl = divergence(mine, vocab_shard(teacher, group), temperature=temperature, group=group)
            kl.sum().backward()
            full = logits.clone().requires_grad_()
            ref = F.kl_div(F.log_softmax(full / temperature, -1),
                           F.log_softmax(teacher / temperature, -1), log_target=True,
                           reduction="none").sum(-1)
            ref.sum().backward()
            torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mine.grad, vocab_shard(full.grad, group), rtol=1e-5, atol=1e-6)
    finally:
        parallel_state.destroy_model_parallel()
    return True




# ---- top-k teacher ------------------------------------------------------------------------------

def _check_topk() -> bool:
    group = world_group()
    world = C.group_size(group)
    for kind in KINDS:
        s_full, t_full = make_logits(kind, extreme=True)
        s_mild, t_mild = make_logits(kind, extreme=False)
        w = _weights()
        for temperature in TEMPERATURES:
            t_real = t_full[:, :VOCAB].double().nan_to_num(neginf=NEG)
            lse = (t_real / temperature).logsumexp(-1)
            # k = the whole vocabulary: exactly `divergence`.
            values, indices = t_full[:, :VOCAB].sort(-1, descending=True)
            s = vocab_shard(s_full, group).requires_grad_()
            with C.count_collectives() as fwd:
                out = topk_divergence(s, values, indices, lse, kind=kind, temperature=temperature,
                                      vocab_size=VOCAB, group=group, chunk_tokens=3, chunk_vocab=5)
            (out * w).sum().backward()
            assert fwd.total_calls == (world > 1)
            ref, ref_grad = reference_grad(
                lambda x: reference(kind, x, t_full, temperature=temperature), s_full, w)
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(s.grad.double(), vocab_shard(ref_grad, group), rtol=1e-5,
                                       atol=1e-5)
            # k = 6: k + 1 buckets, the teacher's leftover mass in the last. (Not on the extreme
            # logits: a leftover of exp(-1e4) is below what 1 - sum(top-k) can resolve.)
            values, indices = t_mild[:, :VOCAB].topk(6, -1)
            lse = (t_mild[:, :VOCAB].double() / temperature).logsumexp(-1)
            s = vocab_shard(s_mild, group).requires_grad_()
            out = topk_divergence(s, values, indices, lse, kind=kind, temperature=temperature,
                                  vocab_size=VOCAB, group=group, chunk_vocab=7)
            (out * w).sum().backward()
            ref, ref_grad = reference_grad(
                lambda x: _bucket_reference(kind, x, t_mild, indices, temperature), s_mild, w)
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(s.grad.double(), vocab_shard(ref_grad, group), rtol=1e-5,
                                       atol=1e-5)
    return True


def _bucket_reference(kind, student, teacher, indices, temperature, vocab_size=VOCAB):
    """The divergence between the (k + 1)-bucket distributions, built by summing probabilities."""
    def buckets(logits):
        p = log_probs(logits, temperature, vocab_size).exp()
        top = p.gather(-1, indices)
        return torch.cat([top, (p.sum(-1) - top.sum(-1)).clamp_min(0)[:, None]], -1)

    logp, logq = (torch.where(x > 0, x, 1e-300).log() for x in (buckets(student), buckets(teacher)))
    return reference(kind, logp, logq, vocab_size=logp.shape[-1])


def test_topk_tp1():
    assert _check_topk()


# ---- soft-capped logits (a model's final_logit_softcap, applied by its LM head) ----------------

CAPS = (3.0, 4.0)  # student, teacher: below the largest logits of make_logits(...) * 3


def _cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """The reference's soft-cap, written out (not the library's helper)."""
    return x if cap is None else cap * torch.tanh(x / cap)


def _capped_inputs(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Full raw logits whose padding columns are 0, as a model's zero padding rows give them
    before its head masks them (the cap's backward would turn NaN there into NaN gradients)."""
    s_full, t_full = (x * 3 for x in make_logits(kind, extreme=False, dtype=torch.float64))
    s_full[:, VOCAB:] = t_full[:, VOCAB:] = 0
    return s_full, t_full


def _check_capped(kind: str, caps, group) -> None:
    """The unfused losses on logits capped on each shard by `layers.softcap.softcap` against the
    float64 reference of the capped full logits; the gradient reaches the raw logits through the
    cap. float64: the two differ in operation order only."""
    s_cap, t_cap = caps
    s_full, t_full = _capped_inputs(kind)
    labels, w = make_labels(s_full), _weights()
    raw = vocab_shard(s_full, group).requires_grad_()
    teacher = softcap(vocab_shard(t_full, group), t_cap)
    ce, div = lm_and_divergence(softcap(raw, s_cap), teacher, labels, kind=kind, temperature=2.0,
                                vocab_size=VOCAB, group=group, chunk_tokens=3, chunk_vocab=5)
    ((ce + div) * w).sum().backward()
    ref, ref_grad = reference_grad(
        lambda x: reference(kind, _cap(x, s_cap), _cap(t_full, t_cap), temperature=2.0)
        + reference_ce(_cap(x, s_cap), labels), s_full, w)
    torch.testing.assert_close((ce + div).double(), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(raw.grad, vocab_shard(ref_grad, group), rtol=1e-10, atol=1e-12)


def _check_capped_topk(kind: str, group) -> None:
    """The offline path: a capped teacher's top-k (distill.offline.teacher_topk, as the export
    takes it from the capped logits) against a capped student, k = 6 and the leftover bucket."""
    s_full, t_full = _capped_inputs(kind)
    t_capped, w = _cap(t_full, CAPS[1]), _weights()
    values, indices, lse = teacher_topk(vocab_shard(t_capped, group), k=6, vocab_size=VOCAB,
                                        temperature=2.0, group=group)
    raw = vocab_shard(s_full, group).requires_grad_()
    out = topk_divergence(softcap(raw, CAPS[0]), values, indices.long(), lse, kind=kind,
                          temperature=2.0, vocab_size=VOCAB, group=group, chunk_vocab=7)
    (out * w).sum().backward()
    ref, ref_grad = reference_grad(
        lambda x: _bucket_reference(kind, _cap(x, CAPS[0]), t_capped, indices.long(), 2.0),
        s_full, w)
    # the stored values and log-sum-exp are float32 (the export's format): fp32 round-off
    torch.testing.assert_close(out, ref, rtol=FP32_RTOL, atol=FP32_ATOL)
    torch.testing.assert_close(raw.grad, vocab_shard(ref_grad, group), rtol=FP32_RTOL,
                               atol=FP32_ATOL)


def _capped_grid() -> int:
    group, checks = world_group(), 0
    for kind in KINDS:
        for caps in ((CAPS[0], None), (None, CAPS[1]), CAPS):
            _check_capped(kind, caps, group)
            checks += 1
        _check_capped_topk(kind, group)
        checks += 1
    return checks


def test_softcapped_tp1():
    assert _capped_grid() == 6 * 4


# ---- vocabularies of 150k-262k, padded (Qwen3 151,936; Gemma 3 262,208) ------------------------

LARGE_VOCABS = (262_208, 151_936)  # the last TP=4 shard ends in 192 / 128 padding columns


def _large_vocab() -> int:
    """Every kind, the cross-entropy and a top-k teacher on 4 tokens of the real vocabularies,
    with NaN padding, default tiles: float32 logits against the float64 reference (values at
    FP32 tolerance; the gradients are per column, p - q, so FP32 tolerance too)."""
    group, checks = world_group(), 0
    tp = C.group_size(group)
    g = torch.Generator().manual_seed(7)
    for vocab in LARGE_VOCABS:
        padded = -(-vocab // (64 * tp)) * 64 * tp
        s_full, t_full = (torch.randn(4, padded, generator=g) * 3 for _ in range(2))
        s_full[:, vocab:] = t_full[:, vocab:] = float("nan")
        labels = torch.tensor([0, vocab - 1, -100, vocab // 2 + 1])
        w = _weights()[:4]
        for kind in KINDS:
            s = vocab_shard(s_full, group).requires_grad_()
            ce, div = lm_and_divergence(s, vocab_shard(t_full, group), labels, kind=kind,
                                        temperature=1.5, vocab_size=vocab, group=group)
            ((ce + div) * w).sum().backward()
            ref, ref_grad = reference_grad(
                lambda x, kind=kind, vocab=vocab: reference(kind, x, t_full, temperature=1.5,
                                                            vocab_size=vocab)
                + reference_ce(x, labels, vocab_size=vocab), s_full, w)
            torch.testing.assert_close((ce + div).double(), ref, rtol=FP32_RTOL, atol=FP32_ATOL)
            torch.testing.assert_close(s.grad.double(), vocab_shard(ref_grad, group),
                                       rtol=FP32_RTOL, atol=FP32_ATOL)
            checks += 1
        values, indices, lse = teacher_topk(vocab_shard(t_full, group), k=16, vocab_size=vocab,
                                            temperature=1.0, group=group)
        assert torch.equal(indices.long(), t_full[:, :vocab].topk(16, -1).indices)
        s = vocab_shard(s_full, group).requires_grad_()
        out = topk_divergence(s, values, indices.long(), lse, vocab_size=vocab, group=group)
        (out * w).sum().backward()
        ref, ref_grad = reference_grad(
            lambda x, vocab=vocab: _bucket_reference("forward_kl", x, t_full, indices.long(), 1.0,
                                                     vocab_size=vocab), s_full, w)
        # the stored float32 log-sum-exp (about 17 here, ulp 2e-6) shifts every log q by its
        # round-off: the divergence moves by as much
        torch.testing.assert_close(out.double(), ref, rtol=FP32_RTOL, atol=1e-5)
        torch.testing.assert_close(s.grad.double(), vocab_shard(ref_grad, group),
                                   rtol=FP32_RTOL, atol=FP32_ATOL)
        checks += 1
    return checks


def test_large_vocabularies_tp1():
    assert _large_vocab() == 2 * 7


# ---- TP 2 and 4: one spawn per world size runs every distributed check ------------------------

def _tp2_suite() -> list:
    return [_exactness_grid(), _gradcheck_all(), _against_libraries(), _check_topk(),
            _capped_grid(), _large_vocab()]


def _tp4_suite() -> list:
    return [_exactness_grid(), _check_topk(), _capped_grid(), _large_vocab()]


def test_tp2_exact_gradcheck_topk_megatron_softcap_and_large_vocab():
    """The grid, float64 gradcheck, megatron-core / torch.nn.functional agreement, top-k,
    soft-capped logits, the vocabularies of 262,208 and 151,936."""
    assert run_ranks(_tp2_suite, 2, timeout_s=240) == \
        [[6 * 3 * 5 + 2, True, True, True, 6 * 4, 2 * 7]] * 2


def test_tp4_exact_topk_softcap_and_large_vocab():
    assert run_ranks(_tp4_suite, 4, timeout_s=240) == [[6 * 3 * 5 + 2, True, 6 * 4, 2 * 7]] * 4


# ---- bad input ----------------------------------------------------------------------------------

def test_bad_arguments_name_the_culprit():
    s, t = torch.randn(2, 8), torch.randn(2, 8)
    cases = [
        (lambda: divergence(s, t, kind="kl"), "kind must be one of"),
        (lambda: divergence(s, t, temperature=0.0), "temperature must be > 0"),
        (lambda: divergence(s, t, kind="jsd", beta=1.0), "beta must be in"),
        (lambda: divergence(s, t, kind="skew_reverse_kl", skew=0.0), "skew must be in"),
        (lambda: divergence(s, t, vocab_size=9), "vocab_size must be in"),
        (lambda: divergence(s, t[:, :4]), "teacher_logits shape"),
        (lambda: cross_entropy(s, torch.tensor([1, 8])), "labels must be in"),
        (lambda: cross_entropy(s, torch.tensor([1])), "labels shape"),
        (lambda: topk_divergence(s, t[:, :2], torch.tensor([[0, 9], [1, 2]]), t[:, 0]),
         "teacher_topk_indices"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
