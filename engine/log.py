"""The one rank-aware logging helper: stdlib `logging`, records from rank 0 unless asked.

Library modules do `log = get_logger(__name__)` and call `log.info(...)`; a record emitted with
`extra={"all_ranks": True}` is kept on every rank and prefixed with the rank.
"""

from __future__ import annotations

import logging
import os
import sys

import torch.distributed as dist

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def current_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rank = current_rank()
        if getattr(record, "all_ranks", False):
            record.msg = f"[rank {rank}] {record.msg}"
            return True
        return rank == 0


def setup_logging(level: int = logging.INFO) -> None:
    """Install one stderr handler on the root logger that drops non-zero ranks' records."""
    root = logging.getLogger()
    if any(getattr(h, "_megadistill", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_RankFilter())
    handler._megadistill = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def error_line(err: BaseException, *, show: bool = True, prefix: str | None = None) -> None:
    """Print `Kind: message` as ONE line on stderr (a multi-line message is folded), when `show`.

    Entry points report every failure a user can act on this way, from one rank only: they pass
    `show` true on the rank that speaks for the others (rank 0 of the role for errors every rank
    of the role meets alike)."""
    if not show:
        return
    message = " ".join(str(err).split())
    print(f"{prefix or type(err).__name__}: {message}", file=sys.stderr, flush=True)
