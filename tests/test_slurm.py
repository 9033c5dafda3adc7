"""launch/slurm/pretrain_distill.sbatch on real SLURM clusters started on this machine
(launch/slurm/local_cluster.sh: munged, slurmctld, slurmd), running the real entry point
launch/pretrain_distill.py on a tiny TP=2 + SP config:

- one node (this host, one torchrun with 2 processes) and two nodes (two network namespaces with
  their own addresses and slurmd each, one torchrun per node, TP split across them) both run to
  the end, and log the same losses bit for bit; PP=2 with a stage on each node logs them to fp32
  round-off;
- a job that gets SIGUSR1 mid-run (what `--signal=B:USR1@120` sends before the time limit) must
  checkpoint, requeue itself and resume where it stopped.

Needs root (packages are installed by launch/slurm/install_deps.sh when missing; slurmd runs jobs
as their owner); skips, saying why, where the machine does not allow that.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT as REPO
from tests.helpers import (
    SLURM_DIR,
    assert_same_run,
    install_or_skip,
    last_logged_step,
    netns_nodes,
    wait_until,
)
from tests.trainer_utils import base_config, make_teacher, read_metrics, teacher_config, write_config

SBATCH = SLURM_DIR / "pretrain_distill.sbatch"
METRIC_KEYS = {"step", "loss", "lm_loss", "kd_loss", "act_loss", "lr", "tokens_per_s"}
LOSS_KEYS = ("loss", "lm_loss", "kd_loss", "act_loss", "grad_norm")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Cluster:
    state: Path  # local_cluster.sh's folder
    netns: str | None  # where clients must run to reach slurmctld (two-node cluster); None: here

    def client(self, *cmd: str, cwd: Path | None = None, env: dict | None = None) -> str:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        env = (env or dict(os.environ)) | {"SLURM_CONF": str(self.state / "slurm.conf")}
        return subprocess.run([*prefix, *cmd], cwd=cwd, env=env, check=True, capture_output=True,
                              text=True).stdout

    def submit(self, submit_dir: Path, *args: str, nodes: int = 1, cpus: int = 2) -> int:
        """sbatch the script from `submit_dir` (logs/ goes there): `cpus` ranks on each node."""
        (submit_dir / "logs").mkdir(parents=True, exist_ok=True)
        env = os.environ | {"REPO_DIR": str(REPO), "PYTHON": sys.executable}
        out = self.client("sbatch", "--parsable", "--job-name=md-test", f"--nodes={nodes}",
                          f"--cpus-per-task={cpus}", str(SBATCH), *args, cwd=submit_dir, env=env)
        return int(out.strip().split(";")[0])

    def job(self, job: int) -> dict[str, str]:
        out = self.client("scontrol", "show", "job", "-o", str(job))
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for_end(self, job: int, submit_dir: Path, timeout_s: float) -> dict[str, str]:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            fields = self.job(job)
            if fields["JobState"] in ENDED:
                return fields
            time.sleep(0.5)
        pytest.fail(f"job {job} still {fields['JobState']} after {timeout_s}s\n"
                    f"{job_log(submit_dir, job)}")


@contextlib.contextmanager
def local_cluster(netns: str | None = None) -> Iterator[Cluster]:
    # Not under pytest's 0700 tmp tree: munged insists its socket directory be searchable by all.
    state = Path(tempfile.mkdtemp(prefix="md-slurm-"))
    script = str(SLURM_DIR / "local_cluster.sh")
    try:
        started = subprocess.run(["bash", script, "start", str(state), *([netns] if netns else [])],
                                 capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, f"local_cluster.sh start failed:\n{started.stderr}"
        yield Cluster(state, f"{netns}-0" if netns else None)
    finally:
        subprocess.run(["bash", script, "stop", str(state)], capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    install_or_skip()
    with local_cluster() as one_host:
        yield one_host


@pytest.fixture(scope="module")
def two_node_cluster() -> Iterator[Cluster]:
    install_or_skip()
    with netns_nodes() as (name, _), local_cluster(name) as two_nodes:
        yield two_nodes


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """A TP=2 + SP distillation config with a random teacher: a few CPU steps per second."""
    tmp = tmp_path_factory.mktemp("slurm-config")
    cfg = base_config(tmp, cache=tmp / "cache")
    cfg["parallel"].update(tp=2, sp=True)
    cfg["distill"] = {"teacher": str(make_teacher(tmp / "teacher", teacher_config(cfg))),
                      "activations": ["all_mlps"], "projection": "shared"}
    return write_config(tmp / "run.yaml", cfg)


def job_log(submit_dir: Path, job: int) -> str:
    path = submit_dir / "logs" / f"md-test-{job}.out"
    return path.read_text() if path.exists() else f"(no {path})"


def wait_for_step(cluster: Cluster, job: int, run_dir: Path, step: int, *, submit_dir: Path,
                  timeout_s: float) -> None:
    wait_until(lambda: last_logged_step(run_dir) >= step, what=f"job {job} step {step}",
               alive=lambda: cluster.job(job)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"),
               output=lambda: job_log(submit_dir, job), timeout_s=timeout_s)


def test_sbatch_one_node_and_two_nodes_distill_alike(cluster, two_node_cluster, config, tmp_path):
    """TP=2 + SP on one node and on two nodes (one rank each) log the same losses; PP=2 over the
    two nodes logs them to fp32 round-off."""
    runs = {"one": tmp_path / "one", "two": tmp_path / "two"}
    jobs = {"one": cluster.submit(runs["one"], "--config", str(config), "train.steps=3",
                                  f"train.run_dir={runs['one'] / 'run'}"),
            "two": two_node_cluster.submit(runs["two"], "--config", str(config), "train.steps=3",
                                           f"train.run_dir={runs['two'] / 'run'}",
                                           nodes=2, cpus=1)}
    clusters = {"one": cluster, "two": two_node_cluster}
    for key, job in jobs.items():
        fields = clusters[key].wait_for_end(job, runs[key], timeout_s=240)
        log = job_log(runs[key], job)
        assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), log
        assert "finished" in log, log
    one_log, two_log = job_log(runs["one"], jobs["one"]), job_log(runs["two"], jobs["two"])
    assert re.search(r"nodes=\S+ \(1\) rendezvous=\S+ procs/node=2", one_log), one_log
    # Two hosts, one torchrun each (srun labels lines by node task), rendezvous on the first.
    name = two_node_cluster.netns.removesuffix("-0")
    assert f"nodes={name}-[0-1] (2) rendezvous={name}-0:" in two_log and "procs/node=1" in two_log
    assert re.search(r"^1: ", two_log, re.M), two_log
    one, two = read_metrics(runs["one"] / "run"), read_metrics(runs["two"] / "run")
    assert [m["step"] for m in one] == [1, 2, 3] and all(m.keys() >= METRIC_KEYS for m in one)
    assert all(m["kd_loss"] > 0 and m["act_loss"] > 0 for m in one)
    # Bit for bit: the same layout and ranks; the gloo sums are of two addends (the same in
    # either order), wherever the ranks run.
    assert [[m[k] for k in LOSS_KEYS] for m in two] == [[m[k] for k in LOSS_KEYS] for m in one]
    # PP=2 with a stage on each node (the colocated teacher cut the same way, an activation pair
    # on each stage): activations and gradients cross the link between the nodes; the losses are
    # the one-node TP=2 + SP run's, both being the single-process run's to fp32 round-off.
    pp_dir = tmp_path / "pp"
    job = two_node_cluster.submit(pp_dir, "--config", str(config), "train.steps=3",
                                  f"train.run_dir={pp_dir / 'run'}", "parallel.tp=1",
                                  "parallel.sp=false", "parallel.pp=2", nodes=2, cpus=1)
    fields = two_node_cluster.wait_for_end(job, pp_dir, timeout_s=240)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), job_log(pp_dir, job)
    assert_same_run(read_metrics(pp_dir / "run"), one, keys=LOSS_KEYS, rtol=2e-5)


def test_usr1_checkpoints_requeues_and_resumes(cluster, config, tmp_path):
    run_dir, steps = tmp_path / "run", 60
    job = cluster.submit(tmp_path, "--config", str(config), f"train.steps={steps}",
                         f"train.run_dir={run_dir}", "train.resume=auto")
    wait_for_step(cluster, job, run_dir, 2, submit_dir=tmp_path, timeout_s=180)
    # What `--signal=B:USR1@120` does before the time limit: SIGUSR1 to the batch shell only.
    cluster.client("scancel", "--batch", "--signal=USR1", str(job))
    fields = cluster.wait_for_end(job, tmp_path, timeout_s=240)
    log = job_log(tmp_path, job)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == \
        ("COMPLETED", "0:0", "1"), log
    assert "SIGUSR1: asking every rank to checkpoint" in log and "requeueing" in log, log
    assert "restart=1" in log and log.count("finished") == 1, log
    saved = sorted(int(p.name.split("_")[-1]) for p in (run_dir / "checkpoints").glob("step_*"))
    stopped_at = min(saved)
    assert 2 <= stopped_at < steps and saved[-1] == steps, (saved, log)
    # The second run resumed after the preemption checkpoint: every step exactly once, in order.
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, steps + 1)), log
