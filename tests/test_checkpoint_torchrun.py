"""Checkpoints under real torchrun processes: SIGKILL mid-save and mid-step, SIGTERM, resume.

One chain of runs shares a checkpoint root; an uninterrupted reference run goes alongside. Every
loss any run logs (including the steps recomputed after each resume) must equal the reference's
bit for bit, and after a rank is SIGKILLed the whole run must end (non-zero) within 60 s instead
of hanging. A generous overall limit guards every run against hangs on a loaded machine. Bit for
bit is the right bound: every run has the same layout and a resumed one restores the parameters,
the optimizer and every RNG, so all of them run the same operations in the same order.
"""

import json
import subprocess
import time
from pathlib import Path

import pytest

from engine.checkpoint import latest_checkpoint
from tests.helpers import command, finish, start

pytestmark = pytest.mark.slow  # chains of torchrun runs, killed and resumed

KILL_TO_EXIT_S = 60  # the bound: from one rank's SIGKILL to the end of every rank


def _launch(ckpt: Path, out: Path, *args: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    return start(command("tests/ckpt_worker.py", "--ckpt", ckpt, "--out", out, "--steps", "20",
                         *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _run(ckpt: Path, out: Path, *args: str) -> tuple[int, str]:
    return finish(_launch(ckpt, out, *args))


def _records(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / f"rank{rank}.jsonl").read_text().splitlines()]


def _run_killed(ckpt: Path, out: Path, *args: str) -> None:
    """A run whose rank 1 SIGKILLs itself: all of it must exit non-zero soon after the kill."""
    rc, log = _run(ckpt, out, *args)
    ended = time.time()
    assert rc != 0, log[-2000:]
    killed_at = [r["time"] for r in _records(out, 1) if r.get("event") == "killed"][-1]
    assert ended - killed_at < KILL_TO_EXIT_S, log[-2000:]


def test_kills_sigterm_and_resumes_reproduce_the_uninterrupted_run(tmp_path):
    reference = _launch(tmp_path / "ref_ckpt", tmp_path / "ref")
    ckpt, out = tmp_path / "ckpt", tmp_path / "run"
    every4 = ("--save-interval", "4")

    # 1. rank 1 is SIGKILLed after writing its first file of the step-8 save
    _run_killed(ckpt, out, *every4, "--kill-in-save", "8")
    assert latest_checkpoint(ckpt).name == "step_00000004"
    assert (ckpt / "step_00000008.tmp").is_dir()

    # 2. resumes from step 4; rank 1 is SIGKILLed in the middle of step 11
    _run_killed(ckpt, out, *every4, "--resume", "--kill-at", "11")
    assert latest_checkpoint(ckpt).name == "step_00000008"
    assert not (ckpt / "step_00000008.tmp").exists()  # the next save cleaned the leftover

    # 3. resumes from step 8; only rank 1 gets SIGTERM at step 14: both save step 14, exit 0
    rc, log = _run(ckpt, out, *every4, "--resume", "--sigterm-at", "14")
    assert rc == 0, log[-2000:]
    assert latest_checkpoint(ckpt).name == "step_00000014"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000012", "step_00000014"]  # keep=2

    # 4. resumes from step 14 and finishes
    rc, log = _run(ckpt, out, *every4, "--resume")
    assert rc == 0, log[-2000:]
    rc, log = finish(reference)
    assert rc == 0, log[-2000:]

    for rank in (0, 1):
        expected = {r["step"]: r["loss"] for r in _records(tmp_path / "ref", rank)}
        records = _records(out, rank)
        assert [r["step"] for r in records if r.get("event") == "resume"] == [4, 8, 14]
        assert [r["step"] for r in records if r.get("event") == "preempted"] == [14]
        losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
        assert {step for step, _ in losses} == set(range(1, 21)) == set(expected)
        for step, loss in losses:
            assert loss == expected[step], f"rank {rank} step {step}: {loss} != {expected[step]}"
