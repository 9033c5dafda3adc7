"""Fault injection against the real entry points and tools (marked slow; `make test` runs them).

    a rank that hangs (SIGSTOP)          every rank ends, non-zero, within the collective timeout
    a rank that dies (SIGKILL)           its peer names it: `lost a peer (rank 1)`
    a refused start-up, ten times        the one ConfigError line every time
    Ctrl-C once / twice                  checkpoint and exit 124 / abort at once with 130
    SIGTERM to a teacher rank            the student saves, every rank exits 124, the run resumes
    SIGTERM once the group exists,       the run stops at the end of its first step, saved,
    before the first step                every rank exits 124, the lock is removed
    two runs on one run directory        the second is refused at once; the first is untouched
    a full disk (RLIMIT_FSIZE)           checkpoint save, preprocess, teacher-logit export: one
                                         line, temporary files removed, earlier results intact
                                         (an export keeps its settings and whole shards to resume)

A full disk is simulated with RLIMIT_FSIZE in the child (with SIGXFSZ ignored, a write past the
limit fails with EFBIG as it would with ENOSPC): it works as any user, in any container, and
needs no mount. Times are measured and bounded generously (the machine is shared), never
compared tightly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from engine.checkpoint import latest_checkpoint, newest_intact_checkpoint
from engine.data import default_corpus, resolve_data_path
from engine.data.config import DataConfig
from tests.helpers import (
    ROOT,
    children,
    command,
    finish,
    run,
    start,
    subprocess_env,
    wait_for_step,
    wait_until,
)
from tests.trainer_utils import base_config, make_teacher, read_metrics, teacher_config, write_config

pytestmark = pytest.mark.slow

TIMEOUT_S = 8  # parallel.timeout_s of the hung-peer run
SHUTDOWN_S = 5  # torchrun --shutdown-timeout: its grace after forwarding a signal
# torchrun's grace between SIGTERM and SIGKILL of the other ranks once one failed: fixed at 30 s
# in torch 2.13 (--shutdown-timeout applies only to forwarded signals). A stopped rank needs it.
FAILED_WORKER_GRACE_S = 30


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """A tiny run (plain LM through launch/pretrain.py; a teacher for the export), its corpus
    built beforehand so that no limit applies to building it."""
    tmp = tmp_path_factory.mktemp("faults")
    cfg = base_config(tmp, cache=tmp / "cache")
    cfg["train"].update(steps=1000, save_interval=0)
    cfg["distill"] = {"teacher": str(make_teacher(tmp / "teacher", teacher_config(cfg)))}
    resolve_data_path(DataConfig(**cfg["data"]))
    return write_config(tmp / "run.yaml", cfg)


# The children write no .pyc files into the checkout (some run under a file-size limit).
ENV = subprocess_env(PYTHONDONTWRITEBYTECODE="1")


DISTILL = "launch/pretrain_distill.py"
TEACHER_RANKS = ("distill.schedule=teacher_ranks", "parallel.teacher_ranks=1")  # rank 1 the teacher


def _command(config: Path, run_dir: Path, *overrides: str, nproc: int = 0,
             script: str = "launch/pretrain.py") -> list[str]:
    return command(script, "--config", config, f"train.run_dir={run_dir}", *overrides,
                   nproc=nproc, launcher_args=[f"--shutdown-timeout={SHUTDOWN_S}"])


def _start(cmd: list[str], **kwargs) -> subprocess.Popen:
    return start(cmd, env=ENV, **kwargs)


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank (a child of the launcher)."""
    for pid, environ in children(launcher.pid):
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"torchrun {launcher.pid} has no worker with RANK={rank}")


def _not_logged(err: str) -> list[str]:
    """stderr lines that are not log records (those start with the time): what a user reads."""
    return [line for line in err.splitlines() if not re.match(r"\d\d:\d\d:\d\d ", line)]


def _resume(pid: int) -> None:
    """SIGCONT a stopped process that torchrun may have killed meanwhile."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def _exit_codes(err: str) -> dict[int, int]:
    """Each failed rank's exit code, from torchrun's report of a failed launch."""
    found = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s+exitcode\s*: (-?\d+)", err)
    return {int(rank): int(code) for rank, code in found}


def _worker_tracebacks(err: str) -> list[str]:
    """Traceback frames in this project's code: a rank's traceback (torchrun's own report of a
    failed or signalled launch has frames in torch only)."""
    ours = re.compile(rf'File "{re.escape(str(ROOT))}/(launch|distill|engine|layers|tools)/')
    return [line for line in err.splitlines() if ours.search(line)]


# ------------------------------------------------------------------------------------- hangs

@pytest.mark.parametrize("layout", [[], ["parallel.pp=2"]], ids=["dp2", "pp2"])
def test_a_hung_rank_ends_every_rank_within_the_timeout(config, tmp_path, layout):
    """DP=2 (the peer waits in a collective) and PP=2 (it waits on a point-to-point receive of
    the pipeline's activations or gradients)."""
    run_dir = tmp_path / "run"
    launcher = _start(_command(config, run_dir, f"parallel.timeout_s={TIMEOUT_S}", *layout,
                               nproc=2))
    wait_for_step(run_dir, 2, launcher)
    stopped = _rank_pid(launcher, 1)
    os.kill(stopped, signal.SIGSTOP)  # a frozen node: alive, silent
    began = time.monotonic()
    try:
        code, err = finish(launcher)
    finally:
        _resume(stopped)
    took = time.monotonic() - began
    assert code != 0
    assert took < TIMEOUT_S + FAILED_WORKER_GRACE_S + 30, took  # + a loaded machine's slack
    lost = [line for line in err.splitlines() if line.startswith("lost a peer (rank 1): ")]
    assert len(lost) == 1 and "Timed out" in lost[0], err[-3000:]
    assert _worker_tracebacks(err) == []
    print(f"hung peer: torchrun exited {code} {took:.1f} s after SIGSTOP (timeout_s={TIMEOUT_S})")


def test_a_killed_rank_is_named_by_its_peer(config, tmp_path):
    run_dir = tmp_path / "run"
    launcher = _start(_command(config, run_dir, nproc=2))
    wait_for_step(run_dir, 2, launcher)
    os.kill(_rank_pid(launcher, 1), signal.SIGKILL)
    code, err = finish(launcher)
    assert code != 0
    lost = [line for line in err.splitlines() if line.startswith("lost a peer")]
    assert len(lost) == 1 and lost[0].startswith("lost a peer (rank 1): "), err[-3000:]
    assert _worker_tracebacks(err) == []


# ------------------------------------------------------------------------- refused start-up

def test_a_refused_start_prints_its_line_every_time(config, tmp_path):
    """Every rank refuses the same config; only rank 0 prints. Rank 1 must not exit first: once
    one rank exits, torchrun ends the others, rank 0 too, perhaps before it printed."""
    cfg = yaml.safe_load(config.read_text())
    teacher = cfg["distill"].pop("teacher")
    cfg["distill"]["teachers"] = [{"name": n, "checkpoint": teacher} for n in ("a", "b")]
    cfg["distill"]["schedule"] = "teacher_ranks"
    cfg["parallel"]["teacher_ranks"] = 1
    refused = tmp_path / "refused.yaml"
    refused.write_text(yaml.safe_dump(cfg))
    for attempt in range(10):
        code, err = finish(_start(_command(refused, tmp_path / "run", script=DISTILL, nproc=2)))
        lines = [line for line in err.splitlines() if "ConfigError" in line]
        assert code != 0 and lines == [
            "ConfigError: distill.teachers: several teachers need schedule colocated or offline "
            "(teacher_ranks serve one teacher)"], (attempt, err[-3000:])
        assert _exit_codes(err)[0] == 2


# ------------------------------------------------------------------------------------ Ctrl-C

def test_first_interrupt_saves_and_exits_124_then_the_run_resumes(config, tmp_path):
    """Ctrl-C in a terminal: SIGINT to torchrun's process group; torchrun forwards it to every
    rank (its workers run in sessions of their own)."""
    run_dir = tmp_path / "run"
    launcher = _start(_command(config, run_dir, "train.steps=400", nproc=2))
    wait_for_step(run_dir, 2, launcher)
    os.killpg(launcher.pid, signal.SIGINT)
    code, err = finish(launcher)
    assert code != 0  # torchrun reports a launch it stopped on a signal as 1
    assert _worker_tracebacks(err) == []
    assert err.count("interrupted: finishing this step, saving a checkpoint and stopping") == 1
    assert "interrupted again" not in err
    saved = latest_checkpoint(run_dir / "checkpoints")
    last = read_metrics(run_dir)[-1]["step"]
    assert saved.name == f"step_{last:08d}"
    code, err = finish(_start(_command(config, run_dir, f"train.steps={last + 2}")))
    assert code == 0, err[-3000:]
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, last + 3))


def test_interrupt_of_one_process_exits_124(config, tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(_command(config, run_dir, "train.steps=400"))
    wait_for_step(run_dir, 2, proc)
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc)
    assert code == 124, err[-3000:]
    assert "Traceback" not in err
    assert latest_checkpoint(run_dir / "checkpoints").name == \
        f"step_{read_metrics(run_dir)[-1]['step']:08d}"


def test_second_interrupt_aborts_at_once_even_inside_a_collective(config, tmp_path):
    run_dir = tmp_path / "run"
    launcher = _start(_command(config, run_dir, "parallel.timeout_s=300", nproc=2))
    wait_for_step(run_dir, 2, launcher)
    rank0, rank1 = _rank_pid(launcher, 0), _rank_pid(launcher, 1)
    os.kill(rank1, signal.SIGSTOP)  # rank 0 is about to wait in a collective for 300 s
    time.sleep(2)
    began = time.monotonic()
    os.kill(rank0, signal.SIGINT)
    time.sleep(1.5)  # a person's second Ctrl-C, not torchrun's echo of the first
    os.kill(rank0, signal.SIGINT)
    try:
        code, err = finish(launcher)
    finally:
        _resume(rank1)
    took = time.monotonic() - began
    assert "interrupted again: aborting without a checkpoint" in err, err[-3000:]
    assert "exitcode  : 130" in err  # torchrun's report of rank 0
    assert took < 60, took  # far below the 300 s collective timeout
    assert latest_checkpoint(run_dir / "checkpoints") is None


# ---------------------------------------------------------------------- SIGTERM to one rank

def test_sigterm_to_a_teacher_rank_stops_the_job(config, tmp_path):
    """The teacher rank's signal travels with its stream: the student stops at a step boundary
    and saves, both ranks exit 124, and the run resumes from there."""
    run_dir = tmp_path / "run"
    launcher = _start(_command(config, run_dir, *TEACHER_RANKS, "train.steps=200",
                               script=DISTILL, nproc=2))
    wait_for_step(run_dir, 2, launcher)
    os.kill(_rank_pid(launcher, 1), signal.SIGTERM)
    code, err = finish(launcher)
    assert code != 0 and _exit_codes(err) == {0: 124, 1: 124}, err[-3000:]
    assert _worker_tracebacks(err) == []
    last = read_metrics(run_dir)[-1]["step"]
    assert last < 200
    assert latest_checkpoint(run_dir / "checkpoints").name == f"step_{last:08d}"
    code, err = finish(_start(_command(config, run_dir, *TEACHER_RANKS, f"train.steps={last + 2}",
                                       script=DISTILL, nproc=2)))
    assert code == 0, err[-3000:]
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, last + 3))


def test_sigterm_once_the_group_exists_before_the_first_step(config, tmp_path):
    """tests/slow_start.py holds every rank once its process group exists: SIGTERM to rank 1
    there is acted on at the end of the first step (saved), not by dying."""
    run_dir, hold = tmp_path / "run", tmp_path / "hold"
    hold.mkdir()
    launcher = _start(command("tests/slow_start.py", hold, "--config", config,
                              f"train.run_dir={run_dir}", nproc=2,
                              launcher_args=[f"--shutdown-timeout={SHUTDOWN_S}"]))
    wait_until(lambda: (hold / "rank0").exists() and (hold / "rank1").exists(),
               alive=lambda: launcher.poll() is None, what="the process group",
               output=lambda: "")
    os.kill(_rank_pid(launcher, 1), signal.SIGTERM)
    time.sleep(1)
    (hold / "go").touch()
    code, err = finish(launcher)
    assert code != 0 and _exit_codes(err) == {0: 124, 1: 124}, err[-3000:]
    assert "lost a peer" not in err and _worker_tracebacks(err) == []
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_00000001"
    assert not (run_dir / ".lock").exists()


# ------------------------------------------------------------------------- one run directory

def test_a_second_run_on_the_same_directory_is_refused(config, tmp_path):
    run_dir = tmp_path / "run"
    first = _start(_command(config, run_dir, "train.save_interval=5", nproc=2))
    wait_for_step(run_dir, 2, first)
    began = time.monotonic()
    code, err = finish(_start(_command(config, run_dir, nproc=2)))
    assert code != 0
    refused = [line for line in err.splitlines() if line.startswith("ConfigError: ")]
    assert refused == [f"ConfigError: train.run_dir: in use by host {os.uname().nodename} pid "
                       f"{_lock_owner(run_dir)['pid']} (lock {run_dir / '.lock'}; if that run is "
                       "gone, delete the lock)"], err[-3000:]
    assert time.monotonic() - began < 90
    assert first.poll() is None  # untouched, still training
    os.killpg(first.pid, signal.SIGTERM)  # stop it as SLURM would: checkpoint, exit
    finish(first)
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(1, steps[-1] + 1))
    assert latest_checkpoint(run_dir / "checkpoints").name == f"step_{steps[-1]:08d}"
    assert not (run_dir / ".lock").exists()


def _lock_owner(run_dir: Path) -> dict:
    return json.loads((run_dir / ".lock").read_text())


# -------------------------------------------------------------------------------- full disks

def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_checkpoint_save_on_a_full_disk(config, tmp_path):
    run_dir = tmp_path / "run"
    code, err = finish(_start(_command(config, run_dir, "train.steps=2")))
    assert code == 0, err[-3000:]
    before = latest_checkpoint(run_dir / "checkpoints")
    # The model file (~160 kB) fits, the optimizer's (~320 kB) does not.
    code, err = finish(_start(_command(config, run_dir, "train.steps=4"),
                               preexec_fn=_limit_file_size(200_000)))
    assert code == 1, err[-3000:]
    final = run_dir / "checkpoints" / "step_00000004"
    assert _not_logged(err) == [
        f"CheckpointError: saving {final} failed (write: Error while serializing: I/O error: File "
        "too large (os error 27)); step_00000004.tmp removed, the previous checkpoint and "
        "`latest` unchanged"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", before.name]
    assert latest_checkpoint(run_dir / "checkpoints") == before
    assert newest_intact_checkpoint(run_dir / "checkpoints", before=10**6) == before  # digests


def test_preprocess_on_a_full_disk_keeps_the_old_dataset_and_leaves_nothing(config, tmp_path):
    data = yaml.safe_load(config.read_text())["data"]
    _, tokenizer = default_corpus(data["cache_dir"], data["vocab_size"],
                                  max_bytes=data["corpus_max_bytes"])
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i}: " + "some words to tokenize " * 8 for i in range(4000)))
    out = tmp_path / "out"
    cmd = command("tools/preprocess_data.py", "--input", corpus, "--tokenizer", tokenizer,
                  "--text-docs", "line", "--no-progress", "--output-prefix", out / "data", nproc=0)
    for existing in (False, True):
        if existing:
            small = tmp_path / "small.txt"
            small.write_text("an earlier, smaller dataset\n")
            assert run([*cmd[:3], str(small), *cmd[4:]], env=ENV).returncode == 0
            before = {p.name: p.read_bytes() for p in out.iterdir()}
        done = run([*cmd, "--force"], env=ENV, preexec_fn=_limit_file_size(64_000))
        assert done.returncode == 1, done.stderr[-3000:]
        assert _not_logged(done.stderr) == [
            f"error: writing {out / 'data'}.bin/.idx failed: File too large"], done.stderr
        if existing:
            assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        else:
            assert list(out.iterdir()) == []


def test_teacher_logit_export_on_a_full_disk_keeps_only_its_settings_to_resume(config, tmp_path):
    """A shard that does not fit is removed; what stays is the interrupted export's settings in
    .export.tmp (resumed by the same command, tests/test_offline.py), never a store."""
    out = tmp_path / "export"
    cmd = command("tools/export_teacher_logits.py", "--config", config, "--top-k", "8", "--out", out,
                  "--shard-samples", "256", "--samples", "512", "--no-progress",
                  "parallel.timeout_s=60")
    done = run(cmd, env=ENV, preexec_fn=_limit_file_size(20_000))
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("ExportError: ")]
    assert len(lines) == 1 and "File too large" in lines[0], done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export.tmp"]
    assert sorted(p.name for p in (tmp_path / ".export.tmp").iterdir()) == ["export.json"]
