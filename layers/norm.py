"""RMSNorm (llama family) and LayerNorm (gpt2), replicated over TP.

Their parameters go through `sp_shared`: under sequence parallelism each rank normalizes only its
sequence shard, and the gradient of the weight (and bias) is summed over the TP group in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.parallel import ParallelLayout
from layers.config import ModelConfig
from layers.params import new_param
from layers.tensor_parallel import sp_shared


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, *, eps: float, layout: ParallelLayout):
        super().__init__()
        self.layout, self.eps = layout, eps
        self.weight = new_param(hidden, tp_split_dim=None, init="ones", device=layout.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, sp_shared(self.weight, self.layout), self.eps)


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
    norm = RMSNorm if config.family == "llama" else LayerNorm
    return norm(config.hidden, eps=config.norm_eps, layout=layout)
