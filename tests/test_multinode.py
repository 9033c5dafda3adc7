"""Two-node torchrun across network namespaces: each "node" is its own namespace with its own
address on a veth pair (launch/slurm/netns_nodes.sh), so rendezvous and gloo traffic really cross a
network link (tests/multinode_worker.py runs on each node; tests/test_slurm.py runs the real entry
point on two such nodes under SLURM).

- A two-node job must finish with one rank on each node and the same collective results on both.
- A job whose link is cut mid-run must end on both nodes with a non-zero exit and a clear error
  line within a bounded time, instead of hanging.

Needs root (namespaces; packages are installed by launch/slurm/install_deps.sh when missing); skips,
saying why, where the machine does not allow that.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "launch" / "slurm"
WORKER = REPO / "tests" / "multinode_worker.py"
RDZV_PORT = 29400  # inside private namespaces: no other process can hold it
COLLECTIVE_TIMEOUT_S = 15
_names = itertools.count()

pytestmark = pytest.mark.slow


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


@pytest.fixture
def two_nodes():
    install_or_skip()
    with netns_nodes() as nodes:
        yield nodes


def start_node(nodes: list[Node], k: int, *, rdzv_id: str, log: Path,
               command: list[str]) -> subprocess.Popen:
    """torchrun of one process for node k inside its namespace; node 0 hosts the rendezvous."""
    node = nodes[k]
    # Explicit rendezvous host and local address: the launch does not depend on name resolution.
    cmd = ["ip", "netns", "exec", node.namespace, sys.executable, "-m", "torch.distributed.run",
           "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint={nodes[0].address}:{RDZV_PORT}", f"--rdzv-conf=is_host={int(k == 0)}",
           f"--local-addr={node.address}", f"--rdzv-id={rdzv_id}", "--max-restarts=0", *command]
    env = os.environ | {"GLOO_SOCKET_IFNAME": node.device, "OMP_NUM_THREADS": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def wait_all(procs: list[subprocess.Popen], deadline_s: float) -> list[int | None]:
    """Exit codes, None for a process still running at the deadline (it is then killed)."""
    end = time.monotonic() + deadline_s
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(end - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            codes.append(None)
    return codes


def logs(paths: list[Path]) -> str:
    return "\n".join(f"--- {p} ---\n{p.read_text()[-4000:]}" for p in paths if p.exists())


def link_bytes(node: Node) -> int:
    cmd = ["ip", "-n", node.namespace, "-j", "-s", "link", "show", "dev", node.device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)[0]["stats64"]["rx"]["bytes"]


def test_two_nodes_over_veth_finish_and_agree(two_nodes, tmp_path):
    name, nodes = two_nodes
    steps = 5
    node_logs = [tmp_path / f"node{k}.log" for k in range(2)]
    command = [str(WORKER), "--run-dir", str(tmp_path), "--steps", str(steps),
               "--timeout-s", str(COLLECTIVE_TIMEOUT_S)]
    procs = [start_node(nodes, k, rdzv_id=name, log=node_logs[k], command=command)
             for k in range(2)]
    assert wait_all(procs, 180) == [0, 0], logs(node_logs)
    records = [json.loads((tmp_path / f"progress-rank{r}.json").read_text()) for r in range(2)]
    # One rank on each node, and both saw the whole world's sums at the last step.
    assert {r.pop("address") for r in records} == {node.address for node in nodes}
    assert records[0] == records[1] == {"step": steps, "world_size": 2, "sum_rank_plus_1": 3.0,
                                        "sum_step": 2.0 * steps, "gathered_ranks": [0.0, 1.0]}
    # The ranks could only talk over the veth pair: the one link each namespace has.
    assert all(link_bytes(node) > 2_000 for node in nodes), [link_bytes(n) for n in nodes]


def test_cut_off_node_ends_job_with_clear_error(two_nodes, tmp_path):
    name, nodes = two_nodes
    node_logs = [tmp_path / f"node{k}.log" for k in range(2)]
    command = [str(WORKER), "--run-dir", str(tmp_path), "--steps", "100000", "--step-s", "0.2",
               "--timeout-s", str(COLLECTIVE_TIMEOUT_S)]
    procs = [start_node(nodes, k, rdzv_id=name, log=node_logs[k], command=command)
             for k in range(2)]
    try:
        _wait_for_step(tmp_path, procs, node_logs, step=3, timeout_s=180)
        subprocess.run(["bash", str(SLURM_DIR / "netns_nodes.sh"), "cut", name], check=True)
        # The collective timeout, plus torchrun noticing its worker and closing the rendezvous.
        codes = wait_all(procs, COLLECTIVE_TIMEOUT_S + 45)
    finally:
        wait_all(procs, 0)
    assert None not in codes, \
        f"a node still ran {COLLECTIVE_TIMEOUT_S + 45}s after the cut\n" + logs(node_logs)
    assert all(code != 0 for code in codes), logs(node_logs)
    for path in node_logs:
        assert re.search(r"multinode_worker rank [01]: collective failed at step \d+: \S",
                         path.read_text()), logs(node_logs)


def _wait_for_step(run_dir: Path, procs: list[subprocess.Popen], node_logs: list[Path], *,
                   step: int, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        assert all(p.poll() is None for p in procs), \
            "a node exited before the cut\n" + logs(node_logs)
        try:
            steps = [json.loads((run_dir / f"progress-rank{r}.json").read_text())["step"]
                     for r in range(2)]
            if min(steps) >= step:
                return
        except (OSError, json.JSONDecodeError):
            pass  # not written yet
        time.sleep(0.5)
    pytest.fail(f"the nodes did not reach step {step} within {timeout_s}s\n" + logs(node_logs))
