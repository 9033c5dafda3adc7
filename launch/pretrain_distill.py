"""Distill a student from a frozen teacher.

    torchrun --nproc_per_node N launch/pretrain_distill.py --config FILE [section.key=value ...]
    python launch/pretrain_distill.py --config FILE ...          # one process
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from distill.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], distill=True, exits=True))
