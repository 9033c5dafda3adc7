"""The teacher contract: what a run asks of its teacher, and what it gets back.

What a run needs from its teacher is a `TeacherRequest` (the objective's `teacher_request()`): the
logits, or for the fused LM-head path the output layer's input and the frozen output weight, or
nothing of the head; and activation buffers by name. A `TeacherSource` gives, for each
micro-batch, the teachers' `TeacherOutputs` by teacher name (one entry for one teacher: the names
are those of `distill.teachers`, or SINGLE_TEACHER for `distill.teacher`), is told
`end_step(stop=...)` once per optimizer step after the step's stop vote, and is `close()`d at the
end of training. Under pipeline parallelism a source also says how the stages meet it (see
`TeacherSource`). Sources:

- in-process (distill/teacher_sources.py): `ColocatedTeacher`, the frozen teacher running forward
  on the students' ranks right before the student (cut into the same pipeline stages), and
  `TeacherList`, several sources as one (`distill.teachers`);
- `RemoteTeacher` (distill/teacher_wire.py): the student side of teacher ranks
  (`parallel.teacher_ranks`), which stream each micro-batch's outputs to the students;
- `OfflineTeacher` (distill/offline.py): the teacher's top-k logits, exported beforehand.

Loading a frozen teacher, or only its output layer, is distill/teacher_load.py's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from engine.pipeline import TensorSpec
from layers.buffers import ActivationBuffer

# What a teacher with another tokenizer hands the objective of each micro-batch (besides logits).
ALIGNMENT_KEYS = ("labels", "teacher_labels", "chunks", "teacher_chunks", "chunk_bytes", "single",
                  "chunk_ends", "teacher_chunk_ends")


@dataclass
class TeacherOutputs:
    """What the objective reads from the teacher for one micro-batch; every field is optional.

    The logit term takes `logits`, or the fused path's `head_hidden` + `output_weight`, or an
    offline teacher's top-k. Activation buffers are keyed by teacher buffer name; a bare tensor
    is taken to be in the student buffer's layout.
    """

    logits: torch.Tensor | None = None  # [batch, seq, padded_vocab/tp] next-token logits shard
    head_hidden: torch.Tensor | None = None  # fused: [batch, seq, hidden_t] output layer input
    output_weight: torch.Tensor | None = None  # fused: [padded_vocab/tp, hidden_t] shard
    # fused: the teacher's final_logit_softcap, which the fused loss applies to its
    # head_hidden @ output_weight.T (None: off); `logits` are capped already
    softcap: float | None = None
    topk_values: torch.Tensor | None = None  # offline: [batch, seq, k] raw teacher logits
    topk_indices: torch.Tensor | None = None  # offline: [batch, seq, k] global vocabulary ids
    logsumexp: torch.Tensor | None = None  # offline: [batch, seq] logsumexp(logits / T), run's T
    buffers: dict[str, ActivationBuffer | torch.Tensor] = field(default_factory=dict)
    # cross_tokenizer: the micro-batch's labels and chunk alignment (ALIGNMENT_KEYS; `logits` are
    # then over the teacher's own window and vocabulary)
    alignment: dict[str, torch.Tensor] | None = None
    # cross_tokenizer from teacher ranks or an offline store: the teacher's statistics of the
    # micro-batch that the chunk term needs (distill/cross_tokenizer.py STATS), by name
    chunk_stats: dict[str, torch.Tensor] | None = None

    @property
    def has_logits(self) -> bool:
        return any(x is not None for x in (self.logits, self.head_hidden, self.topk_values,
                                           self.chunk_stats))


@dataclass(frozen=True)
class TeacherRequest:
    """What the objective needs from a live teacher for each micro-batch."""

    head: Literal["logits", "hidden", "none"]  # logits | head input + output weight (fused) | none
    buffers: tuple[str, ...] = ()  # teacher activation buffer names, sorted
    # cross_tokenizer on teacher ranks: the chunk statistics they compute and stream instead of
    # the head output (distill/cross_tokenizer.py STATS; the buffers go picked at the chunk ends)
    chunk_stats: tuple[str, ...] = ()


class StageTeacher(Protocol):
    """A teacher cut into the student's pipeline stages (at the same depth fractions) that runs
    each chunk in lockstep with the student's, on the same ranks (distill/pipeline_step.py)."""

    def residual_spec(self, rows: tuple[int, int]) -> TensorSpec:
        """What its residual stream between stages looks like, `rows` = (batch, seq or seq/tp);
        it carries no gradient."""
        ...

    def run_chunk(self, chunk: int, input_ids: torch.Tensor, hidden: torch.Tensor | None, *,
                  last: bool, sequence: dict | None = None,
                  ) -> tuple[torch.Tensor | None, TeacherOutputs]:
        """This rank's `chunk` of the teacher on `hidden` from the previous stage (None on the
        first): (its residual stream for the next stage, or None on the `last` stage; the
        outputs published here, the head's included on the last). `sequence`: the micro-batch's
        positions, documents and CP chunks (layers/context.py `sequence_kwargs`)."""
        ...


class TeacherSource(Protocol):
    """Where a run's teacher outputs come from (see the module docstring)."""

    # Under PP: True when every stage calls the source for each micro-batch (each receives its
    # own part, as from teacher ranks); False when only the last stage does.
    reaches_every_stage: bool

    def __call__(self, micro_batch: Mapping[str, torch.Tensor]) -> dict[str, TeacherOutputs]:
        """The teachers' outputs for `micro_batch` ({"input_ids", "labels"?}) by teacher name, in
        training order."""
        ...

    def stage_parts(self) -> dict[str, StageTeacher]:
        """Under PP, the teachers that run inside the student's stages, by name; empty when the
        source is called per micro-batch instead."""
        ...

    def end_step(self, *, stop: bool) -> None:
        """The step's micro-batches are consumed; `stop`: training ends after this step."""
        ...

    def close(self) -> None:
        """Training is over (normally or by preemption): finish what is in flight."""
        ...


def token_checksum(input_ids: torch.Tensor) -> torch.Tensor:
    """A position-weighted checksum of token ids: cheap, and sensitive to order and value."""
    flat = input_ids.reshape(-1).to(torch.int64)
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.int64, device=flat.device)
    return ((flat + 1) * (weights % 1_000_003)).sum().reshape(1) % 2_147_483_647
