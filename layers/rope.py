"""Rotary position embeddings in the Hugging Face ("rotate half") layout, with Llama-3 or linear
scaling, per-layer tables and partial rotation.

Each head's rotated width d (all of it, or its leading `model.partial_rotary_factor` share as in
Phi-3/4) is two halves [x1, x2]; position p rotates the pair (x1[i], x2[i]) by angle
p * inv_freq[i], and the rest of the head passes unchanged. This is the layout of Hugging Face
Llama/Qwen/Mistral/Gemma/Phi-3 checkpoints, so their q/k projections load unchanged.

A model has one table (`global`), or two when its sliding-window layers have their own base
(`local`, Gemma 3: global layers at `rope_theta` with the scaling, local ones at
`rope_local_theta` without); `ModelConfig.rope_kind(layer)` says which a block reads, or None for a
block without RoPE (SmolLM3).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from layers.config import ModelConfig, RopeScaling


def inverse_frequencies(rotary_dim: int, theta: float,
                        scaling: RopeScaling | None = None) -> torch.Tensor:
    """`[rotary_dim/2]` float32 rotation speeds, scaled when `scaling` is given. Computed in fp32
    with the operations of Hugging Face's reference, so the tables (and the logits of an imported
    model, even in float64) agree with it to the bit rather than to fp32's rounding."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq
    return inv_freq / scaling.factor if scaling.type == "linear" else _llama3_scaled(inv_freq, scaling)


def _llama3_scaled(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Long wavelengths (beyond the pretraining context / low_freq_factor) are slowed by `factor`,
    # short ones (below context / high_freq_factor) kept, and the band between interpolated.
    wavelength = 2 * math.pi / inv_freq
    ratio = s.original_max_position / wavelength  # how many wavelengths fit in the old context
    blend = ((ratio - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)).clamp(0, 1)
    return (1 - blend) * inv_freq / s.factor + blend * inv_freq


RopeTables = dict[str, tuple[torch.Tensor, torch.Tensor]]  # rope kind -> (cos, sin)


class Rotary(nn.Module):
    """cos/sin tables `[seq, rotary_dim/2]` per rope kind for positions 0..seq-1, computed per
    forward (cheap), or for any integer positions (per-row positions of decoding, layers/decode.py)."""

    def __init__(self, config: ModelConfig, device: torch.device):
        super().__init__()
        bases = {"global": (config.rope_theta, config.rope_scaling)}
        if config.rope_local_theta is not None:
            bases["local"] = (config.rope_local_theta, None)
        self.kinds = tuple(bases)
        for kind, (theta, scaling) in bases.items():
            inv_freq = inverse_frequencies(config.rotary_dim, theta, scaling)
            self.register_buffer(f"{kind}_inv_freq", inv_freq.to(device), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeTables:
        """Each kind's cos/sin `[*positions.shape, rotary_dim/2]` of integer `positions` (fp32
        angles, as Hugging Face computes them)."""
        tables = {}
        for kind in self.kinds:
            angles = positions.float()[..., None] * getattr(self, f"{kind}_inv_freq").float()
            tables[kind] = angles.cos().to(dtype), angles.sin().to(dtype)
        return tables


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[batch, seq, heads, head_dim]` by the angles in cos/sin `[seq, rotary_dim/2]` (the
    same positions in every row) or `[batch, seq, rotary_dim/2]` (positions per row); the width past
    rotary_dim passes unchanged."""
    rotary_dim = 2 * cos.shape[-1]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = rotated.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, passed), dim=-1)
