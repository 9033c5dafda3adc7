"""Step time of the teacher schedules on CPU, measured in one run.

    python tools/bench/schedule.py [--steps 12] [--warmup 4] [--out DIR]

Same teacher/student pair and data for every row, one thread per process:
- student only (pure LM, no teacher), 1 process;
- `colocated`: teacher forward + student step on the same process;
- `teacher_ranks`: 1 teacher rank streaming ahead + 1 student rank (2 processes);
- the teacher's forward alone (no grad), timed in this process.

Target: `teacher_ranks` step <= 1.2 x max(teacher forward, student step), where `colocated` pays
their sum. Prints a markdown table and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from distill.weights import load_weights, save_weights  # noqa: E402
from engine.config import from_dict  # noqa: E402
from engine.data import (  # noqa: E402
    DataConfig,
    TokenBatches,
    resolve_data_path,
)
from engine.parallel import ParallelLayout  # noqa: E402
from layers.config import ModelConfig  # noqa: E402
from layers.model import TransformerLM  # noqa: E402

VOCAB = 2048
STUDENT = dict(family="llama", vocab_size=VOCAB, hidden=128, layers=2, heads=4, kv_heads=2,
               ffn_hidden=384, max_seq_len=128)
TEACHER = dict(family="llama", vocab_size=VOCAB, hidden=256, layers=4, heads=8, kv_heads=4,
               ffn_hidden=768, max_seq_len=128)
DATA = dict(path="default", vocab_size=VOCAB, seq_len=128, micro_batch=4, global_batch=8)


def config(run_dir: Path, teacher: Path, steps: int) -> dict:
    return {"model": STUDENT, "data": DATA,
            "distill": {"teacher": str(teacher), "logit": {"weight": 1.0}, "lm_weight": 1.0},
            "train": {"steps": steps, "run_dir": str(run_dir), "progress": False,
                      "eval_batches": 1, "warmup_steps": 0}}


def run(cfg_path: Path, nproc: int, overrides: list[str], script: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(ROOT / "launch" / script), "--config", str(cfg_path),
           *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{script} {' '.join(overrides)} failed:\n{done.stderr[-3000:]}")


def step_seconds(run_dir: Path, warmup: int) -> float:
    """Median step time from metrics.jsonl, past the warmup steps and without validation steps."""
    tokens = DATA["global_batch"] * DATA["seq_len"]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    times = [tokens / r["tokens_per_s"] for r in records[warmup:] if "val_loss" not in r]
    return statistics.median(times)


@torch.no_grad()
def teacher_forward_seconds(teacher_dir: Path, repeats: int) -> float:
    """Median time of the teacher's forward over one step's micro-batches, one thread."""
    torch.set_num_threads(1)
    layout = ParallelLayout.single()
    model = TransformerLM(ModelConfig(**TEACHER), layout).eval()
    load_weights(teacher_dir, model, layout)
    data = TokenBatches(from_dict(DataConfig, DATA), seed=1)
    times = []
    for _ in range(repeats):
        batches = data.next_step()
        began = time.perf_counter()
        for mb in batches:
            model(mb["input_ids"])
        times.append(time.perf_counter() - began)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-schedule-"))
    out.mkdir(parents=True, exist_ok=True)
    resolve_data_path(from_dict(DataConfig, DATA))
    teacher = save_weights(out / "teacher", TransformerLM(ModelConfig(**TEACHER),
                                                          ParallelLayout.single(), seed=3),
                           ParallelLayout.single(), config={"model": TEACHER})
    cfg_path = out / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump(config(out, teacher, args.steps)))

    run(cfg_path, 1, [f"train.run_dir={out / 'student_only'}"], "pretrain.py")
    run(cfg_path, 1, [f"train.run_dir={out / 'colocated'}"], "pretrain_distill.py")
    run(cfg_path, 2, [f"train.run_dir={out / 'teacher_ranks'}", "distill.schedule=teacher_ranks",
                      "parallel.teacher_ranks=1"], "pretrain_distill.py")
    student = step_seconds(out / "student_only", args.warmup)
    colocated = step_seconds(out / "colocated", args.warmup)
    remote = step_seconds(out / "teacher_ranks", args.warmup)
    forward = teacher_forward_seconds(teacher, args.steps)
    bound = max(forward, student)

    print(f"\nteacher {TEACHER['hidden']}x{TEACHER['layers']}, student {STUDENT['hidden']}x"
          f"{STUDENT['layers']}, {DATA['global_batch']}x{DATA['seq_len']} tokens/step, "
          "1 thread per process\n")
    print("| schedule | step time (s) | vs max(teacher fwd, student step) |")
    print("|---|---|---|")
    for name, value in (("teacher forward only", forward), ("student only", student),
                        ("colocated", colocated), ("teacher_ranks (1 + 1 ranks)", remote)):
        print(f"| {name} | {value:.3f} | {value / bound:.2f}x |")
    ratio = remote / bound
    print(f"\nteacher_ranks / max(teacher fwd, student step) = {ratio:.2f} (target <= 1.2): "
          f"{'PASS' if ratio <= 1.2 else 'FAIL'}")
    print(f"colocated / (teacher fwd + student step) = {colocated / (forward + student):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
