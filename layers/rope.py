"""Rotary position embeddings in the Hugging Face ("rotate half") layout, with Llama-3 scaling.

Each head's width d is two halves [x1, x2]; position p rotates the pair (x1[i], x2[i]) by angle
p * inv_freq[i]. This is the layout of Hugging Face Llama/Qwen2/Mistral checkpoints, so their q/k
projections load unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from layers.config import ModelConfig, RopeScaling


def inverse_frequencies(head_dim: int, theta: float,
                        scaling: RopeScaling | None = None) -> torch.Tensor:
    """`[head_dim/2]` float64 rotation speeds, Llama-3-scaled when `scaling` is given."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return inv_freq if scaling is None else _llama3_scaled(inv_freq, scaling)


def _llama3_scaled(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Long wavelengths (beyond the pretraining context / low_freq_factor) are slowed by `factor`,
    # short ones (below context / high_freq_factor) kept, and the band between interpolated.
    wavelength = 2 * math.pi / inv_freq
    ratio = s.original_max_position / wavelength  # how many wavelengths fit in the old context
    blend = ((ratio - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)).clamp(0, 1)
    return (1 - blend) * inv_freq / s.factor + blend * inv_freq


class Rotary(nn.Module):
    """cos/sin tables `[seq, head_dim/2]` for positions 0..seq-1, computed per forward (cheap), or
    for any integer positions (`at`: per-row positions of incremental decoding, layers/decode.py)."""

    def __init__(self, config: ModelConfig, device: torch.device):
        super().__init__()
        inv_freq = inverse_frequencies(config.dim_per_head, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv_freq.float().to(device), persistent=False)

    def forward(self, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.at(torch.arange(seq_len, device=self.inv_freq.device), dtype)

    def at(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin `[*positions.shape, head_dim/2]` of integer `positions` (fp32 angles, as HF)."""
        angles = positions.float()[..., None] * self.inv_freq.float()
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[batch, seq, heads, head_dim]` by the angles in cos/sin `[seq, head_dim/2]` (the
    same positions in every row) or `[batch, seq, head_dim/2]` (positions per row)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
