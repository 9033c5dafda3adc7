"""Training samples: fixed-length windows over blended indexed datasets, sharded over DP ranks.

The sample map: per dataset and split, the split's documents in index order are packed into one
token stream, cut into windows of seq_len + 1 tokens that start every seq_len tokens; window w is
the split's sample w whatever the seed (a stream tail shorter than a window is dropped). An epoch
visits every window once, in a seeded order that each epoch draws anew. The sample-map index
of a window over a blend (`TokenBatches.step_sample_ids`) counts the windows of the datasets
before it in data.path: an offline teacher store is keyed by it (distill/offline.py). Inputs are
a window's first seq_len tokens and labels its last seq_len (the next tokens), so documents run
across sample boundaries. With `mask_across_documents`, a label that is the first token of another
document than its input's becomes -100.

Datasets are blended as Megatron does it: global sample g goes to the dataset furthest below its
weight's share of g + 1 samples, so after any number of samples every dataset is within one sample
of its share. Everything is a function of (seed, config, position): no state but counters.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.config import ConfigError
from engine.data.config import SPLITS, DataConfig, check_batch_layout, resolve_data_path, split_fractions
from engine.data.indexed import DataError, IndexedTokens
from engine.data.paired import NO_CHUNK, PairedDocuments
from engine.log import get_logger

log = get_logger(__name__)

IGNORE_INDEX = -100  # label of positions the loss skips
# Datasets up to this size have every token id checked at start-up (a scan of the memory-mapped
# .bin, well under a second); larger ones are checked window by window as training reads them.
EAGER_SCAN_BYTES = 256 << 20
_NO_VALIDATION_HINT = "(data.split=100,0 trains without validation)"


def document_layout(starts: torch.Tensor, *, restart_positions: bool) -> dict[str, torch.Tensor]:
    """{"documents": [mb, seq] index of each token's document within its window, and with
    `restart_positions` "positions": [mb, seq] its place in that document (a document begun before
    the window counts from the window's first token)} from the `starts` flags of the tokens that
    begin a document."""
    documents = starts.long().cumsum(dim=1)
    out = {"documents": documents}
    if restart_positions:
        index = torch.arange(starts.shape[1]).expand_as(documents)
        first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
        out["positions"] = index - first
    return out


def alignment_key(key: str, tokenizer: str) -> str:
    """The micro-batch key of alignment field `key` for teacher tokenization `tokenizer` ("": the
    unnamed one, whose keys are the bare field names)."""
    return f"{key}/{tokenizer}" if tokenizer else key


def shift_labels(labels: torch.Tensor, shift: int) -> torch.Tensor:
    """Targets `shift` positions further on, [batch, seq]: position t gets labels[:, t + shift] and
    the last `shift` positions get IGNORE_INDEX. The one label shift of the project: next-token
    labels of input ids are `shift_labels(input_ids, 1)`, the targets of multi-token-prediction
    head j are `shift_labels(next_token_labels, j)`."""
    if shift == 0:
        return labels
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-shift] = labels[:, shift:]
    return out


def to_device(micro_batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The micro-batch's tensors on `device` (the data pipeline yields CPU tensors)."""
    return {k: v.to(device, non_blocking=True) for k, v in micro_batch.items()}


def split_documents(num_documents: int, split: str) -> dict[str, range]:
    """Contiguous document ranges per split; a split with weight > 0 gets at least one document."""
    fractions = split_fractions(split)
    n_train = max(1, round(num_documents * fractions["train"]))
    if fractions["valid"] > 0 and num_documents > 1:
        n_train = min(n_train, num_documents - 1)
    n_train = min(n_train, num_documents)
    return {"train": range(n_train), "valid": range(n_train, num_documents)}


class PackedSamples:
    """Samples of one split of one dataset: window w of the sample map (`window`), visited as
    stream sample k in epoch k // samples_per_epoch (`window_of`)."""

    def __init__(self, dataset: IndexedTokens, documents: range, *, seq_len: int,
                 seed: tuple[int, ...], split: str, vocab_size: int | None = None):
        self.dataset, self.seq_len, self.seed = dataset, seq_len, seed
        self.vocab_size = vocab_size  # ids must be below it (None: not checked)
        self.documents = np.arange(documents.start, documents.stop, dtype=np.int64)
        hint = f" {_NO_VALIDATION_HINT}" if split == "valid" else ""
        if len(self.documents) == 0:
            raise ConfigError("data.split", f"the {split} split of {dataset.prefix} has no "
                              f"documents ({len(dataset)} in all){hint}")
        tokens = int(dataset.lengths[self.documents].sum(dtype=np.int64))
        self.samples_per_epoch = (tokens - 1) // seq_len
        if self.samples_per_epoch < 1:
            raise ConfigError("data.seq_len", f"the {split} split of {dataset.prefix} has {tokens} "
                              f"tokens, fewer than data.seq_len + 1 = {seq_len + 1}{hint}")
        self._order = self.documents  # [documents] in stream order: the sample map's
        self._ends = np.cumsum(self.dataset.lengths[self._order], dtype=np.int64)  # stream ends
        self._epoch = -1

    def window_of(self, k: int) -> int:
        """The sample-map window that stream sample k visits."""
        epoch, j = divmod(k, self.samples_per_epoch)
        if epoch != self._epoch:
            self._windows = np.random.default_rng([*self.seed, epoch]).permutation(
                self.samples_per_epoch)  # [samples_per_epoch]: stream sample -> window
            self._epoch = epoch
        return int(self._windows[j])

    def sample(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [seq_len + 1] int64, starts_document [seq_len + 1] bool) of stream sample k."""
        return self.window(self.window_of(k))

    def pieces(self, w: int) -> list[tuple[int, int, int]]:
        """Window w of the sample map as (document, first token, tokens) pieces, in order."""
        start, size = w * self.seq_len, self.seq_len + 1
        i = int(np.searchsorted(self._ends, start, side="right"))  # stream document holding start
        offset = start - (int(self._ends[i]) - int(self.dataset.lengths[self._order[i]]))
        pieces, filled = [], 0
        while filled < size:
            doc = int(self._order[i])
            take = min(int(self.dataset.lengths[doc]) - offset, size - filled)
            pieces.append((doc, offset, take))
            filled, offset, i = filled + take, 0, i + 1
        return pieces

    def window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, starts_document) of window w of the sample map."""
        size = self.seq_len + 1
        tokens = np.empty(size, dtype=np.int64)
        starts_document = np.zeros(size, dtype=bool)
        filled = 0
        for doc, offset, take in self.pieces(w):
            first = int(self.dataset.starts[doc]) + offset
            tokens[filled:filled + take] = self.dataset.tokens[first:first + take]
            self._check_ids(tokens[filled:filled + take], doc)
            starts_document[filled] |= offset == 0
            filled += take
        return tokens, starts_document

    def _check_ids(self, ids: np.ndarray, doc: int) -> None:
        """The lazy half of the token-id check (see EAGER_SCAN_BYTES): O(window), every read."""
        if self.vocab_size is not None and ids.size and (ids.min() < 0
                                                         or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
            raise DataError(_bad_id_message(self.dataset, int(bad), doc, self.vocab_size))


def _bad_id_message(dataset: IndexedTokens, token: int, doc: int, vocab_size: int) -> str:
    return (f"{dataset.prefix}: token id {token} in document {doc} is outside the vocabulary "
            f"[0, {vocab_size}) of model.vocab_size")


def check_token_ids(dataset: IndexedTokens, vocab_size: int) -> None:
    """The eager half of the token-id check: scan the whole .bin when it is small enough, or
    nothing when the token dtype cannot hold an id past the vocabulary."""
    info = np.iinfo(dataset.dtype) if dataset.dtype.kind in "iu" else None
    if info is not None and info.min >= 0 and info.max < vocab_size:
        return
    tokens = dataset.tokens
    if tokens.nbytes > EAGER_SCAN_BYTES or not tokens.size:
        return
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        where = int(np.flatnonzero((tokens < 0) | (tokens >= vocab_size))[0])
        doc = int(np.searchsorted(dataset.starts, where, side="right")) - 1
        raise DataError(_bad_id_message(dataset, int(tokens[where]), doc, vocab_size))


def check_datasets(cfg: DataConfig, *, vocab_size: int) -> None:
    """What start-up can afford to check of every dataset, reading only its .idx (and small
    .bins): the index itself (IndexedTokens: header, lengths, back-to-back pointers, .bin size, not
    empty), a train split and (unless data.split gives it no share) a valid split of at least one
    window each, and token ids below `vocab_size` (check_token_ids). Raises DataError or a
    ConfigError naming the dataset. Builds the bundled corpus on first use."""
    for _, prefix in resolve_data_path(cfg):
        dataset = IndexedTokens(prefix)
        for split, documents in split_documents(len(dataset), cfg.split).items():
            if split == "train" or cfg.has_validation:
                PackedSamples(dataset, documents, seq_len=cfg.seq_len, seed=(0,), split=split)
        check_token_ids(dataset, vocab_size)


def chunk_ends(chunks: torch.Tensor, teacher_chunks: torch.Tensor,
               teacher_inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"chunk_ends", "teacher_chunk_ends"} [mb, seq]: at chunk k, the input position of the
    chunk's last token in each model's window (where its hidden state has read the chunk), or
    NO_CHUNK on both where either window ends before it; `teacher_inputs` [mb]: each row's
    teacher input tokens (the rest is padding)."""
    ends = []
    for ids in (chunks, teacher_chunks):
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        last = torch.full_like(chunks, -1).scatter_reduce(
            1, ids.clamp(min=0), torch.where(ids != NO_CHUNK, positions, -1), "amax")
        ends.append(last + 1)  # a label position's token is the next input
    valid = (ends[0] > 0) & (ends[0] < chunks.shape[1]) & (ends[1] > 0) & \
        (ends[1] < teacher_inputs[:, None])
    return {key: torch.where(valid, end, NO_CHUNK)
            for key, end in zip(("chunk_ends", "teacher_chunk_ends"), ends)}


class Blend:
    """Deterministic blending: each next sample goes to the dataset furthest below its share."""

    def __init__(self, weights: list[float]):
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.counts = [0] * len(weights)  # samples drawn from each dataset so far

    def take(self, n: int) -> list[tuple[int, int]]:
        """The next n samples as (dataset, sample index within that dataset)."""
        drawn = []
        for _ in range(n):
            total = sum(self.counts) + 1
            d = int(np.argmax(self.weights * total - np.asarray(self.counts)))
            drawn.append((d, self.counts[d]))
            self.counts[d] += 1
        return drawn


class TokenBatches:
    """One DP rank's micro-batches of the train or valid stream, a global step at a time.

    Step s covers global samples [s * global_batch, (s + 1) * global_batch). Within a step,
    micro-batch m of DP rank r holds the global_batch-relative samples m*mb*dp + r*mb + [0, mb)
    (Megatron's order): ranks get disjoint samples and DP=1 sees exactly their union. The
    position is global, the same on every rank; `state_dict()` saves it and `load_state_dict`
    resumes exactly. `order` (a curriculum, engine/data/curriculum.py) rearranges the stream's
    first len(order) samples: global sample i is the stream's sample order[i]; later ones are
    unchanged. It must cover whole steps. For evaluation, a fresh
    `TokenBatches(..., split="valid")` replays the same batches every time. With `vocab_size`,
    every window read is checked to hold ids below it (a `DataError` naming the dataset and
    document otherwise).
    """

    def __init__(self, cfg: DataConfig, *, seed: int, dp_rank: int = 0, dp: int = 1,
                 split: str = "train", vocab_size: int | None = None,
                 order: np.ndarray | None = None, teacher_len: int | None = None,
                 teacher_tokenizers: tuple[str, ...] = ("",)):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} (got {split!r})")
        if not 0 <= dp_rank < dp:
            raise ValueError(f"dp_rank must be in [0, {dp}) (got {dp_rank})")
        if seed < 0:
            raise ConfigError("train.seed", f"must be >= 0 for the data order (got {seed})")
        check_batch_layout(cfg, dp)
        self.cfg, self.dp_rank, self.dp = cfg, dp_rank, dp
        pairs = resolve_data_path(cfg)
        self.sources = []
        for index, (_, prefix) in enumerate(pairs):
            dataset = IndexedTokens(prefix)
            documents = split_documents(len(dataset), cfg.split)[split]
            self.sources.append(PackedSamples(dataset, documents, seq_len=cfg.seq_len,
                                              seed=(seed, index, SPLITS.index(split)), split=split,
                                              vocab_size=vocab_size))
        self.blend = Blend([weight for weight, _ in pairs])
        # Teachers with other tokenizers: their tokens per window, and the paired tokenizations
        # (engine/data/paired.py; "" the unnamed one, else the name of PREFIX.teacher-NAME)
        self.teacher_len, self.teacher_tokenizers = teacher_len, tuple(teacher_tokenizers)
        self.paired = {} if teacher_len is None else \
            {name: [PairedDocuments(source.dataset, name) for source in self.sources]
             for name in self.teacher_tokenizers}
        # A curriculum (engine/data/curriculum.py): global sample i < len(order) is the stream's
        # sample order[i]; `early` holds the stream's first len(order) draws to pick them from.
        self.order = None if order is None else np.asarray(order, dtype=np.int64)
        self.early = None if order is None else \
            Blend([weight for weight, _ in pairs]).take(len(self.order))
        self.consumed_samples = 0
        self.micro_batches_per_step = cfg.micro_batches(dp)
        # where each dataset's windows start in the blend's sample map
        self.map_offsets = np.cumsum([0] + [s.samples_per_epoch for s in self.sources])
        self.step_sample_ids = np.empty(0, np.int64)  # [global_batch] of the last step drawn
        for (weight, prefix), source in zip(pairs, self.sources):
            log.info("%s data: %s (weight %g): %d documents, %d samples of %d tokens per epoch",
                     split, prefix, weight, len(source.documents), source.samples_per_epoch,
                     cfg.seq_len)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the next global step: {"input_ids", "labels"}, [mb, seq]."""
        first = self.consumed_samples
        drawn = self.blend.take(self.cfg.global_batch)  # (kept in step: its counts are the position)
        if self.order is not None and first < len(self.order):
            drawn = [self.early[i] for i in self.order[first:first + self.cfg.global_batch]]
        self.consumed_samples += self.cfg.global_batch
        self.step_sample_ids = self.sample_ids(drawn)
        mb = self.cfg.micro_batch
        firsts = range(self.dp_rank * mb, self.cfg.global_batch, mb * self.dp)
        return [self._micro_batch(drawn[first:first + mb]) for first in firsts]

    def sample_ids(self, drawn: list[tuple[int, int]]) -> np.ndarray:
        """[len(drawn)] int64: the sample-map index of each (dataset, stream sample) drawn."""
        return np.array([self.map_offsets[d] + self.sources[d].window_of(k) for d, k in drawn],
                        dtype=np.int64)

    def stream_sample_ids(self, count: int) -> np.ndarray:
        """[count] int64: the sample-map indices of the first `count` samples of this stream
        (the curriculum's order applied), without reading a token."""
        drawn = Blend(list(self.blend.weights)).take(count)
        if self.order is not None:
            head = min(count, len(self.order))
            drawn[:head] = [self.early[i] for i in self.order[:head]]
        return self.sample_ids(drawn)

    def map_inputs(self, ids: range) -> torch.Tensor:
        """[len(ids), seq] int64: the input ids of the sample-map windows `ids`."""
        rows = []
        for d, w in self._map_windows(ids):
            rows.append(self.sources[d].window(w)[0][:-1])
        return torch.from_numpy(np.stack(rows))

    def map_batch(self, ids: range) -> dict[str, torch.Tensor]:
        """The micro-batch of the sample-map windows `ids` (with a teacher_len, their teacher
        windows and alignment, as `next_step` gives them)."""
        return self._windows_batch(self._map_windows(ids))

    def _map_windows(self, ids: range) -> list[tuple[int, int]]:
        """(dataset, its window) of each sample-map index of `ids`."""
        out = []
        for i in ids:
            d = int(np.searchsorted(self.map_offsets, i, side="right")) - 1
            out.append((d, i - int(self.map_offsets[d])))
        return out

    @property
    def map_samples(self) -> int:
        """Windows in this split's sample map, over every dataset of the blend."""
        return int(self.map_offsets[-1])

    def _micro_batch(self, drawn: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        return self._windows_batch([(d, self.sources[d].window_of(k)) for d, k in drawn])

    def _windows_batch(self, map_windows: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        windows = [self.sources[d].window(w) for d, w in map_windows]
        tokens = np.stack([w for w, _ in windows])  # [mb, seq + 1]
        starts = np.stack([s for _, s in windows])  # [mb, seq + 1]: tokens that begin a document
        labels = tokens[:, 1:].copy()
        if self.cfg.mask_across_documents:
            labels[starts[:, 1:]] = IGNORE_INDEX
        batch = {"input_ids": torch.from_numpy(tokens[:, :-1].copy()), "labels": torch.from_numpy(labels)}
        if self.cfg.attention_within_documents:
            batch.update(document_layout(torch.from_numpy(starts[:, :-1].copy()),
                                         restart_positions=self.cfg.positions_per_document))
        for name, paired in self.paired.items():  # (the labels' bytes: the same for each)
            for key, value in self._teacher_windows(paired, map_windows, batch["labels"]).items():
                batch[key if key == "label_bytes" else alignment_key(key, name)] = value
        return batch

    def _teacher_windows(self, paired: list[PairedDocuments], map_windows: list[tuple[int, int]],
                         labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's side of a micro-batch (engine/data/paired.py): "teacher_input_ids" and
        "teacher_labels" [mb, teacher_len] (padding: 0 and IGNORE_INDEX), the chunk of each
        scored token "chunks" [mb, seq] and "teacher_chunks" [mb, teacher_len] (NO_CHUNK: none),
        "chunk_bytes" [mb, seq] the bytes of chunk k of the row at k (0: no such chunk), and
        "single" [mb, seq] for a student position whose chunk is one token in both, the teacher's
        position of it (NO_CHUNK: none), "label_bytes" [mb, seq] the bytes of each label (0 where
        skipped), and `chunk_ends`' "chunk_ends" / "teacher_chunk_ends" [mb, seq]. A chunk
        holding a student label the loss skips (mask_across_documents) is no chunk. A named
        teacher tokenization's keys are `alignment_key(key, name)` (but "label_bytes")."""
        rows, length = len(map_windows), self.teacher_len
        out = {"teacher_input_ids": torch.zeros(rows, length, dtype=torch.long),
               "teacher_labels": torch.full((rows, length), IGNORE_INDEX, dtype=torch.long),
               "chunks": torch.full_like(labels, NO_CHUNK),
               "teacher_chunks": torch.full((rows, length), NO_CHUNK, dtype=torch.long),
               "chunk_bytes": torch.zeros_like(labels),
               "single": torch.full_like(labels, NO_CHUNK), "label_bytes": torch.zeros_like(labels)}
        for r, (d, w) in enumerate(map_windows):
            a = paired[d].window(self.sources[d].pieces(w), length)
            n = len(a.teacher_ids) - 1
            out["teacher_input_ids"][r, :n] = torch.from_numpy(a.teacher_ids[:-1])
            out["teacher_labels"][r, :n] = torch.from_numpy(a.teacher_ids[1:])
            out["chunks"][r] = torch.from_numpy(a.student_chunks)
            out["teacher_chunks"][r, :n] = torch.from_numpy(a.teacher_chunks)
            out["chunk_bytes"][r, :len(a.chunk_bytes)] = torch.from_numpy(a.chunk_bytes)
            out["single"][r] = torch.from_numpy(a.single)
            out["label_bytes"][r] = torch.from_numpy(a.label_bytes)
        out["label_bytes"][labels == IGNORE_INDEX] = 0
        skipped = (labels == IGNORE_INDEX) & (out["chunks"] != NO_CHUNK)
        rows_chunks = {(r, int(out["chunks"][r, k])) for r, k in skipped.nonzero().tolist()}
        for r, chunk in rows_chunks:
            out["chunk_bytes"][r, chunk] = 0
            out["single"][r][out["chunks"][r] == chunk] = NO_CHUNK
            for key in ("chunks", "teacher_chunks"):
                out[key][r][out[key][r] == chunk] = NO_CHUNK
        out.update(chunk_ends(out["chunks"], out["teacher_chunks"],
                              (out["teacher_labels"] != IGNORE_INDEX).sum(dim=1)))
        return out

    def state_dict(self) -> dict[str, int]:
        state = {"consumed_samples": self.consumed_samples}
        state.update({f"dataset{d}_samples": n for d, n in enumerate(self.blend.counts)})
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"data position has keys {sorted(state)} but this blend of "
                             f"{len(self.sources)} dataset(s) expects {sorted(expected)}")
        counts = [int(state[f"dataset{d}_samples"]) for d in range(len(self.sources))]
        if sum(counts) != int(state["consumed_samples"]):
            raise ValueError(f"data position is inconsistent: {counts} samples per dataset "
                             f"do not add up to consumed_samples={state['consumed_samples']}")
        self.blend.counts = counts
        self.consumed_samples = int(state["consumed_samples"])
