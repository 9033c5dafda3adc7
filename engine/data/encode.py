"""Text to token ids to an indexed dataset, with a Hugging Face `tokenizer.json` (via `tokenizers`).

Shared by `tools/preprocess_data.py` and the bundled corpus. Input is a stream of `Record`s, one per
document: where it came from (for error messages), its raw text (or the JSON line holding it) and
its size in bytes (for the progress bar). Records are encoded in chunks, in order, by a
pool of worker processes (or in this process when `workers <= 1`); each document gets the
end-of-document token appended, and is written through `IndexedWriter`, so a failure anywhere
leaves no output behind.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from engine.data.indexed import DataError, IndexedWriter, dtype_for_vocab

# Names of the end-of-document token in common tokenizers (GPT-2/Qwen, Llama 3, Llama 2/Mistral,
# Gemma), looked up in this order when none is named.
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
_CHUNK = 64  # documents per task handed to a worker


class Record(NamedTuple):
    origin: str  # "file" or "file:line", for error messages
    text: str  # the document, or the JSON line holding it
    nbytes: int  # input bytes this record covers
    json_key: str | None = None  # when set, text is a JSON object with the document in this field


def check_inputs(paths: Iterable[str | Path]) -> int:
    """Fail on the first missing, unreadable or empty input file; return the total size in bytes."""
    total = 0
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"input file not found: {path}")
        if not os.access(path, os.R_OK):
            raise DataError(f"cannot read input file {path} (permission denied)")
        if path.stat().st_size == 0:
            raise DataError(f"input file {path} is empty")
        total += path.stat().st_size
    return total


def file_records(path: str | Path, *, per_line: bool = False,
                 json_key: str | None = None) -> Iterator[Record]:
    """A file's documents: the whole file, or each non-blank line (JSONL or per_line text)."""
    per_line = per_line or json_key is not None
    path, found = Path(path), 0
    with open(path, "rb") as stream:
        lines = enumerate(stream, 1) if per_line else [(0, stream.read())]
        for lineno, raw in lines:
            origin = f"{path}:{lineno}" if per_line else str(path)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{origin}: not valid UTF-8 (byte {err.start})") from None
            if text.strip():
                found += 1
                yield Record(origin, text.rstrip("\r\n") if per_line else text, len(raw), json_key)
    if not found:
        raise DataError(f"input file {path} has no text")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizer.json`; a missing or malformed file is one DataError line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path} is not a valid tokenizer.json ({reason})") from None


def find_eod_id(tokenizer: Tokenizer, name: str | None = None) -> int:
    """Id of the end-of-document token `name`, or of the first of EOD_CANDIDATES present."""
    for candidate in (name,) if name else EOD_CANDIDATES:
        token_id = tokenizer.token_to_id(candidate)
        if token_id is not None:
            return token_id
    if name:
        raise DataError(f"end-of-document token {name!r} is not in the tokenizer's vocabulary")
    raise DataError(f"the tokenizer has none of {', '.join(EOD_CANDIDATES)}; "
                    "name its end-of-document token (--eod-token)")


def document_text(record: Record) -> str:
    """The record's document: its text, or the `json_key` field of its JSON line."""
    if record.json_key is None:
        return record.text
    try:
        item = json.loads(record.text)
    except json.JSONDecodeError as err:
        raise DataError(f"{record.origin}: invalid JSON ({err.msg})") from None
    if not isinstance(item, dict) or record.json_key not in item:
        raise DataError(f"{record.origin}: no key {record.json_key!r} in this JSON line")
    text = item[record.json_key]
    if not isinstance(text, str):
        raise DataError(f"{record.origin}: {record.json_key!r} is not a string")
    return text


class DocumentEncoder:
    """Turns records into token-id arrays: JSON field lookup, tokenization, end-of-document token."""

    def __init__(self, tokenizer_path: str | Path, *, eod_id: int | None):
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.eod_id = eod_id
        self.dtype = dtype_for_vocab(self.tokenizer.get_vocab_size())

    def __call__(self, records: list[Record]) -> list[np.ndarray]:
        texts = [text for text in map(document_text, records) if text]  # empty documents dropped
        suffix = [] if self.eod_id is None else [self.eod_id]
        return [np.asarray(encoding.ids + suffix, dtype=self.dtype)
                for encoding in self.tokenizer.encode_batch(texts)]


_worker_encoder: DocumentEncoder | None = None  # one per pool worker, set by its initializer


def _init_worker(tokenizer_path: str, eod_id: int | None) -> None:
    global _worker_encoder
    # Each worker is one of N processes: tokenizers' own thread pool would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encoder = DocumentEncoder(tokenizer_path, eod_id=eod_id)


def _encode_in_worker(records: list[Record]) -> tuple[list[np.ndarray], int]:
    assert _worker_encoder is not None
    return _worker_encoder(records), sum(r.nbytes for r in records)


def _chunks(records: Iterable[Record]) -> Iterator[list[Record]]:
    records = iter(records)
    while chunk := list(islice(records, _CHUNK)):
        yield chunk


def _encoded_chunks(records: Iterable[Record], tokenizer_path: str, eod_id: int | None,
                    workers: int) -> Iterator[tuple[list[np.ndarray], int]]:
    if workers <= 1:
        encoder = DocumentEncoder(tokenizer_path, eod_id=eod_id)
        for chunk in _chunks(records):
            yield encoder(chunk), sum(r.nbytes for r in chunk)
        return
    with multiprocessing.get_context().Pool(
            workers, initializer=_init_worker, initargs=(tokenizer_path, eod_id)) as pool:
        yield from pool.imap(_encode_in_worker, _chunks(records))


def encode_to_indexed(prefix: str | Path, records: Iterable[Record], *,
                      tokenizer_path: str | Path, eod_id: int | None, workers: int = 1,
                      total_bytes: int | None = None, progress: bool = True) -> tuple[int, int]:
    """Tokenize `records` into the indexed dataset `prefix`; return (documents, tokens).

    `eod_id=None` appends nothing. Token dtype follows the vocabulary size (dtype_for_vocab).
    """
    vocab_size = load_tokenizer(tokenizer_path).get_vocab_size()
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenizing {Path(prefix).name}",
               disable=None if progress else True, leave=False)  # None: only on a terminal
    with bar, IndexedWriter(prefix, dtype_for_vocab(vocab_size)) as writer:
        for documents, nbytes in _encoded_chunks(records, str(tokenizer_path), eod_id, workers):
            for ids in documents:
                writer.add(ids)
            bar.update(nbytes)
            bar.set_postfix(docs=len(writer), tokens=writer.num_tokens, refresh=False)
    return len(writer), writer.num_tokens
