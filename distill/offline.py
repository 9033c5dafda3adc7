"""The `offline` schedule: teacher top-k logits exported once, read back during training.

`tools/export_teacher_logits.py` runs the teacher over the run's training samples and writes

    DIR/metadata.json               what the export is valid for (see `export_key`), k, samples
                                    covered, the teacher checkpoint's digest, the tokenizer, and
                                    every shard's file name, first sample, count, size and sha256
    DIR/shard_{i:05d}.safetensors   global samples [first, first + count), per sample and position:
        values     [count, seq, k] float32  the teacher's k largest raw logits, descending
        indices    [count, seq, k] int32    their global vocabulary ids
        logsumexp  [count, seq]    float32  logsumexp(teacher logits / T) over the real vocabulary
        checksum   [count]         int64    `token_checksum` of each sample's input ids

The leftover probability mass 1 - sum(top-k) follows from `logsumexp`, which is why it is stored:
`distill._topk.topk_divergence` compares k + 1 buckets, and with k = the vocabulary it equals the
divergence on full logits.

Rows are keyed by GLOBAL sample index: the training stream's sample g depends only on the data,
`data.seq_len` and `train.seed` (`engine.data.TokenBatches` draws samples one at a time), so one
export serves any DP degree, micro-batch size or global batch, as long as it covers
`train.steps * data.global_batch` samples. `check_offline_dir` compares the metadata with the run
at start-up (each shard's size: a stat, no read); `OfflineTeacher` serves each micro-batch's rows
and checks their token checksums. Each shard's sha256 is checked against metadata.json before the
first row is read from it (`ShardedRows`), for the whole step at its first micro-batch, so that
every rank that reads rows (the last stage's, all TP and DP ranks) meets an altered shard at the
same step, before the step's collectives, and stops with the same ConfigError (exit 2).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from distill.config import SINGLE_TEACHER
from distill.teacher import StageTeacher, TeacherOutputs, token_checksum
from engine import collectives as C
from engine.checkpoint import METADATA as CHECKPOINT_METADATA
from engine.checkpoint import resolve_checkpoint
from engine.checkpoint_files import CheckpointError, read_json, safe_child, sha256_of, verify_file
from engine.config import ConfigError
from engine.data import DataConfig, TokenBatches, resolve_data_path

FORMAT = "megadistill-offline-teacher"
VERSION = 1
METADATA = "metadata.json"
FIELDS = ("values", "indices", "logsumexp", "checksum")  # tensors of every shard
KEY = "distill.offline_dir"  # the config key every start-up error names
_OPEN_SHARDS = 4  # shards a reader keeps memory-mapped at once

# The run settings an export is valid for: metadata key -> the config key a user would change.
_RUN_KEYS = {"seq_len": "data.seq_len", "seed": "train.seed",
             "temperature": "distill.logit.temperature", "vocab_size": "model.vocab_size",
             "data_digest": "data.path / data.split"}


class OfflineTeacherError(RuntimeError):
    """The exported rows do not belong to the micro-batch being trained."""


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


# ------------------------------------------------------------------------------ top-k under TP

def teacher_topk(logits_shard: torch.Tensor, *, k: int, vocab_size: int, temperature: float,
                 group: C.Group = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest logits of the FULL vocabulary and logsumexp(logits / temperature).

    `logits_shard` [..., V/tp]: this rank's contiguous vocabulary shard (rank r holds columns
    r*V/tp ..); columns at or past `vocab_size` (padding) are excluded. Returns values [..., k]
    float32 (raw logits, descending), global indices [..., k] int32 and logsumexp [...] float32,
    the same on every rank. One all_gather of [tokens, 2k + 1]: each rank's k best candidates
    and its local log-sum-exp; the vocabulary is never gathered.
    """
    lead, width = logits_shard.shape[:-1], logits_shard.shape[-1]
    offset = C.group_rank(group) * width
    valid = max(0, min(width, vocab_size - offset))  # real-vocabulary columns of this shard
    x = logits_shard.reshape(-1, width)[:, :valid]  # [tokens, valid]
    candidates = torch.full((x.shape[0], 2 * k + 1), float("-inf"), dtype=torch.float64,
                            device=x.device)  # [tokens, k values | k indices | local lse]
    candidates[:, k:2 * k] = -1  # no column: a rank with fewer than k real columns
    if valid:
        values, indices = x.topk(min(k, valid), dim=-1)
        candidates[:, :values.shape[-1]] = values.to(torch.float64)
        candidates[:, k:k + values.shape[-1]] = (indices + offset).to(torch.float64)
        scaled = x.to(torch.promote_types(x.dtype, torch.float32)) / temperature
        candidates[:, -1] = torch.logsumexp(scaled, dim=-1).to(torch.float64)
    gathered = C.all_gather(candidates[None], group, dim=0)  # [tp, tokens, 2k + 1]
    pool = gathered.permute(1, 0, 2)  # [tokens, tp, 2k + 1]
    pool_values = pool[..., :k].reshape(x.shape[0], -1)  # [tokens, tp * k]
    pool_indices = pool[..., k:2 * k].reshape(x.shape[0], -1)
    values, where = pool_values.topk(k, dim=-1)
    indices = pool_indices.gather(-1, where)
    lse = torch.logsumexp(pool[..., -1], dim=-1)
    return (values.float().reshape(*lead, k), indices.to(torch.int32).reshape(*lead, k),
            lse.float().reshape(lead))


def sample_checksums(input_ids: torch.Tensor) -> torch.Tensor:
    """[batch] int64: `token_checksum` of each sample's [seq] token ids."""
    return torch.cat([token_checksum(row) for row in input_ids.cpu()])


# ------------------------------------------------------------------------------ what it is for

def data_fingerprint(data_cfg: DataConfig) -> dict[str, Any]:
    """What decides the sample stream besides seq_len and seed: the split and, per blended
    dataset, its weight, the digest of its .idx (document lengths) and its .bin size. Paths are
    left out so that a moved or rebuilt-identical dataset still matches."""
    sources = [{"weight": weight, "idx_sha256": sha256_of(Path(prefix + ".idx")),
                "bin_bytes": Path(prefix + ".bin").stat().st_size}
               for weight, prefix in resolve_data_path(data_cfg)]
    return {"split": data_cfg.split, "sources": sources}


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def export_key(data_cfg: DataConfig, *, seed: int, temperature: float,
               vocab_size: int) -> dict[str, Any]:
    """The run settings that rows depend on; an export and a run must agree on all of them."""
    return {"seq_len": data_cfg.seq_len, "seed": seed, "temperature": temperature,
            "vocab_size": vocab_size, "data_digest": _digest(data_fingerprint(data_cfg))}


def tokenizer_record(data_cfg: DataConfig) -> list[dict[str, str] | None]:
    """Per dataset, the `tokenizer.json` next to it (the bundled corpus keeps one), or None.
    Provenance only: a different tokenizer already changes the data digest."""
    records = []
    for _, prefix in resolve_data_path(data_cfg):
        path = Path(prefix).parent / "tokenizer.json"
        records.append({"path": str(path), "sha256": sha256_of(path)} if path.is_file() else None)
    return records


# ------------------------------------------------------------------------------ start-up checks

def read_metadata(directory: str | Path) -> dict[str, Any]:
    """The export's metadata.json, checked for format; `ConfigError(distill.offline_dir)`."""
    path = Path(directory).expanduser() / METADATA
    if not path.is_file():
        raise ConfigError(KEY, f"no teacher export at {directory} ({path} not found; write one "
                               "with tools/export_teacher_logits.py)")
    try:
        meta = read_json(path)
    except CheckpointError as err:
        raise ConfigError(KEY, str(err)) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ConfigError(KEY, f"{path} is not a {FORMAT} version {VERSION} export")
    return meta


def _same(saved: Any, wanted: Any) -> bool:
    if isinstance(saved, float) or isinstance(wanted, float):
        return isinstance(saved, (int, float)) and math.isclose(saved, wanted, rel_tol=1e-12)
    return saved == wanted


def check_offline_dir(directory: str, *, wanted: dict[str, Any], samples: int,
                      teacher: str | None) -> dict[str, Any]:
    """Start-up check (before any process group) that `distill.offline_dir` was exported for this
    run: the same settings (`wanted`, the run's `export_key`), at least `samples` samples
    (train.steps * data.global_batch), the run's `teacher` checkpoint if it names one, every shard
    present at its recorded size. Returns the metadata; raises one-line `ConfigError`s."""
    meta = read_metadata(directory)
    for name, config_key in _RUN_KEYS.items():
        saved = meta.get(name)
        if not _same(saved, wanted[name]):
            shown = [str(v)[:12] if name == "data_digest" else repr(v)
                     for v in (saved, wanted[name])]
            raise ConfigError(KEY, f"{directory} was exported for {config_key} = {shown[0]} but "
                                   f"this run has {shown[1]}")
    if meta["samples"] < samples:
        raise ConfigError(KEY, f"{directory} covers {meta['samples']} samples but this run needs "
                               f"train.steps * data.global_batch = {samples}")
    if teacher:
        _check_teacher(teacher, meta, directory)
    _check_shards(Path(directory).expanduser(), meta)
    return meta


def teacher_digest(checkpoint: Path) -> str:
    """A teacher checkpoint's identity: the sha256 of its metadata.json, which records the size
    and sha256 of every file of the checkpoint."""
    return sha256_of(checkpoint / CHECKPOINT_METADATA)


def _check_teacher(teacher: str, meta: dict[str, Any], directory: str) -> None:
    digest = teacher_digest(resolve_checkpoint(teacher, key="distill.teacher"))
    if digest != meta["teacher"]["digest"]:
        raise ConfigError(KEY, f"{directory} was exported from teacher {meta['teacher']['path']}, "
                               f"not from distill.teacher = {teacher} (checkpoint digests differ)")


def _check_shards(directory: Path, meta: dict[str, Any]) -> None:
    for record in meta["shards"]:
        try:
            path = safe_child(directory, record["file"])
        except CheckpointError as err:
            raise ConfigError(KEY, str(err)) from None
        if not path.is_file() or path.stat().st_size != record["size"]:
            raise ConfigError(KEY, f"{path} is missing or altered (metadata records "
                                   f"{record['size']} bytes)")


# ------------------------------------------------------------------------------ serving rows

class ShardedRows:
    """Rows of an export by global sample index, read lazily from memory-mapped shards, each
    verified against its metadata record (size and sha256) before its first read: an altered
    shard is a `ConfigError(key)` naming the file."""

    def __init__(self, directory: str | Path, meta: dict[str, Any], *, key: str = KEY):
        self.directory, self.key = Path(directory).expanduser(), key
        self.per_shard, self.samples = meta["samples_per_shard"], meta["samples"]
        self.records = meta["shards"]  # file, first, count, size, sha256 of each shard
        self._open: OrderedDict[int, Any] = OrderedDict()  # shard -> safe_open handle
        self._verified: set[int] = set()

    def verify(self, samples: range) -> None:
        """Check the digest of every shard holding some of `samples` (each shard once)."""
        last = min(samples.stop, self.samples) - 1
        for shard in range(max(samples.start, 0) // self.per_shard, last // self.per_shard + 1):
            self._verify(shard)

    def _verify(self, shard: int) -> None:
        if shard in self._verified:
            return
        record = self.records[shard]
        try:
            verify_file(safe_child(self.directory, record["file"]), record)
        except CheckpointError as err:
            raise ConfigError(self.key, f"{err}; export it again with "
                                        "tools/export_teacher_logits.py") from None
        self._verified.add(shard)

    def _handle(self, shard: int):
        if shard not in self._open:
            self._verify(shard)
            if len(self._open) == _OPEN_SHARDS:
                self._open.popitem(last=False)
            self._open[shard] = safe_open(str(self.directory / self.records[shard]["file"]),
                                          framework="pt")
        self._open.move_to_end(shard)
        return self._open[shard]

    def close(self) -> None:
        self._open.clear()

    def rows(self, samples: range) -> dict[str, torch.Tensor]:
        """Every field for the consecutive global samples `samples`, stacked along dim 0."""
        if samples.start < 0 or samples.stop > self.samples:
            raise OfflineTeacherError(f"samples [{samples.start}, {samples.stop}) are outside the "
                                      f"{self.samples} samples of the export {self.directory}")
        parts, first = [], samples.start
        while first < samples.stop:
            shard, row = divmod(first, self.per_shard)
            take = min(samples.stop - first, self.per_shard - row)
            handle = self._handle(shard)
            parts.append({name: handle.get_slice(name)[row:row + take] for name in FIELDS})
            first += take
        return {name: torch.cat([part[name] for part in parts]) for name in FIELDS}


class OfflineTeacher:
    """Teacher source (`distill.teacher.TeacherSource`) of the `offline` schedule:
    `teacher(micro_batch)` returns the exported top-k values, indices and logsumexp of that
    micro-batch's samples, as teacher `name`'s outputs. Under PP the last stage reads them.

    Which samples: `data` (this rank's TokenBatches) has just drawn the step being trained, so
    the step starts at global sample `data.consumed_samples - global_batch`, and the trainer asks
    for the step's micro-batches in order; micro-batch m of DP rank r holds samples
    m*mb*dp + r*mb + [0, mb) of the step (TokenBatches' order). Each row's stored token checksum
    must match the micro-batch, so a stream that drifted from the export stops the run.
    """

    reaches_every_stage = False

    def __init__(self, directory: str | Path, *, data: TokenBatches,
                 device: torch.device | str = "cpu", name: str = SINGLE_TEACHER, key: str = KEY):
        self.name = name
        self.store = ShardedRows(directory, read_metadata(directory), key=key)
        self.data, self.device = data, torch.device(device)
        self._step_first = -1  # first global sample of the step being served
        self._micro = 0  # micro-batches of that step served so far

    def _samples(self, batch: int) -> range:
        cfg, data = self.data.cfg, self.data
        step_first = data.consumed_samples - cfg.global_batch
        if step_first != self._step_first:
            self._step_first, self._micro = step_first, 0
            # the whole step's shards, not this rank's: every rank fails at the same step or none
            self.store.verify(range(step_first, step_first + cfg.global_batch))
        first = step_first + (self._micro * data.dp + data.dp_rank) * cfg.micro_batch
        self._micro += 1
        return range(first, first + batch)

    def __call__(self, micro_batch: dict[str, torch.Tensor]) -> dict[str, TeacherOutputs]:
        input_ids = micro_batch["input_ids"]  # [mb, seq]
        samples = self._samples(input_ids.shape[0])
        rows = self.store.rows(samples)
        if rows["values"].shape[1] != input_ids.shape[1] or \
                not torch.equal(rows["checksum"], sample_checksums(input_ids)):
            raise OfflineTeacherError(
                f"exported rows of samples [{samples.start}, {samples.stop}) hold other tokens "
                "than this micro-batch: the export and the training data are misaligned")
        return {self.name: TeacherOutputs(topk_values=rows["values"].to(self.device),
                                          topk_indices=rows["indices"].to(self.device, torch.int64),
                                          logsumexp=rows["logsumexp"].to(self.device))}

    def stage_parts(self) -> dict[str, StageTeacher]:
        return {}

    def end_step(self, *, stop: bool) -> None:
        pass  # rows are read on demand; nothing runs ahead

    def close(self) -> None:
        self.store.close()
