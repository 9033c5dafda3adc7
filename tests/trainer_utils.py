"""Tiny end-to-end runs of the real entry point (`distill.run.main`) for trainer tests."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from engine.parallel import ParallelLayout

VOCAB = 320  # the bundled corpus's BPE size for tests (>= 257)


def base_config(tmp: Path, *, cache: Path) -> dict:
    """A run config small enough for a few CPU steps per second."""
    return {
        "model": {"family": "llama", "vocab_size": VOCAB, "hidden": 32, "layers": 2, "heads": 4,
                  "kv_heads": 2, "ffn_hidden": 64, "max_seq_len": 32},
        "parallel": {"tp": 1, "timeout_s": 60},
        "data": {"path": "default", "vocab_size": VOCAB, "cache_dir": str(cache),
                 "corpus_max_bytes": 150000, "seq_len": 16, "micro_batch": 2, "global_batch": 4,
                 "split": "90,10"},
        "train": {"steps": 3, "lr": 1e-2, "warmup_steps": 0, "decay": "constant",
                  "run_dir": str(tmp / "run"), "eval_batches": 2, "progress": False,
                  "seed": 7},
    }


def teacher_config(cfg: dict) -> dict:
    teacher = json.loads(json.dumps(cfg))
    # A peaked (large-init) teacher, so that its distribution is far from the student's at first.
    teacher["model"].update(hidden=48, layers=3, heads=4, kv_heads=2, ffn_hidden=96, init_std=0.3)
    return teacher


def dropout_tp2_sp_distill_config(tmp: Path, *, activations: list, **train) -> dict:
    """A TP=2 + SP student with dropout on, a colocated teacher and activation pairs through one
    shared projection: the run the exactness tests (resume, recompute) compare bit for bit."""
    cfg = base_config(tmp, cache=tmp / "cache")
    cfg["model"]["dropout"] = 0.1
    cfg["parallel"].update(tp=2, sp=True)
    cfg["train"].update(train)
    cfg["distill"] = {"teacher": str(make_teacher(tmp / "teacher", teacher_config(cfg))),
                      "activations": activations, "projection": "shared"}
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def make_teacher(root: Path, cfg: dict) -> Path:
    """Save a randomly initialized teacher checkpoint (one process, TP=1; `model.moe` a dict for
    an MoE teacher)."""
    from distill.weights import save_weights
    from engine.config import from_dict
    from layers.config import ModelConfig
    from layers.model import TransformerLM

    model_cfg = from_dict(ModelConfig, cfg["model"], prefix="model")
    model = TransformerLM(model_cfg, ParallelLayout.single(), seed=11)
    return save_weights(root, model, ParallelLayout.single(), config=cfg)


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def run_in(config_path: Path, run_dir: Path, overrides: list[str]) -> int:
    """`run_main` with `train.run_dir=run_dir` (module-level: `run_ranks` can spawn it)."""
    return run_main(str(config_path), [f"train.run_dir={run_dir}", *overrides])


def run_main(config_path: str, overrides: list[str], distill: bool = True) -> int:
    """Call the entry point in this process (inside `run_ranks`, the process group exists)."""
    from distill.run import main

    return main(["--config", config_path, *overrides], distill=distill)
