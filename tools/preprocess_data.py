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
byte-level BPEs. Several teachers with their own tokenizers: `--teacher-tokenizer NAME=T.json`,
repeated, writes each one's PREFIX.teacher-NAME, PREFIX.teacher-NAME.offsets and
PREFIX.teacher-NAME.shared_vocab.npy beside the one PREFIX.offsets (a run names the tokenization
of each teacher as `distill.teachers[i].tokenizer: NAME`).
"""

from __future__ import annotations

import argparse
import re
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
    TOKENIZER_NAME,
    check_same_text,
    teacher_prefixes,
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
    parser.add_argument("--teacher-tokenizer", action="append", default=[],
                        metavar="[NAME=]TOKENIZER.json",
                        help="also write the teacher's ids and both byte offsets (paired data); "
                             "repeat as NAME=T.json for several teachers' tokenizers")
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


def teacher_tokenizers(values: list[str]) -> dict[str, str]:
    """{name ("": unnamed): tokenizer path} of the --teacher-tokenizer values."""
    out: dict[str, str] = {}
    for value in values:
        name, path = value.split("=", 1) if "=" in value and not Path(value).exists() \
            else ("", value)
        if name and not re.fullmatch(TOKENIZER_NAME, name):
            raise DataError(f"--teacher-tokenizer {value}: the name must be letters, digits, "
                            f"'_', '.', '-' (got {name!r})")
        if name in out:
            what = f"the name {name!r}" if name else "a tokenizer without a name"
            raise DataError(f"--teacher-tokenizer: {what} is given twice")
        out[name] = path
    return out


def run(args: argparse.Namespace) -> tuple[int, int]:
    if args.workers < 1:
        raise DataError(f"--workers must be >= 1 (got {args.workers})")
    teachers = teacher_tokenizers(args.teacher_tokenizer)
    prefix = args.output_prefix
    prefixes = [prefix] + ([prefix + OFFSETS_SUFFIX] if teachers else []) + [
        p for name in teachers for p in teacher_prefixes(prefix, name).datasets]
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
    if teachers:
        try:
            write_paired(args, teachers, eod_id is not None, total_bytes)
        except BaseException:
            for prefix in prefixes:
                for ext in (".bin", ".idx"):
                    Path(prefix + ext).unlink(missing_ok=True)
            for name in teachers:
                Path(teacher_prefixes(args.output_prefix, name).shared_vocab).unlink(
                    missing_ok=True)
            raise
    return written


def write_paired(args: argparse.Namespace, teachers: dict[str, str], append_eod: bool,
                 total_bytes: int) -> None:
    """Each teacher's ids and byte offsets, and the student's, beside the student's dataset
    (checked alike)."""
    prefix = args.output_prefix
    student_tok = load_tokenizer(args.tokenizer)
    student_eod = find_eod_id(student_tok, args.eod_token) if append_eod else None
    student_table = token_bytes(student_tok, eod_id=student_eod)
    for name, path in teachers.items():
        teacher_tok, out = load_tokenizer(path), teacher_prefixes(prefix, name)
        eod = find_eod_id(teacher_tok, args.eod_token) if append_eod else None
        encode_to_indexed(out.ids, input_records(args), tokenizer_path=path, eod_id=eod,
                          workers=args.workers, total_bytes=total_bytes,
                          progress=not args.no_progress)
        table = token_bytes(teacher_tok, eod_id=eod)
        check_same_text(IndexedTokens(prefix), IndexedTokens(out.ids), student_table, table)
        write_offsets(out.offsets, out.ids, table)
        write_shared_vocab(out.shared_vocab, student_table, table, eods=(student_eod, eod))
    write_offsets(prefix + OFFSETS_SUFFIX, prefix, student_table)


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
