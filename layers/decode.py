"""Incremental decoding: token-by-token forwards through the training model's own modules.

No second model. `forward_step` runs new columns through `TransformerLM`'s `embed`, `run_chunk` and
`finish` with a `KVCache` (layers/kv_cache.py), an option of the model's own blocks and attention:
keys and values of earlier columns come from the cache instead of being recomputed. Decoding is
always in eval mode (no dropout) and without autograd (`decoding(model)`).

Tensor parallelism. The cache of each block holds this rank's `kv_heads/tp` key/value heads; the
collectives are the model's own (the embedding and row-parallel outputs sum over TP). Sequence
parallelism is a training layout (a single new token cannot be split over the sequence):
`decoding(model)` runs the same weights without it.

Batching with per-row prompt lengths: *left padding* (see layers/kv_cache.py for the positions and
the mask).

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

from engine import collectives as C
from engine.config import check
from engine.parallel import ParallelLayout
from layers.kv_cache import KVCache
from layers.model import TransformerLM


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
    layout, plan = model.layout, model.plan
    positions = cache.begin(ids.shape[1])  # [batch, new]
    record = model.recorder(())
    dtype = next(model.parameters()).dtype
    rope = model.rope(ids, dtype, positions)
    hidden = torch.empty(*ids.shape, model.config.hidden, dtype=dtype, device=layout.device)
    for chunk in range(plan.chunks):
        virtual = plan.virtual_stage(chunk)
        if virtual == 0:
            hidden = model.embed(ids, record, positions)  # [batch, new, hidden]
        else:
            C.recv(hidden, src=layout.pp_ranks[(virtual - 1) % plan.pp])
        hidden = model.run_chunk(chunk, hidden, rope, record, cache)
        if virtual < plan.virtual_stages - 1:
            C.send(hidden, dst=layout.pp_ranks[(virtual + 1) % plan.pp])
    cache.commit()
    if not plan.has_head:
        return None
    if last_only:
        hidden = hidden[:, -1:]
    return model.finish(hidden, rope, record, mtp=False).logits


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
                if _all_done(model, done):
                    break
            if step + 1 < max_new_tokens:
                logits_shard = forward_step(model, next_ids[:, None], cache)
    return Generated(tokens=tokens, lengths=generated)


def _all_done(model: TransformerLM, done: torch.Tensor) -> bool:
    """Whether decoding may stop: every row here has ended and, when the model's mixture-of-experts
    blocks exchange tokens over an expert-parallel group, every row of that group's other ranks
    too (a rank that stopped alone would leave the others waiting in their next all_to_all)."""
    finished = torch.tensor([int(bool(done.all()))], device=done.device)
    if model.layout.ep > 1 and model.config.moe is not None:
        C.all_reduce(finished, model.layout.ep_group, op="min")
    return bool(finished.item())
