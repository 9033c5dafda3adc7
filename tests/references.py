"""Single-process float64 references shared by the loss tests (divergences, cross-entropy, the KD
diagnostics), and the logits they are checked on: the definitions on the full vocabulary, through
autograd. tests/test_divergence.py checks them against torch and Megatron."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine import collectives as C

ROWS, FULL_V, VOCAB = 8, 48, 45  # 48 columns split over 1, 2 or 4 ranks; the last 3 are padding
NEG = -1e30  # what the reference puts for -inf, so that its autograd never meets inf - inf


def log_probs(logits: torch.Tensor, temperature: float, vocab_size: int) -> torch.Tensor:
    """log softmax(logits / temperature) over the real vocabulary, -inf kept finite (NEG)."""
    x = logits[..., :vocab_size].double().nan_to_num(neginf=NEG)
    return torch.log_softmax(x / temperature, -1)


def _kl(logx: torch.Tensor, logy: torch.Tensor) -> torch.Tensor:
    return (logx.exp() * (logx - logy)).sum(-1)


def _log_mix(logx, logy, wx):  # log(wx x + (1 - wx) y)
    return torch.logaddexp(logx + math.log(wx), logy + math.log(1 - wx))


def reference(kind: str, student: torch.Tensor, teacher: torch.Tensor, *, temperature=1.0,
              beta=0.5, skew=0.1, vocab_size=VOCAB) -> torch.Tensor:
    logp = log_probs(student, temperature, vocab_size)
    logq = log_probs(teacher, temperature, vocab_size)
    if kind == "forward_kl":
        return _kl(logq, logp)
    if kind == "reverse_kl":
        return _kl(logp, logq)
    if kind == "jsd":
        logm = _log_mix(logq, logp, beta)
        return beta * _kl(logq, logm) + (1 - beta) * _kl(logp, logm)
    if kind == "tvd":
        return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
    if kind == "skew_forward_kl":
        return _kl(logq, _log_mix(logq, logp, skew))
    if kind == "skew_reverse_kl":
        return _kl(logp, _log_mix(logp, logq, skew))
    raise AssertionError(kind)


def reference_ce(logits: torch.Tensor, labels: torch.Tensor, vocab_size=VOCAB) -> torch.Tensor:
    x = logits[..., :vocab_size].double().nan_to_num(neginf=NEG)
    return F.cross_entropy(x, labels, ignore_index=-100, reduction="none")


def reference_grad(fn, full: torch.Tensor, weights: torch.Tensor):
    """(fn(full) in float64, d(sum weights * fn)/d full)."""
    x = full.double().requires_grad_()
    out = fn(x)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    return out.detach(), grad


def reference_diagnostics(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                          vocab_size: int = VOCAB) -> torch.Tensor:
    """[tokens, 3] (teacher entropy, student entropy, top-1 agreement) in float64."""
    def entropy(x):
        logp = torch.log_softmax(x / temperature, -1)
        return -torch.where(logp.exp() > 0, logp.exp() * logp, 0.0).sum(-1)

    s, t = (x[..., :vocab_size].double().nan_to_num(neginf=NEG) for x in (student, teacher))
    return torch.stack([entropy(t), entropy(s), (s.argmax(-1) == t.argmax(-1)).double()], -1)


# ---- inputs -----------------------------------------------------------------------------------

def make_logits(kind: str, *, extreme: bool, dtype=torch.float32, seed=0):
    """Full [ROWS, FULL_V] student and teacher logits; NaN in the padding columns.

    `extreme` adds +-1e4 peaks (on one rank and across ranks), -inf columns shared by both models,
    a row whose whole TP-4 shard is -inf, and one-sided -inf columns wherever `kind` stays finite
    (forward KL allows them in the teacher, reverse KL in the student, the others anywhere).
    """
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(ROWS, FULL_V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(ROWS, FULL_V, generator=g, dtype=torch.float64) * 2
    if extreme:
        neg = float("-inf")
        s[0, 1] = t[0, 1] = neg
        s[4, 12:24] = t[4, 12:24] = neg
        s[2, 4], t[2, 4] = 1e4 - 3, 1e4
        s[6, 40], t[6, 10] = 1e4, 1e4
        s[7, ::5], t[7, 3::7] = -1e4, -1e4
        if kind != "reverse_kl":
            t[1, 2] = neg
            t[3, 30:40] = neg
        if kind != "forward_kl":
            s[1, 7] = neg
            s[5, 0:12] = neg
    s[:, VOCAB:] = t[:, VOCAB:] = float("nan")
    return s.to(dtype), t.to(dtype)


def make_labels(student: torch.Tensor, seed=0) -> torch.Tensor:
    """Labels on finite student columns of the real vocabulary, two of them ignored."""
    g = torch.Generator().manual_seed(seed + 1)
    scores = torch.rand(student.shape, generator=g, dtype=torch.float64)
    scores[~torch.isfinite(student.double())] = -1
    labels = scores[:, :VOCAB].argmax(-1)
    labels[[2, 5]] = -100
    return labels


# ---- this rank's part ------------------------------------------------------------------------

def vocab_shard(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's contiguous slice of the last (vocabulary) dimension of a full tensor."""
    return C.split_along(x, group, dim=-1).clone()


def world_group():
    """The group a spawned test rank's vocab-parallel call takes: all ranks, None when alone."""
    return dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
