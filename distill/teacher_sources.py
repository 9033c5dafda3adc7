"""In-process teacher sources: the frozen teacher running on the students' own ranks, and several
sources as one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from distill.config import SINGLE_TEACHER
from distill.cross_tokenizer import CrossTokenizerTerm, teacher_at_chunk_ends
from distill.teacher import ALIGNMENT_KEYS, StageTeacher, TeacherOutputs, TeacherRequest, TeacherSource
from distill.teacher_load import freeze
from engine.data.dataset import alignment_key
from engine.pipeline import TensorSpec
from layers.context import sequence_kwargs


class ColocatedTeacher:
    """Runs the teacher forward on these ranks for each micro-batch (no grad, eval mode); under
    PP it runs inside the student's stages instead (`stage_parts`)."""

    reaches_every_stage = False

    def __init__(self, model: nn.Module, request: TeacherRequest, *, name: str = SINGLE_TEACHER):
        self.model, self.request, self.name = freeze(model), request, name

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, sequence: dict | None = None):
        """The teacher's `ModelOutput` for input ids [batch, seq] (`sequence`: the micro-batch's
        positions, documents and CP chunks, layers/context.py `sequence_kwargs`)."""
        return self.model(input_ids, buffers=self.request.buffers,
                          compute_logits=self.request.head == "logits", **(sequence or {}))

    def __call__(self, micro_batch: Mapping[str, torch.Tensor]) -> dict[str, TeacherOutputs]:
        out = self.forward(micro_batch["input_ids"], sequence_kwargs(micro_batch))
        return {self.name: self._outputs(out)}

    def stage_parts(self) -> dict[str, StageTeacher]:
        return {self.name: self}

    def residual_spec(self, rows: tuple[int, int]) -> TensorSpec:
        return TensorSpec((*rows, self.model.config.hidden), _dtype(self.model),
                          requires_grad=False)

    @torch.no_grad()
    def run_chunk(self, chunk: int, input_ids: torch.Tensor, hidden: torch.Tensor | None, *,
                  last: bool, sequence: dict | None = None,
                  ) -> tuple[torch.Tensor | None, TeacherOutputs]:
        model, request = self.model, self.request
        record = model.recorder(request.buffers)
        positions, tokens = model.token_layout(input_ids, **(sequence or {}))
        hidden = model.embed(input_ids, record, positions) if hidden is None else hidden
        rope = model.rope(input_ids, _dtype(model), positions)
        hidden = model.run_chunk(chunk, hidden, rope, record, tokens)
        if not last:
            return hidden, TeacherOutputs(buffers=record.buffers)
        out = model.finish(hidden, rope, record, compute_logits=request.head == "logits",
                           tokens=tokens)
        return None, self._outputs(out)

    def _outputs(self, out) -> TeacherOutputs:
        """What the objective reads of the teacher's `ModelOutput` (the last pipeline stage's,
        whose buffers are that stage's)."""
        result = TeacherOutputs(buffers={name: out.buffers[name] for name in self.request.buffers
                                         if name in out.buffers})
        if self.request.head == "logits":
            result.logits = out.logits
        elif self.request.head == "hidden":
            result.head_hidden, result.output_weight = out.head_hidden, self.model.output_weight
            result.softcap = self.model.config.final_logit_softcap
        return result

    def end_step(self, *, stop: bool) -> None:
        pass  # nothing runs ahead of the students

    def close(self) -> None:
        pass


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


class TeacherList:
    """Several teachers as one source (`distill.teachers`): each call gives every source's
    outputs, by name in config order; the objective reads them by name. The sources are of one
    kind (colocated, or offline exports)."""

    def __init__(self, sources: Sequence[TeacherSource]):
        self.sources = list(sources)
        self.reaches_every_stage = any(s.reaches_every_stage for s in self.sources)

    def __call__(self, micro_batch: Mapping[str, torch.Tensor]) -> dict[str, TeacherOutputs]:
        return {name: out for source in self.sources for name, out in source(micro_batch).items()}

    def stage_parts(self) -> dict[str, StageTeacher]:
        return {name: part for source in self.sources for name, part in source.stage_parts().items()}

    def end_step(self, *, stop: bool) -> None:
        for source in self.sources:
            source.end_step(stop=stop)

    def close(self) -> None:
        for source in self.sources:
            source.close()


class OtherTokenizerTeacher:
    """A teacher with another tokenizer (`distill.cross_tokenizer`): runs `source` on the
    micro-batch's teacher window ("teacher_input_ids") and hands the alignment on with its
    outputs. `prepared`: the source's outputs were computed from the teacher window elsewhere
    (teacher ranks, `RemoteTeacher`, or an offline store); it gets the student's micro-batch,
    whose token ids the stream's or the store's checksum covers."""

    reaches_every_stage = False

    def __init__(self, source: TeacherSource, *, prepared: bool = False, tokenizer: str = ""):
        # tokenizer: the teacher's paired tokenization ("": the unnamed one), whose alignment
        # the micro-batch carries under `alignment_key`s
        self.source, self.prepared, self.tokenizer = source, prepared, tokenizer

    def __call__(self, micro_batch: Mapping[str, torch.Tensor]) -> dict[str, TeacherOutputs]:
        def mine(key: str) -> torch.Tensor:  # (the student's labels: the same for every teacher)
            return micro_batch[key if key == "labels" else alignment_key(key, self.tokenizer)]

        outputs = self.source(micro_batch if self.prepared else
                              {"input_ids": mine("teacher_input_ids")})
        for out in outputs.values():
            out.alignment = {key: mine(key) for key in ALIGNMENT_KEYS}
        return outputs

    def stage_parts(self) -> dict[str, StageTeacher]:
        return {}  # (no pipeline parallelism with cross_tokenizer)

    def end_step(self, *, stop: bool) -> None:
        self.source.end_step(stop=stop)

    def close(self) -> None:
        self.source.close()


class ChunkStatsTeacher:
    """The teacher ranks' (and the offline export's) side of a teacher with another tokenizer:
    runs `teacher` on the micro-batch's teacher window and keeps only what the students' chunk
    term needs, its statistics of the micro-batch (`term.teacher_stats` over `term.group`, this
    teacher replica's TP group) and the requested buffers at the chunk ends, replicated over
    [batch, seq, width] (which the wire cuts to each student's sequence shard)."""

    def __init__(self, teacher: ColocatedTeacher, term: CrossTokenizerTerm, *,
                 temperature: float, names: tuple[str, ...] | None = None):
        self.teacher, self.term, self.temperature = teacher, term, temperature
        self.request, self.names = teacher.request, names  # names: the statistics (None: the loss's)

    @torch.no_grad()
    def __call__(self, micro_batch: Mapping[str, torch.Tensor]) -> dict[str, TeacherOutputs]:
        outputs = OtherTokenizerTeacher(self.teacher)(micro_batch)
        for out in outputs.values():
            out.chunk_stats = self.term.teacher_stats(out, temperature=self.temperature,
                                                      names=self.names)
            out.buffers = teacher_at_chunk_ends(out.buffers, out.alignment["teacher_chunk_ends"],
                                                self.term.group)
        return outputs
