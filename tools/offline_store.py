"""Inspect, check and join offline teacher stores (tools/export_teacher_logits.py's output).

    python tools/offline_store.py info DIR...             what each store holds, bytes per token
    python tools/offline_store.py verify DIR...           every shard's sha256, and every sample
                                                          decoded and checked (ids in range and
                                                          distinct, log-probs finite, leftover
                                                          in [0, 1]; a cross-tokenizer store's
                                                          chunk statistics in range)
    python tools/offline_store.py merge DIR... --out OUT  one store of exports of disjoint sample
                                                          ranges of the same data and teacher

A bad argument is one `ConfigError:` line and exit code 2; a store that fails `verify` is one
`StoreError:` line naming the file, exit code 1. `merge` writes OUT atomically (OUT.tmp, renamed)
and copies the shard files, so its inputs stay as they are.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from distill.offline import METADATA, OfflineTeacherError, TeacherStore, read_metadata
from engine.checkpoint_files import file_record, fsync_dir, write_json
from engine.config import ConfigError, check
from engine.entry import EXIT_CONFIG, EXIT_OK, EXIT_RUNTIME, ensure_new_output, report
from engine.log import get_logger, setup_logging

log = get_logger("offline_store")


class StoreError(RuntimeError):
    """A store's shard does not hold what its metadata says: one line naming the file."""


def _store(directory: str) -> TeacherStore:
    return TeacherStore(directory, read_metadata(directory, key=directory), key=directory)


def info(directory: str) -> list[str]:
    """Lines describing one store."""
    store = _store(directory)
    meta = store.meta
    bits = "float32" if meta["value_bits"] == 32 else f"{meta['value_bits']}-bit"
    cross = meta.get("cross_tokenizer")
    what = f"top-{meta['k']} of vocabulary {meta['vocab_size']}, {bits} log-probabilities" \
        if cross is None else \
        (f"chunk statistics (version {cross['version']}) of a teacher with another tokenizer, "
         f"{cross['teacher_seq_len']} teacher tokens per window, top-{meta['k']} probabilities")
    lines = [f"{directory}: {what} at temperature {meta['temperature']}, seq_len "
             f"{meta['seq_len']}",
             f"  teacher {meta['teacher']['path']} (weights {meta['teacher']['digest'][:12]}), "
             f"data {meta['data_digest'][:12]}"]
    for split, records in store.records.items():
        size = sum(r["size"] for r in records.values())
        tokens = store.covered(split) * meta["seq_len"]
        lines.append(f"  {split}: {store.covered(split)} of {store.map_samples(split)} samples in "
                     f"{len(records)} shards, {size / 2**20:.1f} MiB, "
                     f"{size / max(tokens, 1):.1f} bytes/token")
    return lines


def verify(directory: str) -> int:
    """Check every shard and sample of one store; returns the samples checked."""
    store = _store(directory)
    checked = 0
    for split, records in store.records.items():
        for index, record in sorted(records.items()):
            try:
                store.verify(split, np.array([index * store.per_shard]))
            except ConfigError as err:
                raise StoreError(err.message) from None
            for row in range(record["count"]):
                _check_sample(store, split, index * store.per_shard + row, record["file"])
                checked += 1
    return checked


def _check_sample(store: TeacherStore, split: str, i: int, file: str) -> None:
    where = f"{store.directory / file}: sample {i}"
    try:
        sample = store.sample(split, i)
    except (ValueError, IndexError, OfflineTeacherError) as err:
        raise StoreError(f"{where} does not decode ({err})") from None
    if "cross_tokenizer" in store.meta:
        _check_chunk_stats(sample, where, seq=store.meta["seq_len"], k=store.codec.k)
        return
    ids, logp, leftover = sample["ids"], sample["logp"], sample["leftover"]
    if ids.shape != (store.meta["seq_len"], store.codec.k) or ids.min() < 0 or \
            ids.max() >= store.codec.vocab_size or (np.diff(ids, axis=-1) <= 0).any():
        raise StoreError(f"{where} holds token ids out of range or repeated")
    if not np.isfinite(logp).all() or (logp > 1e-6).any():
        raise StoreError(f"{where} holds log-probabilities that are not finite or above 0")
    if not ((leftover >= 0) & (leftover <= 1)).all():
        raise StoreError(f"{where} holds a leftover mass outside [0, 1]")


def _check_chunk_stats(sample: dict[str, np.ndarray], where: str, *, seq: int, k: int) -> None:
    """A sample of a store of a teacher with another tokenizer: chunk NLLs >= 0, chunk
    log-likelihoods <= 0, top-k probabilities in [0, 1], all finite and of their shapes."""
    nll, ll, top = sample["chunk_nll"], sample["chunk_ll"], sample["single_top"]
    if nll.shape != (seq,) or ll.shape != (seq,) or top.shape != (seq, k):
        raise StoreError(f"{where} holds chunk statistics of other shapes than [{seq}] and "
                         f"[{seq}, {k}]")
    if not all(np.isfinite(x).all() for x in (nll, ll, top)) or (nll < 0).any() or \
            (ll > 0).any() or ((top < 0) | (top > 1)).any():
        raise StoreError(f"{where} holds chunk statistics that are not finite or out of range")


def merge(directories: list[str], out: Path) -> None:
    """Join stores of the same settings whose shards are disjoint into `out`."""
    ensure_new_output(out, force=None)
    metas = [read_metadata(d, key=d) for d in directories]
    first = {k: v for k, v in metas[0].items() if k != "splits"}
    splits: dict[str, dict] = {}
    owner: dict[tuple[str, int], str] = {}
    for directory, meta in zip(directories, metas):
        differ = sorted(k for k in set(first) | set(meta) - {"splits"}
                        if meta.get(k) != first.get(k))
        check(not differ, directory, f"was exported with other settings than {directories[0]} "
                                     f"({', '.join(differ)})")
        for split, section in meta["splits"].items():
            merged = splits.setdefault(split, {"map_samples": section["map_samples"], "shards": []})
            for record in section["shards"]:
                check((split, record["index"]) not in owner, directory,
                      f"holds {split} shard {record['index']}, which "
                      f"{owner.get((split, record['index']))} holds too: the ranges overlap")
                owner[split, record["index"]] = directory
                merged["shards"].append(record)
    _write_merged(out, {**first, "splits": splits}, owner)


def _write_merged(out: Path, meta: dict, owner: dict[tuple[str, int], str]) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for section in meta["splits"].values():
        section["shards"].sort(key=lambda r: r["index"])
    for split, section in meta["splits"].items():
        for record in section["shards"]:
            shutil.copyfile(Path(owner[split, record["index"]]) / record["file"],
                            tmp / record["file"])
            check(file_record(tmp / record["file"]) == {k: record[k] for k in ("size", "sha256")},
                  owner[split, record["index"]], f"{record['file']} does not match its metadata")
    write_json(tmp / METADATA, meta)
    tmp.rename(out)
    fsync_dir(out.parent)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("info", "verify", "merge"))
    parser.add_argument("stores", nargs="+", help="store directories")
    parser.add_argument("--out", help="merge: the merged store's directory (must not exist)")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            print("\n".join(line for d in args.stores for line in info(d)))
        elif args.command == "verify":
            for directory in args.stores:
                log.info("%s: %d samples verified", directory, verify(directory))
        else:
            check(bool(args.out), "--out", "is required with merge")
            merge(args.stores, Path(args.out).expanduser())
            log.info("merged %d stores into %s", len(args.stores), args.out)
    except ConfigError as err:
        return report(err, EXIT_CONFIG)
    except StoreError as err:
        return report(err, EXIT_RUNTIME)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
