"""Curricula: the first steps of the training stream rearranged by a score per sample.

A curriculum covers the first `data.curriculum_steps * data.global_batch` global samples of the
training stream. It keeps exactly those samples (each is seen once, and DP ranks still get disjoint
ones: the rearrangement is of global samples, before TokenBatches splits a step over the ranks)
and only changes the order in which they come; from the step after it on, the stream is the one
without a curriculum. The order is a function of the scores (and the seed), so it is the same on
every rank and after a resume, where TokenBatches' position (consumed_samples) says how far along
it the run is.

Modes (`data.curriculum_mode`):
- `order`: highest score first (equal scores by sample index);
- `weight`: a seeded random order that draws confident samples earlier in proportion to their
  score: each sample in turn with probability score / (sum of the scores not yet drawn), without
  replacement (Efraimidis-Spirakis keys u ** (1 / score), highest first).

The scores come from `tools/curriculum_scores.py` (data.curriculum: teacher_confidence: the
teacher's mean max-probability per sample), stored as `DIR/scores.npy` [samples] float64 with
`DIR/metadata.json` saying which run settings they are valid for.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.config import ConfigError

SCORES, METADATA = "scores.npy", "metadata.json"
FORMAT = "megadistill-curriculum-scores"
KEY = "data.curriculum_scores"


def curriculum_order(scores: np.ndarray, *, mode: str, seed: int) -> np.ndarray:
    """A permutation of range(len(scores)): position i of the curriculum holds sample order[i]."""
    scores = np.asarray(scores, dtype=np.float64)
    if mode == "order":
        return np.argsort(-scores, kind="stable")
    if mode == "weight":
        u = np.random.default_rng([seed, 0x5EED]).random(len(scores))
        # log(u ** (1 / w)) = log(u) / w: the same order, without underflow for small w
        keys = np.log(u) / np.maximum(scores, np.finfo(np.float64).tiny)
        return np.argsort(-keys, kind="stable")
    raise ValueError(f"curriculum mode must be order or weight (got {mode!r})")


def write_scores(directory: Path, scores: np.ndarray, metadata: dict) -> None:
    """scores.npy and metadata.json (`metadata` plus format and sample count), written aside and
    renamed into place so that a cut write leaves no valid-looking directory."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (SCORES + ".partial")
    with tmp.open("wb") as f:
        np.save(f, np.asarray(scores, dtype=np.float64), allow_pickle=False)
    tmp.replace(directory / SCORES)
    meta = {"format": FORMAT, "samples": int(len(scores)), **metadata}
    (directory / (METADATA + ".partial")).write_text(json.dumps(meta, indent=1, sort_keys=True))
    (directory / (METADATA + ".partial")).replace(directory / METADATA)


def read_scores(directory: str | Path, *, wanted: dict, samples: int) -> np.ndarray:
    """The first `samples` scores of a directory made for a run whose settings are `wanted`
    (every key of `wanted` must match the metadata); ConfigError naming data.curriculum_scores."""
    directory = Path(directory).expanduser()
    try:
        meta = json.loads((directory / METADATA).read_text())
        scores = np.load(directory / SCORES, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ConfigError(KEY, f"no curriculum scores at {directory} ({err}): make them with "
                               "tools/curriculum_scores.py") from None
    if meta.get("format") != FORMAT or scores.ndim != 1 or len(scores) != meta.get("samples"):
        raise ConfigError(KEY, f"{directory} does not hold curriculum scores of this format")
    for key, value in wanted.items():
        if meta.get(key) != value:
            raise ConfigError(KEY, f"{directory} was made with {key}={meta.get(key)!r}, this run "
                                   f"has {value!r}: make the scores again for this run")
    if len(scores) < samples:
        raise ConfigError(KEY, f"{directory} scores {len(scores)} samples, the curriculum covers "
                               f"{samples} (data.curriculum_steps * data.global_batch)")
    if not np.isfinite(scores[:samples]).all() or (scores[:samples] < 0).any():
        raise ConfigError(KEY, f"{directory} holds scores that are negative or not finite")
    return scores[:samples]
