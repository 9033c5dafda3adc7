"""One pre-norm decoder block: x + attention(norm(x)), then x + mlp(norm(x)).

A mixture-of-experts block (`model.moe`, `model.is_moe_layer`) has `layers/moe.py`'s MoE in place
of the MLP and also publishes its router logits (`decoder.{i}.router_logits`).

With `model.post_norms` (Gemma 2/3) each branch output is normalized again before it is added:
x + norm(attention(norm(x))), four norms per block; the published `mixer_output` / `mlp_output`
buffers are the branches as they enter the residual stream (after their post-norm).

The residual stream stays in its SP layout (sequence-sharded under SP, replicated otherwise); the
attention and MLP enter and leave the TP region themselves. Residual-branch dropout draws from the
stream that matches that layout (see layers/rng.py).

With `recompute="full"` the block is one recomputed region (layers/recompute.py): only its input is
kept for the backward, and the buffers it publishes are outputs of that region, so a loss on them
reaches the block's weights exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.parallel import ParallelLayout
from layers.attention import Attention, Rope
from layers.buffers import BLOCK_BUFFERS, ROUTER_LOGITS, block_buffer
from layers.config import ModelConfig
from layers.context import TokenLayout
from layers.kv_cache import KVCache, LayerCache
from layers.mlp import MLP
from layers.moe import MoE
from layers.norm import make_norm
from layers.recompute import Recompute, recomputed
from layers.rng import DropoutRNG
from layers.rope import RopeTables

Record = Callable[[str, torch.Tensor], None]


class DecoderBlock(nn.Module):
    def __init__(self, config: ModelConfig, layout: ParallelLayout, rng: DropoutRNG, *, name: str,
                 layer: int | None, recompute: Recompute = "none"):
        super().__init__()
        self.name = name  # prefix of this block's buffer names: "decoder.{i}" or "mtp.{j}"
        self.layout, self.rng, self.dropout = layout, rng, config.dropout
        self.rope_kind = config.rope_kind(layer)  # which table of the model's RoPE (None: none)
        self.recompute_block = recompute == "full"
        self.attn_norm = make_norm(config, layout)
        self.attention = Attention(config, layout, rng, layer=layer,
                                   recompute_core=recompute == "selective")
        self.mlp_norm = make_norm(config, layout)
        self.mlp = MoE(config, layout) if config.is_moe_layer(layer) else MLP(config, layout)
        self.post_attn_norm = make_norm(config, layout) if config.post_norms else None
        self.post_mlp_norm = make_norm(config, layout) if config.post_norms else None

    def forward(self, hidden: torch.Tensor, ropes: RopeTables | None, record: Record,
                cache: KVCache | TokenLayout | None = None) -> torch.Tensor:
        """Residual stream `[batch, seq(/tp), hidden]` -> the same after this block. With a
        `KVCache` (decoding) `hidden` holds the new columns and attention reads the earlier ones
        from it; with a `TokenLayout` (context parallelism, packed documents) it says which keys
        each query sees."""
        rope = ropes[self.rope_kind] if ropes is not None and self.rope_kind is not None else None
        layer_cache = cache.layer(self.name) if cache is not None else None
        if self.recompute_block and (cache is None or not cache.decoding):
            hidden, mixer_output, mlp_output, router_logits = recomputed(self._block, hidden, rope,
                                                                         layer_cache, rng=self.rng)
        else:
            hidden, mixer_output, mlp_output, router_logits = self._block(hidden, rope, layer_cache)
        for kind, tensor in zip(BLOCK_BUFFERS, (mixer_output, mlp_output, hidden)):
            record(block_buffer(self.name, kind), tensor)
        if router_logits is not None:
            record(block_buffer(self.name, ROUTER_LOGITS), router_logits)
        return hidden

    def _block(self, hidden: torch.Tensor, rope: Rope,
               cache: LayerCache | None = None) -> tuple[torch.Tensor, ...]:
        """The block's output, the two branch outputs it publishes, all in the SP layout, and an
        MoE block's router logits (None for a dense one).
        Returning the branches (not recording them in here) makes them outputs of a recomputed
        region; unless a caller keeps them they are freed like any intermediate."""
        mixer_output = self.attention(self.attn_norm(hidden), rope, cache)
        if self.post_attn_norm is not None:
            mixer_output = self.post_attn_norm(mixer_output)
        hidden = hidden + self._residual_dropout(mixer_output)
        mlp_output, router_logits = self._mlp(self.mlp_norm(hidden))
        if self.post_mlp_norm is not None:
            mlp_output = self.post_mlp_norm(mlp_output)
        hidden = hidden + self._residual_dropout(mlp_output)
        return hidden, mixer_output, mlp_output, router_logits

    def _mlp(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(self.mlp, MoE):
            return self.mlp(x)
        return self.mlp(x), None

    def _residual_dropout(self, x: torch.Tensor) -> torch.Tensor:
        return self.rng.dropout(x, self.dropout, sharded=self.layout.sp, training=self.training)
