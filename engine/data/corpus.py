"""The bundled default corpus: the running interpreter's standard-library sources, no download.

Every machine that runs this project has the `.py` files of its Python standard library
(`sysconfig.get_paths()["stdlib"]`, installed third-party packages excluded). They are real, varied
text (code, docstrings, comments; about 30 MB, 1800 files on CPython 3.11). The build:

1. lists the files and orders them by a hash of their relative path: a fixed, well-mixed order,
   so a contiguous train/valid split by documents samples every corner of the library;
2. keeps files in that order until `max_bytes` of text (all of them when `max_bytes` is None),
   skipping the few that are not UTF-8;
3. trains a byte-level BPE of `vocab_size` tokens on them with `tokenizers` (`<|endoftext|>` is
   id 0 and ends every document);
4. tokenizes every file as one document into an indexed dataset.

The result is cached under `cache_dir`, keyed by the Python version, vocabulary size, byte budget
and a digest of the file list with sizes; it is built in a temporary directory renamed into place,
under a file lock, so concurrent ranks build it once and an interrupted build leaves nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.data.encode import Record, encode_to_indexed
from engine.log import get_logger

log = get_logger(__name__)

EOD_TOKEN = "<|endoftext|>"
PREFIX_NAME = "stdlib"  # the dataset is <corpus dir>/stdlib.{bin,idx}
_BUILD_VERSION = 1  # bump when the build changes what it writes
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_sources() -> tuple[Path, list[str]]:
    """The stdlib root and its `.py` files (relative POSIX paths), in the corpus's fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    names = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _EXCLUDED_DIRS]  # prune, don't descend
        relative = Path(directory).relative_to(root)
        names += [(relative / f).as_posix() for f in files if f.endswith(".py")]
    return root, sorted(names, key=lambda name: hashlib.sha256(name.encode()).hexdigest())


def _cache_name(root: Path, names: list[str], vocab_size: int, max_bytes: int | None) -> str:
    digest = hashlib.sha256(f"{_BUILD_VERSION}|{sys.version}|{vocab_size}|{max_bytes}".encode())
    for name in names:
        digest.update(f"{name}\t{(root / name).stat().st_size}\n".encode())
    python = f"py{sys.version_info.major}.{sys.version_info.minor}"
    return f"stdlib-{python}-v{vocab_size}-{digest.hexdigest()[:16]}"


def _documents(root: Path, names: list[str], max_bytes: int | None) -> Iterator[Record]:
    """The UTF-8, non-blank files in order, until max_bytes (at least one file)."""
    total = 0
    for name in names:
        raw = (root / name).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a handful of test fixtures are deliberately Latin-1 or KOI8-R
        if not text.strip():
            continue
        if max_bytes is not None and total and total + len(raw) > max_bytes:
            return
        total += len(raw)
        yield Record(name, text, len(raw))


def train_byte_level_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """A GPT-2-style byte-level BPE trained on `texts`, with EOD_TOKEN as id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    return tokenizer


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(root: Path, names: list[str], out: Path, vocab_size: int,
           max_bytes: int | None, progress: bool) -> dict:
    start = time.perf_counter()
    records = list(_documents(root, names, max_bytes))
    tokenizer = train_byte_level_bpe([r.text for r in records], vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    trained = time.perf_counter()
    documents, tokens = encode_to_indexed(
        out / PREFIX_NAME, records, tokenizer_path=out / "tokenizer.json",
        eod_id=tokenizer.token_to_id(EOD_TOKEN), total_bytes=sum(r.nbytes for r in records),
        progress=progress)
    meta = {"python": sys.version, "stdlib": str(root), "vocab_size": tokenizer.get_vocab_size(),
            "max_bytes": max_bytes, "documents": documents, "tokens": tokens,
            "text_bytes": sum(r.nbytes for r in records), "files": [r.origin for r in records],
            "train_tokenizer_s": round(trained - start, 2),
            "total_s": round(time.perf_counter() - start, 2)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def default_corpus(cache_dir: str | Path, vocab_size: int = 2048, *, max_bytes: int | None = None,
                   progress: bool = True) -> tuple[Path, Path]:
    """Build (once) or find the bundled corpus; return (dataset prefix, tokenizer.json path)."""
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    root, names = stdlib_sources()
    final = cache_dir / _cache_name(root, names, vocab_size, max_bytes)
    result = final / PREFIX_NAME, final / "tokenizer.json"
    if final.is_dir():
        return result
    with _file_lock(cache_dir / f".{final.name}.lock"):
        if final.is_dir():  # another process built it while we waited
            return result
        log.info("building the default corpus from %s (vocab %d) into %s", root, vocab_size, final)
        for stale in cache_dir.glob(f".{final.name}.*.tmp"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        scratch = cache_dir / f".{final.name}.{os.getpid()}.tmp"
        scratch.mkdir()
        try:
            meta = _build(root, names, scratch, vocab_size, max_bytes, progress)
            scratch.rename(final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    log.info("default corpus: %d documents, %d tokens, %.1f MB of text, built in %.1f s",
             meta["documents"], meta["tokens"], meta["text_bytes"] / 1e6, meta["total_s"])
    return result
