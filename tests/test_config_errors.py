"""Bad configurations stop before any process group with `ConfigError: <key>: <problem>`, exit 2.

Each case runs the real entry point in-process with WORLD_SIZE set as torchrun would; two cases
also run as a subprocess to check the exit code and that stderr is exactly one line.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

from distill.run import main
from distill.runconfig import load_run_config
from tests.trainer_utils import base_config, make_teacher, teacher_config, write_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cfg")
    cfg = base_config(tmp, cache=tmp / "cache")
    teacher = make_teacher(tmp / "teacher", teacher_config(cfg))
    other_vocab = teacher_config(cfg)
    other_vocab["model"]["vocab_size"] = 400
    odd = make_teacher(tmp / "teacher400", other_vocab)
    cfg["distill"] = {"teacher": str(teacher)}
    return {"config": write_config(tmp / "run.yaml", cfg), "teacher400": odd, "tmp": tmp}


CASES = [  # (world size, overrides, expected start of the message after "ConfigError: ")
    (1, ["train.stpes=3"], "train.stpes: unknown key (did you mean 'train.steps'?)"),
    (1, ["trian.steps=3"], "trian: unknown key (did you mean 'train'?)"),
    (1, ["train.steps=many"], "train.steps: must be an integer"),
    (1, ["train.steps=0"], "train.steps: must be >= 1"),
    (1, ["train.lr=-1"], "train.lr: must be > 0"),
    (1, ["model.family=bert"], "model.family: must be one of 'llama', 'gpt2'"),
    (1, ["distill.logit.kind=kl"], "distill.logit.kind: must be one of"),
    (1, ["distill.logit.temperature=0"], "distill.logit.temperature: must be > 0"),
    (1, ["parallel.sp=true"], "parallel.sp: sequence parallelism needs parallel.tp > 1"),
    (2, ["parallel.tp=3"], "parallel.tp: parallel.tp=3 is larger than the 2 student ranks"),
    (3, ["parallel.tp=2"], "parallel.tp: parallel.tp=2 does not divide the 3 student ranks"),
    (2, ["parallel.tp=2", "model.heads=3", "model.kv_heads=3", "model.hidden=48"],
     "model.heads: 3 query heads"),
    (2, ["parallel.tp=2", "model.kv_heads=1"], "model.kv_heads: 1 key/value heads"),
    (2, ["parallel.teacher_ranks=2", "distill.schedule=teacher_ranks"],
     "parallel.teacher_ranks: parallel.teacher_ranks=2 leaves no student rank"),
    (2, ["distill.schedule=teacher_ranks"], "parallel.teacher_ranks: must be > 0 exactly when"),
    (2, ["parallel.tp=2", "parallel.sp=true", "data.seq_len=15"], "data.seq_len: 15 does not split"),
    (1, ["data.global_batch=6", "data.micro_batch=4"], "data.global_batch: must be a multiple"),
    (2, ["data.global_batch=2", "data.micro_batch=2"], "data.global_batch: must be a multiple"),
    (1, ["data.split=abc"], "data.split: must be two non-negative weights"),
    (1, ["data.path=/nonexistent/corpus"], "data.path: no indexed dataset at /nonexistent/corpus"),
    (1, ["data.seq_len=64"], "data.seq_len: 64 is longer than model.max_seq_len=32"),
    (1, ["model.vocab_size=300"], "model.vocab_size: 300 is smaller than the bundled corpus"),
    (1, ["distill.teacher=/nonexistent/teacher"], "distill.teacher: no complete checkpoint at"),
    (1, ["distill.teacher=null"], "distill.teacher: a teacher checkpoint is needed"),
    (1, ["distill.activations=[{student: decoder.7.mlp_output, teacher: decoder.0.mlp_output}]"],
     "distill.activations[0].student: student buffer 'decoder.7.mlp_output' names layer 7"),
    (1, ["distill.activations=[{student: decoder.0.mlp_out, teacher: decoder.0.mlp_output}]"],
     "distill.activations[0].student: unknown student buffer"),
    (1, ["distill.activations=[all_mlps]"], "distill.projection: the student is 32 wide"),
    (1, ["distill.activations=[all_heads]"], "distill.activations[0]: unknown shortcut"),
    (1, ["train.resume=/nonexistent/ckpt"], "train.resume: no complete checkpoint at"),
    (1, ["train.init=/nonexistent/ckpt"], "train.init: no complete checkpoint at"),
    (1, ["distill.schedule=offline"], "distill.offline_dir: is required with schedule offline"),
    (1, ["train.steps"], "train.steps: an override must look like section.key=value"),
]


@pytest.mark.parametrize("world,overrides,message", CASES, ids=[" ".join(c[1]) for c in CASES])
def test_bad_config_is_one_clear_line(files, capsys, monkeypatch, world, overrides, message):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    assert main(["--config", str(files["config"]), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"ConfigError: {message}"), err[-1]
    assert not dist.is_initialized()


def test_teacher_with_another_vocabulary(files, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["--config", str(files["config"]), f"distill.teacher={files['teacher400']}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ConfigError: distill.teacher: the teacher's vocabulary has 400 tokens")


def test_missing_and_malformed_config_files(files, capsys, tmp_path):
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "ConfigError: config: file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: [1\n")
    assert main(["--config", str(bad)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["pretrain_distill.py", "pretrain.py"])
def test_entry_point_exit_code_and_single_line(files, script):
    done = subprocess.run([sys.executable, str(ROOT / "launch" / script), "--config",
                           str(files["config"]), "parallel.tp=3"], capture_output=True, text=True,
                          env={"WORLD_SIZE": "2", "RANK": "0", "PATH": "/usr/bin:/bin"},
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "ConfigError: parallel.tp: parallel.tp=3 is larger than the 2 student ranks (world size 2)"]


def test_shipped_configs_validate():
    configs = sorted((ROOT / "launch" / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        data = yaml.safe_load(path.read_text())
        world = _world_for(data)
        # Teachers and datasets named in GPU recipes do not exist here: validate everything else.
        overrides = []
        if data.get("distill", {}).get("teacher"):
            overrides += ["distill.teacher=null", "distill.logit.weight=0", "distill.activations=[]",
                          "distill.lm_weight=1"]
        if str(data.get("data", {}).get("path", "default")).startswith("/"):
            overrides += ["data.path=default", f"data.vocab_size={min(data['model']['vocab_size'], 4096)}"]
        load_run_config(path, overrides, world_size=world)


def _world_for(data: dict) -> int:
    par = data.get("parallel", {})
    teacher = par.get("teacher_ranks", 0)
    return teacher * 2 if teacher else par.get("tp", 1)  # recipes pair one student per teacher
