"""Plain text or JSONL to a Megatron indexed dataset (PREFIX.bin / PREFIX.idx).

    python tools/preprocess_data.py --input a.jsonl b.jsonl --tokenizer tokenizer.json \\
        --output-prefix data/corpus [--json-key text] [--workers 4]

Inputs ending in .jsonl or .json are JSON Lines, one document per line in field `--json-key`
(default "text"); passing `--json-key` makes every input JSONL. Other inputs are plain text, one
document per file (or per non-blank line with `--text-docs line`). Each document is tokenized with
the Hugging Face `tokenizer.json` and ends with the end-of-document token. Documents keep the input
order. An existing PREFIX.bin/.idx is kept unless `--force`. Nothing is written unless everything
succeeds (the output is built under temporary names, removed on any failure): a bad input stops
with one `error:` line on stderr and exit code 2, a failed write (a full disk) with one `error:`
line and exit code 1.

With `--teacher-tokenizer T.json` (a teacher with another tokenizer, `distill.cross_tokenizer`) it
also writes the paired data beside PREFIX (engine/data/paired.py): PREFIX.teacher (the teacher's
ids, same documents in the same order), PREFIX.offsets and PREFIX.teacher_offsets (where each
token ends in bytes) and PREFIX.shared_vocab.npy (the tokens both vocabularies share), after
checking that both tokenizations spell every document's bytes alike. Both tokenizers must be
byte-level BPEs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.data import (  # noqa: E402
    EOD_CANDIDATES,
    DataError,
    IndexedTokens,
    Record,
    check_inputs,
    encode_to_indexed,
    file_records,
    find_eod_id,
    load_tokenizer,
)
from engine.data.paired import (  # noqa: E402
    OFFSETS_SUFFIX,
    PAIRED_SUFFIXES,
    SHARED_VOCAB_SUFFIX,
    TEACHER_OFFSETS_SUFFIX,
    TEACHER_SUFFIX,
    check_same_text,
    token_bytes,
    write_offsets,
    write_shared_vocab,
)
from engine.log import get_logger, setup_logging  # noqa: E402

log = get_logger("preprocess_data")
JSONL_SUFFIXES = (".jsonl", ".json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="text or JSONL files, read in the order given")
    parser.add_argument("--tokenizer", required=True, metavar="TOKENIZER.json",
                        help="Hugging Face tokenizer.json")
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX",
                        help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--json-key", default=None,
                        help="JSONL field holding the text (default 'text'); makes inputs JSONL")
    parser.add_argument("--text-docs", choices=("file", "line"), default="file",
                        help="for plain text: one document per file or per non-blank line")
    parser.add_argument("--teacher-tokenizer", default=None, metavar="TOKENIZER.json",
                        help="also write the teacher's ids and both byte offsets (paired data)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--eod-token", default=None,
                        help=f"end-of-document token (default: the first found of "
                             f"{', '.join(EOD_CANDIDATES)})")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="end every document with the end-of-document token")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--force", action="store_true", help="replace an existing PREFIX.bin/.idx")
    return parser.parse_args(argv)


def input_records(args: argparse.Namespace) -> Iterator[Record]:
    for path in map(Path, args.input):
        jsonl = args.json_key is not None or path.suffix in JSONL_SUFFIXES
        yield from file_records(path, per_line=args.text_docs == "line",
                                json_key=(args.json_key or "text") if jsonl else None)


def run(args: argparse.Namespace) -> tuple[int, int]:
    if args.workers < 1:
        raise DataError(f"--workers must be >= 1 (got {args.workers})")
    prefixes = [args.output_prefix] + ([] if args.teacher_tokenizer is None else [
        args.output_prefix + suffix for suffix in PAIRED_SUFFIXES])
    existing = [p for prefix in prefixes for p in (f"{prefix}.bin", f"{prefix}.idx")
                if Path(p).exists()]
    if existing and not args.force:
        raise DataError(f"{existing[0]} exists (pass --force to replace the dataset)")
    total_bytes = check_inputs(args.input)
    tokenizer = load_tokenizer(args.tokenizer)
    eod_id = find_eod_id(tokenizer, args.eod_token) if args.append_eod else None
    written = encode_to_indexed(args.output_prefix, input_records(args),
                                tokenizer_path=args.tokenizer, eod_id=eod_id,
                                workers=args.workers, total_bytes=total_bytes,
                                progress=not args.no_progress)
    if args.teacher_tokenizer is not None:
        try:
            write_paired(args, eod_id is not None, total_bytes)
        except BaseException:
            for prefix in prefixes:
                for ext in (".bin", ".idx"):
                    Path(prefix + ext).unlink(missing_ok=True)
            Path(args.output_prefix + SHARED_VOCAB_SUFFIX).unlink(missing_ok=True)
            raise
    return written


def write_paired(args: argparse.Namespace, append_eod: bool, total_bytes: int) -> None:
    """The teacher's ids and both byte offsets beside the student's dataset (checked alike)."""
    student_tok, teacher_tok = (load_tokenizer(p) for p in (args.tokenizer, args.teacher_tokenizer))
    eods = [find_eod_id(t, args.eod_token) if append_eod else None
            for t in (student_tok, teacher_tok)]
    prefix = args.output_prefix
    encode_to_indexed(prefix + TEACHER_SUFFIX, input_records(args),
                      tokenizer_path=args.teacher_tokenizer, eod_id=eods[1],
                      workers=args.workers, total_bytes=total_bytes,
                      progress=not args.no_progress)
    tables = [token_bytes(t, eod_id=e) for t, e in zip((student_tok, teacher_tok), eods)]
    check_same_text(IndexedTokens(prefix), IndexedTokens(prefix + TEACHER_SUFFIX), *tables)
    write_offsets(prefix + OFFSETS_SUFFIX, prefix, tables[0])
    write_offsets(prefix + TEACHER_OFFSETS_SUFFIX, prefix + TEACHER_SUFFIX, tables[1])
    write_shared_vocab(prefix, *tables, eods=tuple(eods))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        documents, tokens = run(args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a lost mount: the temporary files are already gone
        print(f"error: writing {args.output_prefix}.bin/.idx failed: {err.strerror or err}",
              file=sys.stderr)
        return 1
    log.info("wrote %s.bin/.idx: %d documents, %d tokens", args.output_prefix, documents, tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
