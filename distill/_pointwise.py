"""Per-column terms of every divergence kind, given the two log-distributions.

A divergence is a sum over columns `L = sum_v ell(p_v, q_v)` (p: student, q: teacher). Its gradient
with respect to the student's (temperature-scaled) logits a is, through the softmax,

    dL/da_j = p_j g_j - p_j * sum_v p_v g_v,      g_v = dL/dp_v,

so each kind gives its terms `ell` and `pg = p * g` (the product is finite where g alone is not,
as in forward KL's g = -q/p). Columns with p = 0 (or q = 0) contribute 0: 0 log 0 = 0 and inf - inf
never appears, because every product with a possibly infinite log is taken under `where`.

Callers use this for the kinds whose statistics need two rounds of communication, and for top-k
buckets (where a "column" is a top-k entry or the leftover bucket).
"""

from __future__ import annotations

import math

import torch


def _xmul(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`x * v` for a probability `x`, exactly 0 where x == 0 (even where v is infinite or nan)."""
    return torch.where(x > 0, x * v, 0.0)


def _log_mix(logx: torch.Tensor, logy: torch.Tensor, wx: float) -> torch.Tensor:
    """log(wx * x + (1 - wx) * y) from log x and log y."""
    return torch.logaddexp(logx + math.log(wx), logy + math.log1p(-wx))


def terms(kind: str, logp: torch.Tensor, logq: torch.Tensor, *, beta: float,
          skew: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ell, p * dL/dp) per column for `kind`; `logp`, `logq` are normalized log-probabilities."""
    p, q = logp.exp(), logq.exp()
    if kind == "forward_kl":
        return _xmul(q, logq - logp), -q
    if kind == "reverse_kl":
        ell = _xmul(p, logp - logq)
        return ell, ell
    if kind == "tvd":
        return 0.5 * (p - q).abs(), 0.5 * p * torch.sign(p - q)
    if kind == "jsd":  # m = beta q + (1 - beta) p
        logm = _log_mix(logq, logp, beta)
        p_part = _xmul(p, logp - logm)
        return beta * _xmul(q, logq - logm) + (1 - beta) * p_part, (1 - beta) * p_part
    if kind == "skew_forward_kl":  # KL(q || m), m = skew q + (1 - skew) p
        logm = _log_mix(logq, logp, skew)
        return (_xmul(q, logq - logm),
                -(1 - skew) * _xmul(p, (logq - logm).exp()))
    if kind == "skew_reverse_kl":  # KL(p || m), m = skew p + (1 - skew) q
        logm = _log_mix(logp, logq, skew)
        ell = _xmul(p, logp - logm)
        return ell, ell - skew * _xmul(p, (logp - logm).exp())
    raise ValueError(f"unknown divergence kind {kind!r}")
