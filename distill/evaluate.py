"""Validation loss: the one routine behind the trainer's `val_loss`, `tools/score.py --data` and the
demo's report, so that every number called "validation loss" is computed the same way.

The loss is the mean next-token cross-entropy (nats) over the valid labels of a fixed number of
validation micro-batches, drawn exactly as training draws them (`engine.data.TokenBatches` with
the same seed and split), vocab-parallel (never gathering the vocabulary), through the fused
LM-head path when the run uses it. On paired data (a teacher with another tokenizer) it is also
given in bits per byte (`val_bpb`): nats / ln 2 over the bytes of the labels scored, a number that
compares across tokenizers. A pipeline-parallel student scores them through the pipeline's
forwards (distill/pipeline_step.py); the last stage adds up the losses.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from distill.divergence import cross_entropy
from distill.fused import fused_lm_and_divergence
from distill.pipeline_step import StudentStage, run_pipeline
from engine import collectives as C
from engine.data import IGNORE_INDEX, DataConfig, TokenBatches, to_device
from layers.model import ModelOutput, TransformerLM


def next_token_loss(model: TransformerLM, input_ids: torch.Tensor, labels: torch.Tensor, *,
                    fused: bool = False) -> torch.Tensor:
    """Per-token cross-entropy [batch, seq] of `model` against next-token `labels` (0 where a
    label is ignored); a collective over the TP group."""
    return output_loss(model, model(input_ids, compute_logits=not fused), labels, fused=fused)


def output_loss(model: TransformerLM, out: ModelOutput, labels: torch.Tensor, *,
                fused: bool = False) -> torch.Tensor:
    """`next_token_loss` of a forward's output (logits, or the head input when `fused`)."""
    kwargs = dict(vocab_size=model.config.vocab_size, group=model.layout.tp_group)
    if not fused:
        return cross_entropy(out.logits, labels, **kwargs)
    hidden = out.head_hidden  # [batch, seq, hidden]
    ce, _ = fused_lm_and_divergence(hidden.reshape(-1, hidden.shape[-1]), model.output_weight,
                                    labels=labels.reshape(-1),
                                    softcap=model.config.final_logit_softcap, **kwargs)
    return ce.reshape(labels.shape)


class Validation(NamedTuple):
    loss: float  # mean next-token loss in nats
    labels: int  # labels scored
    bits_per_byte: float | None  # the same loss in bits over the labels' bytes (paired data)


def validation_loss(model: TransformerLM, data: DataConfig, *, micro_batches: int, seed: int,
                    split: str = "valid", fused: bool = False) -> tuple[float, int]:
    """(mean next-token loss in nats, labels scored): `validation` without the bytes."""
    scores = validation(model, data, micro_batches=micro_batches, seed=seed, split=split,
                        fused=fused)
    return scores.loss, scores.labels


@torch.no_grad()
def validation(model: TransformerLM, data: DataConfig, *, micro_batches: int, seed: int,
               split: str = "valid", fused: bool = False, teacher_len: int | None = None,
               teacher_tokenizers: tuple[str, ...] = ("",),
               byte_lengths: torch.Tensor | None = None) -> Validation:
    """The loss over the first `micro_batches` micro-batches of each DP rank's `split` stream;
    the same on every rank (one all-reduce over DP). Also in bits per byte with `teacher_len`
    (paired data, engine/data/paired.py: the labels' bytes from its offsets; `teacher_tokenizers`
    its teacher tokenizations, TokenBatches') or `byte_lengths`
    ([vocab] int64, the bytes each token id stands for: plain data and its tokenizer). The model
    runs in eval mode and is put back in the mode it was in."""
    layout = model.layout
    stream = TokenBatches(data, seed=seed, dp_rank=layout.dp_rank, dp=layout.dp, split=split,
                          vocab_size=model.config.vocab_size, teacher_len=teacher_len,
                          teacher_tokenizers=teacher_tokenizers[:1])
    batches: list[dict] = []
    while len(batches) < micro_batches:
        batches += stream.next_step()
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=layout.device)  # loss sum, labels, bytes
    batches = [to_device(mb, layout.device) for mb in batches[:micro_batches]]

    def add(mb: dict, out: ModelOutput) -> None:
        nll = output_loss(model, out, mb["labels"], fused=fused)
        labels = mb["labels"]
        nbytes = mb["label_bytes"].sum() if "label_bytes" in mb else nll.new_zeros(()) \
            if byte_lengths is None else \
            byte_lengths.to(labels.device)[labels.clamp(min=0)][labels != IGNORE_INDEX].sum()
        totals.add_(torch.stack([nll.double().sum(),
                                 (mb["labels"] != IGNORE_INDEX).sum().double(),
                                 nbytes.double()]))

    if layout.pp == 1:
        for mb in batches:  # whole sequences on every CP rank: no split, no gather
            add(mb, model(mb["input_ids"], compute_logits=not fused,
                          positions=mb.get("positions"), documents=mb.get("documents")))
    else:  # only the last stage adds; the sum over the pipeline group brings it everywhere
        stage = StudentStage(model, batches, last=lambda i, out, _: add(batches[i], out),
                             compute_logits=not fused)
        run_pipeline(stage, layout, train=False)
    model.train(was_training)
    C.all_reduce(totals, layout.dp_group)
    C.all_reduce(totals, layout.pp_group)
    bpb = (totals[0] / math.log(2) / totals[2]).item() \
        if teacher_len is not None or byte_lengths is not None else None
    return Validation((totals[0] / totals[1].clamp(min=1)).item(), int(totals[1].item()), bpb)
