"""`launch/pretrain.py` whose start-up holds each rank once its process groups exist, before it
loads anything, so that a test can signal a rank in that window (tests/test_faults.py):

    torchrun ... tests/slow_start.py HOLD_DIR --config FILE [key=value ...]

Each rank touches HOLD_DIR/rank{R} there and waits (at most HOLD_S) for HOLD_DIR/go before it
goes on to build its model and train.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from distill import run  # noqa: E402

HOLD_S = 120


def main(hold: Path, argv: list[str]) -> int:
    load_and_train = run._run

    def held(*args, **kwargs):
        (hold / f"rank{dist.get_rank()}").touch()
        deadline = time.monotonic() + HOLD_S
        while not (hold / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return load_and_train(*args, **kwargs)

    run._run = held
    return run.main(argv, distill=False, exits=True)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
