"""Pipeline-parallel schedules over model-agnostic stage callables: 1F1B and interleaved 1F1B.

Terms. `pp` ranks form a pipeline group (rank order is the group's); each holds `chunks` model
chunks (1 without interleaving). Chunk c of pipeline rank r runs the layers of virtual stage
c * pp + r (Megatron's placement, engine.parallel.virtual_stage), so a micro-batch visits ranks
0, 1, .., pp-1 once per chunk. A step has `m` micro-batches.

What a caller provides (`PipelineStage`): for each chunk, the specs of the tensors it receives from
the previous virtual stage, and a forward that maps (chunk, micro-batch, received tensors) to the
tensors for the next virtual stage plus this chunk's own loss share (a scalar or None: a stage may
own loss terms too, e.g. activation distillation of its layers). The executor moves tensors
between ranks through the collective module, keeps what the backward needs, and runs the backward
of every forward: autograd through the chunk's outputs (with the gradients that come back from the
next virtual stage) and its own loss, sending the gradients of the received tensors back. Only
received tensors whose spec says `requires_grad` carry gradients; others (a colocated teacher's
hidden states travelling with the student's) are plain data.

Schedules (`one_f_one_b`, `interleaved_one_f_one_b`) are per-rank action lists: warm-up forwards,
a steady state that alternates one forward and one backward, and cool-down backwards.
- 1F1B: warm-up = pp - rank - 1 forwards, so a rank holds at most pp - rank micro-batches'
  activations at once (pp on the first rank), whatever m is. Bubble: (pp - 1) / (m + pp - 1).
- Interleaved (chunks = v > 1, m a multiple of pp): forwards visit micro-batches in groups of pp,
  chunk by chunk; warm-up = 2 (pp - rank - 1) + (v - 1) pp virtual micro-batches. The bubble
  shrinks to (pp - 1) / (v m + pp - 1) of the step, at the price of v times as many point-to-point
  messages and up to (2 (pp - 1) + (v - 1) pp + 1) / v micro-batches' worth of chunk activations
  held per rank, i.e. about pp + (pp - 2) / v full-stage activations on the first rank.

Communication. Every receive happens right before the action that consumes it. Sends are
asynchronous: a send is posted in one batch with the receive that starts the next action when
there is one (1F1B's steady state sends an activation and receives a gradient from the same peer,
and a lone blocking NCCL send facing the peer's lone send would deadlock), and on its own at once
otherwise (warm-up and cool-down), so no send waits for later work. Message order per (sender,
receiver) is the same on both sides because every rank walks the same micro-batch order.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
import torch.distributed as dist

from engine import collectives as C
from engine.parallel import stage_owner, virtual_stage


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor a chunk receives; `requires_grad`: its gradient goes back."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool = True


@dataclass
class StageOutput:
    """What one chunk's forward of one micro-batch produced."""

    outputs: list[torch.Tensor]  # for the next virtual stage, in its input_specs order ([] last)
    loss: torch.Tensor | None = None  # this chunk's own loss share (scalar), or None


class PipelineStage(Protocol):
    """The model side of the pipeline on one rank (all its chunks)."""

    def input_specs(self, chunk: int) -> list[TensorSpec]:
        """What `chunk` receives from the previous virtual stage ([] for virtual stage 0)."""
        ...

    def forward(self, chunk: int, micro_batch: int, inputs: list[torch.Tensor]) -> StageOutput:
        """Run `chunk` on `micro_batch` with the received tensors ([] for virtual stage 0)."""
        ...


@dataclass(frozen=True)
class Action:
    kind: Literal["F", "B"]  # forward or backward
    chunk: int
    micro_batch: int


# ------------------------------------------------------------------------------ schedules

def one_f_one_b(*, pp: int, rank: int, micro_batches: int) -> list[Action]:
    """Non-interleaved 1F1B for pipeline rank `rank` of `pp`."""
    return interleaved_one_f_one_b(pp=pp, rank=rank, micro_batches=micro_batches, chunks=1)


def _forward_order(pp: int, micro_batches: int, chunks: int) -> list[tuple[int, int]]:
    """(chunk, micro-batch) in the order every rank runs its forwards: groups of pp micro-batches,
    each group through chunk 0, then chunk 1, ..."""
    if chunks == 1:
        return [(0, mb) for mb in range(micro_batches)]
    order = []
    for first in range(0, micro_batches, pp):
        group = range(first, min(first + pp, micro_batches))
        order += [(c, mb) for c in range(chunks) for mb in group]
    return order


def warmup_forwards(*, pp: int, rank: int, micro_batches: int, chunks: int) -> int:
    """Forwards a rank runs before its first backward."""
    total = micro_batches * chunks
    if chunks == 1:
        return min(pp - rank - 1, total)
    return min(2 * (pp - rank - 1) + (chunks - 1) * pp, total)


def interleaved_one_f_one_b(*, pp: int, rank: int, micro_batches: int,
                            chunks: int) -> list[Action]:
    """Interleaved 1F1B (1F1B when chunks == 1) for pipeline rank `rank` of `pp`. Interleaving
    needs `micro_batches` to be a multiple of pp (checked by the caller's config)."""
    order = _forward_order(pp, micro_batches, chunks)
    forwards = [Action("F", c, mb) for c, mb in order]
    # Backwards walk the same order, each micro-batch through the chunks in reverse.
    backwards = [Action("B", chunks - 1 - c, mb) for c, mb in order]
    warm = warmup_forwards(pp=pp, rank=rank, micro_batches=micro_batches, chunks=chunks)
    actions = forwards[:warm]
    for k in range(len(order) - warm):
        actions += [forwards[warm + k], backwards[k]]
    return actions + backwards[len(order) - warm:]


def forward_only(*, micro_batches: int, chunks: int, pp: int) -> list[Action]:
    """Every forward, no backward (evaluation), in the training forward order."""
    return [Action("F", c, mb) for c, mb in _forward_order(pp, micro_batches, chunks)]


def bubble_fraction(*, pp: int, micro_batches: int, chunks: int = 1) -> float:
    """The analytic idle fraction of a step: (pp - 1) / (chunks * m + pp - 1)."""
    return (pp - 1) / (chunks * micro_batches + pp - 1)


# ------------------------------------------------------------------------------ execution

@dataclass
class PipelineStats:
    """Where one rank's step time went (seconds), for the bubble benchmark and the tests."""

    compute_s: float = 0.0  # inside forwards and backwards
    wait_s: float = 0.0  # blocked on receives (the bubble, plus transfer time)
    max_in_flight: int = 0  # most micro-batch chunks whose activations were held at once
    timeline: list[tuple[str, int, int, float, float]] = field(default_factory=list)


@dataclass
class _Held:
    """A forward kept for its backward."""

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    loss: torch.Tensor | None


class PipelineExecutor:
    """Runs schedules on this rank of a pipeline group.

    `ranks` are the global ranks of the pipeline group in pipeline order (ranks[i] holds virtual
    stages i, i + pp, ...); `chunks` is the number of model chunks per rank.
    """

    def __init__(self, *, ranks: Sequence[int], rank: int, chunks: int, device: torch.device):
        self.ranks, self.pp, self.chunks = list(ranks), len(ranks), chunks
        self.pp_rank = self.ranks.index(rank)
        self.device = device
        self.last_virtual = self.pp * chunks - 1
        self._pending: list[tuple[torch.Tensor, int]] = []  # sends waiting for the next exchange
        self._sent: list[tuple[dist.Work, torch.Tensor]] = []  # posted sends and their buffers
        self._wait_s = 0.0

    def _virtual(self, chunk: int) -> int:
        return virtual_stage(chunk, pp=self.pp, pp_rank=self.pp_rank)

    def _rank_of(self, virtual: int) -> int:
        return self.ranks[stage_owner(virtual, pp=self.pp)[0]]

    # -- communication --
    def _exchange(self, receives: list[tuple[torch.Tensor, int]]) -> None:
        """Post the waiting sends with these receives, then wait for the receives."""
        sends, self._pending = self._pending, []
        send_works, recv_works = C.exchange(sends, receives, channel="pp")
        self._sent += [(work, tensor) for work, (tensor, _) in zip(send_works, sends)]
        began = time.perf_counter()
        for work in recv_works:
            work.wait()
        self._wait_s += time.perf_counter() - began

    def _receive(self, specs: list[TensorSpec], peer: int) -> list[torch.Tensor]:
        bufs = [torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in specs]
        self._exchange([(b, peer) for b in bufs])
        return bufs

    def _send_later(self, tensors: list[torch.Tensor], peer: int) -> None:
        self._pending += [(t.detach().contiguous(), peer) for t in tensors]

    def _flush(self) -> None:
        """Post what is left to send and wait for every send of the step to complete."""
        if self._pending:
            self._exchange([])
        began = time.perf_counter()
        for work, _ in self._sent:
            work.wait()
        self._wait_s += time.perf_counter() - began
        self._sent = []

    # -- actions --
    def _forward(self, stage: PipelineStage, chunk: int, mb: int, held: dict) -> None:
        virtual = self._virtual(chunk)
        inputs: list[torch.Tensor] = []
        if virtual > 0:
            specs = stage.input_specs(chunk)
            inputs = self._receive(specs, self._rank_of(virtual - 1))
            for t, spec in zip(inputs, specs):
                t.requires_grad_(spec.requires_grad)
        out = stage.forward(chunk, mb, inputs)
        if virtual < self.last_virtual:
            self._send_later(out.outputs, self._rank_of(virtual + 1))
        held[(chunk, mb)] = _Held(inputs, out.outputs, out.loss)

    def _backward(self, chunk: int, mb: int, held: dict) -> None:
        virtual = self._virtual(chunk)
        kept = held.pop((chunk, mb))
        tensors = [t for t in kept.outputs if t.requires_grad]
        grads: list[torch.Tensor] = []
        if virtual < self.last_virtual and tensors:
            specs = [TensorSpec(tuple(t.shape), t.dtype) for t in tensors]
            grads = self._receive(specs, self._rank_of(virtual + 1))
        else:
            tensors = []
        if kept.loss is not None:
            tensors.append(kept.loss)
            grads.append(torch.ones_like(kept.loss))
        if tensors:
            torch.autograd.backward(tensors, grads)
        back = [t.grad if t.grad is not None else torch.zeros_like(t)
                for t in kept.inputs if t.requires_grad]
        if virtual > 0 and back:
            self._send_later(back, self._rank_of(virtual - 1))

    def _receives(self, action: Action) -> bool:
        """Whether `action` starts with a receive (its sends can travel in the same batch)."""
        virtual = self._virtual(action.chunk)
        return virtual > 0 if action.kind == "F" else virtual < self.last_virtual

    def run(self, actions: Sequence[Action], stage: PipelineStage) -> PipelineStats:
        """Execute one step's actions (forward-only lists included); returns where time went."""
        stats, held = PipelineStats(), {}
        self._wait_s = 0.0
        for i, action in enumerate(actions):
            began, waited = time.perf_counter(), self._wait_s
            if action.kind == "F":
                self._forward(stage, action.chunk, action.micro_batch, held)
            else:
                self._backward(action.chunk, action.micro_batch, held)
            spent = time.perf_counter() - began
            stats.compute_s += spent - (self._wait_s - waited)
            stats.max_in_flight = max(stats.max_in_flight, len(held))
            stats.timeline.append((action.kind, action.chunk, action.micro_batch, began, spent))
            if self._pending and (i + 1 == len(actions) or not self._receives(actions[i + 1])):
                self._exchange([])  # nothing to pair them with: post the sends now
        self._flush()
        stats.wait_s = self._wait_s
        return stats
