"""The shipped demo configs end to end under `torchrun --nproc_per_node 2`, a few steps each.

`launch/demo.py --ternary` trains the teacher (`demo_teacher.yaml`, `pretrain.py`, DP=2), the
ternary student (`demo_ternary.yaml`, initialized from the teacher) distilled from it and the same
student alone, and prints the table; then the narrow student (`demo.yaml`, `pretrain_distill.py`,
TP=2 + SP, LM + KD + activations) distills from the same teacher.

The corpus is capped (`data.corpus_max_bytes`) so that it builds in seconds and every run takes 3
steps; everything else is the shipped configuration.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, command, run, run_ok
from tests.trainer_utils import read_metrics

pytestmark = pytest.mark.slow  # the shipped configs' runs, several torchrun launches in all

DEMO_LIMIT_S = 600  # launch/demo.py --ternary: a corpus, three trainings and their evaluations
KEYS = {"step", "loss", "lm_loss", "kd_loss", "act_loss", "lr", "tokens_per_s", "grad_norm",
        "skipped_steps"}


def _tiny(tmp_path: Path) -> list[str]:
    return [f"data.cache_dir={tmp_path / 'cache'}", "data.corpus_max_bytes=400000",
            "train.eval_batches=2", "train.progress=false", "train.steps=3"]


def _torchrun(script: str, config: str, *overrides: str) -> None:
    run_ok(command(f"launch/{script}", "--config", ROOT / "launch" / "configs" / config, *overrides))


def _table(stdout: str) -> dict[str, tuple[float, float]]:
    """{model: (validation loss, perplexity)} from the demo's printed table."""
    rows = re.findall(r"^\| ([a-z ]+) \| [\d.]+ M \| ([^ ]+) \| ([^ ]+) \|$", stdout, re.M)
    return {name: (float(loss), float(ppl)) for name, loss, ppl in rows}


def _check_ternary_demo(out: Path, done: subprocess.CompletedProcess) -> None:
    table = _table(done.stdout)
    assert list(table) == ["teacher", "distilled ternary student", "baseline ternary student"], \
        done.stdout[-2000:]
    for loss, ppl in table.values():
        assert math.isfinite(loss) and 0 < loss < 20 and math.isclose(ppl, math.exp(loss), rel_tol=1e-3)
    work = out / "ternary"
    results = json.loads((work / "results.json").read_text())
    assert {k: round(v, 4) for k, v in results.items()} == {k: v[0] for k, v in table.items()}
    # The exit status says whether the distilled student beat the baseline, in this tiny run either way.
    beat = results["distilled ternary student"] < results["baseline ternary student"]
    assert done.returncode == (0 if beat else 1), done.stderr[-3000:]
    assert (work / "report.md").read_text().startswith("| model |")
    assert (work / "loss_curves.png").stat().st_size > 0

    distilled, baseline = work / "distilled", work / "baseline"
    configs = [yaml.safe_load((run / "config.yaml").read_text()) for run in (distilled, baseline)]
    assert all(c["model"]["quant"] == "ternary" for c in configs)
    assert configs[0]["train"]["init"] == str(out / "teacher")  # both start from the teacher
    assert configs[0]["data"] == configs[1]["data"] and configs[0]["train"] == {
        **configs[1]["train"], "run_dir": configs[0]["train"]["run_dir"]}  # same tokens, seed, steps
    kd, lm = read_metrics(distilled), read_metrics(baseline)
    assert [r["step"] for r in kd] == [r["step"] for r in lm] == [1, 2, 3]
    assert all(r["kd_loss"] > 0 and r["lm_weight"] == 0.5 and r["logit_weight"] == 0.5
               and r["temperature"] == 5.0 for r in kd)
    assert all(r["kd_loss"] == 0 and r["lm_weight"] == 1.0 for r in lm)


def test_demo_configs_run_under_torchrun(tmp_path):
    out = tmp_path / "demo"
    done = run(command("launch/demo.py", "--ternary", "--out", out, "--eval-steps", "1",
                       *_tiny(tmp_path), nproc=0), timeout=DEMO_LIMIT_S)
    _check_ternary_demo(out, done)

    teacher = out / "teacher"
    student = tmp_path / "student"
    _torchrun("pretrain_distill.py", "demo.yaml", *_tiny(tmp_path),
              f"train.run_dir={student}", f"distill.teacher={teacher}")
    records = read_metrics(student)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(set(r) >= KEYS for r in records)
    assert all(r["kd_loss"] > 0 and r["act_loss"] > 0 and r["lm_loss"] > 0 for r in records)
    assert "val_loss" in records[-1]
    assert (student / "config.yaml").is_file()
    assert (student / "checkpoints" / "latest").is_file()
