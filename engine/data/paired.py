"""Paired data for a teacher with another tokenizer: the same text in the teacher's tokens, and
where every token of both tokenizations ends in bytes.

Beside the student's dataset PREFIX, `tools/preprocess_data.py --teacher-tokenizer` writes three
indexed datasets with the same documents in the same order:

    PREFIX.teacher          the teacher's token ids
    PREFIX.offsets          int32, per student token: the byte where it ends in its document
    PREFIX.teacher_offsets  int32, per teacher token: the same
    PREFIX.shared_vocab.npy [K, 2] int64: (student id, teacher id) of the tokens that stand for
                            the same bytes in both vocabularies (`mapped_kl`'s shared vocabulary)

Several teachers with their own tokenizers (`--teacher-tokenizer NAME=T.json`, repeatable) each
get their own files beside the same student dataset and its PREFIX.offsets (`teacher_prefixes`):

    PREFIX.teacher-NAME                   the teacher's token ids
    PREFIX.teacher-NAME.offsets           where each of its tokens ends in bytes
    PREFIX.teacher-NAME.shared_vocab.npy  the shared vocabulary of the student's and its tokenizer

Bytes are those of the document's UTF-8 text; the end-of-document token counts as one byte of its
own, so both tokenizations of a document end at the same byte.

Alignment. A student window (seq_len + 1 tokens, engine/data/dataset.py) covers a span of bytes;
the teacher's window is the teacher tokens overlapping that span. The *scored* tokens of a window
are all but its first (the labels). Chunks are the spans between consecutive byte positions that
are a boundary of a scored token in both tokenizations: the smallest spans holding whole tokens of
both. Bytes before the first or after the last common boundary (partial chunks at the window's
edges) belong to no chunk. A window's chunks are numbered 0.. in byte order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from engine.data.indexed import DataError, IndexedTokens, IndexedWriter

TEACHER_SUFFIX, OFFSETS_SUFFIX, TEACHER_OFFSETS_SUFFIX = ".teacher", ".offsets", ".teacher_offsets"
PAIRED_SUFFIXES = (TEACHER_SUFFIX, OFFSETS_SUFFIX, TEACHER_OFFSETS_SUFFIX)
SHARED_VOCAB_SUFFIX = ".shared_vocab.npy"  # [K, 2] int64 (student id, teacher id), same bytes
NO_CHUNK = -1  # chunk id of a token in no (complete, valid) chunk
TOKENIZER_NAME = r"[A-Za-z0-9_.-]+"  # a named teacher tokenization (`--teacher-tokenizer NAME=`)


@dataclass(frozen=True)
class TeacherPrefixes:
    """Where one teacher tokenization of dataset PREFIX lives (module docstring)."""

    ids: str  # indexed dataset of the teacher's token ids
    offsets: str  # indexed dataset of where each teacher token ends in bytes
    shared_vocab: str  # .npy file of the shared vocabulary

    @property
    def datasets(self) -> tuple[str, str]:
        return self.ids, self.offsets


def teacher_prefixes(prefix: str, name: str = "") -> TeacherPrefixes:
    """The files of teacher tokenization `name` of dataset `prefix` ("": the one unnamed teacher
    tokenization, `--teacher-tokenizer T.json`)."""
    if not name:
        return TeacherPrefixes(prefix + TEACHER_SUFFIX, prefix + TEACHER_OFFSETS_SUFFIX,
                               prefix + SHARED_VOCAB_SUFFIX)
    base = f"{prefix}{TEACHER_SUFFIX}-{name}"
    return TeacherPrefixes(base, base + OFFSETS_SUFFIX, base + SHARED_VOCAB_SUFFIX)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def token_bytes(tokenizer: Tokenizer, *, eod_id: int | None) -> list[bytes]:
    """The bytes each id of a byte-level BPE stands for (the end-of-document token: one byte,
    b"\\0"; other special tokens: b"", which the preprocessing's byte check then refuses)."""
    alphabet = _byte_level_alphabet()
    special = {int(i) for i in tokenizer.get_added_tokens_decoder()}
    table = [b""] * tokenizer.get_vocab_size()
    for token, i in tokenizer.get_vocab().items():
        if i == eod_id:
            table[i] = b"\0"
        elif i not in special:
            if any(c not in alphabet for c in token):
                raise DataError(f"token {token!r} is not byte-level: paired data needs "
                                "byte-level BPE tokenizers (GPT-2, Llama 3, Qwen style)")
            table[i] = bytes(alphabet[c] for c in token)
    return table


def byte_ends(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """[len(ids)] int32: where each token ends in its document, from per-id byte `lengths`."""
    return np.cumsum(lengths[ids], dtype=np.int64).astype(np.int32)


def write_offsets(prefix: str, token_prefix: str, table: list[bytes]) -> None:
    """PREFIX: the byte ends (int32) of every token of the indexed dataset `token_prefix`."""
    lengths = np.array([len(b) for b in table], dtype=np.int64)
    tokens = IndexedTokens(token_prefix)
    with IndexedWriter(prefix, np.int32) as writer:
        for d in range(len(tokens)):
            writer.add(byte_ends(tokens[d].astype(np.int64), lengths))


def check_same_text(student: IndexedTokens, teacher: IndexedTokens, student_table: list[bytes],
                    teacher_table: list[bytes]) -> None:
    """Both tokenizations spell the same bytes, document by document (a DataError otherwise)."""
    if len(student) != len(teacher):
        raise DataError(f"{teacher.prefix} has {len(teacher)} documents, {student.prefix} "
                        f"{len(student)}")
    for d in range(len(student)):
        spelled = [b"".join(table[i] for i in tokens[d].tolist())
                   for tokens, table in ((student, student_table), (teacher, teacher_table))]
        if spelled[0] != spelled[1]:
            raise DataError(f"document {d}: the student's and the teacher's tokens spell "
                            "different bytes (byte-level BPE tokenizers without normalizers "
                            "needed)")


def shared_vocab(student_table: list[bytes], teacher_table: list[bytes],
                 eods: tuple[int | None, int | None] = (None, None)) -> np.ndarray:
    """[K, 2] int64 (student id, teacher id): the tokens that stand for the same bytes in both
    vocabularies, and the end-of-document tokens `eods` (whose table entry b"\0" is no text)."""
    def by_bytes(table: list[bytes], eod: int | None) -> dict[bytes, int]:
        return {b: i for i, b in enumerate(table) if b and i != eod}

    student, teacher = by_bytes(student_table, eods[0]), by_bytes(teacher_table, eods[1])
    pairs = sorted((i, teacher[b]) for b, i in student.items() if b in teacher)
    if None not in eods:
        pairs = sorted([*pairs, eods])
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def write_shared_vocab(path: str, student_table: list[bytes], teacher_table: list[bytes],
                       eods: tuple[int | None, int | None]) -> None:
    """`path` (a `TeacherPrefixes.shared_vocab`): `shared_vocab` of the two tokenizers (written
    atomically)."""
    scratch = f"{path}.tmp.npy"
    np.save(scratch, shared_vocab(student_table, teacher_table, eods))
    os.replace(scratch, path)


def read_shared_vocab(prefix: str, tokenizer: str = "") -> np.ndarray:
    """[K, 2] the shared vocabulary of teacher tokenization `tokenizer` written beside dataset
    `prefix` (a DataError when absent)."""
    path = Path(teacher_prefixes(prefix, tokenizer).shared_vocab)
    if not path.is_file():
        raise DataError(f"{path} not found: preprocess the paired data again "
                        "(tools/preprocess_data.py --teacher-tokenizer)")
    return np.load(path, allow_pickle=False)


@dataclass(frozen=True)
class WindowAlignment:
    """One window's teacher tokens and chunks (see the module docstring)."""

    teacher_ids: np.ndarray  # [<= teacher_len + 1] int64: the teacher's window
    student_chunks: np.ndarray  # [seq_len] int64: chunk of scored student token t + 1, or NO_CHUNK
    teacher_chunks: np.ndarray  # [len(teacher_ids) - 1] int64: the same for the teacher
    chunk_bytes: np.ndarray  # [chunks] int64: bytes of each chunk
    # [seq_len] int64: for a scored student token whose chunk is one token in both tokenizations,
    # the teacher's scored position of that chunk (an index into teacher_chunks), else NO_CHUNK
    single: np.ndarray
    label_bytes: np.ndarray  # [seq_len] int64: the bytes of each scored student token


def align(student_bounds: np.ndarray, teacher_bounds: np.ndarray) -> tuple[np.ndarray, ...]:
    """(student chunk ids, teacher chunk ids, chunk bytes) of the scored tokens, from each
    window's token bounds: [tokens + 1] byte positions where its tokens start, then where the
    last ends (the first token is the unscored context)."""
    common = np.intersect1d(student_bounds[1:], teacher_bounds[1:])  # sorted
    chunks = max(len(common) - 1, 0)

    def chunk_of(bounds: np.ndarray) -> np.ndarray:
        k = np.searchsorted(common, bounds[1:-1], side="right") - 1  # chunk of each token start
        return np.where((k >= 0) & (k < chunks), k, NO_CHUNK).astype(np.int64)

    return chunk_of(student_bounds), chunk_of(teacher_bounds), np.diff(common).astype(np.int64)


def single_token_chunks(student_chunks: np.ndarray, teacher_chunks: np.ndarray) -> np.ndarray:
    """[len(student_chunks)]: the teacher position of each student token whose chunk is one token
    in both tokenizations, else NO_CHUNK."""
    size = max(int(student_chunks.max(initial=0)), int(teacher_chunks.max(initial=0))) + 1
    counts = [np.bincount(c[c != NO_CHUNK], minlength=size) for c in (student_chunks,
                                                                     teacher_chunks)]
    teacher_pos = np.full(size, NO_CHUNK, dtype=np.int64)
    one = teacher_chunks != NO_CHUNK
    teacher_pos[teacher_chunks[one]] = np.flatnonzero(one)
    single = (counts[0] == 1) & (counts[1] == 1)
    inside = student_chunks != NO_CHUNK
    out = np.full(len(student_chunks), NO_CHUNK, dtype=np.int64)
    chunk = student_chunks[inside]
    out[inside] = np.where(single[chunk], teacher_pos[chunk], NO_CHUNK)
    return out


class PairedDocuments:
    """The paired datasets of a student dataset for teacher tokenization `tokenizer` ("": the
    unnamed one), checked to match it: the same documents, the same bytes in each (a DataError
    naming the file otherwise)."""

    def __init__(self, student: IndexedTokens, tokenizer: str = ""):
        prefix = student.prefix
        teacher = teacher_prefixes(prefix, tokenizer)
        wanted = (prefix + OFFSETS_SUFFIX, *teacher.datasets)
        missing = [p for p in wanted if not Path(p + ".idx").exists()]
        if missing:
            flag = f"{tokenizer}=T.json" if tokenizer else "T.json"
            raise DataError(f"{missing[0]}.bin/.idx not found: distill.cross_tokenizer needs "
                            f"paired data (tools/preprocess_data.py --teacher-tokenizer {flag})")
        self.student = student
        self.teacher = IndexedTokens(teacher.ids)
        self.student_ends = IndexedTokens(prefix + OFFSETS_SUFFIX)
        self.teacher_ends = IndexedTokens(teacher.offsets)
        self._check()

    def _check(self) -> None:
        for data, ends in ((self.student, self.student_ends), (self.teacher, self.teacher_ends)):
            if len(ends) != len(self.student) or not np.array_equal(ends.lengths, data.lengths):
                raise DataError(f"{ends.prefix} does not match {data.prefix} (other documents or "
                                "tokens): preprocess the paired data again")
        last = [ends.tokens[ends.starts + ends.lengths - 1] for ends in
                (self.student_ends, self.teacher_ends)]
        differ = np.flatnonzero(last[0] != last[1])
        if differ.size:
            d = int(differ[0])
            raise DataError(f"{self.teacher.prefix}: document {d} has {int(last[1][d])} bytes in "
                            f"the teacher's tokens and {int(last[0][d])} in the student's")

    def _span(self, ends: IndexedTokens, doc: int, lo: int, hi: int) -> np.ndarray:
        """[hi - lo + 1] the byte bounds of tokens lo..hi-1 of document `doc`."""
        start = int(ends.starts[doc])
        tail = ends.tokens[start + lo:start + hi].astype(np.int64)
        head = 0 if lo == 0 else int(ends.tokens[start + lo - 1])
        return np.concatenate([[head], tail])

    def window(self, pieces: list[tuple[int, int, int]], teacher_len: int) -> WindowAlignment:
        """The alignment of the student window made of `pieces` (document, first token, tokens),
        with at most `teacher_len + 1` teacher tokens (more are cut at the end)."""
        student, teacher, teacher_ids = [], [], []
        base = 0  # the window's byte coordinate of the current document's byte 0
        for i, (doc, first, count) in enumerate(pieces):
            bounds = self._span(self.student_ends, doc, first, first + count)
            if i == 0:
                base = -int(bounds[0])
            t_ends = self.teacher_ends[doc].astype(np.int64)
            lo = int(np.searchsorted(t_ends, bounds[0], side="right"))
            hi = min(int(np.searchsorted(t_ends, bounds[-1], side="left")) + 1, len(t_ends))
            student.append(bounds[:-1] + base)
            teacher.append(self._span(self.teacher_ends, doc, lo, hi)[:-1] + base)
            teacher_ids.append(self.teacher[doc][lo:hi].astype(np.int64))
            last_student, last_teacher = int(bounds[-1]) + base, int(t_ends[hi - 1]) + base
            base += int(t_ends[-1])
        student_bounds = np.concatenate([*student, [last_student]])
        teacher_bounds = np.concatenate([*teacher, [last_teacher]])[:teacher_len + 2]
        ids = np.concatenate(teacher_ids)[:teacher_len + 1]
        s_chunks, t_chunks, nbytes = align(student_bounds, teacher_bounds)
        return WindowAlignment(ids, s_chunks, t_chunks, nbytes,
                               single_token_chunks(s_chunks, t_chunks),
                               np.diff(student_bounds)[1:].astype(np.int64))
