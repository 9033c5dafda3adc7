"""Cross-tokenizer distillation: a student with its own BPE distilled from the demo teacher's.

    python tools/bench/cross_tokenizer.py [--out runs/bench_xtok] [--teacher-steps 200]
                                          [--student-steps 100] [--corpus-bytes 2000000]

On the bundled corpus (the first `--corpus-bytes` of it), CPU, one process per run:
1. trains the demo teacher's architecture (launch/configs/demo_teacher.yaml, its 2,048-token BPE)
   with launch/pretrain.py for `--teacher-steps` steps;
2. trains a byte-level BPE of 1,024 tokens on the same text, and writes the paired data
   (tools/preprocess_data.py --teacher-tokenizer);
3. trains the demo student's architecture (launch/configs/demo.yaml at TP 1, no activation
   terms) on the student's tokens for `--student-steps` steps, from the same initialization and
   data: on cross-entropy alone, and with each cross-tokenizer loss added (weight 1, T = 1);
4. times short runs of the `likelihood` student against a same-tokenizer run of the same shapes
   (a teacher of the same architecture with the student's vocabulary, forward KL), back to back,
   twice each: the alignment's overhead (the fastest of each; a shared machine is noisy).

Validation bits per byte: the trainer's `val_loss` (nats per token over `--eval-batches`
validation micro-batches) / ln 2 x the validation split's tokens per byte (from the paired
offsets). All students share one tokenizer, so their `val_loss` already compares; bits per byte
also put the teacher (its own tokens, the same documents) on the same scale.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from engine.data import IndexedTokens, default_corpus, split_documents  # noqa: E402
from engine.data.corpus import train_byte_level_bpe  # noqa: E402
from engine.metrics import read_metrics  # noqa: E402
from engine.parallel import ParallelLayout  # noqa: E402
from tools import preprocess_data  # noqa: E402
from tools.bench.on_policy import run, write_config  # noqa: E402

STUDENT_VOCAB, SEQ = 1024, 64
SIZES = {"--teacher-steps": 200, "--student-steps": 100, "--corpus-bytes": 2_000_000,
         "--eval-batches": 16}  # the command line's numbers and their defaults
SPLIT = "95,5"
LOSSES = {  # name: the distill overrides of each student
    "cross-entropy only": None,
    "likelihood (binary_kl)": ["distill.cross_tokenizer.loss=likelihood"],
    "likelihood (both)": ["distill.cross_tokenizer.loss=likelihood",
                          "distill.cross_tokenizer.divergence=both"],
    "mapped_kl (reverse_kl)": ["distill.cross_tokenizer.loss=mapped_kl",
                               "distill.logit.kind=reverse_kl"],
    "uld (top 64)": ["distill.cross_tokenizer.loss=uld"],
}


def texts_of(corpus_dir: Path) -> list[str]:
    """The corpus's documents, in its order (from its meta.json)."""
    meta = json.loads((corpus_dir / "meta.json").read_text())
    return [(Path(meta["stdlib"]) / name).read_text(encoding="utf-8") for name in meta["files"]]


def tokens_per_byte(prefix: str, side: str) -> float:
    """Tokens per byte of the validation split's documents in one side's tokenization ("" the
    student's, ".teacher")."""
    tokens = IndexedTokens(prefix + side)
    ends = IndexedTokens(prefix + (".teacher_offsets" if side else ".offsets"))
    docs = split_documents(len(tokens), SPLIT)["valid"]
    nbytes = sum(int(ends[d][-1]) for d in docs)
    return sum(int(tokens.lengths[d]) for d in docs) / nbytes


def paired_data(out: Path, corpus_dir: Path) -> str:
    texts = texts_of(corpus_dir)
    student_tok = out / "student_tokenizer.json"
    if not student_tok.exists():
        train_byte_level_bpe(texts, STUDENT_VOCAB).save(str(student_tok))
    prefix = out / "paired" / "corpus"
    if not Path(f"{prefix}.shared_vocab.npy").exists():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        jsonl = out / "paired" / "corpus.jsonl"
        jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        assert preprocess_data.main(["--input", str(jsonl), "--tokenizer", str(student_tok),
                                     "--teacher-tokenizer", str(corpus_dir / "tokenizer.json"),
                                     "--output-prefix", str(prefix), "--no-progress",
                                     "--force"]) == 0
    return str(prefix)


def same_tokenizer_teacher(out: Path) -> Path:
    """A random teacher of the demo teacher's shapes with the student's vocabulary (timing)."""
    from distill.weights import save_weights
    from engine.config import load_yaml
    from layers.config import ModelConfig
    from layers.model import TransformerLM

    cfg = load_yaml(ROOT / "launch" / "configs" / "demo_teacher.yaml")
    cfg["model"]["vocab_size"] = STUDENT_VOCAB
    model = TransformerLM(ModelConfig(**cfg["model"]), ParallelLayout.single(), seed=3)
    return save_weights(out / "same_tokenizer_teacher", model, ParallelLayout.single(), config=cfg)


def student(out: Path, name: str, config: Path, overrides: list[str] | None) -> dict:
    run_dir = out / name.replace(" ", "_").replace("(", "").replace(")", "")
    script = "pretrain.py" if overrides is None else "pretrain_distill.py"
    run([str(ROOT / "launch" / script), "--config", str(config), f"train.run_dir={run_dir}",
         "train.overwrite=true", "train.resume=none", *(overrides or [])], out / f"{name}.log")
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if "val_loss" not in r][1:]  # the first step warms up
    step_tokens = 16 * SEQ  # demo.yaml's global batch x SEQ
    return {"val_loss": records[-1]["val_loss"],
            "step_s": sum(step_tokens / r["tokens_per_s"] for r in steps) / max(len(steps), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_xtok")
    for flag, default in SIZES.items():
        parser.add_argument(flag, type=int, default=default)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = {"cache_dir": str(out / "cache"), "corpus_max_bytes": args.corpus_bytes,
            "seq_len": SEQ, "split": SPLIT}
    corpus_prefix, _ = default_corpus(out / "cache", 2048, max_bytes=args.corpus_bytes,
                                      progress=False)
    teacher_cfg = write_config(out / "teacher.yaml", "demo_teacher.yaml", data=data,
                               train={"steps": args.teacher_steps,
                                      "eval_batches": args.eval_batches,
                                      "eval_interval": args.teacher_steps})
    teacher_dir = out / "teacher"
    if not (teacher_dir / "metrics.jsonl").exists():
        run([str(ROOT / "launch" / "pretrain.py"), "--config", str(teacher_cfg),
             f"train.run_dir={teacher_dir}", "train.overwrite=true", "train.resume=none"],
            out / "teacher.log")
    teacher_loss = read_metrics(teacher_dir / "metrics.jsonl")[-1]["val_loss"]
    prefix = paired_data(out, corpus_prefix.parent)
    student_cfg = write_config(
        out / "student.yaml", "demo.yaml", parallel={"tp": 1, "sp": False},
        model={"vocab_size": STUDENT_VOCAB},
        data={"path": prefix, "seq_len": SEQ, "split": SPLIT},
        distill={"teacher": str(teacher_dir / "checkpoints"), "activations": [],
                 "cross_tokenizer": {"teacher_seq_len": SEQ}},
        train={"steps": args.student_steps, "eval_interval": args.student_steps,
               "eval_batches": args.eval_batches, "warmup_steps": 10})
    results = {name: student(out, name, student_cfg, overrides)
               for name, overrides in LOSSES.items()}
    report(results, teacher_loss, prefix)
    timing(out, student_cfg)
    return 0


def timing(out: Path, config: Path, rounds: int = 2, steps: int = 30) -> None:
    """Step time of the likelihood student against a same-tokenizer forward-KL student of the
    same shapes, short runs back to back (`rounds` of each, interleaved; the fastest counts)."""
    runs = {"likelihood": ["distill.cross_tokenizer.loss=likelihood"],
            "same tokenizer": [f"distill.teacher={same_tokenizer_teacher(out)}"]}
    best = {}
    for i in range(rounds):
        for name, overrides in runs.items():
            step_s = student(out, f"timing {name} {i}", config, [
                *overrides, f"train.steps={steps}", "train.eval_interval=0"])["step_s"]
            best[name] = min(best.get(name, step_s), step_s)
    overhead = best["likelihood"] / best["same tokenizer"] - 1
    print(f"\nstep time: likelihood {best['likelihood']:.3f} s, same-tokenizer forward KL "
          f"{best['same tokenizer']:.3f} s: overhead {overhead:+.1%}")


def report(results: dict, teacher_loss: float, prefix: str) -> None:
    to_bits = 1 / math.log(2)
    student_tpb, teacher_tpb = (tokens_per_byte(prefix, s) for s in ("", ".teacher"))
    base = results["cross-entropy only"]["val_loss"] * to_bits * student_tpb
    print(f"\nteacher (its own 2,048-token BPE): val bpb {teacher_loss * to_bits * teacher_tpb:.4f}")
    print("| student loss | val_loss (nats/token) | val bits/byte | vs cross-entropy only |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        bpb = r["val_loss"] * to_bits * student_tpb
        print(f"| {name} | {r['val_loss']:.4f} | {bpb:.4f} | {bpb - base:+.4f} |")


if __name__ == "__main__":
    sys.exit(main())
