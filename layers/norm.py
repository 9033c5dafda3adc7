"""RMSNorm (llama family) and LayerNorm (gpt2), replicated over TP.

Their parameters go through `sp_shared`: under sequence parallelism each rank normalizes only its
sequence shard, and the gradient of the weight (and bias) is summed over the TP group in backward.

Gemma's RMSNorm (`model.norm_unit_offset`) scales by `1 + weight`: its weights are stored as offsets
from one (zeros at init), which is also how its checkpoints hold them, so they load unchanged.

The per-head norm of queries and keys (`model.qk_norm`, Qwen3 and Gemma 3) normalizes each head's
`head_dim` vector inside the TP region, where each rank holds other heads: its weight's gradient
is a partial sum on every rank and is summed over TP whether or not SP is on (`copy_to_tp`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.mappings import copy_to_tp
from engine.parallel import ParallelLayout
from layers.config import ModelConfig
from layers.params import new_param
from layers.tensor_parallel import sp_shared


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, *, eps: float, layout: ParallelLayout, unit_offset: bool = False,
                 on_head_shards: bool = False):
        super().__init__()
        self.layout, self.eps, self.unit_offset = layout, eps, unit_offset
        self.on_head_shards = on_head_shards  # applied to this rank's heads (qk_norm)
        self.weight = new_param(hidden, tp_split_dim=None, init="zeros" if unit_offset else "ones",
                                device=layout.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_head_shards:
            weight = copy_to_tp(self.weight, self.layout.tp_group)
        else:
            weight = sp_shared(self.weight, self.layout)
        if self.unit_offset:
            weight = 1.0 + weight
        return F.rms_norm(x, self.weight.shape, weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, hidden: int, *, eps: float, layout: ParallelLayout):
        super().__init__()
        self.layout, self.eps = layout, eps
        self.weight = new_param(hidden, tp_split_dim=None, init="ones", device=layout.device)
        self.bias = new_param(hidden, tp_split_dim=None, init="zeros", device=layout.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, sp_shared(self.weight, self.layout),
                            sp_shared(self.bias, self.layout), self.eps)


def make_norm(config: ModelConfig, layout: ParallelLayout) -> RMSNorm | LayerNorm:
    """The norm of the residual stream (and of the branch outputs with `post_norms`)."""
    if config.family != "llama":
        return LayerNorm(config.hidden, eps=config.norm_eps, layout=layout)
    return RMSNorm(config.hidden, eps=config.norm_eps, layout=layout,
                   unit_offset=config.norm_unit_offset)


def make_head_norm(config: ModelConfig, layout: ParallelLayout) -> RMSNorm:
    """The per-head norm of queries or keys (`model.qk_norm`)."""
    return RMSNorm(config.dim_per_head, eps=config.norm_eps, layout=layout,
                   unit_offset=config.norm_unit_offset, on_head_shards=True)
