"""What the end-to-end tests share: running the entry points and tools (under torchrun or
alone), waiting for a run to reach a step, comparing two runs' logged metrics, the timeouts they
wait with, the float tolerances they compare at, and the network-namespace "nodes" of the
multi-node tests.

Config builders for tiny runs stay in tests/trainer_utils.py; float64 references shared by several
test modules are in tests/references.py, tiny transformers models in tests/hf_models.py.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# ---- timeouts (s): hang guards sized for the 2-core CI machine with two xdist workers busy ------
RUN_LIMIT_S = 300  # one entry-point, tool or torchrun command, start-up (and corpus build) included
STEP_WAIT_S = 180  # a run started in the background reaching the step a test interrupts it at
POLL_S = 0.1  # how often a wait looks again

# ---- tolerances ---------------------------------------------------------------------------------
# float32 results of the same math in different operation orders (a reduction split otherwise, a
# sum of logged terms): a few float32 ulps (2**-23 = 1.2e-7 relative), with a floor for values
# near zero.
FP32_RTOL, FP32_ATOL = 1e-6, 1e-7
# Two float32 training runs with other layouts or accumulation orders (distributed vs single
# process, offline vs colocated teacher): round-off of a few hundred operations per step, over a
# few steps.
RUN_RTOL, RUN_ATOL = 1e-5, 1e-7
# The gradient norm after the first update: AdamW divides each gradient element by its own
# magnitude, so an element whose sum nearly cancels (|g| a few ulps of its terms) turns float32
# round-off into a weight change of a visible fraction of lr; one step later the norm carries it.
# Measured 1.1e-5 and 2.3e-5 (PP=2 x TP=2 + SP against one process); a missing reduction is O(1).
RUN_GRAD_NORM_RTOL = 1e-4
RUN_KEYS = ("loss", "lm_loss", "kd_loss", "grad_norm")


# ---- commands ------------------------------------------------------------------------------------

def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment with one thread per process (CI's two cores) and this checkout's code."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def command(script: str | Path, *args: object, nproc: int = 2,
            launcher_args: Sequence[str] = ()) -> list[str]:
    """`python -m torch.distributed.run --standalone` of `script` (relative to the checkout) on
    `nproc` local ranks; nproc=0 runs it as a plain Python script."""
    launcher = [] if nproc == 0 else ["-m", "torch.distributed.run", "--standalone",
                                      f"--nproc_per_node={nproc}", *launcher_args]
    return [sys.executable, *launcher, str(ROOT / script), *map(str, args)]


def run(cmd: list[str], *, timeout: float = RUN_LIMIT_S, env: dict[str, str] | None = None,
        **kwargs) -> subprocess.CompletedProcess:
    """Run to the end, capturing text output."""
    return subprocess.run(cmd, cwd=ROOT, env=env or subprocess_env(), capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def run_ok(cmd: list[str], *, timeout: float = RUN_LIMIT_S) -> subprocess.CompletedProcess:
    done = run(cmd, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def start(cmd: list[str], *, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """Start in the background in a session of its own (a test can signal the whole launch);
    stderr is kept for the test's messages."""
    kwargs = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, **kwargs}
    return subprocess.Popen(cmd, cwd=ROOT, env=env or subprocess_env(), text=True,
                            start_new_session=True, **kwargs)


def finish(proc: subprocess.Popen, limit: float = RUN_LIMIT_S) -> tuple[int, str]:
    """(exit code, what it wrote to its pipes) of a started command; one still running after
    `limit` is killed with everything it started and fails the test."""
    try:
        output = "".join(x or "" for x in proc.communicate(timeout=limit))
    except subprocess.TimeoutExpired:
        # torchrun starts each worker in a session of its own: kill them one by one (a stopped
        # one too), or they keep stderr open and this process waiting.
        for pid in [*descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output = "".join(x or "" for x in proc.communicate())
        raise AssertionError(f"still running after {limit} s:\n{output[-3000:]}") from None
    return proc.returncode, output


def children(pid: int) -> list[tuple[int, list[bytes]]]:
    """(pid, environment) of the processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            parent = int(Path(entry, "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == pid:
                found.append((int(entry.name), Path(entry, "environ").read_bytes().split(b"\0")))
        except (OSError, ValueError, IndexError):
            continue
    return found


def descendants(pid: int) -> list[int]:
    kids = [child for child, _ in children(pid)]
    return kids + [grandchild for child in kids for grandchild in descendants(child)]


# ---- waiting for a run ---------------------------------------------------------------------------

def last_logged_step(run_dir: Path) -> int:
    """The last step in `run_dir/metrics.jsonl` so far, 0 before any (a line being written is
    not one)."""
    path = run_dir / "metrics.jsonl"
    lines = [x for x in path.read_text().splitlines() if x.endswith("}")] if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def wait_until(reached: Callable[[], bool], *, alive: Callable[[], bool], what: str,
               output: Callable[[], str], timeout_s: float = STEP_WAIT_S) -> None:
    """Poll until `reached()`; fail at once when the run is no longer `alive()`, or after
    timeout_s, showing `output()`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if reached():
            return
        if not alive():
            pytest.fail(f"the run ended before {what}:\n{output()}")
        time.sleep(POLL_S)
    pytest.fail(f"{what} not reached in {timeout_s} s:\n{output()}")


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, *,
                  timeout_s: float = STEP_WAIT_S) -> None:
    """Wait until the run started as `proc` has logged `step`."""
    wait_until(lambda: last_logged_step(run_dir) >= step, alive=lambda: proc.poll() is None,
               what=f"step {step}", output=lambda: _stderr_tail(proc), timeout_s=timeout_s)


def _stderr_tail(proc: subprocess.Popen) -> str:
    if proc.poll() is None:  # reading a running process's stderr would wait for its end
        return "(still running)"
    return proc.stderr.read()[-3000:] if proc.stderr else ""


# ---- comparing runs ------------------------------------------------------------------------------

def assert_same_run(got: list[dict], want: list[dict], *, keys: Sequence[str] = RUN_KEYS,
                    rtol: float = RUN_RTOL, atol: float = RUN_ATOL,
                    key_atol: dict[str, float] | None = None, optional: Sequence[str] = ()) -> None:
    """The same steps, and at each the same `keys` within rtol/atol (`key_atol` overrides atol per
    key; `grad_norm` after step 1 gets at least RUN_GRAD_NORM_RTOL, unless rtol is 0: bitwise);
    `optional` keys are compared where `want` logs them (and `got` must then log them)."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    key_atol = key_atol or {}
    for a, b in zip(got, want):
        for key in [*keys, *(k for k in optional if k in b)]:
            key_rtol = max(rtol, RUN_GRAD_NORM_RTOL) if key == "grad_norm" and rtol and b["step"] > 1 \
                else rtol
            assert math.isclose(a[key], b[key], rel_tol=key_rtol, abs_tol=key_atol.get(key, atol)), \
                (key, b["step"], a[key], b[key])


# ---- two network-namespace "nodes" (tests/test_multinode.py, tests/test_slurm.py) ----------------

SLURM_DIR = ROOT / "launch" / "slurm"
_names = itertools.count()


def install_or_skip() -> None:
    """Install slurm-wlm, munge and iproute2 when missing; skip, saying why, where not allowed."""
    proc = subprocess.run(["bash", str(SLURM_DIR / "install_deps.sh")], capture_output=True,
                          text=True, timeout=900)
    if proc.returncode == 3:
        pytest.skip(f"cannot install the multi-node test packages here: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"install_deps.sh failed:\n{proc.stderr[-3000:]}"
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, SLURM daemons)")


@dataclass(frozen=True)
class Node:
    namespace: str
    address: str
    device: str


@contextlib.contextmanager
def netns_nodes() -> Iterator[tuple[str, list[Node]]]:
    """Two namespaces joined by a veth pair (a name unique to this process), removed afterwards."""
    name = f"md{os.getpid() % 100000}x{next(_names)}"
    script = str(SLURM_DIR / "netns_nodes.sh")
    try:
        out = subprocess.run(["bash", script, "up", name], check=True, capture_output=True,
                             text=True).stdout
        yield name, [Node(*line.split()) for line in out.splitlines()]
    finally:
        subprocess.run(["bash", script, "down", name], capture_output=True)
