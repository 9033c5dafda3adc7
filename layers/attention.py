"""Causal self-attention with grouped-query heads split over TP.

Reads the residual stream, enters the TP region once for q, k and v (separate column-parallel
projections, so checkpoints reshard by plain concatenation), attends over this rank's
`heads/tp` query heads and `kv_heads/tp` key/value heads with `scaled_dot_product_attention`, and
leaves through the row-parallel output projection.

Decoding passes the block's `LayerCache` (layers/kv_cache.py): the new columns' keys and values
(after RoPE) are appended to it and the queries attend over everything cached so far, under the
cache's mask. The projections, RoPE and the attention call are the ones training runs. Context
parallelism and packed documents pass a view of the forward's `TokenLayout` (layers/context.py)
in the same place: its `extend` gathers the sequence's keys and values over the CP group and its
mask says which of them each query sees.

Per block (`layer`): its sliding window (`model.layer_types`), its rotary table (`model.rope_kind`);
for every block the options of the families: a per-head RMSNorm of queries and keys before RoPE
(`model.qk_norm`), the scores' scale (`model.query_pre_attn_scalar`), and the soft-cap of the
scores, `c * tanh(s / c)` before the mask (`model.attn_logit_softcap`), which SDPA cannot apply: a
soft-capped block computes its scores explicitly (the `[batch, heads/tp, seq, keys]` matrix that
the math path of SDPA builds too).

With `recompute_core` (`train.recompute=selective`) RoPE and the attention core (scores, softmax,
dropout, probabilities times values) are one recomputed region (layers/recompute.py): the
projections' outputs q, k, v are kept for the backward, the `[batch, heads, seq, seq]` scores and
probabilities (which the non-fused attention kernels save) are not.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.parallel import ParallelLayout
from layers.config import ModelConfig
from layers.kv_cache import LayerCache
from layers.norm import make_head_norm
from layers.recompute import recomputed
from layers.rng import SHARDED, DropoutRNG
from layers.rope import apply_rope
from layers.softcap import softcap
from layers.tensor_parallel import ColumnParallelLinear, RowParallelLinear, enter_tp_region

Rope = tuple[torch.Tensor, torch.Tensor] | None  # this block's (cos, sin), None: no RoPE


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layout: ParallelLayout, rng: DropoutRNG, *,
                 layer: int | None, recompute_core: bool = False):
        super().__init__()
        self.layout, self.rng, self.recompute_core = layout, rng, recompute_core
        self.heads = config.heads // layout.tp  # query heads on this rank
        self.kv_heads = config.num_kv_heads // layout.tp
        self.head_dim = config.dim_per_head
        self.dropout = config.dropout
        self.sliding_window = config.layer_window(layer)
        self.softcap = config.attn_logit_softcap
        pre_scalar = config.query_pre_attn_scalar
        self.scale = pre_scalar ** -0.5 if pre_scalar is not None else self.head_dim ** -0.5
        self.q_norm = make_head_norm(config, layout) if config.qk_norm else None
        self.k_norm = make_head_norm(config, layout) if config.qk_norm else None
        qkv_bias = config.qkv_bias or config.bias
        out_std = config.init_std / math.sqrt(2 * config.layers)

        def column(heads: int) -> ColumnParallelLinear:
            return ColumnParallelLinear(config.hidden, heads * self.head_dim, layout=layout,
                                        bias=qkv_bias, init_std=config.init_std,
                                        quant=config.linear_quant)

        self.q_proj = column(config.heads)
        self.k_proj = column(config.num_kv_heads)
        self.v_proj = column(config.num_kv_heads)
        self.o_proj = RowParallelLinear(config.heads * self.head_dim, config.hidden, layout=layout,
                                        bias=config.bias, init_std=out_std,
                                        quant=config.linear_quant)

    def forward(self, x: torch.Tensor, rope: Rope, cache: LayerCache | None = None) -> torch.Tensor:
        """Residual stream `[batch, seq(/tp), hidden]` -> attention output, same layout. With
        `cache`, `x` holds the new columns only and the keys/values of earlier ones come from it."""
        x_full = enter_tp_region(x, self.layout)  # [batch, seq, hidden]
        batch, seq, _ = x_full.shape
        q = self.q_proj(x_full).view(batch, seq, self.heads, self.head_dim)
        k = self.k_proj(x_full).view(batch, seq, self.kv_heads, self.head_dim)
        v = self.v_proj(x_full).view(batch, seq, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.recompute_core and (cache is None or not cache.decoding):
            context = recomputed(self._core, q, k, v, rope, cache, rng=self.rng)
        else:
            context = self._core(q, k, v, rope, cache)  # [batch, seq, heads/tp * head_dim]
        return self.o_proj(context)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rope,
              cache: LayerCache | None = None) -> torch.Tensor:
        """Projected q `[batch, seq, heads/tp, head_dim]`, k and v (`kv_heads/tp`) -> context."""
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # SDPA's layout: heads before the sequence
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is None:
            mask = self._window_mask(q.shape[2], q.device)
            causal = mask is None
        else:
            k, v = cache.extend(k, v)  # [batch, kv_heads/tp, cached + seq, head_dim]
            if cache.chunked and self.softcap is None and not (self.training and self.dropout):
                out = cache.attend_chunks(q, k, v, scale=self.scale)  # CP: no mask
                return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
            mask, causal = cache.mask, cache.causal
        return self._attend(q, k, v, mask, causal=causal)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None, *, causal: bool) -> torch.Tensor:
        """q `[batch, heads/tp, seq, head_dim]`, k/v `[batch, kv_heads/tp, keys, head_dim]` ->
        context `[batch, seq, heads/tp * head_dim]`. `mask` (True = attend) or `causal`; neither:
        every query sees every key."""
        batch, _, seq, _ = q.shape
        dropout = self.dropout if self.training else 0.0
        with self.rng.fork(SHARDED) if dropout else contextlib.nullcontext():
            if self.softcap is None:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                     is_causal=causal, scale=self.scale,
                                                     enable_gqa=self.kv_heads != self.heads)
            else:
                out = self._softcapped(q, k, v, mask, causal=causal, dropout=dropout)
        return out.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim)

    def _softcapped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None, *, causal: bool, dropout: float) -> torch.Tensor:
        """SDPA's result with the scores soft-capped: q `[batch, heads/tp, seq, head_dim]`, k/v
        `[batch, kv_heads/tp, keys, head_dim]` -> `[batch, heads/tp, seq, head_dim]`."""
        group = self.heads // self.kv_heads  # query heads per key/value head
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # [batch, heads/tp, seq, keys]
        scores = softcap(scores, self.softcap)
        if causal:  # the queries are the last `seq` of the keys
            keys = k.shape[2]
            mask = torch.ones(q.shape[2], keys, dtype=torch.bool, device=q.device).tril(keys - q.shape[2])
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        # softmax in fp32 at least (Hugging Face's eager path upcasts the same way)
        probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32))
        probs = probs.to(q.dtype)
        probs = F.dropout(probs, dropout) if dropout else probs
        return torch.matmul(probs, v)

    def _window_mask(self, seq: int, device: torch.device) -> torch.Tensor | None:
        """Causal sliding-window mask `[seq, seq]` (True = attend), or None for plain causal."""
        if self.sliding_window is None or seq <= self.sliding_window:
            return None
        query = torch.arange(seq, device=device)[:, None]
        key = torch.arange(seq, device=device)[None, :]
        return (key <= query) & (query - key < self.sliding_window)
