"""Several teachers: a student distilled from each teacher alone, from their sum and their mixture.

    python tools/bench/teachers.py [--out runs/bench_teachers] [--teacher-steps 300]
                                   [--student-steps 150] [--reverse-kl]

On the bundled corpus, CPU, one process and one thread per run, in one run of this script:
1. trains two teachers of different widths with launch/pretrain.py: the demo teacher's
   architecture (launch/configs/demo_teacher.yaml: 4 layers, hidden 192) and a narrower one
   (hidden 96, 3 heads, ffn 256), seq_len 64, `--teacher-steps` steps each;
2. trains the demo student's architecture (launch/configs/demo.yaml at TP 1, hidden 96, 2 layers,
   no activation terms) from the same initialization and data for `--student-steps` steps, with
   LM loss + forward KL at T = 1, five ways: no teacher (LM only), the wide teacher alone, the
   narrow teacher alone, `distill.teacher_mode: sum` (weights 0.5 / 0.5, so the KD term has the
   single teacher's scale) and `mixture` (weights 0.5 / 0.5); with `--reverse-kl` also sum and
   mixture with reverse KL (with forward KL the two modes have the same gradient: see below);
3. reports each model's validation loss (next-token cross-entropy on `--eval-batches`
   micro-batches of the validation split, the trainer's `val_loss`) and the step time.

Ratios are against the student distilled from the wide teacher alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from engine.metrics import read_metrics  # noqa: E402
from tools.bench.on_policy import run, write_config  # noqa: E402

NARROW = dict(hidden=96, heads=3, kv_heads=1, ffn_hidden=256)


def train(out: Path, name: str, script: str, config: Path, *overrides: str) -> dict:
    """Train one model; its final validation loss and mean tokens/s."""
    run_dir = out / name
    began = time.perf_counter()
    run([str(ROOT / "launch" / script), "--config", str(config), f"train.run_dir={run_dir}",
         "train.overwrite=true", "train.resume=none", *overrides], out / f"{name}.log")
    records = read_metrics(run_dir / "metrics.jsonl")
    speeds = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    result = {"val_loss": records[-1]["val_loss"], "seconds": time.perf_counter() - began,
              "tokens_per_s": sum(speeds) / len(speeds), "run_dir": str(run_dir)}
    print(f"{name}: val_loss {result['val_loss']:.4f} ({result['seconds']:.0f} s)", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_teachers")
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--student-steps", type=int, default=150)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--reverse-kl", action="store_true",
                        help="also sum and mixture with reverse KL (two more students)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = dict(seq_len=64, micro_batch=4, global_batch=8)
    evals = dict(eval_interval=0, eval_batches=args.eval_batches, progress=False)
    teachers = {}
    for name, model in (("wide", {}), ("narrow", NARROW)):
        cfg = write_config(out / f"teacher_{name}.yaml", "demo_teacher.yaml", data=data,
                           model=model, train=dict(steps=args.teacher_steps, **evals))
        teachers[name] = train(out, f"teacher_{name}", "pretrain.py", cfg)
    ckpt = {name: str(Path(r["run_dir"]) / "checkpoints") for name, r in teachers.items()}

    student = write_config(
        out / "student.yaml", "demo.yaml", parallel=dict(tp=1, sp=False), data=data,
        distill=dict(teacher=None, activations=[], projection="none", lm_weight=1.0,
                     logit=dict(kind="forward_kl", temperature=1.0, weight=1.0)),
        train=dict(steps=args.student_steps, warmup_steps=10, **evals))
    both = json.dumps([{"checkpoint": ckpt[n], "name": n, "weight": 0.5} for n in ckpt])
    students = {
        "no teacher (LM only)": train(out, "student_lm", "pretrain.py", student),
        "wide teacher alone": train(out, "student_wide", "pretrain_distill.py", student,
                                    f"distill.teacher={ckpt['wide']}"),
        "narrow teacher alone": train(out, "student_narrow", "pretrain_distill.py", student,
                                      f"distill.teacher={ckpt['narrow']}"),
        "sum (0.5 / 0.5)": train(out, "student_sum", "pretrain_distill.py", student,
                                 f"distill.teachers={both}", "distill.teacher_mode=sum"),
        "mixture (0.5 / 0.5)": train(out, "student_mixture", "pretrain_distill.py", student,
                                     f"distill.teachers={both}", "distill.teacher_mode=mixture"),
    }
    # With forward KL and weights summing to 1 the two modes differ by a constant (the teachers'
    # weighted entropies minus the mixture's), so their gradients and students are the same;
    # with reverse KL they are different objectives.
    for mode in ("sum", "mixture") if args.reverse_kl else ():
        students[f"{mode} (0.5 / 0.5), reverse KL"] = train(
            out, f"student_{mode}_reverse", "pretrain_distill.py", student,
            f"distill.teachers={both}", f"distill.teacher_mode={mode}",
            "distill.logit.kind=reverse_kl")
    base = students["wide teacher alone"]["val_loss"]
    print(f"\nteachers after {args.teacher_steps} steps, students after {args.student_steps} "
          f"steps (seq 64, batch 8), validation loss on {args.eval_batches} micro-batches\n")
    print("| model | validation loss (nats/token) | vs wide teacher alone | tokens/s |")
    print("|---|---:|---:|---:|")
    for name, r in teachers.items():
        print(f"| teacher {name} | {r['val_loss']:.4f} | | {r['tokens_per_s']:.0f} |")
    for name, r in students.items():
        print(f"| student: {name} | {r['val_loss']:.4f} | {r['val_loss'] / base:.3f} | "
              f"{r['tokens_per_s']:.0f} |")
    (out / "results.json").write_text(json.dumps({"teachers": teachers, "students": students},
                                                 indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
