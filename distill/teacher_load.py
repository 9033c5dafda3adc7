"""Loading a frozen teacher: the whole model at the students' layout, or only the shard of its
output layer that a student rank needs to form the teacher's logits itself (teacher ranks that
stream hidden states, distill/teacher_wire.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from distill.config import aligned_teacher_config
from distill.weights import load_output_weight, load_weights
from engine.checkpoint import ranks_agree
from engine.config import ConfigError
from engine.parallel import ParallelLayout
from layers.config import ModelConfig
from layers.model import TransformerLM
from layers.tensor_parallel import VocabParallelLMHead


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the teacher is never trained."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_teacher(checkpoint: Path, teacher: ModelConfig, student: ModelConfig,
                 layout: ParallelLayout, *, seed: int, bf16: bool,
                 key: str = "distill.teacher") -> TransformerLM:
    """The frozen teacher of a run at `layout`'s TP degree, padded like the student (so both logit
    shards cover the same columns), in bfloat16 when `bf16`. Every entry point builds it here;
    `key` is the config key its errors name."""
    model = TransformerLM(aligned_teacher_config(student, teacher), layout, seed=seed)
    model = model.to(layout.device)
    load_weights(checkpoint, model, layout)
    _check_finite(model, checkpoint, layout, key)
    if bf16:
        model.to(torch.bfloat16)
    return freeze(model)


def load_teacher_head(checkpoint: Path, teacher: ModelConfig, student: ModelConfig,
                      layout: ParallelLayout, *, bf16: bool,
                      here: bool = True) -> VocabParallelLMHead | None:
    """This student rank's frozen shard of the teacher's output layer: the rows of the teacher's
    output weight for the student's vocabulary shard (padded like the student), read from the
    teacher checkpoint at whatever TP it was saved, in the teacher's compute dtype, soft-capped
    by the teacher's `final_logit_softcap`.

    Every student rank calls it (the ranks agree the checkpoint is sound); under PP only the last
    stage holds the head, the others pass `here=False`, read nothing and get None."""
    head = VocabParallelLMHead(vocab_size=student.vocab_size,
                               padded_vocab=student.padded_vocab(layout.tp), hidden=teacher.hidden,
                               layout=layout, softcap=teacher.final_logit_softcap) \
        if here else nn.Module()
    load_output_weight(checkpoint, head, layout, vocab_size=student.vocab_size,
                       tied=teacher.tie_embeddings)
    _check_finite(head, checkpoint, layout)
    if not here:
        return None
    if bf16:
        head.to(torch.bfloat16)
    return freeze(head)


def _check_finite(model: nn.Module, checkpoint: Path, layout: ParallelLayout,
                  key: str = "distill.teacher") -> None:
    """NaN or inf in a frozen teacher would poison every loss (and look like a learning-rate
    problem): refuse it. Each rank checks the shard it holds; the ranks of the role agree."""
    bad = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if not ranks_agree(layout, bad is None):
        where = f"tensor {bad!r}" if bad else "a tensor shard on another rank"
        raise ConfigError(key, f"{checkpoint}: {where} holds non-finite values "
                                             "(NaN or inf)")
