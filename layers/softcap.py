"""Soft-capping (Gemma 2): `x -> cap * tanh(x / cap)`, a smooth bound of logits to (-cap, cap).

The one implementation, for every place that caps: the model's LM head (`final_logit_softcap`),
the fused LM-head losses (distill/fused.py), which cap their logit tiles themselves, and the
attention scores (`attn_logit_softcap`, layers/attention.py).
"""

from __future__ import annotations

import torch


def softcap(x: torch.Tensor, cap: float | None, *, inplace: bool = False) -> torch.Tensor:
    """`cap * tanh(x / cap)`, pointwise (so exact on any vocabulary shard); `x` itself when `cap`
    is None. `inplace` overwrites `x` (for tensors autograd does not track)."""
    if cap is None:
        return x
    if inplace:
        return x.div_(cap).tanh_().mul_(cap)
    return torch.tanh(x / cap) * cap


def softcap_grad(capped: torch.Tensor, cap: float) -> torch.Tensor:
    """d softcap(x) / dx = 1 - tanh(x / cap)^2, from the capped values (as autograd's tanh
    backward computes it, from its output); a new tensor."""
    t = capped / cap
    return t.mul_(t).neg_().add_(1.0)
