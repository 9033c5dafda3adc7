"""Off-policy, sequence-level and on-policy distillation at equal student steps; generation speed.

    python tools/bench/on_policy.py [--out runs/bench_on_policy] [--teacher-steps 600]
                                    [--student-steps 300] [--eval-prompts 64]

On the bundled corpus, CPU, one thread per process:
1. trains the demo teacher's architecture (launch/configs/demo_teacher.yaml, seq_len 64,
   `--teacher-steps` steps) with launch/pretrain.py;
2. measures the teacher's generation speed with tools/generate.py (greedy, 16 prompts of 32 tokens,
   64 new tokens) at TP=1 (python) and TP=2 (torchrun, 2 processes);
3. trains the demo student's architecture (launch/configs/demo.yaml, no activation terms) from the
   same initialization for `--student-steps` steps, four ways:
   - off-policy: `distill.logit.kind=reverse_kl` on corpus windows (pure KD, lm_weight 0);
   - sequence-level: tools/generate.py --data writes one teacher continuation (32 prompt + 32
     sampled tokens) per training sample, and the student trains on that dataset with plain LM
     loss (launch/pretrain.py, data.path=the new dataset);
   - on-policy: as off-policy plus `distill.on_policy.fraction` 0.5 and 1.0 (32 prompt tokens, 32
     student tokens at temperature 1): the reverse KL on the student's own samples, for half or
     all of the micro-batches (an on-policy row is distilled on its 32 generated positions, an
     off-policy row on all 64);
   - off-policy, then on-policy: off-policy for half the steps, then on-policy at fraction 1.0 for
     the other half from those weights (`train.init`: weights only, so AdamW and the learning-rate
     schedule start afresh), the usual recipe of on-policy methods (start from a student whose
     samples are already plausible);
4. evaluates each student (and the untrained initialization) on held-out prompts (32 tokens from
   the validation split): the student samples 32 tokens at temperature 1, both models score
   prompt + sample, and the table reports the mean per-token reverse KL(student || teacher) on the
   sampled positions (lower is better), and the validation LM loss on the corpus.

Ratios are against the off-policy student of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from distill import divergence  # noqa: E402
from distill.evaluate import validation_loss  # noqa: E402
from distill.runconfig import parse_run_config  # noqa: E402
from engine.config import load_yaml  # noqa: E402
from engine.data import DataConfig, TokenBatches  # noqa: E402
from engine.parallel import ParallelLayout  # noqa: E402
from layers.decode import Sampling, generate  # noqa: E402
from layers.model import TransformerLM  # noqa: E402
from tools.score import checkpoint_model_config, load_model  # noqa: E402

CONFIGS = ROOT / "launch" / "configs"
SEQ, PROMPT, NEW = 64, 32, 32
SEED = 1234


def run(cmd: list[str], log_file: Path, nproc: int = 1) -> str:
    """Run a command (under torchrun when nproc > 1); its combined output, or exit on failure."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *cmd]
    else:
        cmd = [sys.executable, *cmd]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    log_file.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout + done.stderr


def write_config(path: Path, base: str, **sections) -> Path:
    cfg = load_yaml(CONFIGS / base)
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(out: Path, name: str, script: str, config: Path, *overrides: str) -> Path:
    run_dir = out / name
    began = time.perf_counter()
    run([str(ROOT / "launch" / script), "--config", str(config), f"train.run_dir={run_dir}",
         "train.overwrite=true", "train.resume=none", *overrides], out / f"{name}.log")
    print(f"{name}: trained in {time.perf_counter() - began:.0f} s", flush=True)
    return run_dir


def generation_speed(out: Path, teacher: Path) -> dict[int, float]:
    """Generated tokens/s of tools/generate.py (greedy) at TP 1 and 2."""
    prompts = out / "speed_prompts.npy"
    np.save(prompts, np.random.default_rng(0).integers(1, 2048, (16, PROMPT)))
    speed = {}
    for tp in (1, 2):
        text = run([str(ROOT / "tools" / "generate.py"), "--ckpt", str(teacher), "--tokens",
                    str(prompts), "--out", str(out / f"speed_tp{tp}.npy"), "--force", "--greedy",
                    "--max-new-tokens", "64", "--micro-batch", "16"], out / f"speed_tp{tp}.log",
                   nproc=tp)
        speed[tp] = float(re.search(r"([\d.]+) tokens/s", text).group(1))
    return speed


def held_out_prompts(count: int) -> torch.Tensor:
    cfg = DataConfig(path="default", vocab_size=2048, seq_len=PROMPT, micro_batch=count,
                     global_batch=count)
    return TokenBatches(cfg, seed=SEED, split="valid").next_step()[0]["input_ids"]


@torch.no_grad()
def reverse_kl_on_own_samples(student: TransformerLM, teacher: TransformerLM,
                              prompts: torch.Tensor) -> float:
    """Mean per-token KL(student || teacher) on the positions the student sampled."""
    g = torch.Generator().manual_seed(SEED)
    sample = generate(student, prompts, max_new_tokens=NEW, sampling=Sampling(temperature=1.0),
                      generator=g).tokens
    ids = torch.cat([prompts, sample], dim=1)
    positions = slice(PROMPT - 1, PROMPT + NEW - 1)  # their next tokens are the sampled ones
    kl = divergence(student(ids).logits[:, positions], teacher(ids).logits[:, positions],
                    kind="reverse_kl", vocab_size=student.config.vocab_size)
    return float(kl.mean())


def evaluate(run_dir: Path | None, teacher: TransformerLM, prompts: torch.Tensor,
             student_yaml: Path) -> tuple[float, float]:
    """(reverse KL on own samples, validation LM loss) of a run's final student (None: init)."""
    if run_dir is None:
        cfg = load_yaml(student_yaml)
        model = TransformerLM(parse_run_config(cfg).model, ParallelLayout.single(), seed=SEED).eval()
    else:
        step_dir, _, model_cfg = checkpoint_model_config(run_dir / "checkpoints", key="checkpoint")
        model = load_model(step_dir, model_cfg, ParallelLayout.single())
    data = DataConfig(path="default", vocab_size=2048, seq_len=SEQ, micro_batch=8, global_batch=8)
    loss, _ = validation_loss(model, data, micro_batches=16, seed=SEED)
    return reverse_kl_on_own_samples(model, teacher, prompts), loss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_on_policy")
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--student-steps", type=int, default=300)
    parser.add_argument("--eval-prompts", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = dict(seq_len=SEQ, micro_batch=4, global_batch=8)
    teacher_yaml = write_config(out / "teacher.yaml", "demo_teacher.yaml", data=data,
                                train=dict(steps=args.teacher_steps, eval_interval=0, progress=False))
    teacher_run = train(out, "teacher", "pretrain.py", teacher_yaml)
    teacher_ckpt = teacher_run / "checkpoints"
    speed = generation_speed(out, teacher_ckpt)

    student_yaml = write_config(
        out / "student.yaml", "demo.yaml", parallel=dict(tp=1, sp=False), data=data,
        distill=dict(teacher=str(teacher_ckpt), activations=[], projection="none", lm_weight=0.0,
                     logit=dict(kind="reverse_kl", temperature=1.0, weight=1.0)),
        train=dict(steps=args.student_steps, eval_interval=0, warmup_steps=10, progress=False))
    runs = {"off-policy": train(out, "off_policy", "pretrain_distill.py", student_yaml)}
    seqkd = out / "seqkd" / "data"
    began = time.perf_counter()
    run([str(ROOT / "tools" / "generate.py"), "--ckpt", str(teacher_ckpt), "--data", "default",
         "--out", str(seqkd), "--force", "--num-prompts", str(args.student_steps * 8),
         "--prompt-len", str(PROMPT), "--max-new-tokens", str(NEW), "--temperature", "1.0",
         "--micro-batch", "32", "--seed", str(SEED)], out / "seqkd.log")
    print(f"sequence-level dataset generated in {time.perf_counter() - began:.0f} s", flush=True)
    runs["sequence-level"] = train(out, "seq_level", "pretrain.py", student_yaml,
                                   f"data.path={seqkd}", "distill.lm_weight=1.0")
    on_policy = (f"distill.on_policy.max_new_tokens={NEW}",)
    for fraction in (0.5, 1.0):
        runs[f"on-policy {fraction:g}"] = train(
            out, f"on_policy_{fraction:g}", "pretrain_distill.py", student_yaml,
            f"distill.on_policy.fraction={fraction}", *on_policy)
    half = args.student_steps // 2
    warm = train(out, "off_policy_half", "pretrain_distill.py", student_yaml, f"train.steps={half}")
    runs["off-policy, then on-policy 1"] = train(
        out, "off_then_on_policy", "pretrain_distill.py", student_yaml,
        f"train.steps={args.student_steps - half}", f"train.init={warm / 'checkpoints'}",
        "distill.on_policy.fraction=1.0", *on_policy)

    step_dir, _, teacher_cfg = checkpoint_model_config(teacher_ckpt, key="teacher")
    teacher = load_model(step_dir, teacher_cfg, ParallelLayout.single())
    prompts = held_out_prompts(args.eval_prompts)
    results = {"student init": evaluate(None, teacher, prompts, student_yaml)}
    results.update({name: evaluate(path, teacher, prompts, student_yaml) for name, path in runs.items()})
    base_kl = results["off-policy"][0]
    print(f"\nstudents after {args.student_steps} steps (teacher {args.teacher_steps} steps), "
          f"{len(prompts)} held-out prompts of {PROMPT} tokens, {NEW} sampled tokens each\n")
    print("| student | reverse KL on own samples (nats/token) | vs off-policy | validation loss |")
    print("|---|---:|---:|---:|")
    for name, (kl, loss) in results.items():
        print(f"| {name} | {kl:.4f} | {kl / base_kl:.2f} | {loss:.4f} |")
    print("\n| demo teacher generation | tokens/s | vs TP=1 |\n|---|---:|---:|")
    for tp, value in speed.items():
        print(f"| TP={tp} | {value:.1f} | {value / speed[1]:.2f} |")
    (out / "results.json").write_text(json.dumps({"students": results, "tokens_per_s": speed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
