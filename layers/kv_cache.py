"""The KV cache of incremental decoding: an option of the model's own attention, not a second model.

A `KVCache` holds, for every decoder block of this rank (by its buffer name `decoder.{i}`), the
keys and values of `capacity` columns of a left-padded batch, in SDPA's layout
`[batch, kv_heads/tp, capacity, head_dim]` (keys after RoPE). A forward over new columns is
bracketed by `begin(new)` and `commit()`; in between each block's attention appends its new keys
and values through `cache.layer(name)` and attends over all columns so far under `mask`.

Left padding. Row b holds `pad[b]` filler columns before its prompt, so every row's next token is
the same column. Row b's real token at column c has position `c - pad[b]` (what learned positions
and RoPE see; Hugging Face's left-padded generate computes the same). No query attends to a padding
column; padding columns attend to themselves only (their outputs are never used, this keeps them
finite). A sliding window (a block's `model.layer_window`) is a mask over the whole cache, as in
training: the cache is not a ring buffer.

The masks are built once per forward, one per distinct window, and shared by the blocks with that
window; where no row is padded and no window cuts in, a mask is dropped for SDPA's own causal path
(a prefill) or for no mask at all (one new column attends to every cached one), which are the
cheap cases of decoding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from layers.model import TransformerLM


class KVCache:
    """Keys and values of `model`'s decoder blocks on this rank, `capacity` columns of a batch whose
    row b starts with `pad[b]` padding columns."""

    decoding = True  # no recomputation (nothing is trained through a cache)

    def __init__(self, model: TransformerLM, *, batch: int, capacity: int, pad: torch.Tensor,
                 dtype: torch.dtype):
        blocks = list(model.decoder.values())
        attention = blocks[0].attention
        shape = (batch, attention.kv_heads, capacity, attention.head_dim)
        device = model.layout.device
        self.keys = {b.name: torch.zeros(shape, dtype=dtype, device=device) for b in blocks}
        self.values = {b.name: torch.zeros(shape, dtype=dtype, device=device) for b in blocks}
        self.pad = pad.to(device=device, dtype=torch.int64)  # [batch] left-padding columns
        self.padded = bool(self.pad.any())
        self.windows = {b.name: b.attention.sliding_window for b in blocks}
        self.capacity = capacity
        self.length = 0  # columns filled so far (the same in every row)
        self.new = 0  # columns of the forward in progress
        # per window: [batch, 1, new, length + new] (True = attend), or None with `causal` (no
        # mask: SDPA's causal mask over the new columns when True, every column when False)
        self.masks: dict[int | None, tuple[torch.Tensor | None, bool]] = {}

    def begin(self, new: int) -> torch.Tensor:
        """Start a forward over the next `new` columns; returns their `[batch, new]` positions."""
        if self.length + new > self.capacity:
            raise ValueError(f"{self.length + new} columns exceed the cache's {self.capacity}")
        self.new = new
        self.masks = {window: self._mask(new, window) for window in set(self.windows.values())}
        columns = torch.arange(self.length, self.length + new, device=self.pad.device)
        return (columns[None, :] - self.pad[:, None]).clamp(min=0)  # 0 on padding columns

    def commit(self) -> None:
        """The forward's columns are cached (every block of this rank appended them)."""
        self.length += self.new
        self.new = 0

    def layer(self, name: str) -> LayerCache:
        return LayerCache(self, name)

    def _mask(self, new: int, window: int | None) -> tuple[torch.Tensor | None, bool]:
        total = self.length + new
        windowed = window is not None and total > window
        if not self.padded and not windowed:
            if self.length == 0:
                return None, new > 1
            if new == 1:
                return None, False
        device = self.pad.device
        query = torch.arange(self.length, total, device=device)[:, None]
        key = torch.arange(total, device=device)[None, :]
        real_key = key[None] >= self.pad[:, None, None]  # [batch, 1, total]
        allowed = (key <= query) & (real_key | (key == query))
        if window is not None:
            allowed = allowed & (query - key < window)
        return allowed[:, None], False


class LayerCache:
    """One block's view of a `KVCache` during a forward."""

    decoding = True
    chunked = False  # (layers/context.py: CP chunks attend without a mask)

    def __init__(self, cache: KVCache, name: str):
        self.cache, self.name = cache, name

    @property
    def mask(self) -> torch.Tensor | None:
        return self.cache.masks[self.cache.windows[self.name]][0]

    @property
    def causal(self) -> bool:
        return self.cache.masks[self.cache.windows[self.name]][1]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new columns' `[batch, kv_heads/tp, new, head_dim]` keys and values; returns
        all of this block's so far, `[batch, kv_heads/tp, length + new, head_dim]`."""
        cache = self.cache
        start, end = cache.length, cache.length + k.shape[2]
        keys, values = cache.keys[self.name], cache.values[self.name]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]
