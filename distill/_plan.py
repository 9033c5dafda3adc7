"""Exact vocab-parallel losses from a few statistics per token.

Everything here works on *tiles*: a block of tokens (rows) and vocabulary columns of this rank's
shard, so the memory a call needs beyond its inputs and the returned gradient is a few tiles.

Forward. Each tile reduces to a few floats per token: per distribution a running max and the sum
of exp((x - max) / T), plus partial sums such as sum_v exp(b'_v) (b'_v - a'_v) for forward KL, on
the max-shifted logits a' = (s - max_s) / T, b' = (t - max_t) / T. Tiles of one rank and the
shards of all ranks merge by the same log-sum-exp rule (partial sums rescaled to the larger max),
so ONE all_gather of [tokens, width] makes every rank's statistics global. `forward_kl`,
`reverse_kl` and the cross-entropy are finished from those; the other kinds need the global
normalizers inside a non-linear term, so they take a second pass over the tiles and one all_reduce
of [tokens, 2].

Precision at any offset. Softmax ignores a constant added to a row, so a teacher whose logits sit
near -3000 and a student near +1000 are ordinary inputs. Every quantity here is therefore a
difference of logits of ONE model taken before the temperature divides it ((x - max) / T, exact in
fp32 near the max), or a difference of two such maxima; nothing is ever of the size of the offset,
and nothing subtracts two numbers of that size.

Backward. Each tile is recomputed and turned into its gradient with the per-token statistics the
forward kept (log-normalizers, the divergence, one auxiliary sum). No collective at all.

Conventions: s, t = raw student and teacher logits; a = s / T, b = t / T (the temperature only
applies to the divergence; the cross-entropy uses the raw student logits). -inf logits are
zero-probability columns; columns at or past the real vocabulary size are never read.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import torch

from distill import _pointwise
from distill.kinds import ONE_PASS_KINDS, check_divergence_args
from engine import collectives as C
from engine.collectives import Group

# (rows, local columns of the shard) -> (student logits tile, teacher logits tile or None), both
# fresh tensors in the compute dtype: the tile methods below use them as scratch space.
TileSource = Callable[[slice, slice], tuple[torch.Tensor, "torch.Tensor | None"]]


@dataclass
class TokenStats:
    """Per-token results of the forward, and what the backward needs of them ([tokens] each)."""

    # Log-normalizers as [tokens, 2] (max of the RAW logits, log sum exp((x - max) / T)): kept
    # apart, because (x - max) is exact near the max while max + log-sum would round at the
    # logits' scale. log p = (x - max) / T - log-sum.
    a_norm: torch.Tensor | None = None  # student, at temperature T
    b_norm: torch.Tensor | None = None  # teacher, at temperature T
    c_norm: torch.Tensor | None = None  # student at temperature 1 (cross-entropy)
    div: torch.Tensor | None = None  # the divergence
    aux: torch.Tensor | None = None  # sum_v p_v dL/dp_v (two-pass kinds)
    ce: torch.Tensor | None = None  # cross-entropy, 0 at ignored tokens
    # [tokens, 3] (teacher entropy, student entropy, 1 where their top-1 columns agree), both
    # distributions at the temperature T; only when the plan asks for diagnostics
    diag: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor | None]:
        return [getattr(self, f.name) for f in fields(self)]

    def rows(self, rows: slice) -> TokenStats:
        return TokenStats(*(None if t is None else t[rows] for t in self.tensors()))

    def outputs(self, empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ce, div) for an autograd.Function to return, `empty` standing for a missing one."""
        return (empty if self.ce is None else self.ce), (empty if self.div is None else self.div)


@dataclass(frozen=True)
class KDDiagnostics:
    """Per-token diagnostics of a divergence call, at its temperature (no gradient).

    Computed from the statistics the divergence gathers anyway: two more sums and two column
    indices per token ride in the same all_gather, so they cost no extra collective."""

    teacher_entropy: torch.Tensor  # H(p_t) in nats
    student_entropy: torch.Tensor  # H(p_s) in nats
    top1_agreement: torch.Tensor  # 1.0 where argmax p_t == argmax p_s, else 0.0

    @classmethod
    def of(cls, diag: torch.Tensor, lead: torch.Size) -> KDDiagnostics:
        """From `TokenStats.diag` [tokens, 3], reshaped to the logits' leading dims."""
        return cls(*(diag[:, i].reshape(lead) for i in range(3)))


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


def shift_(x: torch.Tensor, max_: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(x - max) / T in place, `max_` [rows] (a -inf max, of a row with no finite entry, acts
    as 0 so that the row stays -inf)."""
    x.sub_(max_.nan_to_num(neginf=0.0)[:, None])
    return x if temperature == 1.0 else x.div_(temperature)


def log_normalize_(x: torch.Tensor, norm: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(x / T) in place, `norm` being [rows, 2] (max x, log sum exp((x - max) / T))."""
    return shift_(x, norm[:, 0], temperature).sub_(norm[:, 1:])


def owned_columns(cols: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(which of `cols` fall inside a tile of `width` columns, the columns clamped into it)."""
    return (cols >= 0) & (cols < width), cols.clamp(0, width - 1)


def merge_max(part_max: torch.Tensor,
              temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(max over parts [tokens], each part's (part max - max) / T [parts, tokens]) of raw maxima
    [parts, tokens]: exp of the second rescales a part's sums to the merged max (0 for an empty
    part, whose max is -inf)."""
    top = part_max.amax(0)
    shift = part_max - top.nan_to_num(neginf=0.0)
    return top, (shift if temperature == 1.0 else shift / temperature)


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
    diagnostics: bool = False  # also KDDiagnostics (with a divergence kind only)
    # The fused head only (distill/fused.py): c of the c * tanh(x / c) soft-cap it applies to the
    # student's and the teacher's logits that it computes from hidden states (None: off)
    softcap: float | None = None
    teacher_softcap: float | None = None

    @property
    def one_pass(self) -> bool:
        return self.kind is None or self.kind in ONE_PASS_KINDS

    @property
    def ce_shares_sum(self) -> bool:
        """The cross-entropy's normalizer is the divergence's student one (temperature 1). (Its
        max always is: maxima are taken on the raw logits.)"""
        return self.temperature == 1.0

    @functools.cached_property
    def columns(self) -> dict[str, int]:
        names = ["a_max", "a_sum"]
        if self.kind is not None:
            names += ["b_max", "b_sum"] + (["z"] if self.one_pass else [])
            if self.diagnostics:  # sum exp(x') x' of each, and each argmax (global column)
                names += ["a_ent", "b_ent", "a_arg", "b_arg"]
        if self.with_ce:
            names += ([] if self.ce_shares_sum else ["c_sum"]) + ["y"]
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

    def copy_tile(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """A fresh compute-dtype copy of a caller's tile, for the tile methods to overwrite."""
        return None if x is None else x.to(self.compute_dtype, copy=True)

    # ---- forward, pass 1: statistics that merge over tiles and ranks -------------------------

    def identity(self, *shape: int, device: torch.device) -> torch.Tensor:
        """Statistics of an empty set of columns: max -inf, every sum 0."""
        out = torch.zeros(*shape, len(self.columns), dtype=self.compute_dtype, device=device)
        for name in ("a_max", "b_max"):
            if name in self.columns:
                out[..., self.columns[name]] = float("-inf")
        return out

    def tile_stats(self, s: torch.Tensor, t: torch.Tensor | None, label_cols: torch.Tensor,
                   first_col: int = 0) -> torch.Tensor:
        """[rows, width] statistics of one tile; `label_cols` are label columns within the tile,
        `first_col` is the tile's first column within the shard. Overwrites s and t with their
        shifted logits a', b'."""
        col: dict[str, torch.Tensor] = {}
        if self.with_ce:  # the raw logit, so that max - y is exact
            owned, at = owned_columns(label_cols, s.shape[-1])
            col["y"] = torch.where(owned, s.gather(-1, at[:, None])[:, 0], 0.0)
        col["a_max"] = self._max(s, "a", col, first_col)
        a = shift_(s, col["a_max"])
        if "c_sum" in self.columns:  # at temperature 1, before T divides a
            col["c_sum"] = a.exp().sum(-1)
        ea = self._scale_(a).exp()
        col["a_sum"] = ea.sum(-1)
        if self.kind is not None:
            col["b_max"] = self._max(t, "b", col, first_col)
            b = shift_(t, col["b_max"], self.temperature)
            eb = b.exp()
            col["b_sum"] = eb.sum(-1)
            if self.diagnostics:  # before the KL sums below reuse ea / eb as scratch
                # (-inf logits give 0 * -inf = nan, a zero-probability column: nansum drops it)
                col["a_ent"], col["b_ent"] = torch.nansum(ea * a, -1), torch.nansum(eb * b, -1)
            if self.kind == "forward_kl":  # sum exp(b') (b' - a')
                col["z"] = torch.nansum(torch.sub(b, a, out=ea).mul_(eb), -1)
            elif self.kind == "reverse_kl":  # sum exp(a') (a' - b')
                col["z"] = torch.nansum(torch.sub(a, b, out=eb).mul_(ea), -1)
        return torch.stack([col[name] for name in self.columns], -1)

    def _max(self, x: torch.Tensor, name: str, col: dict[str, torch.Tensor],
             first_col: int) -> torch.Tensor:
        """Row max of raw logits; with diagnostics also records the argmax's global column
        (of the raw logits, before any rounding of the shift) as `{name}_arg`."""
        if not self.diagnostics or self.kind is None:
            return x.amax(-1)
        top, arg = x.max(-1)
        col[f"{name}_arg"] = (arg + self.vocab_offset + first_col).to(x.dtype)
        return top

    def _scale_(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.temperature == 1.0 else x.div_(self.temperature)

    def merge(self, stats: torch.Tensor) -> torch.Tensor:
        """Merge [parts, tokens, width] statistics (tiles or ranks) into [tokens, width]."""
        idx, out = self.columns, torch.empty_like(stats[0])
        part = {name: stats[..., i] for name, i in idx.items()}
        out[:, idx["a_max"]], shift_a = merge_max(part["a_max"], self.temperature)
        out[:, idx["a_sum"]] = (shift_a.exp() * part["a_sum"]).sum(0)
        if "c_sum" in idx:
            out[:, idx["c_sum"]] = (merge_max(part["a_max"])[1].exp() * part["c_sum"]).sum(0)
        if self.kind is not None:
            out[:, idx["b_max"]], shift_b = merge_max(part["b_max"], self.temperature)
            out[:, idx["b_sum"]] = (shift_b.exp() * part["b_sum"]).sum(0)
        if "z" in idx:  # a part's z is on its own maxima: shift its a', b' to the merged ones
            if self.kind == "forward_kl":  # (empty parts give 0 * nan: nansum drops them)
                z = shift_b.exp() * (part["z"] + part["b_sum"] * (shift_b - shift_a))
            else:
                z = shift_a.exp() * (part["z"] + part["a_sum"] * (shift_a - shift_b))
            out[:, idx["z"]] = torch.nansum(z, 0)
        if "y" in idx:  # exactly one part owns each label
            out[:, idx["y"]] = part["y"].sum(0)
        if "a_ent" in idx:
            self._merge_diagnostics(out, part, shift_a, shift_b)
        return out

    def _merge_diagnostics(self, out: torch.Tensor, part: dict[str, torch.Tensor],
                           shift_a: torch.Tensor, shift_b: torch.Tensor) -> None:
        idx = self.columns
        for x, shift in (("a", shift_a), ("b", shift_b)):  # x'' = x' + shift on the merged max
            ent = shift.exp() * (part[f"{x}_ent"] + part[f"{x}_sum"] * shift)
            out[:, idx[f"{x}_ent"]] = torch.nansum(ent, 0)
            # the argmax of the part holding the largest max; parts run in column order and
            # argmax takes the first of equal maxima, so ties resolve to the lowest column
            # as torch.argmax on the whole row does
            owner = part[f"{x}_max"].argmax(0, keepdim=True)
            out[:, idx[f"{x}_arg"]] = part[f"{x}_arg"].gather(0, owner)[0]

    def finish(self, merged: torch.Tensor, ignored: torch.Tensor) -> TokenStats:
        """Per-token results from globally merged statistics (one-pass parts)."""
        col = {name: merged[:, i] for name, i in self.columns.items()}
        tok = TokenStats()
        log_a = col["a_sum"].log()
        tok.a_norm = torch.stack([col["a_max"], log_a], -1)
        if self.kind is not None:
            log_b = col["b_sum"].log()
            tok.b_norm = torch.stack([col["b_max"], log_b], -1)
            if self.kind == "forward_kl":  # sum q (b'' - a'') - log sum_b + log sum_a
                tok.div = col["z"] / col["b_sum"] - (log_b - log_a)
            elif self.kind == "reverse_kl":
                tok.div = col["z"] / col["a_sum"] - (log_a - log_b)
            if self.diagnostics:  # H = log sum exp(x') - sum exp(x') x' / sum exp(x')
                tok.diag = torch.stack([log_b - col["b_ent"] / col["b_sum"],
                                        log_a - col["a_ent"] / col["a_sum"],
                                        (col["a_arg"] == col["b_arg"]).to(log_a.dtype)], -1)
        if self.with_ce:
            log_c = log_a if self.ce_shares_sum else col["c_sum"].log()
            tok.c_norm = torch.stack([col["a_max"], log_c], -1)
            tok.ce = torch.where(ignored, 0.0, (col["a_max"] - col["y"]) + log_c)
        return tok

    # ---- kept exponentials: forward KL and the cross-entropy, whose gradient is a combination
    # of the tiles' exp(a') and exp(b') with per-token coefficients -----------------------------

    @property
    def keeps_exps(self) -> bool:
        """Whether `tile_stats_exp_` / `tile_grad_exp_` apply: forward KL or the cross-entropy
        alone, or both where they share the student's softmax (temperature 1)."""
        return self.kind in (None, "forward_kl") and (self.kind is None or not self.with_ce
                                                      or self.temperature == 1.0)

    def tile_stats_exp_(self, s: torch.Tensor, t: torch.Tensor | None,
                        label_cols: torch.Tensor, first_col: int = 0) -> torch.Tensor:
        """`tile_stats` of a keeps_exps plan, leaving exp(a') in s and exp(b') in t: with
        the tile's maxima (its statistics) and the global normalizers they are p and q."""
        col: dict[str, torch.Tensor] = {}
        if self.with_ce:
            owned, at = owned_columns(label_cols, s.shape[-1])
            col["y"] = torch.where(owned, s.gather(-1, at[:, None])[:, 0], 0.0)
        col["a_max"] = self._max(s, "a", col, first_col)
        a = shift_(s, col["a_max"], self.temperature)
        if self.kind is not None:
            col["b_max"] = self._max(t, "b", col, first_col)
            b = shift_(t, col["b_max"], self.temperature)
            diff = torch.sub(b, a)  # b' - a'
            if self.diagnostics:  # sum exp(x') x', before the exponentials overwrite a', b'
                col["a_ent"] = torch.nansum(a.exp().mul_(a), -1)
                col["b_ent"] = torch.nansum(b.exp().mul_(b), -1)
        col["a_sum"] = a.exp_().sum(-1)
        if self.kind is not None:
            col["b_sum"] = b.exp_().sum(-1)
            col["z"] = _row_dot_(b, diff)  # sum exp(b') (b' - a')
        return torch.stack([col[name] for name in self.columns], -1)

    def tile_grad_exp_(self, ea: torch.Tensor, eb: torch.Tensor | None, label_cols: torch.Tensor,
                       tile_stats: torch.Tensor, tok: TokenStats,
                       upstream: Upstream) -> torch.Tensor:
        """`tile_grad` from the tile left by tile_stats_exp_ (its statistics `tile_stats`),
        written over `ea`: p = exp(a') exp((tile max - max) / T) / sum, likewise q."""
        g_ce = upstream.ce if self.with_ce else None
        g_div = upstream.div if self.kind is not None else None
        idx = self.columns
        p_scale = self._exp_scale(tile_stats[:, idx["a_max"]], tok.a_norm)
        coef = 0.0 if g_div is None else g_div / self.temperature
        coef_a = (coef if g_ce is None else coef + g_ce) * p_scale
        ea.mul_(coef_a[:, None])
        if g_div is not None:
            coef_b = coef * self._exp_scale(tile_stats[:, idx["b_max"]], tok.b_norm)
            ea.addcmul_(eb, coef_b[:, None], value=-1.0)
        if g_ce is not None:
            owned, at = owned_columns(label_cols, ea.shape[-1])
            ea[owned, at[owned]] -= g_ce[owned]
        return ea

    def _exp_scale(self, tile_max: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """exp((tile max - max) / T - log sum): turns a tile's exp(x') into probabilities."""
        return ((tile_max - norm[:, 0].nan_to_num(neginf=0.0)) / self.temperature
                - norm[:, 1]).exp()

    # ---- forward, pass 2 (two-pass kinds): sums that need the global normalizers -------------

    def _log_probs_(self, s: torch.Tensor, t: torch.Tensor,
                    tok: TokenStats) -> tuple[torch.Tensor, torch.Tensor]:
        return (log_normalize_(s, tok.a_norm, self.temperature),
                log_normalize_(t, tok.b_norm, self.temperature))

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


def _row_dot_(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum(x * y, -1), overwriting y with the products; a row holding 0 * inf (zero-probability
    columns) is taken as nansum."""
    out = y.mul_(x).sum(-1)
    bad = out.isnan()
    if bad.any():
        out[bad] = torch.nansum(y[bad], -1)
    return out


def reduce_stats(plan: LossPlan, logits: TileSource, *, n_tokens: int, label_cols: torch.Tensor,
                 ignored: torch.Tensor, group: Group, device: torch.device) -> TokenStats:
    """The whole forward: tile statistics, one all_gather, and for two-pass kinds one all_reduce.

    `logits(rows, cols)` gives the tiles; `label_cols` holds each token's label as a column of
    this rank's shard (-1 where ignored or owned by another rank).
    """
    stats = plan.identity(plan.n_col_tiles(), n_tokens, device=device)
    for j, rows, cols in plan.tiles(n_tokens):
        stats[j, rows] = plan.tile_stats(*logits(rows, cols), label_cols[rows] - cols.start,
                                         cols.start)
    tok = global_stats(plan, stats, ignored, group)
    if not plan.one_pass:
        partials = stats.new_zeros(n_tokens, 2)
        for _, rows, cols in plan.tiles(n_tokens):
            partials[rows] += plan.tile_partials(*logits(rows, cols), tok.rows(rows))
        C.all_reduce(partials, group)
        tok.div, tok.aux = partials[:, 0], partials[:, 1]
    return tok


def global_stats(plan: LossPlan, stats: torch.Tensor, ignored: torch.Tensor,
                 group: Group) -> TokenStats:
    """The one-pass results from this rank's [tiles, tokens, width] tile statistics: merged over
    tiles, one all_gather, merged over ranks."""
    gathered = C.all_gather(plan.merge(stats)[None], group, dim=0)  # [tp, tokens, width]
    return plan.finish(plan.merge(gathered), ignored)


# Default tile (tokens, vocabulary columns): 8 MB of fp32 on CPU, where cache-sized work wins;
# 256 MB on GPUs, where fewer, larger kernels do.
DEFAULT_TILE = {"cpu": (256, 8192), "cuda": (4096, 16384)}


def make_plan(*, kind: str | None, with_ce: bool, shard_vocab: int, dtype: torch.dtype,
              vocab_size: int | None, group: Group, device: torch.device,
              temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
              tile_tokens: int | None = None, tile_vocab: int | None = None,
              diagnostics: bool = False, softcap: float | None = None,
              teacher_softcap: float | None = None) -> LossPlan:
    """Validate the arguments of a public call and place this rank's shard in the vocabulary."""
    for name, cap in (("softcap", softcap), ("teacher_softcap", teacher_softcap)):
        if cap is not None and not 0 < cap < math.inf:
            raise ValueError(f"{name} must be > 0 and finite, or None (got {cap})")
    if kind is not None:
        check_divergence_args(kind, temperature=temperature, beta=beta, skew=skew)
    else:  # the cross-entropy alone: the student statistics are its own, at temperature 1
        temperature = 1.0
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
                    diagnostics=diagnostics and kind is not None, softcap=softcap,
                    teacher_softcap=teacher_softcap,
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
