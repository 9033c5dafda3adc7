"""Model weights in training checkpoints: how a bare `TransformerLM` is saved and loaded.

The trainer checkpoints the student and the objective together (`student.*`, `objective.*`), so a
bare model is saved and loaded under the `student.` prefix: a converted Hugging Face model, a
teacher, or a student's initialization are all ordinary training checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.parallel import ParallelLayout
from layers.model import TransformerLM

PREFIX = "student."


class _Saved(nn.Module):
    """A bare model under the name the trainer saves it as (`student.*`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.student = model


def load_weights(path: str | Path, model: TransformerLM, layout: ParallelLayout) -> dict:
    """Load the model weights of checkpoint directory `path` into `model` (any saved TP degree)."""
    return load_checkpoint(Path(path), layout=layout, model=_Saved(model),
                           vocab_size=model.config.vocab_size, restore_rng=False,
                           only_prefix=PREFIX)


class _OutputLayer(nn.Module):
    """The output layer alone, under the name a full model saves it as."""

    def __init__(self, head: nn.Module, *, tied: bool):
        super().__init__()
        setattr(self, "embedding" if tied else "lm_head", head)


def load_output_weight(path: str | Path, head: nn.Module, layout: ParallelLayout, *,
                       vocab_size: int, tied: bool) -> None:
    """Load only the output weight of the model checkpointed at `path` (any saved TP degree) into
    `head.weight`, this rank's `[padded_vocab/tp, hidden]` vocabulary shard at `layout`; `tied`:
    the checkpoint's model ties it to its embedding (which is where it is saved)."""
    name = f"{PREFIX}{'embedding' if tied else 'lm_head'}.weight"
    load_checkpoint(Path(path), layout=layout, model=_Saved(_OutputLayer(head, tied=tied)),
                    vocab_size=vocab_size, restore_rng=False, only_prefix=name)


def save_weights(root: str | Path, model: TransformerLM, layout: ParallelLayout, *,
                 config: dict, step: int = 0) -> Path:
    """Save `model` alone as a checkpoint `root/step_{step}` (every TP rank calls it).

    `config` is the run config as plain data; it must hold the `model` section, which is how
    `distill.teacher` and `train.init` learn the architecture.
    """
    return save_checkpoint(Path(root), step, layout=layout, model=_Saved(model), optimizer=None,
                           state={}, config=config, keep=0, vocab_size=model.config.vocab_size)
