"""The student as a pipeline stage (engine/pipeline.py) for one step's micro-batches.

Every rank of a pipeline reads the same micro-batches (the data stream follows the DP rank), so a
stage has the token ids (for positions and rotary tables) and the labels wherever it needs them;
only the residual stream `[micro_batch, seq(/tp), hidden]` travels between stages, forward, and its
gradient, backward. The last virtual stage turns its output into the micro-batch's loss share
(`last`), which the executor backwards there.

Gradients after the schedule (`sync_pipeline_grads`): summed over DP (each rank's losses are its
shares of the step's global means, so the sum is the gradient of the means; no DDP under PP), and,
with tied embeddings, the first stage's embedding gradient and the last stage's output-layer copy's
gradient summed over the pipeline's embedding group, so both copies take the same update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from engine import collectives as C
from engine.parallel import ParallelLayout
from engine.pipeline import (PipelineExecutor, StageOutput, TensorSpec, forward_only,
                             interleaved_one_f_one_b)
from layers.model import ModelOutput, TransformerLM

# (micro-batch index, the last stage's output) -> this micro-batch's loss share, or None
LastStage = Callable[[int, ModelOutput], torch.Tensor | None]


class StudentStage:
    """This rank's chunks of `student` over `micro_batches` ({"input_ids", ...} on the device)."""

    def __init__(self, student: TransformerLM, micro_batches: Sequence[dict], *, last: LastStage,
                 buffers: Sequence[str] = (), compute_logits: bool = True,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.student, self.micro_batches, self.last = student, micro_batches, last
        self.buffers, self.compute_logits, self.autocast = buffers, compute_logits, autocast
        layout = student.layout
        self.last_virtual = layout.pp * layout.virtual_stages - 1
        self.dtype = next(student.parameters()).dtype

    def _virtual(self, chunk: int) -> int:
        return chunk * self.student.layout.pp + self.student.layout.pp_rank

    def input_specs(self, chunk: int) -> list[TensorSpec]:
        if self._virtual(chunk) == 0:
            return []
        batch, seq = self.micro_batches[0]["input_ids"].shape
        layout = self.student.layout
        shape = (batch, seq // layout.tp if layout.sp else seq, self.student.config.hidden)
        return [TensorSpec(shape, self.dtype)]

    def forward(self, chunk: int, micro_batch: int, inputs: list[torch.Tensor]) -> StageOutput:
        student, ids = self.student, self.micro_batches[micro_batch]["input_ids"]
        virtual = self._virtual(chunk)
        with self.autocast():
            record = student.recorder(self.buffers)
            hidden = student.embed(ids, record) if virtual == 0 else inputs[0]
            rope = student.rope(ids, self.dtype)
            hidden = student.run_chunk(chunk, hidden, rope, record)
            if virtual < self.last_virtual:
                return StageOutput([hidden])
            out = student.finish(hidden, rope, record, compute_logits=self.compute_logits)
        return StageOutput([], self.last(micro_batch, out))


def run_pipeline(stage: StudentStage, layout: ParallelLayout, *, train: bool) -> None:
    """One step's schedule on this rank: interleaved 1F1B (1F1B with one chunk) when training,
    every forward without autograd otherwise."""
    executor = PipelineExecutor(ranks=layout.pp_ranks, rank=layout.rank,
                                chunks=layout.virtual_stages, device=layout.device)
    m = len(stage.micro_batches)
    if train:
        executor.run(interleaved_one_f_one_b(pp=layout.pp, rank=layout.pp_rank, micro_batches=m,
                                             chunks=layout.virtual_stages), stage)
        return
    with torch.no_grad():
        executor.run(forward_only(micro_batches=m, chunks=layout.virtual_stages, pp=layout.pp),
                     stage)


def sync_pipeline_grads(module: nn.Module, student: TransformerLM, layout: ParallelLayout) -> None:
    """Sum gradients over DP (one flat all-reduce), and the tied embedding's two copies over the
    pipeline's embedding group."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if layout.dp > 1 and grads:
        flat = C.all_reduce(_flatten_dense_tensors(grads), layout.dp_group)
        for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)
    if student.config.tie_embeddings and layout.embedding_group is not None:
        weight = student.embedding.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        C.all_reduce(weight.grad, layout.embedding_group)
