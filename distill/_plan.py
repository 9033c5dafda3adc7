"""Exact vocab-parallel losses from a few statistics per token.

Everything here works on *tiles*: a block of tokens (rows) and vocabulary columns of this rank's
shard, so the memory a call needs beyond its inputs and the returned gradient is a few tiles.

Forward. Each tile reduces to a few floats per token: per distribution a running max and the sum
of exp(x - max), plus partial sums such as sum_v exp(b_v - max_b) (b_v - a_v) for forward KL. Tiles
of one rank and the shards of all ranks merge by the same log-sum-exp rule, so ONE all_gather of
[tokens, width] makes every rank's statistics global. `forward_kl`, `reverse_kl` and the
cross-entropy are finished from those; the other kinds need the global normalizers inside a
non-linear term, so they take a second pass over the tiles and one all_reduce of [tokens, 2].

Backward. Each tile is recomputed and turned into its gradient with the per-token statistics the
forward kept (log-normalizers, the divergence, one auxiliary sum). No collective at all.

Conventions: a = student logits / temperature, b = teacher logits / temperature (the temperature
only applies to the divergence; the cross-entropy uses the raw student logits). -inf logits are
zero-probability columns; columns at or past the real vocabulary size are never read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import torch

from distill import _pointwise
from engine import collectives as C
from engine.collectives import Group

# (rows, local columns of the shard) -> (student logits tile, teacher logits tile or None), both
# fresh tensors in the compute dtype: the tile methods below use them as scratch space.
TileSource = Callable[[slice, slice], tuple[torch.Tensor, "torch.Tensor | None"]]


@dataclass
class TokenStats:
    """Per-token results of the forward, and what the backward needs of them ([tokens] each)."""

    # Log-normalizers as [tokens, 2] (max, log sum exp(x - max)): kept apart, because
    # (x - max) is exact near the max while max + log-sum would round at the logits' scale.
    a_norm: torch.Tensor | None = None  # student logits / T
    b_norm: torch.Tensor | None = None  # teacher logits / T
    c_norm: torch.Tensor | None = None  # raw student logits (cross-entropy)
    div: torch.Tensor | None = None  # the divergence
    aux: torch.Tensor | None = None  # sum_v p_v dL/dp_v (two-pass kinds)
    ce: torch.Tensor | None = None  # cross-entropy, 0 at ignored tokens

    def tensors(self) -> list[torch.Tensor | None]:
        return [getattr(self, f.name) for f in fields(self)]

    def rows(self, rows: slice) -> TokenStats:
        return TokenStats(*(None if t is None else t[rows] for t in self.tensors()))

    def outputs(self, empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ce, div) for an autograd.Function to return, `empty` standing for a missing one."""
        return (empty if self.ce is None else self.ce), (empty if self.div is None else self.div)


@dataclass
class Upstream:
    """The gradients arriving at the per-token (ce, div) outputs; None where an output is unused."""

    ce: torch.Tensor | None
    div: torch.Tensor | None

    @classmethod
    def of(cls, g_ce: torch.Tensor | None, g_div: torch.Tensor | None, ignored: torch.Tensor,
           dtype: torch.dtype) -> Upstream:
        return cls(None if g_ce is None else g_ce.to(dtype).masked_fill(ignored, 0.0),
                   None if g_div is None else g_div.to(dtype))

    @property
    def empty(self) -> bool:
        return self.ce is None and self.div is None

    def rows(self, rows: slice) -> Upstream:
        return Upstream(*(None if g is None else g[rows] for g in (self.ce, self.div)))


def log_normalize_(x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """x - log-sum-exp in place, `norm` being [rows, 2] (max, log sum exp(x - max))."""
    return x.sub_(norm[:, :1]).sub_(norm[:, 1:])


def owned_columns(cols: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(which of `cols` fall inside a tile of `width` columns, the columns clamped into it)."""
    return (cols >= 0) & (cols < width), cols.clamp(0, width - 1)


def max_exp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row max (-inf for a row with no finite entry) and exp(x - max), 0 at -inf entries."""
    m = x.amax(-1)
    return m, torch.sub(x, m.nan_to_num(neginf=0.0)[:, None]).exp_()


@dataclass(frozen=True)
class LossPlan:
    """What one call computes on this rank's shard, and how its statistics are laid out."""

    kind: str | None  # divergence kind, None for cross-entropy alone
    with_ce: bool  # also the cross-entropy against labels (at temperature 1)
    vocab_size: int  # the real vocabulary (all ranks); columns past it are padding
    vocab_offset: int  # global vocabulary index of this rank's first column
    valid: int  # columns of this rank's shard inside the real vocabulary
    temperature: float = 1.0
    beta: float = 0.5
    skew: float = 0.1
    compute_dtype: torch.dtype = torch.float32  # fp32, or fp64 for fp64 inputs
    tile_tokens: int = 256  # rows of one tile
    tile_vocab: int = 8192  # columns of one tile (DEFAULT_TILE picks both per device)

    @property
    def one_pass(self) -> bool:
        return self.kind is None or self.kind in _pointwise.ONE_PASS_KINDS

    @property
    def shares_ce_max(self) -> bool:
        """The cross-entropy reuses the divergence's student statistics (temperature 1)."""
        return self.kind is not None and self.temperature == 1.0

    @functools.cached_property
    def columns(self) -> dict[str, int]:
        names = []
        if self.kind is not None:
            names += ["a_max", "a_sum", "b_max", "b_sum"] + (["z"] if self.one_pass else [])
        if self.with_ce:
            names += ([] if self.shares_ce_max else ["c_max", "c_sum"]) + ["y"]
        return {name: i for i, name in enumerate(names)}

    def n_col_tiles(self) -> int:
        return max(1, len(self.col_tiles()))

    def col_tiles(self) -> list[slice]:
        """Column ranges of this shard's tiles; padding columns belong to none."""
        return [slice(c0, min(c0 + self.tile_vocab, self.valid))
                for c0 in range(0, self.valid, self.tile_vocab)]

    def row_tiles(self, n_tokens: int) -> list[slice]:
        return [slice(r0, min(r0 + self.tile_tokens, n_tokens))
                for r0 in range(0, n_tokens, self.tile_tokens)]

    def tiles(self, n_tokens: int) -> Iterator[tuple[int, slice, slice]]:
        """(column-tile index, rows, columns) of every tile, column tiles outermost."""
        for j, cols in enumerate(self.col_tiles()):
            for rows in self.row_tiles(n_tokens):
                yield j, rows, cols

    def scale_(self, x: torch.Tensor) -> torch.Tensor:
        """Logits / temperature, in place."""
        return x if self.temperature == 1.0 else x.div_(self.temperature)

    def copy_tile(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """A fresh compute-dtype copy of a caller's tile, for the tile methods to overwrite."""
        return None if x is None else x.to(self.compute_dtype, copy=True)

    # ---- forward, pass 1: statistics that merge over tiles and ranks -------------------------

    def identity(self, *shape: int, device: torch.device) -> torch.Tensor:
        """Statistics of an empty set of columns: max -inf, every sum 0."""
        out = torch.zeros(*shape, len(self.columns), dtype=self.compute_dtype, device=device)
        for name in ("a_max", "b_max", "c_max"):
            if name in self.columns:
                out[..., self.columns[name]] = float("-inf")
        return out

    def tile_stats(self, s: torch.Tensor, t: torch.Tensor | None,
                   label_cols: torch.Tensor) -> torch.Tensor:
        """[rows, width] statistics of one tile; `label_cols` are label columns within the tile."""
        col: dict[str, torch.Tensor] = {}
        if self.with_ce:  # on the raw logits, before the temperature scales them in place
            if not self.shares_ce_max:
                col["c_max"], ec = max_exp(s)
                col["c_sum"] = ec.sum(-1)
            owned, at = owned_columns(label_cols, s.shape[-1])
            col["y"] = torch.where(owned, s.gather(-1, at[:, None])[:, 0], 0.0)
        if self.kind is not None:
            a, b = self.scale_(s), self.scale_(t)
            col["a_max"], ea = max_exp(a)
            col["a_sum"] = ea.sum(-1)
            col["b_max"], eb = max_exp(b)
            col["b_sum"] = eb.sum(-1)
            if self.kind == "forward_kl":  # sum exp(b - max_b) (b - a)
                col["z"] = torch.nansum(torch.sub(b, a, out=ea).mul_(eb), -1)
            elif self.kind == "reverse_kl":  # sum exp(a - max_a) (a - b)
                col["z"] = torch.nansum(torch.sub(a, b, out=eb).mul_(ea), -1)
        return torch.stack([col[name] for name in self.columns], -1)

    def merge(self, stats: torch.Tensor) -> torch.Tensor:
        """Merge [parts, tokens, width] statistics (tiles or ranks) into [tokens, width]."""
        idx, out = self.columns, torch.empty_like(stats[0])
        weight = {}
        for m, s in (("a_max", "a_sum"), ("b_max", "b_sum"), ("c_max", "c_sum")):
            if m in idx:
                part_max = stats[..., idx[m]]
                top = part_max.amax(0)
                weight[m] = torch.exp(part_max - top.nan_to_num(neginf=0.0))  # 0 for empty parts
                out[:, idx[m]] = top
                out[:, idx[s]] = (weight[m] * stats[..., idx[s]]).sum(0)
        if "z" in idx:  # weighted like the distribution that weighs the sum
            w = weight["b_max" if self.kind == "forward_kl" else "a_max"]
            out[:, idx["z"]] = torch.nansum(w * stats[..., idx["z"]], 0)
        if "y" in idx:  # exactly one part owns each label
            out[:, idx["y"]] = stats[..., idx["y"]].sum(0)
        return out

    def finish(self, merged: torch.Tensor, ignored: torch.Tensor) -> TokenStats:
        """Per-token results from globally merged statistics (one-pass parts)."""
        col = {name: merged[:, i] for name, i in self.columns.items()}
        tok = TokenStats()
        if self.kind is not None:
            log_a, log_b = col["a_sum"].log(), col["b_sum"].log()
            tok.a_norm = torch.stack([col["a_max"], log_a], -1)
            tok.b_norm = torch.stack([col["b_max"], log_b], -1)
            gap = (col["a_max"] - col["b_max"]) + (log_a - log_b)  # = a_lse - b_lse
            if self.kind == "forward_kl":  # sum q (b - a) - b_lse + a_lse
                tok.div = col["z"] / col["b_sum"] + gap
            elif self.kind == "reverse_kl":
                tok.div = col["z"] / col["a_sum"] - gap
        if self.with_ce:
            c_max, c_sum = (col["a_max"], col["a_sum"]) if self.shares_ce_max \
                else (col["c_max"], col["c_sum"])
            tok.c_norm = torch.stack([c_max, c_sum.log()], -1)
            tok.ce = torch.where(ignored, 0.0, (c_max - col["y"]) + c_sum.log())
        return tok

    # ---- forward, pass 2 (two-pass kinds): sums that need the global normalizers -------------

    def _log_probs_(self, s: torch.Tensor, t: torch.Tensor,
                    tok: TokenStats) -> tuple[torch.Tensor, torch.Tensor]:
        return (log_normalize_(self.scale_(s), tok.a_norm),
                log_normalize_(self.scale_(t), tok.b_norm))

    def tile_partials(self, s: torch.Tensor, t: torch.Tensor, tok: TokenStats) -> torch.Tensor:
        """[rows, 2]: this tile's share of the divergence and of sum_v p_v dL/dp_v."""
        ell, pg = _pointwise.terms(self.kind, *self._log_probs_(s, t, tok), beta=self.beta,
                                   skew=self.skew)
        return torch.stack([ell.sum(-1), pg.sum(-1)], -1)

    # ---- backward ----------------------------------------------------------------------------

    def tile_grad(self, s: torch.Tensor, t: torch.Tensor | None, label_cols: torch.Tensor,
                  tok: TokenStats, upstream: Upstream) -> torch.Tensor:
        """d(sum g_div * div + g_ce * ce)/d(student logits) on one tile, in the compute dtype."""
        g_ce, g_div = upstream.ce, upstream.div
        use_div = g_div is not None and self.kind is not None
        grad = None
        if g_ce is not None and self.with_ce:  # p - onehot(label), from the raw logits
            raw = s.clone() if use_div else s
            grad = log_normalize_(raw, tok.c_norm).exp_().mul_(g_ce[:, None])
            owned, at = owned_columns(label_cols, s.shape[-1])
            grad[owned, at[owned]] -= g_ce[owned]
        if use_div:
            term = self._div_grad_(s, t, tok).mul_((g_div / self.temperature)[:, None])
            grad = term if grad is None else grad.add_(term)
        return s.zero_() if grad is None else grad

    def _div_grad_(self, s: torch.Tensor, t: torch.Tensor, tok: TokenStats) -> torch.Tensor:
        """d div / d a on one tile (a = student logits / T)."""
        logp, logq = self._log_probs_(s, t, tok)
        if self.kind == "forward_kl":  # p - q
            return logp.exp_().sub_(logq.exp_())
        p = logp.exp()
        if self.kind == "reverse_kl":  # p (log p - log q - KL)
            return torch.where(p > 0, p * (logp - logq - tok.div[:, None]), 0.0)
        _, pg = _pointwise.terms(self.kind, logp, logq, beta=self.beta, skew=self.skew)
        return pg.sub_(p.mul_(tok.aux[:, None]))


def reduce_stats(plan: LossPlan, logits: TileSource, *, n_tokens: int, label_cols: torch.Tensor,
                 ignored: torch.Tensor, group: Group, device: torch.device) -> TokenStats:
    """The whole forward: tile statistics, one all_gather, and for two-pass kinds one all_reduce.

    `logits(rows, cols)` gives the tiles; `label_cols` holds each token's label as a column of
    this rank's shard (-1 where ignored or owned by another rank).
    """
    stats = plan.identity(plan.n_col_tiles(), n_tokens, device=device)
    for j, rows, cols in plan.tiles(n_tokens):
        stats[j, rows] = plan.tile_stats(*logits(rows, cols), label_cols[rows] - cols.start)
    gathered = C.all_gather(plan.merge(stats)[None], group, dim=0)  # [tp, tokens, width]
    tok = plan.finish(plan.merge(gathered), ignored)
    if not plan.one_pass:
        partials = stats.new_zeros(n_tokens, 2)
        for _, rows, cols in plan.tiles(n_tokens):
            partials[rows] += plan.tile_partials(*logits(rows, cols), tok.rows(rows))
        C.all_reduce(partials, group)
        tok.div, tok.aux = partials[:, 0], partials[:, 1]
    return tok


# Default tile (tokens, vocabulary columns): 8 MB of fp32 on CPU, where cache-sized work wins;
# 256 MB on GPUs, where fewer, larger kernels do.
DEFAULT_TILE = {"cpu": (256, 8192), "cuda": (4096, 16384)}


def make_plan(*, kind: str | None, with_ce: bool, shard_vocab: int, dtype: torch.dtype,
              vocab_size: int | None, group: Group, device: torch.device,
              temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
              tile_tokens: int | None = None, tile_vocab: int | None = None) -> LossPlan:
    """Validate the arguments of a public call and place this rank's shard in the vocabulary."""
    if kind is not None:
        _pointwise.check_kind(kind, beta=beta, skew=skew, temperature=temperature)
    default_tokens, default_vocab = DEFAULT_TILE.get(device.type, DEFAULT_TILE["cpu"])
    tile_tokens = default_tokens if tile_tokens is None else tile_tokens
    tile_vocab = default_vocab if tile_vocab is None else tile_vocab
    if tile_tokens < 1 or tile_vocab < 1:
        raise ValueError(f"chunk sizes must be >= 1 (got {tile_tokens} tokens, "
                         f"{tile_vocab} columns)")
    tp = C.group_size(group)
    full = shard_vocab * tp
    vocab_size = full if vocab_size is None else vocab_size
    if not 0 < vocab_size <= full:
        raise ValueError(f"vocab_size must be in [1, {full}] for {tp} shard(s) of {shard_vocab} "
                         f"columns (got {vocab_size})")
    offset = C.group_rank(group) * shard_vocab
    return LossPlan(kind=kind, with_ce=with_ce, vocab_size=vocab_size, vocab_offset=offset,
                    valid=min(max(vocab_size - offset, 0), shard_vocab), temperature=temperature,
                    beta=beta, skew=skew, tile_tokens=tile_tokens, tile_vocab=tile_vocab,
                    compute_dtype=torch.float64 if dtype == torch.float64 else torch.float32)


def label_columns(plan: LossPlan, labels: torch.Tensor,
                  ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(each label as a column of this rank's shard, -1 where ignored; the ignored mask)."""
    ignored = labels == ignore_index
    bad = ~ignored & ((labels < 0) | (labels >= plan.vocab_size))
    if bad.any():
        raise ValueError(f"labels must be in [0, {plan.vocab_size}) or ignore_index={ignore_index} "
                         f"(got {labels[bad][0].item()})")
    return torch.where(ignored, -1, labels - plan.vocab_offset), ignored
