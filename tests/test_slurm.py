"""launch/slurm/pretrain_distill.sbatch on a real one-host SLURM cluster (munged, slurmctld and
slurmd started on this machine by launch/slurm/local_cluster.sh), running the real entry point
launch/pretrain_distill.py on a tiny config: one job must distill to the end and write its metrics;
a second gets SIGUSR1 mid-run (what `--signal=B:USR1@120` sends before the time limit) and must
checkpoint, requeue itself and resume where it stopped.

Needs root (packages are installed by launch/slurm/install_deps.sh when missing, and slurmd runs
jobs as their owner); skips, saying why, where the machine does not allow that.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.test_multinode import install_or_skip, tiny_distill_config
from tests.trainer_utils import read_metrics

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "launch" / "slurm"
SBATCH = SLURM_DIR / "pretrain_distill.sbatch"
METRIC_KEYS = {"step", "loss", "lm_loss", "kd_loss", "act_loss", "lr", "tokens_per_s"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster_env():
    """Environment whose SLURM_CONF points at a fresh one-host cluster, stopped afterwards."""
    install_or_skip()
    # Not under pytest's 0700 tmp tree: munged insists its socket directory be searchable by all.
    state = Path(tempfile.mkdtemp(prefix="md-slurm-"))
    script = str(SLURM_DIR / "local_cluster.sh")
    try:
        started = subprocess.run(["bash", script, "start", str(state)], capture_output=True,
                                 text=True, timeout=120)
        assert started.returncode == 0, f"local_cluster.sh start failed:\n{started.stderr}"
        yield os.environ | {"SLURM_CONF": str(state / "slurm.conf")}
    finally:
        subprocess.run(["bash", script, "stop", str(state)], capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return tiny_distill_config(tmp_path_factory.mktemp("slurm-config"))


def submit(env: dict, submit_dir: Path, *args: str) -> int:
    """sbatch the script from `submit_dir` (logs/ goes there), one node, one torchrun of 2 ranks."""
    (submit_dir / "logs").mkdir(parents=True, exist_ok=True)
    job_env = env | {"REPO_DIR": str(REPO), "PYTHON": sys.executable}
    out = subprocess.run(["sbatch", "--parsable", "--job-name=md-test", "--cpus-per-task=2",
                          str(SBATCH), *args], cwd=submit_dir, env=job_env, check=True,
                         capture_output=True, text=True).stdout
    return int(out.strip().split(";")[0])


def job_fields(env: dict, job: int) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def job_log(submit_dir: Path, job: int) -> str:
    path = submit_dir / "logs" / f"md-test-{job}.out"
    return path.read_text() if path.exists() else f"(no {path})"


def wait_for_end(env: dict, job: int, submit_dir: Path, timeout_s: float) -> dict[str, str]:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        fields = job_fields(env, job)
        if fields["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                  "OUT_OF_MEMORY"):
            return fields
        time.sleep(0.5)
    pytest.fail(f"job {job} still {fields['JobState']} after {timeout_s}s\n"
                f"{job_log(submit_dir, job)}")


def wait_for_step(run_dir: Path, step: int, *, env: dict, job: int, submit_dir: Path,
                  timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if (run_dir / "metrics.jsonl").exists() and read_metrics(run_dir)[-1:] and \
                read_metrics(run_dir)[-1]["step"] >= step:
            return
        assert job_fields(env, job)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), \
            job_log(submit_dir, job)
        time.sleep(0.2)
    pytest.fail(f"job {job} did not reach step {step} in {timeout_s}s\n{job_log(submit_dir, job)}")


def test_sbatch_distills_and_writes_metrics(cluster_env, config, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(cluster_env, tmp_path, "--config", str(config), "train.steps=3",
                 f"train.run_dir={run_dir}")
    fields = wait_for_end(cluster_env, job, tmp_path, timeout_s=180)
    log = job_log(tmp_path, job)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert "rendezvous=" in log and "procs/node=2" in log and "finished" in log, log
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3], log
    assert all(METRIC_KEYS <= m.keys() for m in metrics)
    assert all(m["kd_loss"] > 0 and m["act_loss"] > 0 for m in metrics)


def test_usr1_checkpoints_requeues_and_resumes(cluster_env, config, tmp_path):
    run_dir, steps = tmp_path / "run", 60
    job = submit(cluster_env, tmp_path, "--config", str(config), f"train.steps={steps}",
                 f"train.run_dir={run_dir}", "train.resume=auto")
    wait_for_step(run_dir, 2, env=cluster_env, job=job, submit_dir=tmp_path, timeout_s=180)
    # What `--signal=B:USR1@120` does before the time limit: SIGUSR1 to the batch shell only.
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], env=cluster_env, check=True)
    fields = wait_for_end(cluster_env, job, tmp_path, timeout_s=240)
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
