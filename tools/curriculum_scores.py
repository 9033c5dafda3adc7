"""Score a run's first training samples by teacher confidence, for a curriculum.

    python tools/curriculum_scores.py --config FILE --out DIR [--store STORE] [section.key=value ...]

The pre-pass of `data.curriculum: teacher_confidence`: runs the teacher `distill.teacher` over the
first `data.curriculum_steps * data.global_batch` samples of the run's training stream, in global
order (the stream without a curriculum, as `train.seed` and `data.*` give it), and writes for each
sample the teacher's mean max-probability: the mean over the sample's positions with a label of
max_v softmax(teacher logits)_v, at temperature 1. One process at TP 1 (a teacher checkpoint of
any TP degree loads); it reads a teacher forward's worth of samples at a time (`data.micro_batch`).
Output: DIR/scores.npy and DIR/metadata.json (engine/data/curriculum.py), valid for the data,
`data.seq_len`, `train.seed` and `model.vocab_size` it was made with; train with
`data.curriculum=teacher_confidence data.curriculum_scores=DIR`. With `--store STORE` (an offline
teacher store of the run's data, tools/export_teacher_logits.py) no teacher runs: the top-1
probability of each position is read from the store, at the store's temperature (at
temperature 1, the teacher's own up to the store's quantization), which is how a curriculum and
`distill.schedule: offline` go together. The config may be the run's own
before it names `data.curriculum_scores`: the tool ignores `data.curriculum` and that key. A bad
config is one `ConfigError:` line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from distill.offline import TeacherStore, check_offline_dir  # noqa: E402
from distill.runconfig import (  # noqa: E402
    RunConfig,
    check_data,
    curriculum_key,
    parse_run_config,
    run_store_key,
    teacher_config,
)
from distill.teacher_load import load_teacher  # noqa: E402
from engine.checkpoint import open_checkpoint  # noqa: E402
from engine.config import ConfigError, apply_overrides, check, load_yaml  # noqa: E402
from engine.data import IGNORE_INDEX, TokenBatches  # noqa: E402
from engine.data.curriculum import write_scores  # noqa: E402
from engine.entry import ensure_new_output, start_up  # noqa: E402
from engine.log import get_logger, setup_logging  # noqa: E402
from engine.parallel import ParallelLayout  # noqa: E402

log = get_logger("curriculum_scores")


def load_config(args: argparse.Namespace) -> RunConfig:
    """The run config, checked for what the pre-pass needs; raises `ConfigError`."""
    cfg = parse_run_config(plain_stream(apply_overrides(load_yaml(args.config), args.overrides)))
    check(cfg.data.curriculum_steps >= 1, "data.curriculum_steps",
          f"must be >= 1: the steps whose samples are scored (got {cfg.data.curriculum_steps})")
    check(bool(cfg.distill.teacher) or bool(args.store), "distill.teacher",
          "the confidence is one teacher's: give its checkpoint as distill.teacher (or --store)")
    ensure_new_output(Path(args.out).expanduser(), force=None)
    check_data(cfg)
    return cfg


def plain_stream(raw: dict) -> dict:
    """The run's config without its curriculum: the tool scores the stream the curriculum will
    rearrange, and writes the `data.curriculum_scores` the run's config may not name yet."""
    data = {k: v for k, v in (raw.get("data") or {}).items() if k != "curriculum_scores"}
    return {**raw, "data": {**data, "curriculum": "none"}}


def confidence(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per sample [mb]: mean over positions with a label of the largest probability."""
    return labeled_mean(torch.softmax(logits[..., :vocab_size].double(), -1).amax(-1), labels)


def labeled_mean(top: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample [mb]: the mean of top [mb, seq] over positions with a label (all without)."""
    mask = (labels != IGNORE_INDEX).double()
    mask = torch.where(mask.sum(-1, keepdim=True) > 0, mask, torch.ones_like(mask))
    return (top * mask).sum(-1) / mask.sum(-1)


@torch.no_grad()
def scores(cfg: RunConfig) -> np.ndarray:
    """The scores of the first curriculum_steps * global_batch samples, in global order."""
    layout = ParallelLayout.single()
    checkpoint = open_checkpoint(cfg.distill.teacher, key="distill.teacher")
    model = load_teacher(checkpoint.path, teacher_config(cfg, checkpoint), cfg.model, layout,
                         seed=cfg.train.seed, bf16=cfg.distill.teacher_bf16)
    # the plain stream (no `order`): the samples the curriculum will rearrange
    data = TokenBatches(cfg.data, seed=cfg.train.seed, vocab_size=cfg.model.vocab_size)
    out = []
    for _ in range(cfg.data.curriculum_steps):
        for mb in data.next_step():
            logits = model(mb["input_ids"]).logits
            out.append(confidence(logits, mb["labels"], cfg.model.vocab_size))
    return torch.cat(out).numpy()


def store_scores(cfg: RunConfig, directory: str) -> np.ndarray:
    """The same scores from an offline teacher store's top-1 log-probabilities."""
    data = TokenBatches(cfg.data, seed=cfg.train.seed, vocab_size=cfg.model.vocab_size)
    count = cfg.data.curriculum_steps * cfg.data.global_batch
    try:
        check_offline_dir(directory, wanted=run_store_key(cfg), teacher=cfg.distill.teacher,
                          needed=lambda: data.stream_sample_ids(count))
    except ConfigError as err:
        raise ConfigError("--store", err.message) from None
    store = TeacherStore(directory, key="--store")
    out = []
    for _ in range(cfg.data.curriculum_steps):
        micro_batches = data.next_step()  # DP = 1: the step's samples in order
        ids = np.split(data.step_sample_ids, len(micro_batches))
        for mb, samples in zip(micro_batches, ids):
            top = store.rows("train", samples)["logp"].double().amax(-1).exp()  # [mb, seq]
            out.append(labeled_mean(top, mb["labels"]))
    return torch.cat(out).numpy()


def _scored(args: argparse.Namespace) -> tuple[RunConfig, np.ndarray]:
    cfg = load_config(args)
    return cfg, store_scores(cfg, args.store) if args.store else scores(cfg)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run's YAML configuration")
    parser.add_argument("--out", required=True, help="scores directory (must not exist)")
    parser.add_argument("--store", help="read the confidence from this offline teacher store")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    started = start_up(lambda _launch: _scored(args))
    if isinstance(started, int):
        return started
    _, (cfg, values) = started
    write_scores(Path(args.out).expanduser(), values, curriculum_key(cfg))
    log.info("scored %d samples (mean confidence %.4f) into %s", len(values), values.mean(),
             args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
