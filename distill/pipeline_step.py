"""The student as a pipeline stage (engine/pipeline.py) for one step's micro-batches.

Every rank of a pipeline reads the same micro-batches (the data stream follows the DP rank), so a
stage has the token ids (for positions and rotary tables) and the labels wherever it needs them;
only the residual stream `[micro_batch, seq(/tp), hidden]` travels between stages, forward, and its
gradient, backward. The last virtual stage turns its output into the micro-batch's loss share
(`last`), which the executor backwards there.

The teachers that run inside the stages (`teachers`: a source's `stage_parts()`, colocated
teachers) are split into the same virtual stages (layers/stages.py, at the same depth fractions)
and run forward in lockstep on the same ranks: their residual streams travel with the student's,
in config order after it, as tensors that carry no gradient. Their outputs reach `activations` and
`last` as {name: TeacherOutputs}. Every virtual stage hands the activation buffers both models
published there to `activations` (the activation pairs of that stage, whose loss shares join the
step's loss on the stage that owns them); the last one also hands the teachers' head outputs to
`last`.

Gradients after the schedule (`sync_pipeline_grads`): summed over DP (each rank's losses are its
shares of the step's global means, so the sum is the gradient of the means; no DDP under PP), and,
with tied embeddings, the first stage's embedding gradient and the last stage's output-layer copy's
gradient summed over the pipeline's embedding group, so both copies take the same update. The
objective's parameters (activation projections) have a copy on every stage, each with the gradient
of its stage's pairs: they are summed over the pipeline group, and counted once in the gradient
norm (`pipeline_copies`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from distill.teacher import StageTeacher, TeacherOutputs
from engine import collectives as C
from engine.optim import reduce_expert_gradients
from engine.parallel import ParallelLayout
from engine.param_tags import param_tags, tag
from engine.pipeline import PipelineExecutor, StageOutput, TensorSpec, forward_only, interleaved_one_f_one_b
from layers.context import sequence_kwargs
from layers.model import ModelOutput, TransformerLM

# (micro-batch, the last stage's output, the teachers' outputs there by name or None) -> loss
# share or None
LastStage = Callable[[int, ModelOutput, dict[str, TeacherOutputs] | None], torch.Tensor | None]
# (micro-batch, virtual stage, student buffers, teachers' outputs) of a stage before the last
StageTerms = Callable[[int, int, dict, dict[str, TeacherOutputs] | None], torch.Tensor | None]


class StudentStage:
    """This rank's chunks of `student` over `micro_batches` ({"input_ids", ...} on the device)."""

    def __init__(self, student: TransformerLM, micro_batches: Sequence[dict], *, last: LastStage,
                 buffers: Sequence[str] = (), compute_logits: bool = True,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 teachers: dict[str, StageTeacher] | None = None,
                 activations: StageTerms | None = None):
        self.student, self.micro_batches, self.last = student, micro_batches, last
        self.buffers, self.compute_logits, self.autocast = buffers, compute_logits, autocast
        self.activations = activations
        self.teachers = teachers or {}
        self.last_virtual = student.plan.virtual_stages - 1
        self.dtype = next(student.parameters()).dtype

    def _virtual(self, chunk: int) -> int:
        return self.student.layout.virtual_stage(chunk)

    def input_specs(self, chunk: int) -> list[TensorSpec]:
        if self._virtual(chunk) == 0:
            return []
        batch, seq = self.micro_batches[0]["input_ids"].shape
        layout = self.student.layout
        rows = (batch, seq // layout.tp if layout.sp else seq)
        specs = [TensorSpec((*rows, self.student.config.hidden), self.dtype)]
        return specs + [teacher.residual_spec(rows) for teacher in self.teachers.values()]

    def forward(self, chunk: int, micro_batch: int, inputs: list[torch.Tensor]) -> StageOutput:
        student, mb = self.student, self.micro_batches[micro_batch]
        ids, sequence = mb["input_ids"], sequence_kwargs(mb)
        virtual = self._virtual(chunk)
        last = virtual == self.last_virtual
        teacher_hidden, teacher_out = self._teacher(chunk, ids, inputs[1:], last=last,
                                                    sequence=sequence)
        with self.autocast():
            record = student.recorder(self.buffers)
            positions, tokens = student.token_layout(ids, **sequence)
            hidden = student.embed(ids, record, positions) if virtual == 0 else inputs[0]
            rope = student.rope(ids, self.dtype, positions)
            hidden = student.run_chunk(chunk, hidden, rope, record, tokens)
            if not last:
                loss = self.activations(micro_batch, virtual, record.buffers, teacher_out) \
                    if self.activations is not None else None
                return StageOutput([hidden, *teacher_hidden], loss)
            out = student.finish(hidden, rope, record, compute_logits=self.compute_logits,
                                 tokens=tokens)
        return StageOutput([], self.last(micro_batch, out, teacher_out))

    def _teacher(self, chunk: int, ids: torch.Tensor, inputs: list[torch.Tensor], *, last: bool,
                 sequence: dict) -> tuple[list[torch.Tensor], dict[str, TeacherOutputs] | None]:
        """The teachers' chunk: ([their residual streams for the next stage], their outputs
        here by name); `inputs`: their residual streams from the previous stage ([] on the
        first); `sequence`: the micro-batch's positions, documents and CP chunks."""
        if not self.teachers:
            return [], None
        streams, outputs = [], {}
        for i, (name, teacher) in enumerate(self.teachers.items()):
            hidden, outputs[name] = teacher.run_chunk(chunk, ids, inputs[i] if inputs else None,
                                                      last=last, sequence=sequence)
            streams += [] if hidden is None else [hidden]
        return streams, outputs


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


def pipeline_copies(objective: nn.Module, layout: ParallelLayout) -> None:
    """Mark the objective's parameters past the first stage as copies (engine/optim.py's norm
    counts them once)."""
    for param in objective.parameters():
        tag(param, pp_duplicate=layout.pp_rank > 0)


def sync_pipeline_grads(module: nn.Module, student: TransformerLM, objective: nn.Module,
                        layout: ParallelLayout, *, sum_dp: bool = True) -> None:
    """Sum gradients over DP (one flat all-reduce; `sum_dp` False: the distributed optimizer
    reduce-scatters them itself), the tied embedding's two copies over the pipeline's embedding
    group, and the objective's copies over the pipeline group."""
    for param in objective.parameters():
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        C.all_reduce(param.grad, layout.pp_group)
    grads = [p.grad for p in module.parameters() if p.grad is not None and not param_tags(p).expert]
    if sum_dp and layout.dp * layout.cp > 1 and grads:  # CP ranks: the same parameters, other tokens
        flat = C.all_reduce(_flatten_dense_tensors(grads), layout.dp_cp_group)
        for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)
    if sum_dp:
        reduce_expert_gradients(module.parameters(), layout)
    if student.config.tie_embeddings and layout.embedding_group is not None:
        weight = student.embedding.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        C.all_reduce(weight.grad, layout.embedding_group)
