"""Which keys each query sees when a forward's tokens are not one whole causal sequence.

Two cases, one mechanism (an option of the model's own attention, like the KV cache):

- Context parallelism (`parallel.cp`). Each sequence is cut into `2 x cp` chunks and CP rank r holds
  chunks r and `2cp - 1 - r` (`cp_positions`): under a causal mask the early chunks have few keys and
  the late ones many, so pairing them gives every rank the same attention work. Each attention
  layer all-gathers the keys and values of the whole sequence over the CP group (`gather_from_sp`
  along the sequence: its backward reduce-scatters, so each rank's keys get the gradients of every
  rank's queries) and its queries attend to them under a mask built from the tokens' global
  positions. Gathering rather than a ring: every rank then holds `[batch, kv_heads/tp, seq,
  head_dim]` keys and values (with grouped-query attention a few times smaller than the queries'
  activations), one collective per layer and direction, and the mask handles any pattern (causal,
  windows, documents) without per-step bookkeeping; the scores stay `[seq/cp, seq]` per rank.
  Whole causal sequences (no documents, no window shorter than the sequence) on CPU attend
  without a mask (`causal_chunk_attention`): SDPA keeps a float copy of a boolean mask per layer,
  `4 x seq^2 / cp` bytes, which at long sequences outgrows every other activation; instead each
  chunk's queries attend to the keys before the chunk (all visible) and to their own chunk
  (causal) in two flash calls merged by their log-sum-exps. Elsewhere (documents, windows,
  soft-capped scores, attention dropout, GPU) the mask is used.
- Packed documents (`data.attention_within_documents`): a query sees only keys of its own document
  (document ids per token, from the data), at any CP degree including 1.

A `TokenLayout` is built per forward from the tokens' global positions and document ids; blocks
ask it for their view (`layer(name)`: a mask per sliding window, shared by the blocks that have
it). Masks are True where a query may attend; every query sees at least itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine import collectives as C
from engine.data import shift_labels
from engine.mappings import gather_from_sp

if TYPE_CHECKING:
    from layers.model import TransformerLM

KEY_DIM = 2  # keys and values are [batch, kv_heads/tp, seq, head_dim]
MTP_LABELS = "mtp_labels"  # a micro-batch entry [batch, seq, heads]: MTP head j's targets at j - 1


def cp_positions(seq: int, cp: int, cp_rank: int, device: torch.device | None = None) -> torch.Tensor:
    """The global positions `[seq / cp]` CP rank `cp_rank` holds: chunks r and 2cp-1-r of 2cp."""
    if seq % (2 * cp):
        raise ValueError(f"sequence length {seq} does not split into 2 x parallel.cp={cp} chunks")
    chunk = seq // (2 * cp)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp - 1 - cp_rank) * chunk, (2 * cp - cp_rank) * chunk, device=device)
    return torch.cat([first, second])


class TokenLayout:
    """This forward's tokens: global `positions` `[seq_local]` (or per row `[batch, seq_local]`) and
    `documents` `[batch, seq_local]` (or None: one document), with keys gathered over `model`'s CP
    group."""

    decoding = False  # not a KV cache: recomputation applies as usual

    def __init__(self, model: TransformerLM, *, positions: torch.Tensor,
                 documents: torch.Tensor | None = None, cp_chunks: bool = False):
        """`cp_chunks`: the tokens are this CP rank's chunks of the sequence (keys and values are
        gathered over the CP group); otherwise the whole sequence is here."""
        self.cp = model.layout.cp if cp_chunks else 1
        self.group = model.layout.cp_group
        blocks = [*model.decoder.values(), *model.mtp.values()]
        self.windows = {b.name: b.attention.sliding_window for b in blocks}
        self.q_pos = positions
        self.k_pos = C.all_gather(positions, self.group, dim=-1) if self.cp > 1 else positions
        self.cp_rank = C.group_rank(self.group) if self.cp > 1 else 0
        # the tokens are exactly this rank's `cp_positions` (what `_LayerView.attend_chunks` needs)
        self.balanced = self.cp > 1 and positions.dim() == 1 and torch.equal(
            positions, cp_positions(self.k_pos.shape[-1], self.cp, self.cp_rank, positions.device))
        self.q_doc = documents
        self.k_doc = None if documents is None else (
            C.all_gather(documents, self.group, dim=-1) if self.cp > 1 else documents)
        self._masks: dict[int | None, torch.Tensor | None] = {}

    def layer(self, name: str) -> _LayerView:
        return _LayerView(self, self.windows.get(name))

    def mask(self, window: int | None) -> torch.Tensor | None:
        """`[batch or 1, 1, seq_local, seq]` (True = attend), or None for SDPA's plain causal mask."""
        if window not in self._masks:
            self._masks[window] = self._build(window)
        return self._masks[window]

    def _build(self, window: int | None) -> torch.Tensor | None:
        if self.cp == 1 and self.q_doc is None and (window is None or self.q_pos.shape[-1] <= window):
            return None
        query, key = self.q_pos[..., :, None], self.k_pos[..., None, :]
        allowed = key <= query
        if window is not None:
            allowed = allowed & (query - key < window)
        if self.q_doc is not None:
            allowed = allowed & (self.q_doc[..., :, None] == self.k_doc[..., None, :])
        if allowed.dim() == 2:
            allowed = allowed[None]
        return allowed[:, None]  # broadcast over heads


class _LayerView:
    """One block's view of a `TokenLayout` (the interface of `layers.kv_cache.LayerCache`)."""

    decoding = False

    def __init__(self, tokens: TokenLayout, window: int | None):
        self.tokens, self.window = tokens, window

    @property
    def chunked(self) -> bool:
        """Whether `attend_chunks` applies: CP chunks of whole causal sequences on CPU (no
        documents, no window shorter than the sequence)."""
        tokens = self.tokens
        return (tokens.cp > 1 and tokens.q_doc is None and tokens.balanced
                and (self.window is None or self.window >= tokens.k_pos.shape[-1])
                and tokens.q_pos.device.type == "cpu")

    def attend_chunks(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      scale: float | None) -> torch.Tensor:
        """Causal attention of this rank's queries `[batch, heads/tp, seq/cp, head_dim]` over the
        gathered keys and values `[batch, kv_heads/tp, seq, head_dim]` (`extend`'s), without a
        mask: each of the rank's two chunks attends to every key before it and causally to its
        own (`causal_chunk_attention`). -> `[batch, heads/tp, seq/cp, head_dim]`."""
        cp, rank = self.tokens.cp, self.tokens.cp_rank
        chunk = q.shape[2] // 2
        k, v = global_order(k, cp), global_order(v, cp)
        outs = []
        for i, g in enumerate((rank, 2 * cp - 1 - rank)):  # this rank's chunks, global index g
            start = g * chunk
            outs.append(causal_chunk_attention(
                q[:, :, i * chunk:(i + 1) * chunk], k[:, :, :start], v[:, :, :start],
                k[:, :, start:start + chunk], v[:, :, start:start + chunk], scale=scale))
        return torch.cat(outs, dim=2)

    @property
    def mask(self) -> torch.Tensor | None:
        return self.tokens.mask(self.window)

    @property
    def causal(self) -> bool:
        return self.mask is None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's keys and values -> the whole sequence's (all-gathered over CP)."""
        if self.tokens.cp == 1:
            return k, v
        group = self.tokens.group
        return (gather_from_sp(k, group, seq_dim=KEY_DIM), gather_from_sp(v, group, seq_dim=KEY_DIM))


def global_order(x: torch.Tensor, cp: int, *, dim: int = KEY_DIM) -> torch.Tensor:
    """A tensor gathered over CP along the sequence `dim` (rank j's chunks j and 2cp-1-j at the
    j-th place; keys and values by default) -> the same in sequence order."""
    per_rank = x.shape[dim] // cp
    chunk = per_rank // 2
    pieces = [x.narrow(dim, g * per_rank, chunk) if g < cp else
              x.narrow(dim, (2 * cp - 1 - g) * per_rank + chunk, chunk) for g in range(2 * cp)]
    return torch.cat(pieces, dim=dim)


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _CausalChunkAttention(torch.autograd.Function):
    """Forward: the queries of one chunk over the keys before it (all visible) and their own
    chunk's (causal), two flash calls merged by their log-sum-exps. Backward: each block's flash
    backward with the merged output and log-sum-exp (the block's exact share of the gradients)."""

    @staticmethod
    def forward(ctx, q, k_past, v_past, k_own, v_own, scale):
        out, lse = _flash(q, k_own, v_own, 0.0, True, scale=scale)
        if k_past.shape[KEY_DIM]:
            past, past_lse = _flash(q, k_past, v_past, 0.0, False, scale=scale)
            merged = torch.logaddexp(lse, past_lse)
            out = (out * (lse - merged).exp()[..., None].to(out.dtype)
                   + past * (past_lse - merged).exp()[..., None].to(out.dtype))
            lse = merged
        ctx.save_for_backward(q, k_past, v_past, k_own, v_own, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k_past, v_past, k_own, v_own, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, dk_own, dv_own = _flash_backward(grad_out, q, k_own, v_own, out, lse, 0.0, True,
                                             scale=ctx.scale)
        dk_past, dv_past = torch.zeros_like(k_past), torch.zeros_like(v_past)
        if k_past.shape[KEY_DIM]:
            dq_past, dk_past, dv_past = _flash_backward(grad_out, q, k_past, v_past, out, lse, 0.0,
                                                        False, scale=ctx.scale)
            dq = dq + dq_past
        return dq, dk_past, dv_past, dk_own, dv_own, None


def causal_chunk_attention(q: torch.Tensor, k_past: torch.Tensor, v_past: torch.Tensor,
                           k_own: torch.Tensor, v_own: torch.Tensor, *,
                           scale: float | None) -> torch.Tensor:
    """q `[batch, heads, chunk, head_dim]` of one chunk; its own keys/values `[batch, kv_heads,
    chunk, head_dim]` (causal) and those of every earlier token (all visible) -> context `[batch,
    heads, chunk, head_dim]`, with no `[chunk, keys]` mask (SDPA keeps a float copy of a boolean
    one per layer: O(seq^2 / cp) bytes)."""
    return _CausalChunkAttention.apply(q.contiguous(), k_past.contiguous(), v_past.contiguous(),
                                       k_own.contiguous(), v_own.contiguous(), scale)


# [batch, seq, ...] entries of a micro-batch
SEQUENCE_KEYS = ("input_ids", "labels", "kd_mask", "documents", "positions", MTP_LABELS)


def split_for_cp(micro_batch: dict[str, torch.Tensor], cp: int, cp_rank: int, *,
                 mtp_heads: int = 0) -> dict[str, torch.Tensor]:
    """This CP rank's share of a micro-batch: every per-token entry at its chunks' positions, and
    `positions` (the global ones, or the per-document ones cut the same way). With `mtp_heads`,
    the targets of MTP heads 1..k are shifted on the whole sequence first (`MTP_LABELS`): the
    k-ahead labels of a chunk's last tokens lie in another chunk."""
    seq = micro_batch["input_ids"].shape[1]
    chunks = cp_positions(seq, cp, cp_rank, micro_batch["input_ids"].device)
    out = dict(micro_batch)
    if mtp_heads and "labels" in micro_batch:
        micro_batch = {**micro_batch, MTP_LABELS: torch.stack(
            [shift_labels(micro_batch["labels"], j) for j in range(1, mtp_heads + 1)], dim=-1)}
    for key in SEQUENCE_KEYS:
        if key in micro_batch:
            out[key] = micro_batch[key][:, chunks]
    if "positions" not in micro_batch:
        out["positions"] = chunks
    out[CP_CHUNKS] = torch.tensor(True)
    return out


CP_CHUNKS = "cp_chunks"  # a micro-batch entry: its tokens are this CP rank's chunks (split_for_cp)


def sequence_kwargs(micro_batch: dict[str, torch.Tensor]) -> dict:
    """The model's `positions`, `documents` and `cp_chunks` arguments for a micro-batch."""
    return {"positions": micro_batch.get("positions"), "documents": micro_batch.get("documents"),
            "cp_chunks": bool(micro_batch.get(CP_CHUNKS, False))}
