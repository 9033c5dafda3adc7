"""Plain language-model training (no teacher): how the demo trains its teacher.

    torchrun --nproc_per_node N launch/pretrain.py --config FILE [section.key=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from distill.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], distill=False, exits=True))
