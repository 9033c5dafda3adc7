"""Build (or find in the cache) the bundled default corpus and print where it is.

    python tools/build_corpus.py [--vocab-size 2048] [--cache-dir ~/.cache/megadistill] [--max-bytes N]

Prints the dataset prefix and the tokenizer.json path, one per line. Training builds the same
corpus on first use (`data.path: default`); this is for building it ahead of time, or timing it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.data import DataConfig, default_corpus  # noqa: E402
from engine.log import setup_logging  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    defaults = DataConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    parser.add_argument("--cache-dir", default=defaults.cache_dir)
    parser.add_argument("--max-bytes", type=int, default=defaults.corpus_max_bytes,
                        help="cap on the stdlib text used (default: all of it)")
    args = parser.parse_args(argv)
    setup_logging()
    config = DataConfig(vocab_size=args.vocab_size, cache_dir=args.cache_dir,
                        corpus_max_bytes=args.max_bytes)  # validates the numbers
    start = time.perf_counter()
    prefix, tokenizer = default_corpus(config.cache_dir, config.vocab_size,
                                       max_bytes=config.corpus_max_bytes)
    print(prefix)
    print(tokenizer)
    print(f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
