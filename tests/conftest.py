import os

# Every test process and every spawned rank runs OMP_NUM_THREADS threads, 1 unless the caller says
# otherwise: CI has two cores and runs pytest-xdist workers that each spawn several ranks. The suite
# must also pass at 2 (other reduction orders in the CPU kernels), so the count is not pinned here.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
