"""`make demo`: teacher -> distilled student vs. the same student trained alone, on CPU.

    python launch/demo.py [--out runs/demo] [--nproc 2] [--retrain-teacher]

1. builds the bundled corpus (Python stdlib sources + a byte-level BPE) on first use;
2. trains the teacher with `launch/pretrain.py` (reused when a finished teacher of the same config
   is already in `--out`);
3. distills the student at TP=2 with sequence parallelism (`launch/pretrain_distill.py`:
   LM + forward-KL logit distillation + MLP-activation MSE through a learned projection);
4. trains the same student without a teacher on the same tokens (`launch/pretrain.py`);
5. evaluates all three on the same validation tokens, prints the table, writes `report.md` and
   the loss curves `loss_curves.png`. Exits non-zero if the distilled student does not beat the
   baseline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from distill.evaluate import validation_loss  # noqa: E402
from distill.runconfig import parse_run_config  # noqa: E402
from engine.config import apply_overrides, load_yaml  # noqa: E402
from engine.data import resolve_data_path  # noqa: E402
from engine.log import get_logger, setup_logging  # noqa: E402
from engine.parallel import ParallelLayout  # noqa: E402
from layers.model import TransformerLM  # noqa: E402
from tools.score import checkpoint_model_config, load_model  # noqa: E402

log = get_logger("demo")
CONFIGS = ROOT / "launch" / "configs"
EVAL_STEPS = 20  # validation global batches (of data.global_batch samples) per model


def torchrun(script: str, config: Path, overrides: list[str], nproc: int, log_file: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(ROOT / "launch" / script), "--config", str(config),
           *overrides]
    log.info("running: %s", " ".join(cmd[2:]))
    began = time.perf_counter()
    with log_file.open("w") as out:
        done = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log_file.read_text().splitlines()[-15:]
        raise SystemExit(f"{script} failed (exit {done.returncode}); last lines of {log_file}:\n"
                         + "\n".join(tail))
    log.info("%s finished in %.0f s", script, time.perf_counter() - began)


def config_digest(config: Path, overrides: list[str]) -> str:
    resolved = apply_overrides(load_yaml(config), overrides)
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]


def train_teacher(out: Path, nproc: int, retrain: bool) -> Path:
    run_dir = out / "teacher"
    overrides = [f"train.run_dir={run_dir}"]
    digest = config_digest(CONFIGS / "demo_teacher.yaml", overrides)
    stamp = run_dir / "demo-teacher.digest"
    if not retrain and stamp.is_file() and stamp.read_text() == digest:
        log.info("reusing the teacher in %s (same config)", run_dir)
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    torchrun("pretrain.py", CONFIGS / "demo_teacher.yaml", overrides, nproc,
             run_dir / "train.log")
    stamp.write_text(digest)
    return run_dir


def fresh_run(run_dir: Path) -> Path:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    return run_dir


@torch.no_grad()
def checkpoint_loss(run_dir: Path, config: Path) -> float:
    """Mean next-token loss (nats) of a run's checkpoint on the first EVAL_STEPS validation steps
    of `config`'s data, evaluated in this process at TP=1 (the checkpoint reshards on load)."""
    data = parse_run_config(load_yaml(config)).data
    step_dir, run_config, model_cfg = checkpoint_model_config(run_dir, key="checkpoint")
    model = load_model(step_dir, model_cfg, ParallelLayout.single())
    per_step = data.global_batch // data.micro_batch  # micro-batches of one step at DP = 1
    loss, _ = validation_loss(model, data, micro_batches=EVAL_STEPS * per_step,
                              seed=run_config["train"]["seed"])
    return loss


def report(rows: list[tuple[str, str, float, float]], seconds: dict) -> str:
    lines = ["| model | params | validation loss (nats/token) | perplexity |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {params} | {loss:.4f} | {ppl:.2f} |" for name, params, loss, ppl in rows]
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    return "\n".join(lines) + f"\n\nWall time: {timing}.\n"


def count_params(config: Path) -> str:
    cfg = parse_run_config(load_yaml(config))
    model = TransformerLM(cfg.model, ParallelLayout.single())
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--retrain-teacher", action="store_true")
    args = parser.parse_args(argv)
    setup_logging()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    began = time.perf_counter()
    resolve_data_path(parse_run_config(load_yaml(CONFIGS / "demo_teacher.yaml")).data)
    seconds["corpus"] = time.perf_counter() - began

    began = time.perf_counter()
    teacher = train_teacher(out, args.nproc, args.retrain_teacher)
    seconds["teacher"] = time.perf_counter() - began

    student_cfg = CONFIGS / "demo.yaml"
    distilled = fresh_run(out / "distilled")
    baseline = fresh_run(out / "baseline")
    began = time.perf_counter()
    torchrun("pretrain_distill.py", student_cfg,
             [f"train.run_dir={distilled}", f"distill.teacher={teacher}"], args.nproc,
             distilled / "train.log")
    seconds["distill"] = time.perf_counter() - began
    began = time.perf_counter()
    torchrun("pretrain.py", student_cfg, [f"train.run_dir={baseline}"], args.nproc,
             baseline / "train.log")
    seconds["baseline"] = time.perf_counter() - began

    results = {}
    for name, run_dir, config in (("teacher", teacher, CONFIGS / "demo_teacher.yaml"),
                                  ("distilled student", distilled, student_cfg),
                                  ("baseline student", baseline, student_cfg)):
        results[name] = checkpoint_loss(run_dir, config)
    rows = [(name, count_params(CONFIGS / ("demo_teacher.yaml" if name == "teacher" else
                                           "demo.yaml")), loss, math.exp(loss))
            for name, loss in results.items()]
    table = report(rows, seconds)

    from tools.plot_metrics import plot
    plot([distilled, baseline], ["lm_loss", "val_loss"], out / "loss_curves.png")
    (out / "report.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + table)
    print(f"loss curves: {out / 'loss_curves.png'}\nreport: {out / 'report.md'}")
    gain = results["baseline student"] - results["distilled student"]
    if gain <= 0:
        print(f"the distilled student did NOT beat the baseline (gain {gain:+.4f} nats)")
        return 1
    print(f"distillation gain: {gain:.4f} nats/token on validation "
          f"({(1 - math.exp(-gain)) * 100:.1f}% lower perplexity)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
