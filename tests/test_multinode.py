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

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, SLURM_DIR, Node, install_or_skip, netns_nodes, wait_until

WORKER = ROOT / "tests" / "multinode_worker.py"
RDZV_PORT = 29400  # inside private namespaces: no other process can hold it
COLLECTIVE_TIMEOUT_S = 15

pytestmark = pytest.mark.slow


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
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


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
        wait_until(lambda: _progress_steps(tmp_path) >= 3, what="step 3 on both nodes",
                   alive=lambda: all(p.poll() is None for p in procs),
                   output=lambda: logs(node_logs))
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


def _progress_steps(run_dir: Path) -> int:
    """The step both ranks have reported reaching (0 before both have reported)."""
    try:
        return min(json.loads((run_dir / f"progress-rank{r}.json").read_text())["step"]
                   for r in range(2))
    except (OSError, json.JSONDecodeError):
        return 0  # not written yet, or caught mid-write
