"""Megatron indexed datasets: `PREFIX.bin` holds token ids back to back, `PREFIX.idx` the index.

The bytes are megatron-core's (`megatron.core.datasets.indexed_dataset`, index version 1), so its
`IndexedDataset` reads what this module writes and the other way round:

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    u64       version, 1
    u8        dtype code of the tokens (see _DTYPE_CODES)
    u64       sequence count S
    u64       document-index count D
    i32[S]    sequence lengths, in tokens
    i64[S]    sequence pointers, byte offsets into .bin
    i64[D]    document indices: the sequence where each document starts, then S

(A multimodal index appends i8[S] sequence modes; this project neither writes nor needs them.)
Each sequence written here is one whole document, and readers here treat a sequence as a document,
as megatron-core's GPTDataset does.
"""

from __future__ import annotations

import os
import secrets
import struct
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import numpy as np

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
_DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                6: np.float64, 7: np.float32, 8: np.uint16}


class DataError(ValueError):
    """Bad data on disk or in the input: the message is one line naming the file (and line)."""


def dtype_for_vocab(vocab_size: int) -> type[np.integer]:
    """The token dtype for a vocabulary (megatron-core's choice: uint16 below 65500, else int32)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def _dtype_code(dtype: np.dtype | type) -> int:
    for code, candidate in _DTYPE_CODES.items():
        if np.dtype(candidate) == np.dtype(dtype):
            return code
    raise DataError(f"dtype {np.dtype(dtype)} cannot be stored in a Megatron index")


def _read_header(index: np.ndarray, idx_path: Path) -> tuple[np.dtype, int, int]:
    """(token dtype, sequence count, document-index count) of a mapped .idx at least a header long."""
    magic, version, code, count, doc_count = _HEADER.unpack_from(index)
    if magic != _MAGIC:
        raise DataError(f"{idx_path} is not a Megatron index (bad magic {magic!r})")
    if version != _VERSION:
        raise DataError(f"{idx_path} has index version {version}; only {_VERSION} is supported")
    if code not in _DTYPE_CODES:
        raise DataError(f"{idx_path} has unknown dtype code {code}")
    if len(index) < _HEADER.size + 12 * count + 8 * doc_count:
        raise DataError(f"{idx_path} is truncated ({count} sequences declared)")
    return np.dtype(_DTYPE_CODES[code]), count, doc_count


def _check_back_to_back(lengths: np.ndarray, pointers: np.ndarray, itemsize: int,
                        idx_path: Path) -> None:
    """Every writer (this one, megatron-core's) stores sequences back to back: pointer i is the byte
    sum of the lengths before it. An index that says otherwise would read the wrong tokens silently,
    so it is refused. Costs O(documents), on the small .idx only."""
    if (lengths < 0).any():
        raise DataError(f"{idx_path} has negative sequence lengths")
    expected = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1] * np.int64(itemsize), out=expected[1:])
    wrong = np.flatnonzero(pointers != expected)
    if wrong.size:
        i = int(wrong[0])
        raise DataError(f"{idx_path}: sequence {i} starts at byte {int(pointers[i])}, but the "
                        f"lengths before it add up to {int(expected[i])} bytes (a corrupt or "
                        "foreign index)")


class IndexedTokens:
    """Read-only, memory-mapped view of one indexed dataset; `dataset[i]` is document i's ids."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        idx_path, bin_path = Path(self.prefix + ".idx"), Path(self.prefix + ".bin")
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise DataError(f"{path} not found")
        if idx_path.stat().st_size < _HEADER.size:
            raise DataError(f"{idx_path} is too short to be a Megatron index")
        self._index = np.memmap(idx_path, dtype=np.uint8, mode="r")
        self.dtype, count, doc_count = _read_header(self._index, idx_path)
        offset = _HEADER.size
        self.lengths = np.frombuffer(self._index, np.int32, count, offset)  # [documents]
        self.pointers = np.frombuffer(self._index, np.int64, count, offset + 4 * count)  # bytes
        self.document_indices = np.frombuffer(self._index, np.int64, doc_count,
                                              offset + 12 * count)
        if count == 0:
            raise DataError(f"{idx_path} indexes no documents: the dataset is empty")
        _check_back_to_back(self.lengths, self.pointers, self.dtype.itemsize, idx_path)
        self.starts = self.pointers // self.dtype.itemsize  # [documents], token offsets into .bin
        expected = int(self.lengths.sum(dtype=np.int64)) * self.dtype.itemsize
        if bin_path.stat().st_size != expected:
            raise DataError(f"{bin_path} has {bin_path.stat().st_size} bytes but {idx_path} "
                            f"indexes {expected}: the pair is truncated or mismatched")
        # np.memmap refuses empty files; an empty dataset simply has no tokens.
        self.tokens = (np.memmap(bin_path, dtype=self.dtype, mode="r") if expected
                       else np.empty(0, self.dtype))  # [all tokens]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {self.prefix} ({len(self)} documents)")
        start = int(self.starts[i])
        return self.tokens[start:start + int(self.lengths[i])]

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))


class IndexedWriter:
    """Streams documents into `PREFIX.bin` / `PREFIX.idx`, visible only once `finish()` succeeds.

    Both files are written under temporary names in the destination directory and renamed at the
    end, so an interrupted or failed write leaves no partial dataset behind. As a context manager
    it finishes on success and removes its temporary files on an exception.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype | type):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        self._code = _dtype_code(self.dtype)
        self._limits = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        # Unique names beside the destination (same filesystem, so the final rename is atomic).
        self._bin_tmp = f"{self.prefix}.bin.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        self._idx_tmp = f"{self.prefix}.idx.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        self._bin = open(self._bin_tmp, "xb")  # noqa: SIM115 - closed in finish/abort
        self._lengths: list[int] = []
        self.num_tokens = 0

    def add(self, ids: np.ndarray | Iterable[int]) -> None:
        """Append one document (its token ids, end-of-document token included if wanted)."""
        ids = np.asarray(ids)
        if self._limits is not None and ids.size and (
                ids.min() < self._limits.min or ids.max() > self._limits.max):
            raise DataError(f"token ids {ids.min()}..{ids.max()} do not fit {self.dtype} "
                            f"(writing {self.prefix})")
        self._bin.write(ids.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(int(ids.size))
        self.num_tokens += int(ids.size)

    def __len__(self) -> int:
        return len(self._lengths)

    def finish(self) -> None:
        if not self._lengths:
            self.abort()
            raise DataError(f"no documents to write to {self.prefix}")
        try:
            self._write_index()
        except BaseException:
            self.abort()
            raise

    def _write_index(self) -> None:
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1] * np.int64(self.dtype.itemsize), out=pointers[1:])
        document_indices = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(self._idx_tmp, "xb") as idx:
            idx.write(_HEADER.pack(_MAGIC, _VERSION, self._code, len(lengths),
                                   len(document_indices)))
            for array in (lengths, pointers, document_indices):
                idx.write(array.tobytes(order="C"))
        # .idx last: a reader never sees a new index next to an old .bin.
        os.replace(self._bin_tmp, self.prefix + ".bin")
        os.replace(self._idx_tmp, self.prefix + ".idx")

    def abort(self) -> None:
        """Remove the temporary files, whatever state they are in."""
        try:
            self._bin.close()
        except OSError:
            pass  # a full disk fails the last flush as well; the file goes anyway
        finally:
            for path in (self._bin_tmp, self._idx_tmp):
                Path(path).unlink(missing_ok=True)

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if kind is None:
            self.finish()
        else:
            self.abort()


def write_indexed(prefix: str | Path, documents: Iterable[np.ndarray],
                  dtype: np.dtype | type) -> tuple[int, int]:
    """Write `documents` (one token-id array each) as an indexed dataset; return (documents, tokens)."""
    with IndexedWriter(prefix, dtype) as writer:
        for ids in documents:
            writer.add(ids)
    return len(writer), writer.num_tokens
