"""Two-node torchrun across network namespaces: each "node" is its own namespace with its own address
on a veth pair (launch/slurm/netns_nodes.sh), so rendezvous and gloo traffic really cross a network
link. One run must finish with the same collective results on both nodes; a second run, whose link is
cut mid-run, must end on both nodes with a non-zero exit and a clear error within a bounded time.

Needs root (namespaces; packages are installed by launch/slurm/install_deps.sh when missing); skips,
saying why, where the machine does not allow that.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
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
    """Install slurm-wlm, munge and iproute2 when missing; skip (saying why) where that is forbidden."""
    proc = subprocess.run(["bash", str(SLURM_DIR / "install_deps.sh")], capture_output=True, text=True,
                          timeout=900)
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


@pytest.fixture
def two_nodes():
    install_or_skip()
    name = f"md{os.getpid() % 100000}x{next(_names)}"
    script = str(SLURM_DIR / "netns_nodes.sh")
    try:
        out = subprocess.run(["bash", script, "up", name], check=True, capture_output=True, text=True).stdout
        yield name, [Node(*line.split()) for line in out.splitlines()]
    finally:
        subprocess.run(["bash", script, "down", name], capture_output=True)


def start_node(nodes: list[Node], k: int, *, run_dir: Path, rdzv_id: str,
               worker_args: list[str]) -> subprocess.Popen:
    """torchrun for node k inside its namespace; node 0 hosts the c10d rendezvous store."""
    node = nodes[k]
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = ["ip", "netns", "exec", node.namespace, sys.executable, "-m", "torch.distributed.run",
           "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint={nodes[0].address}:{RDZV_PORT}", f"--rdzv-conf=is_host={int(k == 0)}",
           f"--local-addr={node.address}", f"--rdzv-id={rdzv_id}", "--max-restarts=0",
           str(WORKER), "--run-dir", str(run_dir), "--timeout-s", str(COLLECTIVE_TIMEOUT_S),
           *worker_args]
    env = os.environ | {"GLOO_SOCKET_IFNAME": node.device, "OMP_NUM_THREADS": "1"}
    with open(run_dir / "torchrun.log", "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)


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


def logs(run_dirs: list[Path]) -> str:
    return "\n".join(f"--- node {k} ---\n{(d / 'torchrun.log').read_text()[-4000:]}"
                     for k, d in enumerate(run_dirs))


def progress(run_dir: Path) -> dict:
    """The last step record written by the one rank that ran on this node."""
    (path,) = run_dir.glob("progress-rank*.json")
    return json.loads(path.read_text())


def link_bytes(node: Node) -> int:
    out = subprocess.run(["ip", "-n", node.namespace, "-j", "-s", "link", "show", "dev", node.device],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)[0]["stats64"]["rx"]["bytes"]


def test_two_nodes_over_veth_finish_and_agree(two_nodes, tmp_path):
    name, nodes = two_nodes
    steps = 3
    run_dirs = [tmp_path / f"node{k}" for k in range(2)]
    procs = [start_node(nodes, k, run_dir=run_dirs[k], rdzv_id=name, worker_args=["--steps", str(steps)])
             for k in range(2)]
    assert wait_all(procs, 180) == [0, 0], logs(run_dirs)
    records = [progress(d) for d in run_dirs]
    # Rank 0 and rank 1 ran in different namespaces; both saw the full world's sums at the last step.
    expected = {"step": steps, "world_size": 2, "sum_rank_plus_1": 3.0, "sum_step": 2.0 * steps,
                "gathered_ranks": [0.0, 1.0], "restart": 0}
    assert records[0] == records[1] == expected
    (metrics_dir,) = [d for d in run_dirs if (d / "metrics.jsonl").exists()]
    lines = (metrics_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, steps + 1))
    # Every byte between the ranks had to cross the veth pair: the only link each namespace has.
    assert all(link_bytes(node) > 10_000 for node in nodes)


def test_cut_off_node_ends_job_with_clear_error(two_nodes, tmp_path):
    name, nodes = two_nodes
    run_dirs = [tmp_path / f"node{k}" for k in range(2)]
    procs = [start_node(nodes, k, run_dir=run_dirs[k], rdzv_id=name,
                        worker_args=["--steps", "100000", "--step-s", "0.2"]) for k in range(2)]
    try:
        _wait_for_step(run_dirs, procs, step=3, timeout_s=180)
        subprocess.run(["bash", str(SLURM_DIR / "netns_nodes.sh"), "cut", name], check=True)
        # The collective timeout, plus torchrun noticing its worker and closing the rendezvous.
        codes = wait_all(procs, COLLECTIVE_TIMEOUT_S + 45)
    finally:
        wait_all(procs, 0)
    assert None not in codes, f"a node still ran {COLLECTIVE_TIMEOUT_S + 45}s after the cut\n" + logs(run_dirs)
    assert all(code != 0 for code in codes), logs(run_dirs)
    for d in run_dirs:
        text = (d / "torchrun.log").read_text()
        assert re.search(r"multinode_worker rank [01]: collective failed at step \d+: \S", text), \
            logs(run_dirs)


def _wait_for_step(run_dirs: list[Path], procs: list[subprocess.Popen], *, step: int,
                   timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        assert all(p.poll() is None for p in procs), "a node exited before the cut\n" + logs(run_dirs)
        try:
            if all(progress(d)["step"] >= step for d in run_dirs):
                return
        except (ValueError, json.JSONDecodeError):
            pass  # not written yet
        time.sleep(0.5)
    pytest.fail(f"the nodes did not reach step {step} within {timeout_s}s\n" + logs(run_dirs))
