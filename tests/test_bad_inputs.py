"""Bad inputs a user or a cluster produces every day: one line, the right exit code, nothing lost.

Each case runs the real entry point in-process (WORLD_SIZE=1, as `python launch/...` would) and
checks the exit code, the one line on stderr, and that no process group was created where the
problem can be seen before one exists. The fault injections that need real processes (a hung rank,
a full disk, signals, two runs at once) are in tests/test_faults.py.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from distill.run import main
from engine.data import DataError, TokenBatches, write_indexed
from engine.data import dataset as dataset_module
from engine.data.config import DataConfig
from tests.trainer_utils import VOCAB, base_config, read_metrics, write_config

DOCS = 40  # documents of 30 tokens: a 90,10 split gives 4 validation documents


def _tokens(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, size=30) for _ in range(DOCS)]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("inputs")
    prefix = tmp / "good"
    write_indexed(prefix, _tokens(), np.uint16)
    cfg = base_config(tmp, cache=tmp / "cache")
    cfg["data"]["path"] = str(prefix)
    cfg["distill"] = {"logit": {"weight": 0}}
    return {"config": write_config(tmp / "run.yaml", cfg), "prefix": prefix, "tmp": tmp}


def run_main(config: Path, *overrides: str) -> int:
    return main(["--config", str(config), *overrides], distill=False)


def one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines, "nothing on stderr"
    return lines[-1]


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")


def _copy(good: dict, tmp_path: Path) -> tuple[Path, Path]:
    prefix = tmp_path / "data"
    for suffix in (".bin", ".idx"):
        Path(f"{prefix}{suffix}").write_bytes(Path(f"{good['prefix']}{suffix}").read_bytes())
    return Path(f"{prefix}.bin"), Path(f"{prefix}.idx")


def _shift_pointer(idx: Path) -> None:
    """Move sequence 1's pointer by one token: same sizes, wrong tokens."""
    raw = bytearray(idx.read_bytes())
    pointer_1 = 34 + 4 * DOCS + 8
    value = struct.unpack_from("<q", raw, pointer_1)[0]
    struct.pack_into("<q", raw, pointer_1, value + 2)
    idx.write_bytes(bytes(raw))


def _empty(bin_path: Path, idx: Path) -> None:
    bin_path.write_bytes(b"")
    idx.write_bytes(struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", 1, 8, 0, 1) + struct.pack("<q", 0))


DATA_CASES = {  # corruption -> start of the message after "ConfigError: data.path: "
    "truncated .bin": (lambda b, i: b.write_bytes(b.read_bytes()[:-6]), "truncated or mismatched"),
    "bad magic": (lambda b, i: i.write_bytes(b"NOTANIDX!" + i.read_bytes()[9:]), "bad magic"),
    "pointers": (lambda b, i: _shift_pointer(i), "sequence 1 starts at byte 62, but the lengths"),
    "empty": (_empty, "indexes no documents: the dataset is empty"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_corrupt_dataset_is_one_line_before_the_process_group(good, tmp_path, capsys, case):
    bin_path, idx = _copy(good, tmp_path)
    corrupt, message = DATA_CASES[case]
    corrupt(bin_path, idx)
    assert run_main(good["config"], f"data.path={tmp_path / 'data'}") == 2
    line = one_line(capsys)
    assert line.startswith("ConfigError: data.path: ") and message in line, line
    assert not dist.is_initialized()


def test_token_ids_past_the_vocabulary_are_one_line(good, tmp_path, capsys):
    docs = _tokens()
    docs[7][3] = VOCAB + 80
    write_indexed(tmp_path / "big_ids", docs, np.uint16)
    assert run_main(good["config"], f"data.path={tmp_path / 'big_ids'}") == 2
    assert one_line(capsys) == (f"ConfigError: data.path: {tmp_path / 'big_ids'}: token id "
                                f"{VOCAB + 80} in document 7 is outside the vocabulary "
                                f"[0, {VOCAB}) of model.vocab_size")


def test_token_ids_of_a_large_dataset_are_checked_as_they_are_read(good, tmp_path, monkeypatch):
    docs = _tokens()
    docs[7][3] = VOCAB + 80
    write_indexed(tmp_path / "big_ids", docs, np.uint16)
    monkeypatch.setattr(dataset_module, "EAGER_SCAN_BYTES", 0)  # "too large to scan"
    cfg = DataConfig(path=str(tmp_path / "big_ids"), seq_len=16, micro_batch=4, global_batch=4)
    dataset_module.check_datasets(cfg, vocab_size=VOCAB)  # passes: nothing scanned
    batches = TokenBatches(cfg, seed=0, vocab_size=VOCAB)
    with pytest.raises(DataError, match=r"big_ids: token id 400 in document 7 is outside"):
        for _ in range(20):
            batches.next_step()


def test_validation_split_shorter_than_a_window_stops_at_start(good, tmp_path, capsys):
    docs = [np.arange(1, 200) % VOCAB for _ in range(9)] + [np.arange(1, 6)]
    write_indexed(tmp_path / "small_valid", docs, np.uint16)
    assert run_main(good["config"], f"data.path={tmp_path / 'small_valid'}") == 2
    assert one_line(capsys) == (
        f"ConfigError: data.seq_len: the valid split of {tmp_path / 'small_valid'} has 5 tokens, "
        "fewer than data.seq_len + 1 = 17 (data.split=100,0 trains without validation)")
    assert not dist.is_initialized()


def test_no_validation_split_trains_saves_and_skips_validation(good, tmp_path, caplog):
    run_dir = tmp_path / "run"
    assert run_main(good["config"], "data.split=100,0", f"train.run_dir={run_dir}") == 0
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert not any("val_loss" in r for r in records)
    assert (run_dir / "checkpoints" / "step_00000003" / "metadata.json").is_file()
    assert "leaves no validation data: validation is skipped" in caplog.text


def test_the_final_checkpoint_is_written_before_the_final_validation(good, tmp_path, monkeypatch):
    from distill.trainer import DistillTrainer

    def failing_validation(self):
        raise RuntimeError("validation broke")

    monkeypatch.setattr(DistillTrainer, "validate", failing_validation)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="validation broke"):
        run_main(good["config"], f"train.run_dir={run_dir}")
    assert (run_dir / "checkpoints" / "step_00000003" / "metadata.json").is_file()


# ------------------------------------------------------------------------- run directories

@pytest.fixture(scope="module")
def finished(good, tmp_path_factory) -> Path:
    """A finished 3-step run that saved every step."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    import os
    os.environ.update(WORLD_SIZE="1", RANK="0")
    assert run_main(good["config"], f"train.run_dir={run_dir}", "train.save_interval=1",
                    "train.keep=3") == 0
    return run_dir


def _copy_run(finished: Path, tmp_path: Path) -> Path:
    import shutil
    return Path(shutil.copytree(finished, tmp_path / "run"))


def test_resume_none_over_an_earlier_run_refuses(good, finished, tmp_path, capsys):
    run_dir = _copy_run(finished, tmp_path)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert run_main(good["config"], f"train.run_dir={run_dir}", "train.resume=none") == 2
    assert one_line(capsys) == (
        f"ConfigError: train.resume: is none, but {run_dir} holds the checkpoints of an earlier "
        "run (newest step_00000003): continue it with train.resume=auto, choose another "
        "train.run_dir, or pass train.overwrite=true to move that run aside")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_overwrite_moves_the_earlier_run_aside(good, finished, tmp_path, caplog):
    run_dir = _copy_run(finished, tmp_path)
    old_metrics = (run_dir / "metrics.jsonl").read_text()
    assert run_main(good["config"], f"train.run_dir={run_dir}", "train.resume=none",
                    "train.overwrite=true", "train.steps=2") == 0
    [aside] = run_dir.glob("replaced-*")
    assert f"train.overwrite: moved the earlier run's checkpoints, metrics.jsonl, config.yaml to " \
           f"{aside}" in caplog.text
    assert (aside / "metrics.jsonl").read_text() == old_metrics
    assert sorted(p.name for p in (aside / "checkpoints").glob("step_*")) == [
        "step_00000001", "step_00000002", "step_00000003"]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"


CHECKPOINT_CASES = [  # (overrides, start of the message after "ConfigError: ")
    (["train.overwrite=true"], "train.overwrite: needs train.resume=none (got 'auto')"),
    (["train.resume={teacher}"], "train.resume: {teacher}/step_00000000 holds model weights only "
                                 "(no optimizer state, like an imported model): start from it "
                                 "with train.init={teacher}/step_00000000"),
    (["train.init={teacher}"], "train.init: {teacher}/step_00000000 holds a model of another "
                               "shape than this run's (model.hidden=48 vs 32, model.layers=3 vs 2, "
                               "model.ffn_hidden=96 vs 64)"),
    (["train.resume={finished}/checkpoints/step_00000003", "model.hidden=64"],
     "train.resume: {finished}/checkpoints/step_00000003 holds a model of another shape than this "
     "run's (model.hidden=32 vs 64)"),
]


@pytest.fixture(scope="module")
def teacher(good) -> Path:
    from tests.trainer_utils import make_teacher, teacher_config
    cfg = base_config(good["tmp"], cache=good["tmp"] / "cache")
    return make_teacher(good["tmp"] / "teacher", teacher_config(cfg)).parent


@pytest.mark.parametrize("overrides,message", CHECKPOINT_CASES,
                         ids=[" ".join(c[0]) for c in CHECKPOINT_CASES])
def test_unusable_start_checkpoint_is_one_line(good, finished, teacher, tmp_path, capsys,
                                               overrides, message):
    names = {"teacher": teacher, "finished": finished}
    overrides = [o.format(**names) for o in overrides]
    assert run_main(good["config"], f"train.run_dir={tmp_path / 'run'}", *overrides) == 2
    assert one_line(capsys).startswith("ConfigError: " + message.format(**names))
    assert not dist.is_initialized()


def test_resume_from_a_run_directory_takes_its_newest_checkpoint(good, finished, tmp_path, caplog):
    run_dir = tmp_path / "run"
    assert run_main(good["config"], f"train.run_dir={run_dir}", f"train.resume={finished}",
                    "train.steps=5") == 0
    assert f"resumed from {finished}/checkpoints/step_00000003 at step 3" in caplog.text
    assert [r["step"] for r in read_metrics(run_dir)] == [4, 5]


def test_resume_that_would_replace_later_checkpoints_refuses(good, finished, tmp_path, capsys):
    run_dir = _copy_run(finished, tmp_path)
    step1 = run_dir / "checkpoints" / "step_00000001"
    assert run_main(good["config"], f"train.run_dir={run_dir}", f"train.resume={step1}") == 2
    assert one_line(capsys) == (
        f"ConfigError: train.resume: {step1} is at step 1, but {run_dir} holds later checkpoints "
        "(step_00000003) that this run would replace: move them away or choose another "
        "train.run_dir")


def test_run_dir_that_is_a_file(good, tmp_path, capsys):
    (tmp_path / "run").write_text("not a directory")
    assert run_main(good["config"], f"train.run_dir={tmp_path / 'run'}") == 2
    assert one_line(capsys) == f"ConfigError: train.run_dir: {tmp_path / 'run'} is a file, not a directory"


def test_newest_checkpoint_failing_its_digest_names_the_newest_intact_one(good, finished, tmp_path,
                                                                          capsys):
    run_dir = _copy_run(finished, tmp_path)
    model_file = run_dir / "checkpoints" / "step_00000003" / "model_tp000.safetensors"
    raw = bytearray(model_file.read_bytes())
    raw[-3] ^= 0xFF  # same size, other bytes: only the digest can tell
    model_file.write_bytes(bytes(raw))
    assert run_main(good["config"], f"train.run_dir={run_dir}", "train.steps=5") == 2
    intact = run_dir / "checkpoints" / "step_00000002"
    assert one_line(capsys) == (
        f"ConfigError: train.resume: {model_file} is corrupted or altered: its sha256 does not "
        f"match metadata; the newest intact checkpoint is {intact}: resume from it with "
        f"train.resume={intact}")


def test_the_advice_after_an_altered_optimizer_file_works_as_printed(good, finished, tmp_path,
                                                                     capsys, caplog):
    """The error's `train.resume=X` resumes from X; the damaged later checkpoint, which it
    replaces, is named in a warning (an intact later one is still refused, above)."""
    from engine.checkpoint import is_intact
    run_dir = _copy_run(finished, tmp_path)
    optim = run_dir / "checkpoints" / "step_00000003" / "optim_tp000.safetensors"
    raw = bytearray(optim.read_bytes())
    raw[-3] ^= 0xFF
    optim.write_bytes(bytes(raw))
    assert run_main(good["config"], f"train.run_dir={run_dir}", "train.steps=5") == 2
    advice = one_line(capsys).rsplit("resume from it with ", 1)[1]
    intact = run_dir / "checkpoints" / "step_00000002"
    assert advice == f"train.resume={intact}"
    assert run_main(good["config"], f"train.run_dir={run_dir}", advice, "train.steps=5",
                    "train.save_interval=1", "train.keep=3") == 0
    assert f"resumed from {intact} at step 2" in caplog.text
    assert ("the later checkpoints step_00000003 fail their digests; resuming from "
            f"{intact}, this run's saves replace them") in caplog.text
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]
    assert all(is_intact(run_dir / "checkpoints" / f"step_0000000{s}") for s in (3, 4, 5))


def test_truncated_checkpoint_is_found_at_start_up(good, finished, tmp_path, capsys):
    run_dir = _copy_run(finished, tmp_path)
    optim = run_dir / "checkpoints" / "step_00000003" / "optim_tp000.safetensors"
    size = optim.stat().st_size
    optim.write_bytes(optim.read_bytes()[:100])
    assert run_main(good["config"], f"train.run_dir={run_dir}", "train.steps=5") == 2
    assert one_line(capsys) == (f"ConfigError: train.resume: {optim} is truncated or altered: "
                                f"100 bytes, metadata says {size}")
    assert not dist.is_initialized()


# ------------------------------------------------------------------------------- teachers

def _distill_config(good: dict, tmp_path: Path, teacher: Path) -> Path:
    cfg = base_config(tmp_path, cache=good["tmp"] / "cache")
    cfg["data"]["path"] = str(good["prefix"])
    cfg["distill"] = {"teacher": str(teacher)}
    return write_config(tmp_path / "distill.yaml", cfg)


def test_truncated_teacher_is_one_line_before_the_process_group(good, teacher, tmp_path, capsys):
    import shutil
    copy = Path(shutil.copytree(teacher, tmp_path / "teacher"))
    model_file = copy / "step_00000000" / "model_tp000.safetensors"
    size = model_file.stat().st_size
    model_file.write_bytes(model_file.read_bytes()[:size // 2])
    assert main(["--config", str(_distill_config(good, tmp_path, copy))]) == 2
    assert one_line(capsys) == (f"ConfigError: distill.teacher: {model_file} is truncated or "
                                f"altered: {size // 2} bytes, metadata says {size}")
    assert not dist.is_initialized()


def test_teacher_with_non_finite_weights_is_one_line(good, tmp_path, capsys):
    import torch

    from distill.weights import save_weights
    from engine.parallel import ParallelLayout
    from layers.config import ModelConfig
    from layers.model import TransformerLM
    from tests.trainer_utils import teacher_config

    cfg = teacher_config(base_config(tmp_path, cache=good["tmp"] / "cache"))
    model = TransformerLM(ModelConfig(**cfg["model"]), ParallelLayout.single(), seed=3)
    with torch.no_grad():
        model.get_parameter("decoder.1.mlp.down_proj.weight")[0, 0] = float("nan")
    checkpoint = save_weights(tmp_path / "nan_teacher", model, ParallelLayout.single(), config=cfg)
    assert main(["--config", str(_distill_config(good, tmp_path, tmp_path / "nan_teacher"))]) == 2
    assert one_line(capsys) == (f"ConfigError: distill.teacher: {checkpoint}: tensor "
                                "'decoder.1.mlp.down_proj.weight' holds non-finite values (NaN or inf)")
    # one of several teachers: the line names its entry
    config = _distill_config(good, tmp_path, tmp_path / "nan_teacher")
    assert main(["--config", str(config), "distill.teacher=null", f"train.run_dir={tmp_path / 'r2'}",
                 f"distill.teachers=[{{checkpoint: {tmp_path / 'nan_teacher'}, name: a}}]"]) == 2
    assert one_line(capsys).startswith(f"ConfigError: distill.teachers[0].checkpoint: {checkpoint}")


# ------------------------------------------------------------------------- run-directory lock

def _lock(run_dir: Path, **fields) -> Path:
    import json
    import socket
    owner = {"host": socket.gethostname(), "pid": 1, "started": None, "job": "",
             "restarts": [0, 0], "token": "0123456789abcdef", **fields}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ".lock").write_text(json.dumps(owner))
    return run_dir / ".lock"


def _dead_pid() -> int:
    import subprocess
    import sys
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_run_dir_in_use_by_another_host_refuses(good, tmp_path, capsys):
    lock = _lock(tmp_path / "run", host="node-17", pid=4242)
    assert run_main(good["config"], f"train.run_dir={tmp_path / 'run'}") == 2
    assert one_line(capsys) == (f"ConfigError: train.run_dir: in use by host node-17 pid 4242 "
                                f"(lock {lock}; if that run is gone, delete the lock)")
    assert lock.is_file() and not dist.is_initialized()


@pytest.mark.parametrize("owner,reason", [
    (lambda: {"pid": _dead_pid()}, "its process has exited"),
    (lambda: {"host": "node-17", "pid": 4242, "job": "slurm:77", "restarts": [0, 0]},
     "an earlier run of job slurm:77"),
])
def test_stale_lock_is_taken_over_and_released(good, tmp_path, monkeypatch, caplog, owner, reason):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = _lock(tmp_path / "run", **owner())
    assert run_main(good["config"], f"train.run_dir={tmp_path / 'run'}", "train.steps=1") == 0
    assert "taking over the lock of host" in caplog.text and reason in caplog.text
    assert not lock.exists()  # released at the end
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".lock")) == []


@pytest.fixture
def zombie_pid():
    """The pid of a process that has exited but is not reaped yet: what a SIGKILLed rank leaves
    behind until its parent (or init) collects it."""
    import os
    import time
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    stat = Path(f"/proc/{pid}/stat")
    deadline = time.monotonic() + 10
    while stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    yield pid
    os.waitpid(pid, 0)


def test_lock_of_an_unreaped_process_is_taken_over(good, tmp_path, caplog, zombie_pid):
    lock = _lock(tmp_path / "run", pid=zombie_pid)
    assert run_main(good["config"], f"train.run_dir={tmp_path / 'run'}", "train.steps=1") == 0
    assert "its process has exited" in caplog.text and not lock.exists()


def test_live_lock_on_this_host_refuses(good, tmp_path, capsys):
    import os
    lock = _lock(tmp_path / "run", pid=os.getppid())
    assert run_main(good["config"], f"train.run_dir={tmp_path / 'run'}") == 2
    assert one_line(capsys).startswith("ConfigError: train.run_dir: in use by host ")
    assert lock.is_file()


# ------------------------------------------------------------------------------ metrics.jsonl

def test_a_cut_last_metrics_line_is_dropped_with_a_warning(good, finished, tmp_path, caplog):
    run_dir = _copy_run(finished, tmp_path)
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines) + '\n{"step": 4, "loss": 5.7')  # a crash mid-write
    assert run_main(good["config"], f"train.run_dir={run_dir}", "train.steps=5") == 0
    assert f"{metrics}:4 is not a whole record (cut by a crash or a full disk?): dropped" in caplog.text
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]
    assert metrics.read_text().endswith("}\n")


def test_lock_on_a_filesystem_without_hard_links(tmp_path, monkeypatch):
    import dataclasses
    import errno
    import os

    from engine.config import ConfigError
    from engine.rundir import RunDirLock

    def no_links(*args):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with RunDirLock(tmp_path / "run"):
        assert (tmp_path / "run" / ".lock").is_file()
        other = RunDirLock(tmp_path / "run")
        other.owner = dataclasses.replace(other.owner, pid=os.getppid())  # another live process
        with pytest.raises(ConfigError, match="train.run_dir: in use by host .* pid "):
            other.acquire()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []
