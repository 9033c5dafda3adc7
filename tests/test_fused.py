"""The fused LM head + losses against float64 references built from materialized logits.

The reference computes `hidden @ weight.T` in float64 and applies the definitions of
test_divergence.py; the fused path must match its outputs (rtol=atol=1e-5), the gradient of the
hidden states (summed over TP by `copy_to_tp`, as the model does) and this rank's weight-shard
gradient (rtol=atol=1e-5; bf16 inputs get their gradients in bf16: rtol 8e-3, atol 8e-3 of the
largest gradient, since the partial sums are rounded before the TP sum). Padding rows of the
weights hold NaN, so reading one would show. Small tiles (3 tokens x 5 columns) make every call
cross tile and shard boundaries. The memory contract (no [tokens, vocab] allocation but the
unfused path's returned gradient) is checked by recording every allocation.
"""

from __future__ import annotations

import pytest
import torch
from test_divergence import _group, _shard, reference, reference_ce
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distill import KINDS, fused_lm_and_divergence, lm_and_divergence
from engine import collectives as C
from engine.mappings import copy_to_tp, scatter_to_tp
from engine.spawn import run_ranks

TOKENS, HIDDEN, T_HIDDEN, FULL_V, VOCAB = 7, 6, 5, 48, 45


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, HIDDEN, generator=g, dtype=torch.float64)
    weight = torch.randn(FULL_V, HIDDEN, generator=g, dtype=torch.float64)
    t_hidden = torch.randn(TOKENS, T_HIDDEN, generator=g, dtype=torch.float64)
    t_weight = torch.randn(FULL_V, T_HIDDEN, generator=g, dtype=torch.float64) * 2
    weight[VOCAB:] = t_weight[VOCAB:] = float("nan")
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    labels[1] = -100
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


def _check(kind, temperature, *, teacher_as, with_labels, dtype, group):
    hidden, weight, t_hidden, t_weight, labels = _inputs(dtype)
    t_logits = t_hidden.double() @ t_weight.double().T  # [tokens, FULL_V], NaN in the padding
    labels = labels if with_labels else None
    teacher = {"hidden": dict(teacher_hidden=t_hidden, teacher_weight_shard=_rows(t_weight, group)),
               "logits": dict(teacher_logits=_shard(t_logits.to(dtype), group)),
               None: {}}[teacher_as]
    w_ce, w_div = torch.rand(2, TOKENS, generator=torch.Generator().manual_seed(9),
                             dtype=torch.float64)  # the same on every rank
    h = hidden.clone().requires_grad_()
    w_shard = _rows(weight, group).requires_grad_()
    with C.count_collectives() as fwd:
        ce, div = fused_lm_and_divergence(
            copy_to_tp(h, group), w_shard, **teacher, labels=labels, kind=kind,
            temperature=temperature, vocab_size=VOCAB, group=group, chunk_tokens=3, chunk_vocab=5)
    assert (ce is None) == (labels is None) and (div is None) == (teacher_as is None)
    loss = sum((x * c).sum() for x, c in ((ce, w_ce), (div, w_div)) if x is not None)
    with C.count_collectives() as bwd:
        loss.backward()
    one_pass = kind in ("forward_kl", "reverse_kl") or teacher_as is None
    if C.group_size(group) > 1:
        assert dict(fwd.calls) == ({"all_gather": 1} if one_pass else
                                   {"all_gather": 1, "all_reduce": 1}), fwd.calls
        assert dict(bwd.calls) == {"all_reduce": 1}  # copy_to_tp's, summing the partial grads
    ref_t = None if teacher_as is None else \
        (t_logits if teacher_as == "hidden" else t_logits.to(dtype).double())
    ref_ce, ref_div, ref_gh, ref_gw = _reference(kind, temperature, hidden, weight, ref_t, labels,
                                                 w_ce, w_div)
    # bf16: each rank's partial hidden gradient is rounded before the TP sum, so the error scales
    # with the partials, not with the (possibly cancelling) total.
    grad_tol = dict(rtol=8e-3, atol=8e-3 * ref_gh.abs().max().item()) if dtype == torch.bfloat16 \
        else dict(rtol=1e-5, atol=1e-5)
    for out, ref in ((ce, ref_ce), (div, ref_div)):
        if ref is not None:
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert h.grad.dtype == w_shard.grad.dtype == dtype
    torch.testing.assert_close(h.grad.double(), ref_gh, **grad_tol)
    torch.testing.assert_close(w_shard.grad.double(), _rows(ref_gw, group), **grad_tol)


def _fused_grid() -> int:
    group, checks = _group(), 0
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
    group = _group()
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
    return [_fused_grid(), _gradcheck()]


def test_fused_tp2_and_gradcheck():
    assert run_ranks(_tp2_suite, 2, timeout_s=240) == [[6 * 2 * 2 + 3, True]] * 2


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

        with _Allocations() as fwd:
            ce, div = fused_lm_and_divergence(
                hidden, weight, teacher_hidden=t_hidden, teacher_weight_shard=t_weight,
                labels=labels, kind=kind, chunk_tokens=tile[0], chunk_vocab=tile[1])
        with _Allocations() as bwd:
            (ce + div).sum().backward()
        assert max(fwd.sizes + bwd.sizes) < full / 4, kind
