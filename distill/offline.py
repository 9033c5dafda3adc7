"""The `offline` schedule: a teacher store keyed by the dataset's sample map, read during training.

`tools/export_teacher_logits.py` runs the teacher once over a dataset's samples (the sample map of
engine/data/dataset.py: window w of a split, whatever a run's seed, batch sizes or layout) and
writes

    DIR/metadata.json                 what the store is valid for and where each sample is:
        format, version, seq_len, vocab_size, temperature, k, value_bits, data_digest (the split
        and each dataset's .idx digest and .bin size), tokenizer (sha256 of the tokenizer.json
        files beside the datasets, or null), teacher {path, digest (its weights' digest), bf16},
        samples_per_shard, splits {train|valid: {map_samples, shards: [{file, index, first,
        count, size, sha256}]}}
    DIR/{split}_{index:05d}.safetensors   samples [index * samples_per_shard, + count) of the
        split's sample map, encoded as distill/offline_codec.py says: top-k ids Rice-coded,
        log-probabilities at the export's temperature quantized (or float32), the leftover mass
        1 - sum(top-k) in float32, and each sample's token checksum. A store of a teacher with
        another tokenizer (`distill.cross_tokenizer`; metadata "cross_tokenizer": the version of
        its encoding, teacher_seq_len and the paired data's digest, `cross_store_key`) holds
        instead the teacher's chunk statistics of each student sample (offline_codec.py
        CHUNK_STATS) and the checksum of its student tokens.

A run checks the metadata against its own settings at start-up (one ConfigError naming the field
on a mismatch; every sample the run will draw must be in the store), then each rank looks its
micro-batches' samples up by sample-map index (`TokenBatches.step_sample_ids`): any seed, DP, PP,
global or micro batch, or curriculum reads the same store. Shards are memory-mapped and each one's
sha256 is checked before its first read, for the whole step at its first micro-batch, so that
every rank meets an altered shard at the same step and stops with the same ConfigError (exit 2).
The store replaces the per-run export format of earlier versions (version 1), which is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from distill.config import SINGLE_TEACHER
from distill.offline_codec import CHUNK_STATS_VERSION, FLOAT_VALUES, VALUE_BITS, Codec, decode_chunk_stats
from distill.teacher import StageTeacher, TeacherOutputs, token_checksum
from engine import collectives as C
from engine.checkpoint import open_checkpoint
from engine.checkpoint_files import CheckpointError, read_json, safe_child, sha256_of, verify_file
from engine.config import ConfigError
from engine.data import DataConfig, TokenBatches, resolve_data_path
from engine.data.paired import PAIRED_SUFFIXES
from engine.parallel import ParallelLayout
from layers.context import CP_CHUNKS, cp_positions

FORMAT = "megadistill-teacher-store"
VERSION = 2
METADATA = "metadata.json"
KEY = "distill.offline_dir"  # the config key every start-up error names
_OPEN_SHARDS = 64  # shards a reader keeps memory-mapped at once (file handles)

# Settings a store is valid for: metadata key -> the config key a user would change.
_RUN_KEYS = {"seq_len": "data.seq_len", "vocab_size": "model.vocab_size",
             "data_digest": "data.path / data.split",
             "tokenizer": "the tokenizer (tokenizer.json beside data.path)",
             "temperature": "distill.logit.temperature"}


class OfflineTeacherError(RuntimeError):
    """The stored rows do not belong to the micro-batch being trained."""


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.safetensors"


# ------------------------------------------------------------------------------ top-k under TP

def teacher_topk(logits_shard: torch.Tensor, *, k: int, vocab_size: int, temperature: float,
                 group: C.Group = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest logits of the FULL vocabulary and logsumexp(logits / temperature).

    `logits_shard` [..., V/tp]: this rank's contiguous vocabulary shard (rank r holds columns
    r*V/tp ..); columns at or past `vocab_size` (padding) are excluded. Returns values [..., k]
    float32 (raw logits, descending), global indices [..., k] int32 and logsumexp [...] float64,
    the same on every rank. One all_gather of [tokens, 2k + 1]: each rank's k best candidates
    and its local log-sum-exp; the vocabulary is never gathered.
    """
    lead, width = logits_shard.shape[:-1], logits_shard.shape[-1]
    offset = C.group_rank(group) * width
    valid = max(0, min(width, vocab_size - offset))  # real-vocabulary columns of this shard
    x = logits_shard.reshape(-1, width)[:, :valid]  # [tokens, valid]
    if C.group_size(group) == 1:  # the whole vocabulary is here
        values, indices = x.topk(k, dim=-1)
        return (values.float().reshape(*lead, k), indices.to(torch.int32).reshape(*lead, k),
                _logsumexp64(x / temperature).reshape(lead))
    candidates = torch.full((x.shape[0], 2 * k + 1), float("-inf"), dtype=torch.float64,
                            device=x.device)  # [tokens, k values | k indices | local lse]
    candidates[:, k:2 * k] = -1  # no column: a rank with fewer than k real columns
    if valid:
        values, indices = x.topk(min(k, valid), dim=-1)
        candidates[:, :values.shape[-1]] = values.to(torch.float64)
        candidates[:, k:k + values.shape[-1]] = (indices + offset).to(torch.float64)
        candidates[:, -1] = _logsumexp64(x / temperature)
    gathered = C.all_gather(candidates[None], group, dim=0)  # [tp, tokens, 2k + 1]
    pool = gathered.permute(1, 0, 2)  # [tokens, tp, 2k + 1]
    pool_values = pool[..., :k].reshape(x.shape[0], -1)  # [tokens, tp * k]
    pool_indices = pool[..., k:2 * k].reshape(x.shape[0], -1)
    values, where = pool_values.topk(k, dim=-1)
    indices = pool_indices.gather(-1, where)
    lse = torch.logsumexp(pool[..., -1], dim=-1)
    return (values.float().reshape(*lead, k), indices.to(torch.int32).reshape(*lead, k),
            lse.reshape(lead))


def _logsumexp64(scaled: torch.Tensor) -> torch.Tensor:
    """[tokens] float64 log-sum-exp of [tokens, n]: exponentials in the input's precision after
    the max is taken out (each term then has its float32 relative error), summed in float64."""
    top = scaled.amax(-1, keepdim=True)
    return top.squeeze(-1).double() + torch.exp(scaled - top).sum(-1, dtype=torch.float64).log()


def topk_logprobs(values: torch.Tensor, lse: torch.Tensor, *, temperature: float,
                  vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(log-probs [..., k] float64, leftover mass [...] float64) at `temperature` of `teacher_topk`'s
    raw values and float64 log-sum-exp; the leftover is 1 - sum(top-k), 0 when k is the vocabulary."""
    logp = values.double() / temperature - lse.double()[..., None]
    if values.shape[-1] == vocab_size:
        return logp.numpy(), np.zeros(lse.shape)
    leftover = (-torch.expm1(logp.logsumexp(-1))).clamp(0.0, 1.0)
    return logp.numpy(), leftover.numpy()


def sample_checksums(input_ids: torch.Tensor) -> torch.Tensor:
    """[batch] int64: `token_checksum` of each sample's [seq] token ids."""
    return torch.cat([token_checksum(row) for row in input_ids.cpu()])


def chunk_checksums(input_ids: torch.Tensor, positions: torch.Tensor, group) -> torch.Tensor:
    """`sample_checksums` of whole samples from each CP rank's tokens `[batch, seq/cp]` at global
    `positions` `[seq/cp]`: the checksum is a position-weighted sum, so each rank adds its tokens'
    terms and the CP group sums them (one small all-reduce)."""
    weights = (positions.cpu().to(torch.int64) + 1) % 1_000_003  # token_checksum's weights
    partial = ((input_ids.cpu().to(torch.int64) + 1) * weights).sum(dim=1)
    return C.all_reduce(partial, group) % 2_147_483_647


# ------------------------------------------------------------------------------ what it is for

def data_fingerprint(data_cfg: DataConfig) -> dict[str, Any]:
    """What decides the sample map besides seq_len: the split and, per dataset in data.path order,
    the digest of its .idx (document lengths) and its .bin size. Blend weights only order the
    stream and paths may move, so neither is in it."""
    sources = [{"idx_sha256": sha256_of(Path(prefix + ".idx")),
                "bin_bytes": Path(prefix + ".bin").stat().st_size}
               for _, prefix in resolve_data_path(data_cfg)]
    return {"split": data_cfg.split, "sources": sources}


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def tokenizer_digest(data_cfg: DataConfig) -> str | None:
    """sha256 over the `tokenizer.json` files beside the datasets (the bundled corpus keeps one);
    None when there is none."""
    digests = []
    for _, prefix in resolve_data_path(data_cfg):
        path = Path(prefix).parent / "tokenizer.json"
        digests.append(sha256_of(path) if path.is_file() else None)
    return None if all(d is None for d in digests) else _digest(digests)


def store_key(data_cfg: DataConfig, *, temperature: float, vocab_size: int) -> dict[str, Any]:
    """The settings that stored rows depend on; a store and a run must agree on all of them."""
    return {"seq_len": data_cfg.seq_len, "vocab_size": vocab_size,
            "tokenizer": tokenizer_digest(data_cfg), "temperature": temperature,
            "data_digest": _digest(data_fingerprint(data_cfg))}


def cross_store_key(data_cfg: DataConfig, *, teacher_tokens: int) -> dict[str, Any]:
    """What the chunk statistics of a store of a teacher with another tokenizer (metadata
    "cross_tokenizer") depend on besides `store_key`: their encoding's version, the teacher's
    tokens per window (distill.cross_tokenizer.teacher_seq_len) and the paired data (the digest
    of each paired dataset's .idx and its .bin size, engine/data/paired.py)."""
    paired = [{"idx_sha256": sha256_of(Path(prefix + suffix + ".idx")),
               "bin_bytes": Path(prefix + suffix + ".bin").stat().st_size}
              for _, prefix in resolve_data_path(data_cfg) for suffix in PAIRED_SUFFIXES]
    return {"version": CHUNK_STATS_VERSION, "teacher_seq_len": teacher_tokens,
            "paired_digest": _digest(paired)}


def check_cross_store(directory: str, meta: dict[str, Any], wanted: dict[str, Any] | None, *,
                      top_k: int) -> None:
    """A store's chunk statistics against the run's `cross_store_key` (None: a run whose
    teacher shares its tokenizer) and uld's `top_k` (0: not uld): one-line ConfigErrors."""
    saved = meta.get("cross_tokenizer")
    if wanted is None or saved is None:
        if wanted is not None or saved is not None:
            what = ("chunk statistics of a teacher with another tokenizer", "none") \
                if saved is not None else ("top-k logits of a teacher with the student's "
                                           "tokenizer", "a cross-tokenizer loss")
            raise ConfigError(KEY, f"{directory} holds {what[0]} but this run has "
                                   f"distill.cross_tokenizer.loss = {what[1]}")
        return
    names = {"version": "the chunk statistics' version",
             "teacher_seq_len": "distill.cross_tokenizer.teacher_seq_len",
             "paired_digest": "the paired data (data.path's teacher files)"}
    for name, what in names.items():
        if saved.get(name) != wanted[name]:
            raise ConfigError(KEY, f"{directory} was exported for {what} = "
                                   f"{_shown(name, saved.get(name))} but this run has "
                                   f"{_shown(name, wanted[name])}")
    if top_k > meta["k"]:
        raise ConfigError(KEY, f"{directory} holds the teacher's top-{meta['k']} probabilities "
                               f"but this run has distill.cross_tokenizer.uld_top_k = {top_k}")


def teacher_digest(path: str | Path, *, key: str = "distill.teacher") -> str:
    """A teacher checkpoint's identity: the digest of its weights (a copy has the same)."""
    return open_checkpoint(path, key=key).weights_digest


# ------------------------------------------------------------------------------ start-up checks

def read_metadata(directory: str | Path, *, key: str = KEY) -> dict[str, Any]:
    """The store's metadata.json, checked for format; `ConfigError(key)`."""
    path = Path(directory).expanduser() / METADATA
    if not path.is_file():
        raise ConfigError(key, f"no teacher store at {directory} ({path} not found; write one "
                               "with tools/export_teacher_logits.py)")
    try:
        meta = read_json(path)
    except CheckpointError as err:
        raise ConfigError(key, str(err)) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ConfigError(key, f"{path} is not a {FORMAT} version {VERSION} store (a per-run "
                               "export of an earlier version? export it again)")
    return meta


def _same(saved: Any, wanted: Any) -> bool:
    if isinstance(saved, float) or isinstance(wanted, float):
        return isinstance(saved, (int, float)) and math.isclose(saved, wanted, rel_tol=1e-12)
    return saved == wanted


def _shown(name: str, value: Any) -> str:
    return str(value)[:12] if name in ("data_digest", "tokenizer", "digest", "paired_digest") \
        else repr(value)


def check_offline_dir(directory: str, *, wanted: dict[str, Any], needed: Callable[[], np.ndarray],
                      teacher: str | None, k: int = 0, cross: dict[str, Any] | None = None,
                      uld_top_k: int = 0) -> dict[str, Any]:
    """Start-up check (before any process group) that `directory` serves this run: the same
    settings (`wanted`, the run's `store_key`; with another tokenizer `cross`, its
    `cross_store_key`, and uld's `uld_top_k`), the run's `teacher` checkpoint if it names one, `k`
    if > 0, every train sample the run will draw (`needed()`, sample-map indices; only called when
    the store holds part of the map) in a shard present at its recorded size. Returns the
    metadata; raises one-line `ConfigError`s naming the field."""
    meta = read_metadata(directory)
    check_cross_store(directory, meta, cross, top_k=uld_top_k)
    for name, config_key in _RUN_KEYS.items():
        if not _same(meta.get(name), wanted[name]):
            raise ConfigError(KEY, f"{directory} was exported for {config_key} = "
                                   f"{_shown(name, meta.get(name))} but this run has "
                                   f"{_shown(name, wanted[name])}")
    if k and meta["k"] != k:
        raise ConfigError(KEY, f"{directory} holds the top-{meta['k']} but this run has "
                               f"distill.offline_top_k = {k}")
    if teacher and teacher_digest(teacher) != meta["teacher"]["digest"]:
        raise ConfigError(KEY, f"{directory} was exported from teacher {meta['teacher']['path']}, "
                               f"not from distill.teacher = {teacher} (weights digests differ)")
    store = TeacherStore(directory, meta)
    store.check_sizes("train")
    if store.covered("train") < store.map_samples("train"):
        store.require("train", needed(), error=ConfigError)
    return meta


# ------------------------------------------------------------------------------ serving rows

class TeacherStore:
    """A store's rows by (split, sample-map index), decoded from memory-mapped shards, each
    verified against its metadata record (size and sha256) before its first read: an altered
    shard is a `ConfigError(key)` naming the file."""

    def __init__(self, directory: str | Path, meta: dict[str, Any] | None = None, *,
                 key: str = KEY):
        self.directory, self.key = Path(directory).expanduser(), key
        self.meta = meta if meta is not None else read_metadata(directory, key=key)
        bits = self.meta["value_bits"]
        if bits != FLOAT_VALUES and bits not in VALUE_BITS:
            raise ConfigError(key, f"{self.directory / METADATA} has value_bits {bits}")
        self.codec = Codec(self.meta["vocab_size"], self.meta["k"], bits)
        self.per_shard = self.meta["samples_per_shard"]
        self.records = {split: {r["index"]: r for r in section["shards"]}
                        for split, section in self.meta["splits"].items()}
        self._open: OrderedDict[tuple[str, int], Any] = OrderedDict()  # -> safe_open handle
        self._verified: set[tuple[str, int]] = set()

    def map_samples(self, split: str) -> int:
        return self.meta["splits"][split]["map_samples"] if split in self.meta["splits"] else 0

    def covered(self, split: str) -> int:
        return sum(r["count"] for r in self.records.get(split, {}).values())

    def require(self, split: str, ids: np.ndarray, *, error: type[Exception]) -> None:
        """Every sample of `ids` is in the store, or `error` naming the first missing one."""
        ids = np.asarray(ids, dtype=np.int64)
        present = np.array([int(i) // self.per_shard in self.records.get(split, {})
                            for i in np.unique(ids)], dtype=bool)
        missing = np.unique(ids)[~present] if ids.size else ids
        if missing.size:
            message = (f"{self.directory} holds {self.covered(split)} of the "
                       f"{self.map_samples(split)} {split} samples, not sample {int(missing[0])} "
                       "that this run draws (export the whole split, or more --samples)")
            raise ConfigError(self.key, message) if error is ConfigError else error(message)

    def check_sizes(self, split: str) -> None:
        """Every shard of `split` present at its recorded size (a stat, no read)."""
        for record in self.records.get(split, {}).values():
            path = self._path(record)
            if not path.is_file() or path.stat().st_size != record["size"]:
                raise ConfigError(self.key, f"{path} is missing or altered (metadata records "
                                            f"{record['size']} bytes)")

    def _path(self, record: dict[str, Any]) -> Path:
        try:
            return safe_child(self.directory, record["file"])
        except CheckpointError as err:
            raise ConfigError(self.key, str(err)) from None

    def verify(self, split: str, ids: np.ndarray) -> None:
        """Check the digest of every shard holding some of `ids` (each shard once)."""
        for shard in np.unique(np.asarray(ids, dtype=np.int64) // self.per_shard):
            self._verify(split, int(shard))

    def _verify(self, split: str, shard: int) -> None:
        if (split, shard) in self._verified:
            return
        try:
            verify_file(self._path(self.records[split][shard]), self.records[split][shard])
        except CheckpointError as err:
            raise ConfigError(self.key, f"{err}; export it again with "
                                        "tools/export_teacher_logits.py") from None
        self._verified.add((split, shard))

    def _handle(self, split: str, shard: int):
        if (split, shard) not in self._open:
            self._verify(split, shard)
            if len(self._open) == _OPEN_SHARDS:
                self._open.popitem(last=False)
            self._open[split, shard] = safe_open(str(self._path(self.records[split][shard])),
                                                 framework="numpy")
        self._open.move_to_end((split, shard))
        return self._open[split, shard]

    def close(self) -> None:
        self._open.clear()

    def sample(self, split: str, index: int) -> dict[str, np.ndarray]:
        """One sample: ids [seq, k] int64 (ascending), logp [seq, k] float32 (log-probabilities
        at the store's temperature), leftover [seq] float32, checksum [] int64; of a store of
        chunk statistics (metadata "cross_tokenizer"), those (offline_codec.CHUNK_STATS) and
        the checksum."""
        shard, row = divmod(index, self.per_shard)
        if shard not in self.records.get(split, {}) or row >= self.records[split][shard]["count"]:
            raise OfflineTeacherError(f"sample {index} of the {split} split is not in the store "
                                      f"{self.directory}")
        handle = self._handle(split, shard)
        checksum = np.int64(handle.get_slice("checksum")[row])
        if "cross_tokenizer" in self.meta:
            return {**decode_chunk_stats(handle.get_slice, row), "checksum": checksum}
        ids, logp = self.codec.decode(handle.get_slice, row)
        leftover = handle.get_slice("leftover")[row]
        return {"ids": ids, "logp": logp, "leftover": leftover, "checksum": checksum}

    def rows(self, split: str, ids: np.ndarray) -> dict[str, torch.Tensor]:
        """`sample` of each of `ids`, stacked along dim 0, as tensors (a store of chunk
        statistics: the CHUNK_STATS of each, and its checksum)."""
        parts = [self.sample(split, int(i)) for i in ids]
        return {name: torch.from_numpy(np.stack([p[name] for p in parts])) for name in parts[0]}


class OfflineTeacher:
    """Teacher source (`distill.teacher.TeacherSource`) of the `offline` schedule:
    `teacher(micro_batch)` returns the stored top-k of that micro-batch's samples, as teacher
    `name`'s outputs (values = log-probabilities x T with a log-normalizer of 0, which the top-k
    divergence reads as the stored log-probabilities). Under PP the last stage reads them.

    With another tokenizer (`chunk_stats`, the loss's STATS): the stored chunk statistics of the
    samples instead, uld's top probabilities cut to `uld_top_k` (a top-k sorted decreasing
    holds every smaller one); `OtherTokenizerTeacher(prepared=True)` adds the alignment.

    Which samples: `data` (this rank's TokenBatches) has just drawn the step being trained, whose
    sample-map indices are `data.step_sample_ids`, and the trainer asks for the step's
    micro-batches in order; micro-batch m of DP rank r holds the step's samples m*mb*dp + r*mb +
    [0, mb) (TokenBatches' order). Each row's stored token checksum must match the micro-batch,
    so a store of other data stops the run.
    """

    reaches_every_stage = False

    def __init__(self, directory: str | Path, *, data: TokenBatches, temperature: float,
                 device: torch.device | str = "cpu", name: str = SINGLE_TEACHER, key: str = KEY,
                 chunk_stats: tuple[str, ...] = (), uld_top_k: int = 0,
                 layout: ParallelLayout | None = None):
        """`layout`: under context parallelism each rank reads its chunks of the stored rows."""
        self.name, self.temperature = name, temperature
        self.chunk_stats, self.uld_top_k = chunk_stats, uld_top_k  # another tokenizer's
        self.layout = layout or ParallelLayout.single(device)
        self.store = TeacherStore(directory, key=key)
        self.data, self.device = data, torch.device(device)
        self._step_first = -1  # first global sample of the step being served
        self._micro = 0  # micro-batches of that step served so far

    def _samples(self, batch: int) -> np.ndarray:
        cfg, data = self.data.cfg, self.data
        step_first = data.consumed_samples - cfg.global_batch
        if step_first != self._step_first:
            self._step_first, self._micro = step_first, 0
            # the whole step's shards, not this rank's: every rank fails at the same step or none
            self.store.require("train", data.step_sample_ids, error=OfflineTeacherError)
            self.store.verify("train", data.step_sample_ids)
        first = (self._micro * data.dp + data.dp_rank) * cfg.micro_batch
        self._micro += 1
        return data.step_sample_ids[first:first + batch]

    def __call__(self, micro_batch: dict[str, torch.Tensor]) -> dict[str, TeacherOutputs]:
        input_ids = micro_batch["input_ids"]  # [mb, seq], or [mb, seq/cp]: this rank's chunks
        samples = self._samples(input_ids.shape[0])
        rows = self.store.rows("train", samples)
        checksums = sample_checksums
        if micro_batch.get(CP_CHUNKS, False):  # (another tokenizer's stores never run under CP)
            layout = self.layout
            chunks = cp_positions(rows["logp"].shape[1], layout.cp, layout.cp_rank)
            rows = {**{name: rows[name][:, chunks] for name in ("ids", "logp", "leftover")},
                    "checksum": rows["checksum"]}

            def checksums(ids: torch.Tensor) -> torch.Tensor:
                return chunk_checksums(ids, chunks, layout.cp_group)
        if rows["logp" if not self.chunk_stats else "chunk_nll"].shape[1] != input_ids.shape[1] \
                or not torch.equal(rows["checksum"], checksums(input_ids)):
            raise OfflineTeacherError(
                f"stored rows of samples {samples.tolist()} hold other tokens than this "
                "micro-batch: the store and the training data are misaligned")
        if self.chunk_stats:  # the top of the stored top-k is uld's (sorted decreasing)
            stats = {name: rows[name].to(self.device) for name in self.chunk_stats}
            if "single_top" in stats:
                stats["single_top"] = stats["single_top"][..., :self.uld_top_k]
            return {self.name: TeacherOutputs(chunk_stats=stats)}
        logp = rows["logp"].to(self.device)  # [mb, seq, k]
        return {self.name: TeacherOutputs(topk_values=logp * self.temperature,
                                          topk_indices=rows["ids"].to(self.device),
                                          logsumexp=torch.zeros(logp.shape[:-1],
                                                                device=self.device))}

    def stage_parts(self) -> dict[str, StageTeacher]:
        return {}

    def end_step(self, *, stop: bool) -> None:
        pass  # rows are read on demand; nothing runs ahead

    def close(self) -> None:
        self.store.close()
