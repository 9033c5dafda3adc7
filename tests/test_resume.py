"""Exact resume through the real entry point under torchrun (TP=2, SP, dropout on; PP=2; CP=2;
on-policy samples scored by a teacher rank; an MoE student at EP=2, DDP or the distributed
optimizer).

An uninterrupted run is compared bit for bit with (a) a run SIGKILLed mid-training and resumed
with `train.resume=auto`, and (b) a run whose ranks get SIGTERM (as SLURM preemption sends), which
must checkpoint and stop, then resume. Bit for bit is the right bound: the resumed run has the
same layout and restores every parameter, optimizer moment, RNG stream and data position, so it
runs the same operations in the same order as the uninterrupted one.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.helpers import command, finish, start, wait_for_step
from tests.trainer_utils import (
    base_config,
    dropout_tp2_sp_distill_config,
    make_teacher,
    read_metrics,
    teacher_config,
    write_config,
)

pytestmark = pytest.mark.slow  # end-to-end runs under torchrun, killed and resumed

STEPS = 16  # enough steps that the signals land mid-run even on a loaded machine


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    cfg = dropout_tp2_sp_distill_config(tmp, activations=["all_mlps"], steps=STEPS,
                                        save_interval=2, keep=2)
    return write_config(tmp / "run.yaml", cfg)


def _torchrun(config: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    return start(command("launch/pretrain_distill.py", "--config", config,
                         f"train.run_dir={run_dir}", *extra))


def _finish(proc: subprocess.Popen, *, ok: bool = True) -> int:
    """The run's exit code: 0 when `ok` (its output in the failure message otherwise), else 0 or
    1 (torchrun's code when a worker stopped early)."""
    code, err = finish(proc)
    assert code == 0 if ok else code in (0, 1), err[-3000:]
    return code


def _worker_pids(run_dir: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"pretrain_distill.py.*train.run_dir={run_dir}"],
                         capture_output=True, text=True).stdout.split()
    launcher = subprocess.run(["pgrep", "-f", f"torch.distributed.run.*train.run_dir={run_dir}"],
                              capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if p not in launcher]


def _losses(run_dir: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    _finish(_torchrun(config, run_dir))
    losses = _losses(run_dir)
    assert [s for s, _, _ in losses] == list(range(1, STEPS + 1))
    return losses


def test_sigkill_then_resume_is_bitwise_identical(config, reference, tmp_path):
    run_dir = tmp_path / "killed"
    proc = _torchrun(config, run_dir)
    wait_for_step(run_dir, 5, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert (run_dir / "checkpoints" / "latest").is_file()
    _finish(_torchrun(config, run_dir, "train.resume=auto"))
    assert _losses(run_dir) == reference  # exact float equality, every step


def _sigterm_and_resume(config, run_dir) -> list:
    """SIGTERM every rank after step 3; the run must have checkpointed where it stopped (its
    metrics end there) and resume to the end. Returns the losses of the whole run."""
    proc = _torchrun(config, run_dir)
    wait_for_step(run_dir, 3, proc)
    for pid in _worker_pids(run_dir):
        os.kill(pid, signal.SIGTERM)
    _finish(proc, ok=False)
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    stopped_at = int(saved[-1].removeprefix("step_"))
    assert 3 <= stopped_at < STEPS, saved
    assert len(read_metrics(run_dir)) == stopped_at
    _finish(_torchrun(config, run_dir, "train.resume=auto"))
    return _losses(run_dir)


def test_sigterm_checkpoints_and_resumes(config, reference, tmp_path):
    assert _sigterm_and_resume(config, tmp_path / "preempted") == reference


def test_sigterm_at_pp2_checkpoints_and_resumes_exactly(tmp_path):
    """Pipeline-parallel (PP=2, dropout on, colocated teacher cut into two stages, an activation
    pair on each stage): SIGTERM mid-run, per-stage checkpoint, resume equal bit for bit."""
    cfg = base_config(tmp_path, cache=tmp_path / "cache")
    cfg["model"].update(dropout=0.1, layers=4)
    cfg["parallel"]["pp"] = 2
    cfg["train"].update(steps=STEPS, save_interval=2, keep=2)
    teacher = teacher_config(cfg)
    teacher["model"]["hidden"] = cfg["model"]["hidden"]
    cfg["distill"] = {"teacher": str(make_teacher(tmp_path / "teacher", teacher)),
                      "activations": [{"student": "decoder.1.output", "teacher": "decoder.0.output"},
                                      {"student": "decoder.3.output", "teacher": "decoder.2.output"}]}
    _check_preemption(cfg, tmp_path)


def test_sigterm_at_cp2_checkpoints_and_resumes_exactly(tmp_path):
    """Context-parallel (CP=2, dropout on, packed documents attending within themselves, a
    colocated teacher with logit and activation distillation): SIGTERM mid-run, checkpoint,
    resume equal bit for bit."""
    cfg = base_config(tmp_path, cache=tmp_path / "cache")
    cfg["model"]["dropout"] = 0.1
    cfg["parallel"]["cp"] = 2
    cfg["data"].update(attention_within_documents=True, positions_per_document=True)
    cfg["train"].update(steps=STEPS, save_interval=2, keep=2)
    cfg["distill"] = {"teacher": str(make_teacher(tmp_path / "teacher", teacher_config(cfg))),
                      "activations": [{"student": "decoder.1.output", "teacher": "decoder.2.output"}],
                      "projection": "shared"}
    _check_preemption(cfg, tmp_path)


def test_sigterm_with_on_policy_samples_on_a_teacher_rank(tmp_path):
    """On-policy micro-batches scored by a teacher rank (the student sends its samples): SIGTERM
    mid-run ends both ranks, the checkpoint resumes equal bit for bit (the on-policy choice
    counted from the resumed step on both sides)."""
    cfg = base_config(tmp_path, cache=tmp_path / "cache")
    cfg["parallel"]["teacher_ranks"] = 1
    cfg["train"].update(steps=STEPS, save_interval=2, keep=2)
    cfg["distill"] = {"teacher": str(make_teacher(tmp_path / "teacher", teacher_config(cfg))),
                      "schedule": "teacher_ranks", "logit": {"kind": "reverse_kl"},
                      "on_policy": {"fraction": 0.5, "max_new_tokens": 6}}
    _check_preemption(cfg, tmp_path)


@pytest.mark.parametrize("optimizer", ["ddp", "distributed"])
def test_sigterm_at_ep2_checkpoints_and_resumes_exactly(tmp_path, optimizer):
    """An MoE student (4 experts split over EP=2 = DP=2, a shared expert, both auxiliary losses,
    dropout on) distilled from a colocated teacher, with DDP or the distributed optimizer: SIGTERM
    mid-run, one checkpoint file per EP rank, resume equal bit for bit."""
    cfg = base_config(tmp_path, cache=tmp_path / "cache")
    teacher = make_teacher(tmp_path / "teacher", teacher_config(cfg))  # dense
    cfg["model"].update(dropout=0.1, moe={"experts": 4, "top_k": 2, "expert_ffn_hidden": 32,
                                          "shared_experts": 1, "aux_loss_coef": 0.05,
                                          "z_loss_coef": 0.001})
    cfg["parallel"]["ep"] = 2
    cfg["train"].update(steps=STEPS, save_interval=2, keep=2,
                        distributed_optimizer=optimizer == "distributed")
    cfg["distill"] = {"teacher": str(teacher), "lm_weight": 0.5, "logit": {"weight": 1.0}}
    _check_preemption(cfg, tmp_path)


def _check_preemption(cfg: dict, tmp_path: Path) -> None:
    """The uninterrupted run of `cfg` against one preempted by SIGTERM and resumed."""
    config = write_config(tmp_path / "run.yaml", cfg)
    _finish(_torchrun(config, tmp_path / "reference"))
    reference = _losses(tmp_path / "reference")
    assert [s for s, _, _ in reference] == list(range(1, STEPS + 1))
    assert _sigterm_and_resume(config, tmp_path / "preempted") == reference
