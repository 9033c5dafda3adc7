"""The shipped demo configs end to end under `torchrun --nproc_per_node 2`, a few steps each:
teacher (`pretrain.py`, DP=2) then student (`pretrain_distill.py`, TP=2 + SP, LM + KD + activations).

The corpus is capped (`data.corpus_max_bytes`) so that it builds in seconds; everything else is the
shipped configuration.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.trainer_utils import read_metrics

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"step", "loss", "lm_loss", "kd_loss", "act_loss", "lr", "tokens_per_s", "grad_norm",
        "skipped_steps"}


def _torchrun(script: str, config: str, *overrides: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "launch" / script), "--config", str(ROOT / "launch" / "configs" / config),
           *overrides]
    done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_demo_configs_run_under_torchrun(tmp_path):
    data = [f"data.cache_dir={tmp_path / 'cache'}", "data.corpus_max_bytes=400000",
            "train.eval_batches=2", "train.progress=false"]
    teacher = tmp_path / "teacher"
    _torchrun("pretrain.py", "demo_teacher.yaml", *data, "train.steps=3",
              f"train.run_dir={teacher}")
    student = tmp_path / "student"
    _torchrun("pretrain_distill.py", "demo.yaml", *data, "train.steps=3",
              f"train.run_dir={student}", f"distill.teacher={teacher}")
    records = read_metrics(student)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(set(r) >= KEYS for r in records)
    assert all(r["kd_loss"] > 0 and r["act_loss"] > 0 and r["lm_loss"] > 0 for r in records)
    assert "val_loss" in records[-1]
    assert (student / "config.yaml").is_file()
    assert (student / "checkpoints" / "latest").is_file()
