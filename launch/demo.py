"""`make demo`: teacher -> distilled student vs. the same student trained alone, on CPU.

    python launch/demo.py [--ternary] [--out runs/demo] [--nproc 2] [--retrain-teacher]
                          [--eval-steps 20] [section.key=value ...]
    python launch/demo.py --real [--quick] ...   # prune + distill SmolLM2: launch/demo_real.py

1. builds the bundled corpus (Python stdlib sources + a byte-level BPE) on first use;
2. trains the teacher (`demo_teacher.yaml`) with `launch/pretrain.py` (reused when a finished
   teacher of the same config is already in `--out`);
3. distills the student with `launch/pretrain_distill.py`: `demo.yaml`, a narrower student at
   TP=2 with sequence parallelism (LM + forward-KL logit distillation + MLP-activation MSE through
   a learned projection), or with `--ternary` `demo_ternary.yaml`, a ternary (BitNet b1.58)
   student of the teacher's architecture at DP=2 (0.5 * LM + 0.5 * T^2 * forward KL at T = 5);
4. trains the same student without a teacher on the same tokens, same seed and steps
   (`launch/pretrain.py`; the ternary baseline with `distill.lm_weight=1`: plain cross-entropy).
   Both ternary students start from the teacher's weights (`train.init`): quantization-aware
   training of the full-precision model, with and without its soft targets;
5. evaluates all three on the same validation tokens, prints the table, writes `report.md` and
   the loss curves `loss_curves.png` (in `--out`, or `--out`/ternary). Exits non-zero if the
   distilled student does not beat the baseline.

Trailing `section.key=value` overrides apply to every run (teacher and both students), e.g. a
smaller corpus or fewer steps for a quick look.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
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
from launch.demo_real import run_tool  # noqa: E402
from tools.score import checkpoint_model_config, load_model  # noqa: E402

log = get_logger("demo")
CONFIGS = ROOT / "launch" / "configs"
EVAL_STEPS = 20  # validation global batches (of data.global_batch samples) per model


@dataclass(frozen=True)
class Students:
    """What one demo compares: a student config, distilled and trained alone."""

    config: str  # in launch/configs
    subdir: str  # under --out: the two students' runs, report and plot
    name: str  # in the table: "distilled {name}", "baseline {name}"
    baseline_overrides: tuple[str, ...] = ()
    init_from_teacher: bool = False  # both students start from the teacher's weights (train.init)
    plot_keys: tuple[str, ...] = ("lm_loss", "val_loss")  # metrics.jsonl keys, one panel each


NARROW = Students("demo.yaml", "", "student")
# Quantization-aware training of the teacher's own weights. The baseline is hard-label training:
# cross-entropy at weight 1, not the recipe's 0.5 (and no lm_loss panel: the logged lm_loss
# includes the weight, 0.5 for the distilled student).
TERNARY = Students("demo_ternary.yaml", "ternary", "ternary student", ("distill.lm_weight=1.0",),
                   init_from_teacher=True, plot_keys=("val_loss",))


def torchrun(script: str, config: Path, overrides: list[str], nproc: int, log_file: Path) -> None:
    run_tool([f"launch/{script}", "--config", config, *overrides], log_file, nproc=nproc)


def config_digest(config: Path, overrides: list[str]) -> str:
    resolved = apply_overrides(load_yaml(config), overrides)
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]


def train_teacher(out: Path, nproc: int, retrain: bool, extra: list[str]) -> Path:
    run_dir = out / "teacher"
    overrides = [*extra, f"train.run_dir={run_dir}"]
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
def checkpoint_loss(run_dir: Path, eval_steps: int = EVAL_STEPS) -> tuple[float, int]:
    """(mean next-token loss in nats, parameter count) of a run's checkpoint on the first
    `eval_steps` validation steps of the run's own data (the same tokens for every demo run),
    evaluated in this process at TP=1 (the checkpoint reshards on load)."""
    step_dir, run_config, model_cfg = checkpoint_model_config(run_dir, key="checkpoint")
    data = parse_run_config(run_config).data
    model = load_model(step_dir, model_cfg, ParallelLayout.single())
    per_step = data.global_batch // data.micro_batch  # micro-batches of one step at DP = 1
    loss, _ = validation_loss(model, data, micro_batches=eval_steps * per_step,
                              seed=run_config["train"]["seed"])
    return loss, sum(p.numel() for p in model.parameters())


def report(rows: list[tuple[str, int, float]], seconds: dict) -> str:
    lines = ["| model | params | validation loss (nats/token) | perplexity |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {params / 1e6:.2f} M | {loss:.4f} | {math.exp(loss):.2f} |"
              for name, params, loss in rows]
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    return "\n".join(lines) + f"\n\nWall time: {timing}.\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ternary", action="store_true",
                        help="a ternary (BitNet b1.58) student of the teacher's architecture")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--retrain-teacher", action="store_true")
    parser.add_argument("--eval-steps", type=int, default=EVAL_STEPS,
                        help="validation steps (global batches) scored per model")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="applied to every run (teacher and both students)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--real" in argv:
        from launch.demo_real import main as real_demo
        setup_logging()
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        return real_demo(argv)
    args = parse_args(argv)
    setup_logging()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    students = TERNARY if args.ternary else NARROW
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    began = time.perf_counter()
    resolve_data_path(parse_run_config(
        apply_overrides(load_yaml(CONFIGS / "demo_teacher.yaml"), args.overrides)).data)
    seconds["corpus"] = time.perf_counter() - began

    began = time.perf_counter()
    teacher = train_teacher(out, args.nproc, args.retrain_teacher, args.overrides)
    seconds["teacher"] = time.perf_counter() - began

    student_cfg = CONFIGS / students.config
    work = out / students.subdir
    distilled = fresh_run(work / "distilled")
    baseline = fresh_run(work / "baseline")
    common = [*args.overrides, *([f"train.init={teacher}"] if students.init_from_teacher else [])]
    began = time.perf_counter()
    torchrun("pretrain_distill.py", student_cfg,
             [*common, f"train.run_dir={distilled}", f"distill.teacher={teacher}"],
             args.nproc, distilled / "train.log")
    seconds["distill"] = time.perf_counter() - began
    began = time.perf_counter()
    torchrun("pretrain.py", student_cfg,
             [*common, *students.baseline_overrides, f"train.run_dir={baseline}"],
             args.nproc, baseline / "train.log")
    seconds["baseline"] = time.perf_counter() - began

    runs = {"teacher": teacher, f"distilled {students.name}": distilled,
            f"baseline {students.name}": baseline}
    scored = {name: checkpoint_loss(run_dir, args.eval_steps) for name, run_dir in runs.items()}
    results = {name: loss for name, (loss, _) in scored.items()}
    table = report([(name, params, loss) for name, (loss, params) in scored.items()], seconds)

    from tools.plot_metrics import plot
    plot([distilled, baseline], list(students.plot_keys), work / "loss_curves.png")
    (work / "report.md").write_text(table)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + table)
    print(f"loss curves: {work / 'loss_curves.png'}\nreport: {work / 'report.md'}")
    gain = results[f"baseline {students.name}"] - results[f"distilled {students.name}"]
    if gain <= 0:
        print(f"the distilled {students.name} did NOT beat the baseline (gain {gain:+.4f} nats)")
        return 1
    print(f"distillation gain: {gain:.4f} nats/token on validation "
          f"({(1 - math.exp(-gain)) * 100:.1f}% lower perplexity)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
