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
from engine import entry
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
    return {"config": write_config(tmp / "run.yaml", cfg), "teacher": teacher, "teacher400": odd,
            "tmp": tmp}


def _teachers(entries: str, *extra: str) -> list[str]:
    """Overrides that replace the config's one teacher by `distill.teachers=[entries]`."""
    return ["distill.teacher=null", f"distill.teachers=[{entries}]", *extra]


A = "{checkpoint: @teacher, name: a}"  # @teacher, @teacher400: the fixture's checkpoints
AB = f"{A}, {{checkpoint: @teacher, name: b}}"


CASES = [  # (world size, overrides, expected start of the message after "ConfigError: ")
    (1, ["train.stpes=3"], "train.stpes: unknown key (did you mean 'train.steps'?)"),
    (1, ["trian.steps=3"], "trian: unknown key (did you mean 'train'?)"),
    (1, ["train.steps=many"], "train.steps: must be an integer"),
    (1, ["train.steps=0"], "train.steps: must be >= 1"),
    (1, ["train.lr=-1"], "train.lr: must be > 0"),
    (1, ["model.family=bert"], "model.family: must be one of 'llama', 'gpt2'"),
    (1, ["model.final_logit_softcap=0"],
     "model.final_logit_softcap: must be > 0 and finite, or null (got 0.0)"),
    (1, ["model.final_logit_softcap=-30.0"],
     "model.final_logit_softcap: must be > 0 and finite, or null (got -30.0)"),
    (1, ["model.final_logit_softcap=high"],
     "model.final_logit_softcap: must be a number (got 'high')"),
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
    (2, ["parallel.teacher_tp=2"], "parallel.teacher_tp: only applies with parallel.teacher_ranks > 0"),
    (2, ["parallel.teacher_cp=2"], "parallel.teacher_cp: only applies with parallel.teacher_ranks > 0"),
    (3, ["parallel.teacher_ranks=1", "distill.schedule=teacher_ranks", "parallel.teacher_cp=2"],
     "parallel.teacher_cp: parallel.tp=1 x parallel.teacher_cp=2 does not divide parallel.teacher_ranks=1"),
    (4, ["parallel.teacher_ranks=2", "distill.schedule=teacher_ranks", "parallel.teacher_cp=2",
         "data.seq_len=14"], "parallel.teacher_cp: data.seq_len=14 does not split into 2 x 2 chunks"),
    (3, ["parallel.teacher_ranks=2", "distill.schedule=teacher_ranks", "parallel.teacher_tp=0"],
     "parallel.teacher_tp: must be >= 1"),
    (3, ["parallel.teacher_ranks=1", "distill.schedule=teacher_ranks", "parallel.teacher_tp=2"],
     "parallel.teacher_tp: parallel.teacher_tp=2 does not divide parallel.teacher_ranks=1"),
    (5, ["parallel.teacher_ranks=2", "distill.schedule=teacher_ranks", "parallel.teacher_tp=1"],
     "parallel.teacher_ranks: the teacher's data-parallel degree 2 (parallel.teacher_ranks=2 / "
     "parallel.teacher_tp=1) does not divide the students' 3"),
    (6, ["parallel.teacher_ranks=4", "distill.schedule=teacher_ranks", "parallel.tp=2",
         "parallel.teacher_tp=4", "parallel.sp=true", "data.seq_len=18"],
     "parallel.teacher_tp: data.seq_len=18 does not split over 4 teacher ranks"),
    (5, ["parallel.teacher_ranks=4", "distill.schedule=teacher_ranks", "parallel.teacher_tp=4"],
     "distill.teacher(model.kv_heads): 2 key/value heads"),
    (3, ["parallel.teacher_ranks=2", "distill.schedule=teacher_ranks", "parallel.teacher_tp=2",
         "distill.teacher_stream=logits"],
     "distill.teacher_stream: logits streams logit shards, which needs parallel.teacher_tp=2"),
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
    # Settings that used to pass start-up and fail at the first micro-batch or later:
    (1, ["distill.logit.kind=jsd", "distill.logit.beta=0"],
     "distill.logit.beta: must be in (0, 1) for jsd (got 0.0)"),
    (1, ["distill.logit.kind=jsd", "distill.logit.beta=1"],
     "distill.logit.beta: must be in (0, 1) for jsd (got 1.0)"),
    (1, ["distill.logit.kind=skew_forward_kl", "distill.logit.skew=0"],
     "distill.logit.skew: must be in (0, 1) for skew_forward_kl (got 0.0)"),
    (1, ["distill.logit.kind=skew_reverse_kl", "distill.logit.skew=1"],
     "distill.logit.skew: must be in (0, 1) for skew_reverse_kl (got 1.0)"),
    (1, ["model.max_seq_len=64", "data.seq_len=48"],
     "distill.teacher: the teacher's max_seq_len=32 is shorter than data.seq_len=48"),
    (1, ["distill.activations=[{student: embedding, teacher: decoder.9.output}]"],
     "distill.activations[0].teacher: teacher buffer 'decoder.9.output' names layer 9, but the "
     "teacher has 3 layers"),
    (1, ["distill.activations=[{student: decoder.0.output, teacher: decoder.0.output, "
         "loss: huber}]"], "distill.activations[0].loss: must be one of 'mse', 'l2', 'cosine'"),
    (1, ["distill.prefetch=0"], "distill.prefetch: must be >= 1 (got 0)"),
    (1, ["distill.mtp_weights=[1]"], "distill.mtp_weights: has 1 entries for model.mtp_heads=0"),
    (1, ["distill.logit.weight=-1"], "distill.logit.weight: must be >= 0"),
    (1, ["distill.lm_weight=0", "distill.logit.weight=0"],
     "distill.lm_weight: every loss term is off"),
    (1, ["distill.schedule=offline", "distill.offline_dir=/nonexistent/export"],
     "distill.offline_dir: no teacher store at /nonexistent/export"),
    (1, ["distill.schedule=offline", "distill.offline_dir=x", "distill.activations=[all_mlps]"],
     "distill.activations: the offline schedule stores teacher logits only"),
    (1, ["distill.schedule=offline", "distill.offline_dir=x", "distill.fused_lm_head=true"],
     "distill.fused_lm_head: is not supported with schedule offline"),
    (1, ["model.kv_heads=3"], "model.kv_heads: must divide model.heads=4"),
    (1, ["model.dropout=1.0"], "model.dropout: must be in [0, 1)"),
    (2, ["parallel.tp=2", "model.ffn_hidden=63"], "model.ffn_hidden: 63 does not split"),
    (1, ["data.micro_batch=0"], "data.micro_batch:"),
    (1, ["train.min_lr=1"], "train.min_lr: must be between 0 and train.lr"),
    (1, ["train.keep=0"], "train.keep: must be >= 1 (got 0)"),
    (1, ["parallel.timeout_s=0"], "parallel.timeout_s: must be > 0"),
    (1, ["parallel.pp=0"], "parallel.pp: must be >= 1 (got 0)"),
    (3, ["parallel.pp=2"], "parallel.pp: parallel.tp=1 x parallel.pp=2 does not divide the 3 "
                           "student ranks"),
    (2, ["parallel.pp=2", "model.layers=3"],
     "parallel.pp: parallel.pp=2 does not divide the student's model.layers=3"),
    (1, ["parallel.virtual_stages=2"],
     "parallel.virtual_stages: 2 virtual stages need parallel.pp > 1"),
    (2, ["parallel.pp=2", "parallel.virtual_stages=2"],
     "parallel.virtual_stages: parallel.virtual_stages=2 does not divide the 1 decoder blocks of "
     "each of the parallel.pp=2 stages"),
    (2, ["parallel.pp=2", "parallel.virtual_stages=2", "model.layers=4", "data.global_batch=2"],
     "parallel.virtual_stages: the interleaved schedule needs the 1 micro-batches of a step (per "
     "DP rank) to be a multiple of parallel.pp=2"),
    (3, ["parallel.pp=2", "parallel.teacher_ranks=1", "distill.schedule=teacher_ranks",
         "distill.prefetch=1"],
     "distill.prefetch: must be >= the 2 micro-batches of a step with parallel.pp=2 and teacher "
     "ranks (got 1)"),
    (2, ["parallel.pp=2", "model.hidden=48",
         "distill.activations=[{student: decoder.0.output, teacher: decoder.2.output}]"],
     "distill.activations: decoder.0.output -> decoder.2.output: with parallel.pp=2 x "
     "parallel.virtual_stages=1 the student buffer is on virtual stage 0 and the teacher's on 1"),
    (1, ["train.recompute=attention"],
     "train.recompute: must be one of 'none', 'selective', 'full' (got 'attention')"),
    # Several teachers (@teacher, @teacher400: the fixture's checkpoints)
    (1, ["distill.teachers=[{checkpoint: @teacher, name: a}]"],
     "distill.teachers: give distill.teacher or distill.teachers, not both"),
    (1, _teachers(f"{A}, {A}"), "distill.teachers[1].name: 'a' is used twice"),
    (1, _teachers("{checkpoint: @teacher}"), "distill.teachers[0].name: is required"),
    (1, _teachers("{checkpoint: @teacher, name: a, weight: -1}"),
     "distill.teachers[0].weight: must be >= 0"),
    (1, _teachers("{checkpoint: @teacher, name: a, weight: 0}"),
     "distill.teachers: every weight is 0"),
    (1, _teachers("{checkpoint: /nonexistent/t, name: a}"),
     "distill.teachers[0].checkpoint: no complete checkpoint at"),
    (1, _teachers(f"{A}, {{checkpoint: @teacher400, name: b}}"),
     "distill.teachers[1].checkpoint: the teacher's vocabulary has 400 tokens and the student's "
     "320"),
    (2, _teachers(A, "distill.schedule=teacher_ranks", "parallel.teacher_ranks=1"),
     "distill.teachers: several teachers need schedule colocated or offline (teacher_ranks "
     "serve one teacher)"),
    (1, _teachers(A, "distill.schedule=offline"),
     "distill.teachers[0].offline_dir: is required with schedule offline"),
    (1, _teachers("{offline_dir: x, name: a}", "distill.schedule=offline", "distill.offline_dir=x"),
     "distill.offline_dir: give each teacher's export as distill.teachers[i].offline_dir"),
    (1, _teachers("{offline_dir: x, name: a}", "distill.schedule=offline",
                  "distill.teacher_mode=mixture"),
     "distill.teacher_mode: mixture needs every teacher's full distribution"),
    (1, _teachers("{offline_dir: /nonexistent/e, name: a}", "distill.schedule=offline"),
     "distill.teachers[0].offline_dir: no teacher store at /nonexistent/e"),
    (1, _teachers("{name: a}"), "distill.teachers[0].checkpoint: is required"),
    (1, _teachers(AB, "distill.projection=per_pair", "distill.activations=[all_mlps]"),
     "distill.activations[0].teacher_name: is required with several teachers"),
    (1, _teachers(AB, "distill.projection=per_pair",
                  "distill.activations=[{student: all_mlps, teacher_name: c}]"),
     "distill.activations[0].teacher_name: 'c' is none of distill.teachers (a, b)"),
    # Curriculum
    (1, ["data.curriculum=teacher_confidence"],
     "data.curriculum_steps: must be >= 1 with data.curriculum teacher_confidence"),
    (1, ["data.curriculum=teacher_confidence", "data.curriculum_steps=2"],
     "data.curriculum_scores: is required with data.curriculum teacher_confidence"),
    (1, ["data.curriculum=teacher_confidence", "data.curriculum_steps=2",
         "data.curriculum_scores=/nonexistent/scores"],
     "data.curriculum_scores: no curriculum scores at /nonexistent/scores"),
    (1, ["data.curriculum=by_length"], "data.curriculum: must be one of 'none', "
     "'teacher_confidence'"),
    (1, ["distill.teacher_mode=average"],
     "distill.teacher_mode: must be one of 'sum', 'mixture'"),
    (2, ["train.distributed_optimizer=maybe"],
     "train.distributed_optimizer: must be true or false (got 'maybe')"),
]


@pytest.mark.parametrize("world,overrides,message", CASES, ids=[" ".join(c[1]) for c in CASES])
def test_bad_config_is_one_clear_line(files, capsys, monkeypatch, world, overrides, message):
    for name, value in {"WORLD_SIZE": str(world), "RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    overrides = [o.replace("@teacher400", str(files["teacher400"]))
                 .replace("@teacher", str(files["teacher"])) for o in overrides]
    assert main(["--config", str(files["config"]), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"ConfigError: {message}"), err[-1]
    assert not dist.is_initialized()


def test_teacher_with_another_vocabulary(files, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["--config", str(files["config"]), f"distill.teacher={files['teacher400']}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ConfigError: distill.teacher: the teacher's vocabulary has 400 tokens")


NON_FINITE = [  # (override, the line after "ConfigError: ")
    ("distill.logit.temperature=.inf", "distill.logit.temperature: must be a finite number (got inf)"),
    ("distill.logit.weight=.inf", "distill.logit.weight: must be a finite number (got inf)"),
    ("distill.lm_weight=.inf", "distill.lm_weight: must be a finite number (got inf)"),
    ("distill.lm_weight=-.inf", "distill.lm_weight: must be a finite number (got -inf)"),
    ("distill.logit.temperature=.nan", "distill.logit.temperature: must be a finite number (got nan)"),
    ("train.lr=1e999", "train.lr: must be a finite number (got inf)"),  # a string YAML leaves
    ("model.final_logit_softcap=.inf",
     "model.final_logit_softcap: must be a finite number (got inf)"),
    ("distill.logit.weight={start: .inf, end: 1}",
     "distill.logit.weight.start: must be a finite number (got inf)"),
]


@pytest.mark.parametrize("override,message", NON_FINITE, ids=[c[0] for c in NON_FINITE])
def test_non_finite_float_settings_are_refused(files, capsys, monkeypatch, tmp_path, override,
                                               message):
    """Constants used to pass start-up and end the run with NonFiniteError, or with exit 0 and
    every step skipped; schedules were already refused."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    run_dir = tmp_path / "run"
    assert main(["--config", str(files["config"]), f"train.run_dir={run_dir}", override]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"ConfigError: {message}"]
    assert not run_dir.exists() and not dist.is_initialized()


def test_missing_and_malformed_config_files(files, capsys, tmp_path):
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "ConfigError: config: file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n   lr: 1\n")
    assert main(["--config", str(bad)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ConfigError: config: {bad} is not valid YAML: line 3, column 6: mapping values are not "
        "allowed here"]


TORCHRUN_ENV = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
                "PATH": "/usr/bin:/bin"}


TP3_LINE = "ConfigError: parallel.tp: parallel.tp=3 is larger than the 2 student ranks (world size 2)"


@pytest.mark.parametrize("script", ["pretrain_distill.py", "pretrain.py"])
def test_entry_point_exit_code_and_single_line(files, script):
    """Rank 0 prints the one line at once."""
    done = subprocess.run([sys.executable, str(ROOT / "launch" / script), "--config",
                           str(files["config"]), "parallel.tp=3"], capture_output=True,
                          text=True, env={**TORCHRUN_ENV, "RANK": "0"}, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [TP3_LINE]


def test_other_ranks_wait_for_rank_0s_line_and_speak_only_if_still_running(files, monkeypatch,
                                                                           capsys):
    """Rank 1 meets the same error. It waits SPEAKER_GRACE_S first: if it exited at once,
    torchrun could end rank 0 before its line is out. Still running after it (torchrun ends it
    once rank 0 has exited), it says the line itself, naming its rank."""
    slept = []
    monkeypatch.setattr(entry.time, "sleep", slept.append)
    for key, value in {**TORCHRUN_ENV, "RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    assert main(["--config", str(files["config"]), "parallel.tp=3"]) == 2
    assert slept == [entry.SPEAKER_GRACE_S]
    assert capsys.readouterr().err.strip().splitlines() == [f"rank 1: {TP3_LINE}"]


@pytest.mark.parametrize("env,message", [
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
     "ConfigError: environment: RANK is not set"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "ConfigError: environment: WORLD_SIZE=2 but MASTER_ADDR is "
                                       "not set"),
    ({"WORLD_SIZE": "2.5", "RANK": "0"}, "ConfigError: environment: WORLD_SIZE='2.5' is not an "
                                         "integer"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
     "ConfigError: environment: RANK=2 is outside WORLD_SIZE=2"),
])
def test_broken_launcher_environment_is_one_line_at_once(files, env, message):
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain_distill.py"),
                           "--config", str(files["config"])], capture_output=True, text=True,
                          env={**env, "PATH": "/usr/bin:/bin"}, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines


def test_shipped_configs_validate(tmp_path):
    configs = sorted((ROOT / "launch" / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        data = yaml.safe_load(path.read_text())
        world = _world_for(data)
        # Teachers, checkpoints and datasets the configs name do not exist here: validate the rest.
        overrides = []
        if data.get("distill", {}).get("teacher"):
            overrides += ["distill.teacher=null", "distill.logit.weight=0", "distill.activations=[]",
                          "distill.lm_weight=1"]
        if data.get("train", {}).get("init"):  # the ternary demo starts from the demo teacher
            overrides += ["train.init=null"]
        if str(data.get("data", {}).get("path", "default")).startswith("/"):
            overrides += ["data.path=default", f"data.vocab_size={min(data['model']['vocab_size'], 4096)}"]
        # Start-up checks the datasets, building the bundled corpus: a small one, not the whole stdlib.
        overrides += [f"data.cache_dir={tmp_path}", "data.corpus_max_bytes=300000"]
        load_run_config(path, overrides, world_size=world)


def _world_for(data: dict) -> int:
    par = data.get("parallel", {})
    teacher = par.get("teacher_ranks", 0)
    return teacher * 2 if teacher else par.get("tp", 1)  # recipes pair one student per teacher
