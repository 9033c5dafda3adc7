"""The `data:` config section, and where its datasets are on disk."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from engine.config import ConfigError, check
from engine.data.corpus import default_corpus

DEFAULT_PATH = "default"  # data.path naming the bundled stdlib corpus
SPLITS = ("train", "valid")


@dataclass(frozen=True)
class DataConfig:
    # "default" (the bundled stdlib corpus), an indexed-dataset prefix (PREFIX.bin/.idx), or a
    # list of [weight, prefix] pairs to blend (weights are relative, > 0)
    path: str | tuple[Any, ...] = DEFAULT_PATH
    seq_len: int = 256  # tokens per sample (inputs and labels each)
    micro_batch: int = 4  # samples per micro-batch on one data-parallel rank
    global_batch: int = 8  # samples per optimizer step over all data-parallel ranks
    # relative sizes "train,valid" of the split, by documents of each dataset (first part train)
    split: str = "98,2"
    mask_across_documents: bool = False  # labels that cross into the next document become -100
    # attention stays inside each packed document (the micro-batch carries document ids per token)
    attention_within_documents: bool = False
    positions_per_document: bool = False  # positions restart at each document's first token
    vocab_size: int = 2048  # vocabulary of the BPE trained for the default corpus
    cache_dir: str = "~/.cache/megadistill"  # where the default corpus is built and kept
    corpus_max_bytes: int | None = None  # cap on the default corpus's text (None: whole stdlib)
    # none, or teacher_confidence: the first curriculum_steps steps take their samples in the
    # order of the teacher's confidence (scores from tools/curriculum_scores.py)
    curriculum: Literal["none", "teacher_confidence"] = "none"
    curriculum_steps: int = 0  # steps whose samples the curriculum orders (then the usual stream)
    # order: most confident first | weight: seeded random order, confident samples drawn earlier
    curriculum_mode: Literal["order", "weight"] = "order"
    curriculum_scores: str | None = None  # directory written by tools/curriculum_scores.py

    def __post_init__(self):
        check(not self.positions_per_document or self.attention_within_documents,
              "data.positions_per_document", "needs data.attention_within_documents")
        if not isinstance(self.path, str):
            object.__setattr__(self, "path", _blend_pairs(self.path))
        check(self.path != "", "data.path", "must not be empty")
        for key in ("seq_len", "micro_batch", "global_batch"):
            value = getattr(self, key)
            check(value >= 1, f"data.{key}", f"must be >= 1 (got {value})")
        check(self.global_batch % self.micro_batch == 0, "data.global_batch",
              f"must be a multiple of data.micro_batch={self.micro_batch} (got {self.global_batch})")
        split_fractions(self.split)
        check(257 <= self.vocab_size <= 1 << 20, "data.vocab_size",
              f"must be in 257..{1 << 20} (256 bytes + end of document; got {self.vocab_size})")
        check(self.corpus_max_bytes is None or self.corpus_max_bytes > 0, "data.corpus_max_bytes",
              f"must be > 0 or null (got {self.corpus_max_bytes})")
        check(self.curriculum_steps >= 0, "data.curriculum_steps",
              f"must be >= 0 (got {self.curriculum_steps})")
        if self.curriculum != "none":
            check(self.curriculum_steps >= 1, "data.curriculum_steps",
                  f"must be >= 1 with data.curriculum {self.curriculum}")
            check(bool(self.curriculum_scores), "data.curriculum_scores",
                  f"is required with data.curriculum {self.curriculum} (make it with "
                  "tools/curriculum_scores.py)")

    def micro_batches(self, dp: int) -> int:
        """Micro-batches of one optimizer step on each of `dp` data-parallel ranks."""
        return self.global_batch // (self.micro_batch * dp)

    @property
    def curriculum_samples(self) -> int:
        """Global samples the curriculum rearranges (0 without one)."""
        return 0 if self.curriculum == "none" else self.curriculum_steps * self.global_batch

    @property
    def has_validation(self) -> bool:
        """False when data.split gives validation no share ("100,0"): the run skips validation."""
        return split_fractions(self.split)["valid"] > 0


def _blend_pairs(items: Any) -> tuple[tuple[float, str], ...]:
    check(len(items) > 0, "data.path", "a blend needs at least one [weight, prefix] pair")
    pairs = []
    for i, item in enumerate(items):
        key = f"data.path[{i}]"
        check(isinstance(item, (list, tuple)) and len(item) == 2, key,
              f"must be a [weight, prefix] pair (got {item!r})")
        weight, prefix = item
        check(isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0,
              key, f"weight must be a number > 0 (got {weight!r})")
        check(isinstance(prefix, str) and prefix != "", key,
              f"prefix must be a non-empty string (got {prefix!r})")
        pairs.append((float(weight), prefix))
    return tuple(pairs)


def split_fractions(split: str) -> dict[str, float]:
    """"98,2" -> {"train": 0.98, "valid": 0.02}; any non-negative weights with a positive train."""
    parts = split.split(",")
    try:
        weights = [float(part) for part in parts]
    except ValueError:
        weights = []
    check(len(weights) == len(SPLITS) and all(0 <= w < math.inf for w in weights)
          and weights[0] > 0,
          "data.split", f"must be two non-negative weights 'train,valid' with train > 0 "
          f"(got {split!r})")
    return {name: w / sum(weights) for name, w in zip(SPLITS, weights)}


def check_batch_layout(cfg: DataConfig, dp: int) -> None:
    """The global batch must split evenly into micro-batches on every data-parallel rank."""
    per_step = cfg.micro_batch * dp
    check(cfg.global_batch % per_step == 0, "data.global_batch",
          f"must be a multiple of data.micro_batch * dp = {cfg.micro_batch} * {dp} "
          f"(got {cfg.global_batch})")


def resolve_data_path(cfg: DataConfig) -> list[tuple[float, str]]:
    """The (weight, prefix) pairs to read; builds the bundled corpus when `path` is "default"."""
    if cfg.path == DEFAULT_PATH:
        prefix, _ = default_corpus(cfg.cache_dir, cfg.vocab_size, max_bytes=cfg.corpus_max_bytes)
        return [(1.0, str(prefix))]
    given = [(1.0, cfg.path)] if isinstance(cfg.path, str) else cfg.path
    pairs = [(weight, str(Path(prefix).expanduser())) for weight, prefix in given]
    for _, prefix in pairs:
        missing = [p for p in (prefix + ".idx", prefix + ".bin") if not Path(p).is_file()]
        if missing:
            raise ConfigError("data.path", f"no indexed dataset at {prefix} ({missing[0]} not found)")
    return pairs
