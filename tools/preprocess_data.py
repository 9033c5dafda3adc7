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
    Record,
    check_inputs,
    encode_to_indexed,
    file_records,
    find_eod_id,
    load_tokenizer,
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
    existing = [p for p in (f"{args.output_prefix}.bin", f"{args.output_prefix}.idx")
                if Path(p).exists()]
    if existing and not args.force:
        raise DataError(f"{existing[0]} exists (pass --force to replace the dataset)")
    total_bytes = check_inputs(args.input)
    tokenizer = load_tokenizer(args.tokenizer)
    eod_id = find_eod_id(tokenizer, args.eod_token) if args.append_eod else None
    return encode_to_indexed(args.output_prefix, input_records(args),
                             tokenizer_path=args.tokenizer, eod_id=eod_id, workers=args.workers,
                             total_bytes=total_bytes, progress=not args.no_progress)


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
