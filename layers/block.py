"""One pre-norm decoder block: x + attention(norm(x)), then x + mlp(norm(x)).

The residual stream stays in its SP layout (sequence-sharded under SP, replicated otherwise); the
attention and MLP enter and leave the TP region themselves. Residual-branch dropout draws from the
stream that matches that layout (see layers/rng.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.parallel import ParallelLayout
from layers.attention import Attention, Rope
from layers.config import ModelConfig
from layers.mlp import MLP
from layers.norm import make_norm
from layers.rng import DropoutRNG

Record = Callable[[str, torch.Tensor], None]


class DecoderBlock(nn.Module):
    def __init__(self, config: ModelConfig, layout: ParallelLayout, rng: DropoutRNG, *, name: str):
        super().__init__()
        self.name = name  # prefix of this block's buffer names: "decoder.{i}" or "mtp.{j}"
        self.layout, self.rng, self.dropout = layout, rng, config.dropout
        self.attn_norm = make_norm(config, layout)
        self.attention = Attention(config, layout, rng)
        self.mlp_norm = make_norm(config, layout)
        self.mlp = MLP(config, layout)

    def forward(self, hidden: torch.Tensor, rope: Rope, record: Record) -> torch.Tensor:
        """Residual stream `[batch, seq(/tp), hidden]` -> the same after this block."""
        mixer_output = self.attention(self.attn_norm(hidden), rope)
        record(f"{self.name}.mixer_output", mixer_output)
        hidden = hidden + self._residual_dropout(mixer_output)
        mlp_output = self.mlp(self.mlp_norm(hidden))
        record(f"{self.name}.mlp_output", mlp_output)
        hidden = hidden + self._residual_dropout(mlp_output)
        record(f"{self.name}.output", hidden)
        return hidden

    def _residual_dropout(self, x: torch.Tensor) -> torch.Tensor:
        return self.rng.dropout(x, self.dropout, sharded=self.layout.sp, training=self.training)
