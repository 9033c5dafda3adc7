"""How the offline teacher store encodes one shard: top-k ids, log-probabilities, leftover mass.

Per position (token) of a sample the store keeps the teacher's k most probable token ids, their
log-probabilities at the export's temperature and the leftover mass r = 1 - sum(top-k
probabilities), computed in float64 from the full vocabulary (never from the rounded top-k):

- ids, sorted ascending, as gaps g = id[j] - id[j-1] - 1 (>= 0), coded with one code per shard,
  whichever takes the fewest bits (`choose_code`): Rice (the high part g >> m in unary, g >> m
  ones and a zero, in one bit stream; the low m bits fixed-width in another), Exp-Golomb (the
  length n of (g >> m) + 1 in unary, its n bits after the leading one in a middle stream, the
  low m bits fixed-width: for gaps with a heavier tail, as a trained teacher's, whose top-k
  crowds the frequent, low ids), or plain fixed-width fields of ceil(log2 V) bits. All decode
  without a loop per token (the zeros of the unary stream are found at once); lossless at any
  vocabulary size.
- log-probabilities (in the ids' sorted order) relative to the top-1: u = log p_1 - log p_j >= 0
  is companded, t = 1 - exp(-u / a) with a = COMPAND, and t is rounded to one of 2^value_bits
  levels over [0, 1 - exp(-U_MAX / a)] (u past U_MAX, a probability below e^-16 of the top-1's,
  is clipped to U_MAX); the level, counted down from the top (most of a top-k lies near its tail,
  so the counts are small), is coded like the ids (plain value_bits-bit fields, when those are
  the smallest). The step in u grows as e^(u / a): fine for the probable tokens that carry the loss,
  coarse in the tail. The reader restores log p_j = c - u_j with c chosen so that the top-k
  probabilities add up to exactly 1 - r: the leftover mass is never rounded by the quantization,
  and the top-1 is where the distribution puts it. `value_bits = 32` keeps float32 log-probs
  instead (lossless to float32: the exactness tests use it).
- r as float32.

The bound (README, "Offline teacher store"): a rounded t is off by at most half a step dt/2, so
each u_j is off by at most h(u) = -a log(1 - (dt/2) e^(u / a)) (u <= U_MAX; past it, u - U_MAX +
h(U_MAX)), and the common shift c by at most H = log sum_j w_j e^(h(u_j)) (w_j = p_j / (1 - r)).
Each stored log-probability is therefore within eta_j = h(u_j) + H of the truth, and the KD term
of any divergence kind of the offline path changes by at most
    sum_j |p~_j - p_j| (|log(p_j / q_j)| + eta_j + 1) + sum_j q_j eta_j
per token (q: the student's bucket probabilities; `kd_bound` computes it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

COMPAND = 4.0  # a: the scale of the companding 1 - exp(-u / a)
U_MAX = 16.0  # u = log p_1 - log p_j is clipped here (p_j < e^-16 p_1)
FLOAT_VALUES = 32  # value_bits meaning float32 log-probabilities, unquantized
VALUE_BITS = range(2, 17)  # quantized widths; or FLOAT_VALUES


def id_bits(vocab_size: int) -> int:
    """ceil(log2 V): the width of one token id stored as a plain fixed-width field."""
    return max(1, (vocab_size - 1).bit_length())


def pack_rows(values: np.ndarray, width: int) -> np.ndarray:
    """[rows, cols] non-negative ints < 2**width -> [rows, ceil(cols * width / 8)] uint8, each
    row's fields back to back, most significant bit first."""
    rows = values.shape[0]
    if width == 0:
        return np.zeros((rows, 0), np.uint8)
    size = 1 if width <= 8 else 2 if width <= 16 else 4  # bytes of the narrowest field that fits
    big_endian = values.astype(f">u{size}").view(np.uint8).reshape(rows, -1, size)
    bits = np.unpackbits(big_endian, axis=2)[:, :, 8 * size - width:]  # [rows, cols, width]
    return np.packbits(bits.reshape(rows, -1), axis=1)


def unpack_row(packed: np.ndarray, width: int, count: int) -> np.ndarray:
    """Inverse of `pack_rows` for one row: [count] int64."""
    if width == 0:
        return np.zeros(count, np.int64)
    return _to_ints(np.unpackbits(packed, count=count * width).reshape(count, width))


def _to_ints(bits: np.ndarray) -> np.ndarray:
    """[count, width] bits, most significant first -> [count] int64 (width <= 32)."""
    count, width = bits.shape
    size = 1 if width <= 8 else 2 if width <= 16 else 4  # bytes of the narrowest field that fits
    full = np.zeros((count, 8 * size), np.uint8)
    full[:, 8 * size - width:] = bits
    return np.packbits(full.reshape(-1)).view(f">u{size}").astype(np.int64)  # rows: whole bytes


PLAIN, RICE, EXP_GOLOMB = 0, 1, 2  # how a stream of fields is coded (`choose_code`)


def _high_parts(fields: np.ndarray, mode: int, m: int) -> np.ndarray:
    """What the unary stream holds per field: fields >> m (Rice), or n = floor(log2((fields >>
    m) + 1)) (Exp-Golomb, whose next n bits, in the middle stream, hold the rest of it)."""
    if mode == RICE:
        return fields >> m
    return np.frexp((fields >> m) + 1)[1].astype(np.int64) - 1


def choose_code(fields: np.ndarray, width: int) -> tuple[int, int]:
    """(mode, m): the coding of `fields` (non-negative, < 2**width) in the fewest bits, of Rice
    codes with the geometric-distribution parameter m ~ log2(mean ln 2) and its neighbours,
    Exp-Golomb codes of orders below it (for gaps with a heavier tail than a geometric's) and
    plain `width`-bit fields, which bound the cost of an unfavourable shard."""
    counts = np.bincount(fields.reshape(-1), minlength=1 << width)  # costs from the histogram
    values = np.arange(counts.size, dtype=np.int64)
    mean = float(counts @ values) / max(fields.size, 1)
    guess = min(width, max(0, round(math.log2(max(mean * math.log(2), 1.0)))))
    costs = {(RICE, m): int(counts @ _high_parts(values, RICE, m)) + fields.size * (m + 1)
             for m in range(max(0, guess - 1), min(guess + 2, width + 1))}
    costs.update({(EXP_GOLOMB, m): 2 * int(counts @ _high_parts(values, EXP_GOLOMB, m))
                  + fields.size * (m + 1) for m in range(max(0, guess - 3), guess)})
    costs[PLAIN, width] = fields.size * width
    return min(costs, key=costs.get)


def encode_fields(name: str, fields: np.ndarray, width: int) -> dict[str, np.ndarray]:
    """Code non-negative ints [samples, ...] below 2**width, one `choose_code` for the shard:
    `name_code` [mode, m]; `name_low` [samples, bytes], the low m bits of each field,
    fixed-width; `name_high`, the unary stream (h ones and a zero per field, h from
    `_high_parts`) of every sample back to back, and `name_end` [samples], where each sample's
    part ends, in bits; for Exp-Golomb `name_mid` / `name_mid_end` likewise, the n bits after
    the leading one of (fields >> m) + 1. Streams a mode does not use are empty."""
    samples = fields.shape[0]
    mode, m = choose_code(fields, width)
    out = {f"{name}_code": np.array([mode, m], np.uint8),
           f"{name}_low": _pack(fields & ((1 << m) - 1), m)}
    if mode != PLAIN:
        high = _high_parts(fields, mode, m).reshape(samples, -1)
        ends = np.cumsum(high + 1, axis=None)  # h ones and a zero per field
        bits = np.ones(int(ends[-1]), np.uint8)
        bits[ends - 1] = 0
        out[f"{name}_high"], out[f"{name}_end"] = np.packbits(bits), ends.reshape(samples, -1)[:, -1]
    if mode == EXP_GOLOMB:
        rest = (fields.reshape(samples, -1) >> m) + 1 - (1 << high)
        out[f"{name}_mid"], out[f"{name}_mid_end"] = _variable_width(high, rest)
    for key in ("high", "end", "mid", "mid_end"):
        out.setdefault(f"{name}_{key}", np.zeros(0, np.uint8 if "end" not in key else np.int64))
    return out


def _variable_width(widths: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[samples, n] fields of [samples, n] widths, most significant bit first, back to back:
    (packed bits, [samples] where each sample's bits end)."""
    w, v = widths.reshape(-1, 1).astype(np.int32), values.reshape(-1, 1).astype(np.int32)
    widest = max(int(w.max()), 1)
    place = np.arange(widest, dtype=np.int32)  # a field's bits, right-aligned in `widest`
    bits = ((v >> (widest - 1 - place)) & 1).astype(np.uint8)  # [fields, widest]
    return np.packbits(bits[place >= widest - w]), np.cumsum(widths.sum(-1))


def decode_fields(get: Callable[[str], Any], name: str, row: int, count: int) -> np.ndarray:
    """The `count` fields of sample `row` of `encode_fields(name, ...)`: [count] int64, without a
    loop per field (the unary parts are the gaps between the zeros of their stream)."""
    mode, m = (int(x) for x in get(f"{name}_code")[:2])
    low = unpack_row(get(f"{name}_low")[row], m, count)
    if mode == PLAIN:
        return low
    high = np.diff(np.flatnonzero(_bits(get, f"{name}_high", f"{name}_end", row) == 0),
                   prepend=-1) - 1
    if mode == RICE:
        return high << m | low
    place = np.arange(max(int(high.max()), 1))  # as `_variable_width` laid them out
    bits = np.zeros((count, place.size), np.uint8)
    bits[place >= place.size - high[:, None]] = _bits(get, f"{name}_mid", f"{name}_mid_end", row)
    return ((1 << high) + _to_ints(bits) - 1) << m | low


def _bits(get: Callable[[str], Any], stream: str, ends: str, row: int) -> np.ndarray:
    """Sample `row`'s bits of a stream whose per-sample ends are `ends`."""
    where = get(ends)
    start, end = (int(where[row - 1]) if row else 0), int(where[row])
    return np.unpackbits(get(stream)[start // 8:(end + 7) // 8])[start % 8:start % 8 + end - start]


def _pack(fields: np.ndarray, width: int) -> np.ndarray:
    """[samples, ...] -> [samples, bytes], in groups of samples whose unpacked bits (a byte
    each) stay under 64 MiB."""
    flat = fields.reshape(fields.shape[0], -1)
    group = max(1, (64 << 20) // (32 * max(flat.shape[1], 1)))
    return np.concatenate([pack_rows(flat[i:i + group], width) for i in range(0, len(flat), group)])


@dataclass(frozen=True)
class Codec:
    """Encoding of top-k rows for a vocabulary, k and value width (see the module docstring)."""

    vocab_size: int
    k: int
    value_bits: int  # 2..16 quantized, or FLOAT_VALUES

    @property
    def levels(self) -> int:
        return (1 << self.value_bits) - 1

    @property
    def t_max(self) -> float:
        return -math.expm1(-U_MAX / COMPAND)

    # --------------------------------------------------------------------------- encode

    def encode(self, ids: np.ndarray, logp: np.ndarray, leftover: np.ndarray) -> dict[str, np.ndarray]:
        """One shard's arrays. ids [samples, seq, k] (distinct per position, any order), logp
        [samples, seq, k] float64 log-probabilities, leftover [samples, seq] float64."""
        ids = ids.astype(np.int32, copy=False)  # distinct per position: any sort is the same
        order = np.argsort(ids, axis=-1)
        ids = np.take_along_axis(ids, order, -1).astype(np.int64)
        logp = np.take_along_axis(logp, order, -1)
        gaps = np.diff(ids, axis=-1, prepend=-1) - 1  # >= 0
        out = {"leftover": leftover.astype(np.float32),
               **encode_fields("ids", gaps, id_bits(self.vocab_size))}
        if self.value_bits == FLOAT_VALUES:
            return {**out, "values": logp.astype(np.float32)}
        # codes counted down from the tail: most of a top-k is near its tail, so they are small
        return {**out, **encode_fields("values", self.levels - self.quantize(logp), self.value_bits)}

    def quantize(self, logp: np.ndarray) -> np.ndarray:
        """[..., k] float64 log-probabilities -> [..., k] integer codes of t (see module)."""
        u = (logp.max(-1, keepdims=True) - logp).astype(np.float32)  # float32: ample for 16 bits
        t = np.minimum(-np.expm1(u / np.float32(-COMPAND)), np.float32(self.t_max))
        return np.rint(t * np.float32(self.levels / self.t_max)).astype(np.int64)

    # --------------------------------------------------------------------------- decode

    def decode(self, get: Callable[[str], Any], row: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample `row` of a shard whose arrays `get(name)` gives (numpy arrays, or memory-mapped
        safetensors slices): (ids [seq, k] int64 ascending, logp [seq, k] float32)."""
        leftover = get("leftover")[row]
        seq = leftover.shape[0]
        gaps = decode_fields(get, "ids", row, seq * self.k).reshape(seq, self.k)
        ids = np.cumsum(gaps + 1, axis=-1) - 1
        if self.value_bits == FLOAT_VALUES:
            return ids, get("values")[row].reshape(seq, self.k)
        codes = self.levels - decode_fields(get, "values", row, seq * self.k).reshape(seq, self.k)
        return ids, self.dequantize(codes, leftover).astype(np.float32)

    def dequantize(self, codes: np.ndarray, leftover: np.ndarray) -> np.ndarray:
        """[..., k] codes and [...] leftover -> [..., k] float64 log-probs whose probabilities
        add up to 1 - leftover."""
        u = -COMPAND * np.log1p(-codes / self.levels * self.t_max)
        shift = np.log1p(-leftover.astype(np.float64)) - _logsumexp(-u)
        return shift[..., None] - u

    # --------------------------------------------------------------------------- the bound

    def error_bound(self, logp: np.ndarray, leftover: np.ndarray) -> np.ndarray:
        """[..., k] float64: eta_j, the most a decoded log-probability can differ from `logp`."""
        if self.value_bits == FLOAT_VALUES:
            return np.abs(logp) * np.finfo(np.float32).eps
        half_step = self.t_max / self.levels / 2
        u = logp.max(-1, keepdims=True) - logp
        inside = np.minimum(u, U_MAX)
        h = -COMPAND * np.log1p(-half_step * np.exp(inside / COMPAND)) + (u - inside)
        weights = np.exp(logp) / (1 - leftover[..., None])
        shift = np.log((weights * np.exp(h)).sum(-1, keepdims=True))
        return h + shift


def kd_bound(logp: np.ndarray, eta: np.ndarray, student_logq: np.ndarray) -> np.ndarray:
    """[...] the bound on the per-token change of the KD term (module docstring), from the true
    teacher log-probs [..., k], their bound eta and the student's log-probs at the same ids;
    |p~_j - p_j| <= p_j (e^eta_j - 1)."""
    change = np.exp(logp) * np.expm1(eta)
    q = np.exp(student_logq)
    return (change * (np.abs(logp - student_logq) + eta + 1)).sum(-1) + (q * eta).sum(-1)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(-1)
    return top + np.log(np.exp(x - top[..., None]).sum(-1))


# ------------------------------------------------------------------- cross-tokenizer statistics

# A store of a teacher with another tokenizer (`distill.cross_tokenizer`) holds, instead of top-k
# rows, the teacher's statistics of each student sample that the chunk term needs
# (distill/cross_tokenizer.py STATS), float32 as computed: "chunk_nll" and "chunk_ll" [samples,
# seq] (chunk k of the sample at k), "single_top" [samples, seq, k] (its top-k probabilities at the
# single-token chunks, 0 elsewhere). The version is the metadata's "cross_tokenizer.version";
# a store of another version is refused.
CHUNK_STATS_VERSION = 1
CHUNK_STATS = ("chunk_nll", "chunk_ll", "single_top")


def encode_chunk_stats(stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One shard's arrays of the chunk statistics (every name of CHUNK_STATS, [samples, ...])."""
    return {name: np.ascontiguousarray(stats[name], dtype=np.float32) for name in CHUNK_STATS}


def decode_chunk_stats(get: Callable[[str], Any], row: int) -> dict[str, np.ndarray]:
    """Sample `row`'s chunk statistics of a shard whose arrays `get(name)` gives."""
    return {name: np.asarray(get(name)[row], dtype=np.float32) for name in CHUNK_STATS}
