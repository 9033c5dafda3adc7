"""The feed-forward block: SwiGLU (llama family) or a two-layer GELU MLP (gpt2), split over TP.

gate/up are separate column-parallel layers (so checkpoints reshard by plain concatenation), down is
row-parallel; the activation runs on this rank's `ffn_hidden/tp` slice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from engine.parallel import ParallelLayout
from layers.config import ModelConfig
from layers.tensor_parallel import ColumnParallelLinear, RowParallelLinear, enter_tp_region

ACTIVATION_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
}


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layout: ParallelLayout, *, ffn_hidden: int | None = None):
        """`ffn_hidden`: the inner width (default `config.ffn_hidden`; an MoE's shared experts)."""
        super().__init__()
        self.layout = layout
        self.act = ACTIVATION_FNS[config.mlp_activation]
        ffn_hidden = ffn_hidden or config.ffn_hidden
        column = partial(ColumnParallelLinear, config.hidden, ffn_hidden, layout=layout,
                         bias=config.bias, init_std=config.init_std, quant=config.linear_quant)
        self.gate_proj = column() if config.gated_mlp else None
        self.up_proj = column()
        self.down_proj = RowParallelLinear(ffn_hidden, config.hidden, layout=layout,
                                           bias=config.bias,
                                           init_std=config.init_std / math.sqrt(2 * config.layers),
                                           quant=config.linear_quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual stream `[batch, seq(/tp), hidden]` -> MLP output, same layout."""
        x_full = enter_tp_region(x, self.layout)  # [batch, seq, hidden]
        if self.gate_proj is None:
            inner_shard = self.act(self.up_proj(x_full))  # [batch, seq, ffn/tp]
        else:
            inner_shard = self.act(self.gate_proj(x_full)) * self.up_proj(x_full)
        return self.down_proj(inner_shard)
