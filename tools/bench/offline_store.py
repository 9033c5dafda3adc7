"""The offline teacher store: bytes per token, KD-loss change, read and export throughput.

    python tools/bench/offline_store.py [--out runs/bench_offline_store] [--teacher-steps 100]
                                        [--corpus-bytes 300000] [--value-bits 6]

On the bundled corpus (capped at --corpus-bytes of text), CPU, one process and one thread, in
one run of this script:
1. trains the demo teacher's architecture (launch/configs/demo_teacher.yaml: vocabulary 2048,
   4 layers, hidden 192, seq_len 128) for --teacher-steps steps with launch/pretrain.py;
2. sizes: the trained teacher's logits on 2048 tokens of the train split, and Gaussian logits
   (std 3) at the Qwen2 vocabulary 151936 on 256 tokens, encoded at k = 16 / 64 / 256: bytes per
   token (every array of a shard, the per-sample checksum and bit offsets included) against the
   uncompressed top-k (int64 ids + float32 values: 12 k bytes) and the 300 bytes/token reference;
   and the change of the mean forward-KL term (T = 1) against the uncompressed top-k, for a
   student of the demo student's architecture (random initialization; Gaussian logits at 151936:
   the teacher's plus noise of std 1.5);
3. exports the whole train split at k = 64 with tools/export_teacher_logits.py's code in this
   process: tokens/s of the export against the teacher's forward alone (the top-k, log-probs,
   encoding and writing are the difference);
4. reads the store as a training rank does (micro-batches of 8 random samples): tokens/s against
   what the demo student's training step consumes, measured by training it from the store at
   TP 1 (LM + forward KL, no activation terms) for 8 steps.
Targets: <= 100 bytes/token at k = 64 with the KD change <= 1e-3 nats/token; reading >= 10x the
student's consumption; writing <= 5% of the export.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from distill import topk_divergence  # noqa: E402
from distill.offline import TeacherStore, teacher_topk, topk_logprobs  # noqa: E402
from distill.offline_codec import Codec  # noqa: E402
from distill.runconfig import load_run_config  # noqa: E402
from distill.teacher_load import load_teacher  # noqa: E402
from engine.checkpoint import open_checkpoint  # noqa: E402
from engine.data import TokenBatches  # noqa: E402
from engine.metrics import read_metrics  # noqa: E402
from engine.parallel import ParallelLayout  # noqa: E402
from layers.model import TransformerLM  # noqa: E402
from tools import export_teacher_logits  # noqa: E402
from tools.bench.on_policy import train, write_config  # noqa: E402

REFERENCE = 300.0  # bytes/token of the most compact known store (issue 32)


def shard_bytes(codec: Codec, logits: torch.Tensor, *, seq: int) -> tuple[float, np.ndarray,
                                                                          np.ndarray, dict]:
    """(bytes/token of the shard, exact log-probs, leftover, arrays) of logits [tokens, V]."""
    values, indices, lse = teacher_topk(logits, k=codec.k, vocab_size=codec.vocab_size,
                                        temperature=1.0)
    logp, leftover = topk_logprobs(values, lse, temperature=1.0, vocab_size=codec.vocab_size)
    samples = logits.shape[0] // seq
    arrays = codec.encode(indices.numpy().reshape(samples, seq, -1),
                          logp.reshape(samples, seq, -1), leftover.reshape(samples, seq))
    size = sum(a.nbytes for a in arrays.values()) + 8 * samples  # + the checksums
    return size / logits.shape[0], indices.numpy(), logp, arrays


def kd_change(codec: Codec, teacher: torch.Tensor, student: torch.Tensor, *, seq: int) -> float:
    """|mean forward KL from the decoded store - from the uncompressed top-k|, nats/token."""
    _, ids, logp, arrays = shard_bytes(codec, teacher, seq=seq)
    decoded_ids, decoded = (np.concatenate(x) for x in zip(*(
        codec.decode(arrays.__getitem__, j) for j in range(len(arrays["leftover"])))))
    order = np.argsort(ids, -1)
    exact = np.take_along_axis(logp, order, -1)
    kd = [topk_divergence(student, torch.from_numpy(v.astype(np.float64)),
                          torch.from_numpy(decoded_ids), torch.zeros(len(v), dtype=torch.float64),
                          vocab_size=codec.vocab_size).mean().item() for v in (exact, decoded)]
    return abs(kd[1] - kd[0])


def size_table(teacher_dir: Path, config: Path, bits: int) -> list[str]:
    """The rows of the bytes/token and KD-change table."""
    cfg = load_run_config(config, [], world_size=1).cfg
    layout = ParallelLayout.single()
    torch.manual_seed(0)
    checkpoint = open_checkpoint(teacher_dir, key="teacher")
    teacher = load_teacher(checkpoint.path, cfg.model, cfg.model, layout, seed=0, bf16=False)
    student = TransformerLM(_student_model(cfg.model), layout, seed=1)
    data = TokenBatches(cfg.data, seed=0)
    input_ids = torch.cat([mb["input_ids"] for mb in data.next_step()])  # [16, 128]
    with torch.no_grad():
        logits = [m(input_ids).logits.reshape(-1, 2048).double() for m in (teacher, student)]
    g = torch.Generator().manual_seed(0)
    big = torch.randn(256, 151936, generator=g) * 3
    big_student = big + torch.randn(256, 151936, generator=g) * 1.5
    rows = ["| logits | V | k | value bits | bytes/token | uncompressed (12 k) | x smaller | "
            "vs 300 B/token | KD change (nats/token) |", "|---|---|---|---|---|---|---|---|---|"]
    settings = [(16, bits), (64, bits - 1), (64, bits), (64, bits + 2), (256, bits)]
    for name, vocab, (t, s), seq in (("demo teacher (trained)", 2048, logits, 128),
                                     ("Gaussian, std 3", 151936, (big, big_student), 128)):
        for k, value_bits in settings:
            codec = Codec(vocab, k, value_bits)
            size = shard_bytes(codec, t, seq=seq)[0]
            change = kd_change(codec, t.double(), s.double(), seq=seq)
            rows.append(f"| {name} | {vocab} | {k} | {value_bits} | {size:.1f} | {12 * k} | "
                        f"{12 * k / size:.1f}x | {size / REFERENCE:.2f}x | {change:.1e} |")
    return rows


def _student_model(teacher_model):
    """The demo student's architecture (launch/configs/demo.yaml) at the teacher's vocabulary."""
    return dataclasses.replace(teacher_model, hidden=96, layers=2, heads=4, kv_heads=2,
                               ffn_hidden=256)


def export_and_read(out: Path, teacher_dir: Path, config: Path, bits: int) -> tuple[list[str], Path]:
    store = out / "store"
    args = export_teacher_logits.parse_args([
        "--config", str(config), "--top-k", "64", "--out", str(store), "--value-bits", str(bits),
        "--no-progress", f"distill.teacher={teacher_dir}", "distill.logit.weight=1"])
    plan = export_teacher_logits.load_plan(args, world_size=1)
    stats = export_teacher_logits.export(plan, ParallelLayout.single(), progress=False)
    rows = ["| export (k = 64) | tokens | seconds | tokens/s | ratio |", "|---|---|---|---|---|"]
    for name, seconds in (("teacher forward alone", stats.forward_s),
                          ("forward + top-k (any top-k store)", stats.forward_s + stats.topk_s),
                          ("whole export (encoding, writing in a thread)", stats.seconds)):
        rows.append(f"| {name} | {stats.tokens} | {seconds:.1f} | {stats.tokens / seconds:.0f} | "
                    f"{stats.forward_s / seconds:.2f}x |")
    extra = stats.seconds - stats.forward_s - stats.topk_s
    rows.append(f"| writing's cost: export - forward - top-k | | {extra:.2f} | | "
                f"{100 * extra / stats.seconds:.1f}% of the export |")
    return rows, store


def read_rate(store_dir: Path, *, micro_batch: int = 8, batches: int = 200) -> float:
    """Tokens/s of `TeacherStore.rows` over micro-batches of random samples (cold shards)."""
    store = TeacherStore(store_dir)
    samples = store.covered("train")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, samples, (batches, micro_batch))
    started = time.perf_counter()
    for batch in ids:
        store.rows("train", batch)
    return batches * micro_batch * store.meta["seq_len"] / (time.perf_counter() - started)


def student_rate(out: Path, store: Path, config: Path, teacher_dir: Path) -> float:
    """Tokens/s of the demo student trained from the store (TP 1, 8 steps, after the first)."""
    run_dir = train(out, "student", "pretrain_distill.py", config, "distill.schedule=offline",
                    f"distill.offline_dir={store}", f"distill.teacher={teacher_dir}",
                    "distill.logit.weight=1", "distill.lm_weight=1", "train.steps=8",
                    "train.eval_interval=0")
    speeds = [r["tokens_per_s"] for r in read_metrics(run_dir / "metrics.jsonl")[1:]
              if r.get("tokens_per_s")]
    return sum(speeds) / len(speeds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_offline_store")
    parser.add_argument("--teacher-steps", type=int, default=100)
    parser.add_argument("--corpus-bytes", type=int, default=300000)
    parser.add_argument("--value-bits", type=int, default=6)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    data = {"corpus_max_bytes": args.corpus_bytes}
    teacher_cfg = write_config(args.out / "teacher.yaml", "demo_teacher.yaml", data=data)
    teacher_dir = train(args.out, "teacher", "pretrain.py", teacher_cfg,
                        f"train.steps={args.teacher_steps}", "train.eval_interval=0")
    student_cfg = write_config(args.out / "student.yaml", "demo.yaml", data=data,
                               parallel={"tp": 1, "sp": False},
                               distill={"activations": [], "teacher": str(teacher_dir)})
    print("\n".join(size_table(teacher_dir, teacher_cfg, args.value_bits)), flush=True)
    rows, store = export_and_read(args.out, teacher_dir, student_cfg, args.value_bits)
    print("\n" + "\n".join(rows), flush=True)
    read = read_rate(store)
    consumed = student_rate(args.out, store, student_cfg, teacher_dir)
    print("\n| reading (one rank) | tokens/s | ratio |\n|---|---|---|\n"
          f"| demo student training step (consumes) | {consumed:.0f} | 1.00x |\n"
          f"| store reads, micro-batches of 8 random samples | {read:.0f} | "
          f"{read / consumed:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
