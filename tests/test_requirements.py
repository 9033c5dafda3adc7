"""The declared torch floor is the real one: the features that set it exist in the installed torch,
and the installed torch satisfies the floor (pyproject.toml is read, not restated)."""

import inspect
import re
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _floor() -> tuple[int, int]:
    """The `torch>=X.Y` of pyproject.toml's dependencies (read as text: tomllib needs 3.11)."""
    (major, minor), = re.findall(r'^\s*"torch>=(\d+)\.(\d+)",', (ROOT / "pyproject.toml").read_text(),
                                 re.M)
    return int(major), int(minor)


def test_installed_torch_meets_the_declared_floor():
    installed = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    assert installed >= _floor() == (2, 8)


def test_features_that_set_the_floor_exist():
    # torch.mm(a, b, out_dtype=...) arrived in 2.8 (distill/fused.py's bf16 tiles on CUDA).
    # The CPU build has the operator but no CPU kernel (it is a CUDA path): check it on `meta`.
    assert hasattr(torch.ops.aten.mm, "dtype")
    a = torch.empty(2, 3, dtype=torch.bfloat16, device="meta")
    assert torch.mm(a, a.T, out_dtype=torch.float32).dtype == torch.float32
    # SDPA's enable_gqa (layers/attention.py) arrived in 2.5.
    q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    assert F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True).shape == q.shape
    assert "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")
    # Gloo collectives on flat buffers under either name (engine/collectives.py).
    import torch.distributed as dist
    assert hasattr(dist, "all_gather_into_tensor") or hasattr(dist, "all_gather_single")
    assert inspect.isfunction(dist.new_group) and "timeout" in inspect.signature(dist.new_group).parameters
