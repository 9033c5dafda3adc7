import os

# Every test process and every spawned rank stays on one thread: CI has two cores and runs
# pytest-xdist workers that each spawn several ranks.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
