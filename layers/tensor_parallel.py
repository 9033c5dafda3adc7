"""Megatron's tensor-parallel layers, on batch-first activations `[batch, seq, hidden]`.

Regions. Outside attention and the MLP the residual stream is *replicated* over the TP group
(`[batch, seq, hidden]` on every rank) or, under sequence parallelism (SP), *sequence-sharded*
(`[batch, seq/tp, hidden]`, rank r holding the r-th contiguous chunk of the sequence). Entering TP
compute, `enter_tp_region` makes the full sequence (an all-gather under SP, `copy_to_tp` otherwise),
once for all the column-parallel layers that read it; leaving, `RowParallelLinear` sums the partial
outputs (`reduce_from_tp`) or, under SP, reduce-scatters them into sequence shards.

Replicated parameters used on sequence shards (norm weights, row-parallel biases, learned positions)
see only part of the sequence on each rank, so their gradients must be summed over TP. `sp_shared`
wraps such a parameter in `copy_to_tp` (forward identity, backward all-reduce) under SP, which makes
every replicated gradient complete and identical on all TP ranks right after `backward()`: there is
no separate "finalize gradients" step to call.

Quantization (`quant=LinearQuant(...)`, layers/quant.py) is an option of the two linear layers:
the forward multiplies the quantized input by the quantized weight, whose scale is that of the
whole (unsharded) weight, and the backward is the straight-through estimator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.mappings import copy_to_tp, gather_from_sp, gather_from_tp, reduce_from_tp, reduce_scatter_to_sp
from engine.parallel import ParallelLayout
from layers.params import new_param
from layers.quant import LinearQuant
from layers.softcap import softcap

SEQ_DIM = 1  # activations are [batch, seq, hidden]


def enter_tp_region(x: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """Residual stream -> full-sequence input of TP compute (backward sums the ranks' partial grads)."""
    if layout.sp:
        return gather_from_sp(x, layout.tp_group, seq_dim=SEQ_DIM)
    return copy_to_tp(x, layout.tp_group)


def exit_tp_region(x: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """Partial sums of TP compute -> residual stream (reduce-scattered into seq shards under SP)."""
    if layout.sp:
        return reduce_scatter_to_sp(x, layout.tp_group, seq_dim=SEQ_DIM)
    return reduce_from_tp(x, layout.tp_group)


def sp_shared(param: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """A replicated parameter applied to a sequence shard: under SP its gradient is summed over TP."""
    return copy_to_tp(param, layout.tp_group) if layout.sp else param


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows: `[batch, seq, in]` -> `[batch, seq, out/tp]`.

    The input must already be in the TP region (`enter_tp_region`). With `gather_output` the output
    is all-gathered back to `[batch, seq, out]`. With `quant`, each input row is whole on this rank
    (no communication) and the weight's scale is all-reduced over TP.
    """

    def __init__(self, in_features: int, out_features: int, *, layout: ParallelLayout,
                 bias: bool = False, gather_output: bool = False, init_std: float = 0.02,
                 quant: LinearQuant | None = None):
        super().__init__()
        self.layout, self.gather_output, self.quant = layout, gather_output, quant
        out_shard = out_features // layout.tp
        self.weight = new_param(out_shard, in_features, tp_split_dim=0, init=init_std,
                                device=layout.device)
        self.bias = new_param(out_shard, tp_split_dim=0, init="zeros",
                              device=layout.device) if bias else None

    def forward(self, x_full: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.quant is not None:
            x_full = self.quant.input(x_full, None)  # [batch, seq, in]: whole token rows
            weight = self.quant.weight(weight, self.layout.tp_group)
        y_shard = F.linear(x_full, weight, self.bias)  # [batch, seq, out/tp]
        return gather_from_tp(y_shard, self.layout.tp_group) if self.gather_output else y_shard


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns: `[batch, seq, in/tp]` -> residual stream.

    The input is already split over TP (the output of a column-parallel layer). The partial products
    are summed over TP, reduce-scattered into sequence shards under SP; the bias is replicated. With
    `quant`, a token's row is split over TP, so its absmax is all-reduced (max) over TP, and so is
    the weight's scale (sum).
    """

    def __init__(self, in_features: int, out_features: int, *, layout: ParallelLayout,
                 bias: bool = False, init_std: float = 0.02, quant: LinearQuant | None = None):
        super().__init__()
        self.layout, self.quant = layout, quant
        self.weight = new_param(out_features, in_features // layout.tp, tp_split_dim=1,
                                init=init_std, device=layout.device)
        self.bias = new_param(out_features, tp_split_dim=None, init="zeros",
                              device=layout.device) if bias else None

    def forward(self, x_shard: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.quant is not None:
            x_shard = self.quant.input(x_shard, self.layout.tp_group)  # [batch, seq, in/tp]
            weight = self.quant.weight(weight, self.layout.tp_group)
        y = exit_tp_region(F.linear(x_shard, weight), self.layout)
        return y if self.bias is None else y + sp_shared(self.bias, self.layout)


class VocabParallelEmbedding(nn.Module):
    """Token ids `[batch, seq]` (full on every TP rank) -> residual stream `[batch, seq(/tp), hidden]`.

    Rank r holds rows `r*V/tp .. (r+1)*V/tp - 1` of the padded table; ids outside the shard look up
    zeros and the ranks' results are summed (reduce-scattered along the sequence under SP). Ids are
    not range-checked (that would synchronize a GPU): validate them where the data is read.
    """

    def __init__(self, padded_vocab: int, hidden: int, *, layout: ParallelLayout,
                 init_std: float = 0.02):
        super().__init__()
        self.layout = layout
        self.rows = padded_vocab // layout.tp
        self.first_row = layout.tp_rank * self.rows
        self.weight = new_param(self.rows, hidden, tp_split_dim=0, init=init_std,
                                vocab_parallel=True, device=layout.device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.layout.tp == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.first_row
        outside = (local_ids < 0) | (local_ids >= self.rows)
        partial = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        partial = partial.masked_fill(outside.unsqueeze(-1), 0.0)  # [batch, seq, hidden]
        return exit_tp_region(partial, self.layout)


class VocabParallelLMHead(nn.Module):
    """Full-sequence hidden states -> this rank's vocabulary shard of the logits, never gathered.

    `logits_shard = head_hidden @ weight_shard.T`, `[batch, seq, padded_vocab/tp]`, then with
    `softcap` = c each logit becomes c * tanh(logit / c) (pointwise: the same on any shard). The
    weight is its own parameter, or the embedding's (`tied`). Columns past the real vocabulary
    (padding) are set to the dtype's lowest value after the cap, so a softmax gives them exactly
    zero mass without creating infinities.
    """

    def __init__(self, *, vocab_size: int, padded_vocab: int, hidden: int,
                 layout: ParallelLayout, tied: VocabParallelEmbedding | None = None,
                 init_std: float = 0.02, softcap: float | None = None):
        super().__init__()
        self.layout, self.softcap = layout, softcap
        rows = padded_vocab // layout.tp
        # A tuple keeps the tied embedding out of this module's parameters and state dict.
        self._tied = (tied,) if tied is not None else None
        if tied is None:
            self.weight = new_param(rows, hidden, tp_split_dim=0, init=init_std,
                                    vocab_parallel=True, device=layout.device)
        columns = torch.arange(rows, device=layout.device) + layout.tp_rank * rows
        padding = columns >= vocab_size
        has_padding = (layout.tp_rank + 1) * rows > vocab_size  # (no .item(): meta-safe)
        self.register_buffer("padding", padding if has_padding else None, persistent=False)

    def weight_shard(self) -> nn.Parameter:
        """This rank's `[padded_vocab/tp, hidden]` output weight (the embedding's when tied)."""
        return self._tied[0].weight if self._tied is not None else self.weight

    def head_input(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """Residual stream after the final norm -> `[batch, seq, hidden]` input of the head."""
        return enter_tp_region(final_hidden, self.layout)

    def forward(self, head_hidden: torch.Tensor) -> torch.Tensor:
        logits_shard = F.linear(head_hidden, self.weight_shard())  # [batch, seq, padded_vocab/tp]
        logits_shard = softcap(logits_shard, self.softcap)
        if self.padding is None:
            return logits_shard
        return logits_shard.masked_fill(self.padding, torch.finfo(logits_shard.dtype).min)
