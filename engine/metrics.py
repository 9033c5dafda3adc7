"""Run-directory metrics: `metrics.jsonl` (one object per logged step), TensorBoard events when
`tensorboard` is installed, and a tqdm progress bar. Only rank 0 writes; other ranks get a no-op.

A crash or a full disk can cut the record being appended. Readers (`read_metrics`) drop such a
line with a warning naming the file and line, so the file stays readable; each record is written
whole in one flush, and the resume-time rewrite goes through a temporary file and a rename.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from engine.log import get_logger

log = get_logger(__name__)


class MetricsError(RuntimeError):
    """metrics.jsonl cannot be written (a full disk, ...): one line naming the file."""


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, skipping (with a warning) lines that are not a JSON object:
    what a crash or a full disk leaves when it cuts the line being written."""
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            log.warning("%s:%d is not a whole record (cut by a crash or a full disk?): dropped",
                        path, number)
    return records


def _tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional; absent means no event files
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


class MetricsWriter:
    """Appends metrics to `run_dir/metrics.jsonl`; keeps a progress bar over `total_steps`."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int = 0,
                 progress: bool = True):
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        self._truncate_after(path, start_step)
        self._file = path.open("a")
        self._tb = _tensorboard_writer(run_dir)
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, mininterval=1.0)

    @staticmethod
    def _truncate_after(path: Path, start_step: int) -> None:
        """On resume, drop records past the checkpoint (and cut lines) so the file reads as one
        clean run; rewritten aside and renamed over, so a crash here loses nothing."""
        if not path.exists():
            return
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= start_step]
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(partial, path)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        try:
            self._file.write(json.dumps(clean) + "\n")
            self._file.flush()
        except OSError as err:
            raise MetricsError(f"cannot write {self._file.name}: {err.strerror or err}") from None
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])
        if self._bar is not None:
            shown = {k: record[k] for k in ("loss", "tokens_per_s") if k in record}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
