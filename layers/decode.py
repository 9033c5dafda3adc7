"""Incremental decoding: a KV cache and token-by-token forwards through the training model's layers.

No second model. `forward_step` runs new tokens through the very modules `TransformerLM.forward`
uses (embedding, learned positions or RoPE, each block's norms, q/k/v/o projections and MLP, final
norm, vocab-parallel head); only the attention core differs: keys and values of earlier tokens come
from the cache instead of being recomputed. Blocks are pre-norm residual
(`h + attention(norm(h))`, then `h + mlp(norm(h))`) exactly as layers/block.py, without dropout:
decoding is always in eval mode.

Tensor parallelism. The cache of each layer holds this rank's `kv_heads/tp` key/value heads
`[batch, capacity, kv_heads/tp, head_dim]`; the collectives are the model's own (the embedding and
row-parallel outputs sum over TP). Sequence parallelism is a training layout (a single new token
cannot be split over the sequence): `decoding(model)` runs the same weights without it.

Batching with per-row prompt lengths: *left padding*. A batch of prompts is `[batch, P]`, row b
holding `pad[b] = P - prompt_lengths[b]` filler ids first and its prompt right-aligned, so every
row's next token is column P, then P+1, ... Row b's real token at column c has position
`c - pad[b]` (what learned positions and RoPE see; Hugging Face's left-padded generate computes the
same). No query attends to a padding column; padding columns attend to themselves only (their
outputs are never used, this keeps them finite). Sliding windows (`model.sliding_window`) are a
mask over the full cache, as in training: the cache is not a ring buffer.

Pipeline parallelism. Every rank of a pipeline calls `forward_step` and `generate` together: the
new columns' hidden states go through the virtual stages in order (virtual stage k on pipeline rank
k % pp, as in training), one blocking point-to-point hop per stage boundary, each stage caching
the keys and values of the blocks it holds; the last stage forms the logits and chooses the tokens,
which it broadcasts over the pipeline group, so every stage appends the same ones.

Choosing tokens. Each step gathers the last position's logits over TP (`[batch, vocab]`, one row
per sequence; the training losses never do this) and every TP rank draws the same token from the
same generator, so ranks agree without a broadcast. Greedy is argmax (first index on ties, like
torch and transformers); sampling divides by the temperature, keeps the top-k, then the top-p
nucleus, and draws with `torch.multinomial`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine import collectives as C
from engine.config import check
from engine.parallel import ParallelLayout
from layers.attention import Attention
from layers.model import TransformerLM
from layers.rope import apply_rope
from layers.tensor_parallel import enter_tp_region


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits (validated: `check` names the option)."""

    greedy: bool = False  # argmax; the other fields are ignored
    temperature: float = 1.0  # logits are divided by this before sampling
    top_k: int | None = None  # keep the k most likely tokens; None: all
    top_p: float | None = None  # keep the smallest set of tokens with mass >= top_p; None: all

    def __post_init__(self) -> None:
        check(self.temperature > 0, "temperature", f"must be > 0 (got {self.temperature})")
        check(self.top_k is None or self.top_k >= 1, "top_k", f"must be >= 1 (got {self.top_k})")
        check(self.top_p is None or 0 < self.top_p <= 1, "top_p",
              f"must be in (0, 1] (got {self.top_p})")


class KVCache:
    """Keys and values of every decoder layer of this rank (by the block's global index) for
    `capacity` columns of a left-padded batch."""

    def __init__(self, model: TransformerLM, *, batch: int, capacity: int, pad: torch.Tensor,
                 dtype: torch.dtype):
        attention: Attention = next(iter(model.decoder.values())).attention
        shape = (batch, capacity, attention.kv_heads, attention.head_dim)
        device = model.layout.device
        self.keys = {name: torch.zeros(shape, dtype=dtype, device=device) for name in model.decoder}
        self.values = {name: torch.zeros(shape, dtype=dtype, device=device)
                       for name in model.decoder}
        self.pad = pad.to(device=device, dtype=torch.int64)  # [batch] left-padding columns
        self.window = model.config.sliding_window
        self.length = 0  # columns filled so far (the same in every row)

    @property
    def capacity(self) -> int:
        return next(iter(self.keys.values())).shape[1]

    def positions(self, new: int) -> torch.Tensor:
        """`[batch, new]` positions of the next `new` columns (0 on padding columns)."""
        columns = torch.arange(self.length, self.length + new, device=self.pad.device)
        return (columns[None, :] - self.pad[:, None]).clamp(min=0)

    def mask(self, new: int) -> torch.Tensor:
        """`[batch, 1, new, length + new]` True where the next columns' queries may attend."""
        query = torch.arange(self.length, self.length + new, device=self.pad.device)[:, None]
        key = torch.arange(self.length + new, device=self.pad.device)[None, :]
        real_key = key[None] >= self.pad[:, None, None]  # [batch, 1, total]
        allowed = (key <= query) & (real_key | (key == query))
        if self.window is not None:
            allowed = allowed & (query - key < self.window)
        return allowed[:, None]

    def append(self, layer: str, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store `[batch, new, kv_heads/tp, head_dim]` keys/values; all of the layer's so far."""
        end = self.length + k.shape[1]
        self.keys[layer][:, self.length:end] = k
        self.values[layer][:, self.length:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]


@contextlib.contextmanager
def decoding(model: TransformerLM) -> Iterator[TransformerLM]:
    """The model in eval mode, without sequence parallelism and without autograd; restored after."""
    was_training = model.training
    swapped = []
    for module in model.modules():
        layout = getattr(module, "layout", None)
        if isinstance(layout, ParallelLayout) and layout.sp:
            swapped.append((module, layout))
            module.layout = dataclasses.replace(layout, sp=False)
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, layout in swapped:
            module.layout = layout
        model.train(was_training)


def forward_step(model: TransformerLM, ids: torch.Tensor, cache: KVCache, *,
                 last_only: bool = False) -> torch.Tensor | None:
    """The next `ids` `[batch, new]` of every row -> logits shard `[batch, new, padded_vocab/tp]`
    (`[batch, 1, ...]` with `last_only`), appending their keys and values to `cache`.
    Call inside `decoding(model)`. Under PP every pipeline rank calls it; the last stage returns
    the logits, the others None."""
    new = ids.shape[1]
    if cache.length + new > cache.capacity:
        raise ValueError(f"{cache.length + new} columns exceed the cache's {cache.capacity}")
    layout, plan = model.layout, model.plan
    dtype = next(model.parameters()).dtype
    positions = cache.positions(new)  # [batch, new]
    rope = model.rotary.at(positions, dtype) if model.rotary is not None else None
    mask = cache.mask(new)
    hidden = torch.empty(ids.shape[0], new, model.config.hidden, dtype=dtype, device=layout.device)
    for chunk in range(plan.chunks):
        virtual = plan.virtual_stage(chunk)
        if virtual == 0:
            hidden = model.embedding(ids)  # [batch, new, hidden]
            if model.position_embedding is not None:
                hidden = hidden + model.position_embedding.weight[positions]
        else:
            C.recv(hidden, src=layout.pp_ranks[(virtual - 1) % plan.pp])
        for layer in plan.chunk_layers(chunk):
            block = model.decoder[str(layer)]
            hidden = hidden + _attention_step(block.attention, block.attn_norm(hidden), rope, mask,
                                              cache, str(layer))
            hidden = hidden + block.mlp(block.mlp_norm(hidden))
        if virtual < plan.virtual_stages - 1:
            C.send(hidden, dst=layout.pp_ranks[(virtual + 1) % plan.pp])
    cache.length += new
    if not plan.has_head:
        return None
    if last_only:
        hidden = hidden[:, -1:]
    return model.lm_head(model.lm_head.head_input(model.final_norm(hidden)))


def _attention_step(attn: Attention, x: torch.Tensor, rope, mask: torch.Tensor, cache: KVCache,
                    layer: str) -> torch.Tensor:
    """`Attention.forward` for new columns: q/k/v of `x` `[batch, new, hidden]`, keys and values
    of all columns so far from the cache."""
    x_full = enter_tp_region(x, attn.layout)  # [batch, new, hidden]
    batch, new, _ = x_full.shape
    q = attn.q_proj(x_full).view(batch, new, attn.heads, attn.head_dim)
    k = attn.k_proj(x_full).view(batch, new, attn.kv_heads, attn.head_dim)
    v = attn.v_proj(x_full).view(batch, new, attn.kv_heads, attn.head_dim)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    keys, values = cache.append(layer, k, v)  # [batch, length + new, kv_heads/tp, head_dim]
    context = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask,
        enable_gqa=attn.kv_heads != attn.heads)  # [batch, heads/tp, new, head_dim]
    return attn.o_proj(context.transpose(1, 2).reshape(batch, new, attn.heads * attn.head_dim))


# ------------------------------------------------------------------------------ generation

@dataclass
class Generated:
    """What `generate` returns for a batch of prompts."""

    tokens: torch.Tensor  # [batch, max_new_tokens] int64; after a row's EOS: fill ids
    lengths: torch.Tensor  # [batch] int64 tokens generated per row, its EOS included


def full_logits(logits_shard: torch.Tensor, model: TransformerLM) -> torch.Tensor:
    """`[batch, padded_vocab/tp]` shards -> `[batch, vocab]` real columns, the same on every rank."""
    gathered = C.all_gather(logits_shard, model.layout.tp_group, dim=-1)
    return gathered[..., :model.config.vocab_size]


def next_tokens(model: TransformerLM, logits_shard: torch.Tensor | None, sampling: Sampling,
                generator: torch.Generator | None, *, batch: int) -> torch.Tensor:
    """`[batch]` token ids chosen from the last column of `forward_step`'s logits; under PP the
    last stage chooses (the only one that draws from `generator`) and broadcasts them over the
    pipeline group."""
    layout = model.layout
    if logits_shard is None:  # a stage before the last
        chosen = torch.empty(batch, dtype=torch.int64, device=layout.device)
    else:
        chosen = choose_tokens(full_logits(logits_shard[:, -1], model), sampling, generator)
    return C.broadcast(chosen, layout.pp_group, src=layout.pp_ranks[-1])


def choose_tokens(logits: torch.Tensor, sampling: Sampling,
                  generator: torch.Generator | None) -> torch.Tensor:
    """`[batch, vocab]` logits -> `[batch]` int64 token ids."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if sampling.top_p is not None and sampling.top_p < 1:
        logits = _nucleus(logits, sampling.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Drop the tokens outside the smallest most-likely set whose mass reaches `top_p`."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
    drop_sorted = mass_before >= top_p  # the first token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -torch.inf)


def left_pad(prompts: list[torch.Tensor], *, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of any lengths (1-D int ids) -> (`[batch, P]` left-padded ids, `[batch]` lengths)."""
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
    width = int(lengths.max())
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
    return ids, lengths


def generate(model: TransformerLM, prompt_ids: torch.Tensor, *, max_new_tokens: int,
             sampling: Sampling = Sampling(greedy=True), prompt_lengths: torch.Tensor | None = None,
             generator: torch.Generator | None = None, eos_id: int | None = None,
             fill_id: int | None = None) -> Generated:
    """Continue left-padded prompts `[batch, P]` (every row full when `prompt_lengths` is None) by
    up to `max_new_tokens` tokens. A row stops after its `eos_id`; its later columns hold `fill_id`
    (default: `eos_id`, else 0). Every TP rank (and under PP every pipeline rank) passes the same
    prompts and an identically seeded `generator`, and gets the same tokens. The model's mode and
    layout are left as they were."""
    batch, width = prompt_ids.shape
    if width + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"prompt length {width} + {max_new_tokens} new tokens exceed "
                         f"model.max_seq_len={model.config.max_seq_len}")
    lengths = torch.full((batch,), width) if prompt_lengths is None else prompt_lengths
    fill = fill_id if fill_id is not None else (eos_id if eos_id is not None else 0)
    device = model.layout.device
    tokens = torch.full((batch, max_new_tokens), fill, dtype=torch.int64, device=device)
    generated = torch.full((batch,), max_new_tokens, dtype=torch.int64, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    with decoding(model):
        dtype = next(model.parameters()).dtype
        cache = KVCache(model, batch=batch, capacity=width + max_new_tokens,
                        pad=width - lengths.to(device), dtype=dtype)
        logits_shard = forward_step(model, prompt_ids.to(device), cache, last_only=True)
        for step in range(max_new_tokens):
            next_ids = next_tokens(model, logits_shard, sampling, generator, batch=batch)
            tokens[:, step] = next_ids.masked_fill(done, fill)
            if eos_id is not None:
                ended = (next_ids == eos_id) & ~done
                generated[ended] = step + 1
                done |= ended
                if bool(done.all()):
                    break
            if step + 1 < max_new_tokens:
                logits_shard = forward_step(model, next_ids[:, None], cache)
    return Generated(tokens=tokens, lengths=generated)
