"""Step time of the teacher schedules on CPU, and what teacher ranks send, measured in one run.

    python tools/bench/schedule.py [--steps 12] [--warmup 4] [--out DIR]

Same teacher/student pair and data for every row, one thread per process:
- student only (pure LM, no teacher), 1 process;
- `colocated`: teacher forward + student step on the same process;
- `teacher_ranks`: 1 teacher rank streaming ahead + 1 student rank (2 processes), once streaming
  the teacher's final hidden states (the protocol) and once its logit shards (the older protocol,
  `distill.teacher_stream=logits`, the baseline), with the bytes the teacher rank sends per step
  read from the collective counters;
- the teacher's forward alone (no grad), timed in this process.

Target: `teacher_ranks` step <= 1.2 x max(teacher forward, student step), where `colocated` pays
their sum. Prints markdown tables: step times, bytes per step of both protocols, and their byte
ratio projected at Llama-3-8B shapes.
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
from engine.collectives import count_collectives  # noqa: E402
from engine.config import from_dict  # noqa: E402
from engine.data import DataConfig, TokenBatches, resolve_data_path  # noqa: E402
from engine.parallel import ParallelLayout  # noqa: E402
from engine.spawn import run_ranks  # noqa: E402
from layers.config import ModelConfig  # noqa: E402
from layers.model import TransformerLM  # noqa: E402

VOCAB = 2048
STUDENT = dict(family="llama", vocab_size=VOCAB, hidden=128, layers=2, heads=4, kv_heads=2,
               ffn_hidden=384, max_seq_len=128)
TEACHER = dict(family="llama", vocab_size=VOCAB, hidden=256, layers=4, heads=8, kv_heads=4,
               ffn_hidden=768, max_seq_len=128)
DATA = dict(path="default", vocab_size=VOCAB, seq_len=128, micro_batch=4, global_batch=8)
LLAMA3_8B = dict(vocab=128256, hidden=4096)  # the projection's shapes
TEACHER_RANKS = ["distill.schedule=teacher_ranks", "parallel.teacher_ranks=1"]


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


def _counted_run(cfg_path: Path, overrides: list[str]) -> int:
    """One rank of a teacher_ranks run (inside `run_ranks`): the bytes it sent point to point."""
    from distill.run import main as run_main

    with count_collectives() as counts:
        if run_main(["--config", str(cfg_path), *overrides]) != 0:
            raise RuntimeError(f"teacher_ranks run {' '.join(overrides)} failed")
    return counts.bytes["send"]


def streaming_run(cfg_path: Path, run_dir: Path, stream: str) -> int:
    """A 1 + 1 teacher_ranks run streaming `stream`; the bytes the teacher rank sent."""
    overrides = [f"train.run_dir={run_dir}", *TEACHER_RANKS, f"distill.teacher_stream={stream}"]
    return run_ranks(_counted_run, 2, cfg_path, overrides, timeout_s=1800)[1]


def projected_ratio(student_tp: int) -> float:
    """Logit-shard bytes over hidden-state bytes per token for one student TP group: the logit
    shards of a token cover the (padded) vocabulary once, its hidden states go to every TP rank."""
    multiple = 128 * student_tp
    padded = -(-LLAMA3_8B["vocab"] // multiple) * multiple
    return padded / (student_tp * LLAMA3_8B["hidden"])


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
    sent = {stream: streaming_run(cfg_path, out / f"teacher_ranks_{stream}", stream)
            for stream in ("logits", "hidden")}
    student = step_seconds(out / "student_only", args.warmup)
    colocated = step_seconds(out / "colocated", args.warmup)
    remote = step_seconds(out / "teacher_ranks_hidden", args.warmup)
    baseline = step_seconds(out / "teacher_ranks_logits", args.warmup)
    forward = teacher_forward_seconds(teacher, args.steps)
    bound = max(forward, student)

    print(f"\nteacher {TEACHER['hidden']}x{TEACHER['layers']}, student {STUDENT['hidden']}x"
          f"{STUDENT['layers']}, {DATA['global_batch']}x{DATA['seq_len']} tokens/step, "
          "1 thread per process\n")
    print("| schedule | step time (s) | vs max(teacher fwd, student step) |")
    print("|---|---|---|")
    for name, value in (("teacher forward only", forward), ("student only", student),
                        ("colocated", colocated), ("teacher_ranks (1 + 1 ranks)", remote),
                        ("teacher_ranks, logits streamed (baseline)", baseline)):
        print(f"| {name} | {value:.3f} | {value / bound:.2f}x |")
    ratio = remote / bound
    print(f"\nteacher_ranks / max(teacher fwd, student step) = {ratio:.2f} (target <= 1.2): "
          f"{'PASS' if ratio <= 1.2 else 'FAIL'}")
    print(f"colocated / (teacher fwd + student step) = {colocated / (forward + student):.2f}")
    print_bytes(sent, {"logits": baseline, "hidden": remote}, args.steps)
    return 0


def print_bytes(sent: dict[str, int], seconds: dict[str, float], steps: int) -> None:
    tokens = DATA["global_batch"] * DATA["seq_len"]
    print(f"\nteacher rank -> student rank, {tokens} tokens/step, fp32 teacher (vocab {VOCAB}, "
          f"hidden {TEACHER['hidden']}), student TP 1\n")
    print("| stream | bytes/step | bytes/token | step time (s) |")
    print("|---|---:|---:|---:|")
    for stream, label in (("logits", "logit shards (baseline)"), ("hidden", "hidden states")):
        per_step = sent[stream] / steps
        print(f"| {label} | {per_step:,.0f} | {per_step / tokens:,.1f} | {seconds[stream]:.3f} |")
    print(f"\nmeasured byte ratio logits / hidden: {sent['logits'] / sent['hidden']:.2f} "
          f"(vocab / hidden = {VOCAB / TEACHER['hidden']:.2f} plus the checksums and header)")
    print(f"\nprojected at Llama-3-8B shapes (vocab {LLAMA3_8B['vocab']}, hidden "
          f"{LLAMA3_8B['hidden']}), logit-shard bytes over hidden-state bytes per token:\n")
    print("| student TP | 1 | 2 | 4 | 8 |")
    print("|---|---:|---:|---:|---:|")
    print("| logits / hidden | " + " | ".join(f"{projected_ratio(tp):.1f}x" for tp in (1, 2, 4, 8))
          + " |")


if __name__ == "__main__":
    sys.exit(main())
