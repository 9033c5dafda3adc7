"""`launch/pretrain.py` whose start-up holds each rank once its process group exists, so that a
test can signal a rank in that window (tests/test_faults.py):

    torchrun ... tests/slow_start.py HOLD_DIR --config FILE [key=value ...]

Each rank touches HOLD_DIR/rank{R} when its group exists and waits (at most HOLD_S) for
HOLD_DIR/go before going on to build its model and train.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from distill import run  # noqa: E402

HOLD_S = 120


def main(hold: Path, argv: list[str]) -> int:
    init_parallel = run.init_parallel

    def held(*args, **kwargs):
        layout = init_parallel(*args, **kwargs)
        (hold / f"rank{layout.rank}").touch()
        deadline = time.monotonic() + HOLD_S
        while not (hold / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return layout

    run.init_parallel = held
    return run.main(argv, distill=False)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
