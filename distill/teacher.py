"""Where the teacher's outputs come from, one micro-batch at a time.

- `ColocatedTeacher`: the frozen teacher runs forward on the same ranks, right before the student.
- `RemoteTeacher` / `serve_teacher`: the teacher runs on its own ranks (`parallel.teacher_ranks`)
  and streams each micro-batch's logit shard and requested activations to the matching student
  rank with asynchronous point-to-point sends, up to `prefetch` micro-batches ahead. Each transfer
  carries a checksum of its token ids; a mismatch stops the run.

Teacher rank (dp d, tp t) serves the student ranks (dp d + k * teacher_dp, tp t) in turn, so the
teacher's DP degree must divide the students'.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator

import torch
from torch import nn

from engine import collectives as C
from engine.log import get_logger
from engine.parallel import STUDENT, TEACHER, ParallelLayout

log = get_logger(__name__)

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
_HEADER_LEN = 64


class TeacherStreamError(RuntimeError):
    """The teacher's stream does not match what the student is training on."""


def token_checksum(input_ids: torch.Tensor) -> torch.Tensor:
    """A position-weighted checksum of token ids: cheap, and sensitive to order and value."""
    flat = input_ids.reshape(-1).to(torch.int64)
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.int64, device=flat.device)
    return ((flat + 1) * (weights % 1_000_003)).sum().reshape(1) % 2_147_483_647


def to_device(micro_batch: dict, device: torch.device) -> dict:
    """The micro-batch's tensors on `device` (the data pipeline yields CPU tensors)."""
    return {k: v.to(device, non_blocking=True) for k, v in micro_batch.items()}


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the teacher is never trained."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class ColocatedTeacher:
    """Runs the teacher forward on these ranks for each micro-batch (no grad, eval mode)."""

    def __init__(self, model: nn.Module, *, buffer_names: set[str], compute_logits: bool,
                 autocast_bf16: bool = False):
        self.model = freeze(model)
        self.buffer_names = sorted(buffer_names)
        self.compute_logits = compute_logits
        self.autocast_bf16 = autocast_bf16

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor):
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16,
                            enabled=self.autocast_bf16):
            return self.model(input_ids, buffers=self.buffer_names,
                              compute_logits=self.compute_logits)

    def __call__(self, micro_batch: dict) -> dict[str, torch.Tensor]:
        """The teacher tensors for one micro-batch, by name (see `teacher_tensors`)."""
        return teacher_tensors(self.forward(micro_batch["input_ids"]), self.buffer_names,
                               with_weight=not self.compute_logits, model=self.model)


def teacher_tensors(out, buffer_names: list[str], *, with_weight: bool,
                    model: nn.Module) -> dict[str, torch.Tensor]:
    """Flatten a teacher forward into named tensors: `logits` (or `head_hidden` + `output_weight`
    for the fused LM-head path) and one entry per requested activation buffer."""
    tensors = {}
    if with_weight:
        tensors["head_hidden"] = out.head_hidden
        tensors["output_weight"] = model.output_weight
    else:
        tensors["logits"] = out.logits
    for name in buffer_names:
        tensors[f"buffer:{name}"] = out.buffers[name].tensor
    return tensors


def _peer_student_ranks(layout: ParallelLayout) -> list[int]:
    student_dp = layout.student_world // layout.tp
    return [layout.global_rank(role=STUDENT, dp_rank=d, tp_rank=layout.tp_rank)
            for d in range(layout.dp_rank, student_dp, layout.dp)]


def peer_teacher_rank(layout: ParallelLayout) -> int:
    teacher_dp = layout.teacher_ranks // layout.tp
    return layout.global_rank(role=TEACHER, dp_rank=layout.dp_rank % teacher_dp,
                              tp_rank=layout.tp_rank)


def _encode_header(tensors: list[torch.Tensor]) -> torch.Tensor:
    header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
    values = [len(tensors)]
    for t in tensors:
        values += [_DTYPES.index(t.dtype), t.ndim, *t.shape]
    if len(values) > _HEADER_LEN:
        raise TeacherStreamError("too many teacher tensors to describe in one header")
    header[: len(values)] = torch.tensor(values)
    return header


def _decode_header(header: torch.Tensor) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    values = header.tolist()
    specs, pos = [], 1
    for _ in range(values[0]):
        dtype, ndim = _DTYPES[values[pos]], values[pos + 1]
        specs.append((dtype, tuple(values[pos + 2: pos + 2 + ndim])))
        pos += 2 + ndim
    return specs


ACK_STOP, ACK_CONTINUE = 0, 1


class _StudentLink:
    """The teacher's side of one student: sends in flight, and the student's acknowledgements.

    The student acknowledges every micro-batch it has consumed (stop or continue); the teacher sends
    micro-batch j only after the acknowledgement of j - prefetch, so it runs at most `prefetch`
    ahead, and it learns at once when the students stop early (preemption)."""

    def __init__(self, peer: int, device: torch.device):
        self.peer, self.device = peer, device
        self.sent = self.acked = 0
        self.pending: collections.deque = collections.deque()  # (works, tensors) per micro-batch
        self.stopped = False
        self.announced = False

    def _receive_ack(self) -> None:
        ack = torch.zeros(1, dtype=torch.int64, device=self.device)
        C.recv(ack, src=self.peer)
        self.acked += 1
        works, _ = self.pending.popleft()  # the student had it before acknowledging
        for work in works:
            work.wait()
        self.stopped = int(ack.item()) == ACK_STOP

    def ready(self, prefetch: int) -> bool:
        """Wait until another micro-batch may be sent; False once the student has stopped."""
        while not self.stopped and self.sent - self.acked >= prefetch:
            self._receive_ack()
        return not self.stopped

    def send(self, tensors: list[torch.Tensor]) -> None:
        if not self.announced:
            C.send(_encode_header(tensors[1:]).to(self.device), dst=self.peer)
            self.announced = True
        self.pending.append(([C.isend(t, dst=self.peer) for t in tensors], tensors))
        self.sent += 1

    def close(self) -> None:
        """Collect the outstanding acknowledgements, then wait for every send to complete."""
        while not self.stopped and self.acked < self.sent:
            self._receive_ack()
        for works, _ in self.pending:  # after a stop the student drains what it had posted
            for work in works:
                work.wait()
        self.pending.clear()


def serve_teacher(teacher: ColocatedTeacher, layout: ParallelLayout, *, names: list[str],
                  batches_for: Callable[[int], Iterator[dict]], prefetch: int) -> int:
    """Teacher-rank loop: stream outputs for every micro-batch of each served student rank.

    `batches_for(student_dp_rank)` yields that student's micro-batches in training order. Students
    are served in turn, at most `prefetch` micro-batches ahead of each; the loop ends when every
    stream is done or its student stopped. Returns the number of micro-batches sent.
    """
    student_dp = layout.student_world // layout.tp
    links = {p: _StudentLink(p, layout.device) for p in _peer_student_ranks(layout)}
    streams = {p: batches_for((p - layout.tp_rank) // layout.tp % student_dp) for p in links}
    while streams:
        for peer in list(streams):
            batch = next(streams[peer], None) if links[peer].ready(prefetch) else None
            if batch is None:
                del streams[peer]
                continue
            batch = to_device(batch, layout.device)
            out = teacher(batch)
            links[peer].send([token_checksum(batch["input_ids"]).to(layout.device)] +
                             [out[n].detach().contiguous().to(layout.device) for n in names])
    for link in links.values():
        link.close()
    if any(link.stopped for link in links.values()):
        log.info("teacher rank %d: the students stopped early", layout.rank)
    return sum(link.sent for link in links.values())


class RemoteTeacher:
    """Student side of `serve_teacher`: receives the teacher tensors for each micro-batch, with
    receives posted up to `prefetch` micro-batches ahead so the teacher never waits on us, and
    acknowledges each consumed micro-batch (the last one of a step after the stop vote, through
    `end_step`). `close()` at the end of training."""

    def __init__(self, layout: ParallelLayout, *, names: list[str], prefetch: int, total: int):
        self.layout, self.names, self.prefetch = layout, names, prefetch
        self.unposted = total  # micro-batches the teacher will still send us
        self.src = peer_teacher_rank(layout)
        self.specs: list | None = None
        self.posted: collections.deque = collections.deque()
        self.unacked = False  # the last micro-batch handed out awaits its acknowledgement
        self.acks: list[tuple[object, torch.Tensor]] = []

    def _post_one(self) -> None:
        checksum = torch.zeros(1, dtype=torch.int64, device=self.layout.device)
        bufs = [torch.empty(shape, dtype=dtype, device=self.layout.device)
                for dtype, shape in self.specs]
        works = [C.irecv(checksum, src=self.src)] + [C.irecv(b, src=self.src) for b in bufs]
        self.posted.append((works, checksum, bufs))

    def _acknowledge(self, flag: int) -> None:
        if self.unacked:
            ack = torch.full((1,), flag, dtype=torch.int64, device=self.layout.device)
            self.acks.append((C.isend(ack, dst=self.src), ack))
            self.unacked = False

    def end_step(self, *, stop: bool) -> None:
        """After the step's stop vote: acknowledge the step's last micro-batch. On a stop, first
        receive what was posted ahead (the teacher is sending it) so nothing is left in flight."""
        if stop:
            while self.posted:
                for work in self.posted.popleft()[0]:
                    work.wait()
        self._acknowledge(ACK_STOP if stop else ACK_CONTINUE)

    def close(self) -> None:
        for work, _ in self.acks:
            work.wait()
        self.acks.clear()

    def __call__(self, micro_batch: dict) -> dict[str, torch.Tensor]:
        self._acknowledge(ACK_CONTINUE)
        if self.specs is None:
            header = torch.zeros(_HEADER_LEN, dtype=torch.int64, device=self.layout.device)
            C.recv(header, src=self.src)
            self.specs = _decode_header(header.cpu())
        while len(self.posted) < self.prefetch and self.unposted > 0:
            self._post_one()
            self.unposted -= 1
        if not self.posted:
            raise TeacherStreamError("the student asked for more micro-batches than the teacher sends")
        works, checksum, bufs = self.posted.popleft()
        for work in works:
            work.wait()
        expected = token_checksum(micro_batch["input_ids"]).to(checksum.device)
        if not torch.equal(checksum, expected):
            raise TeacherStreamError(
                f"teacher rank {self.src} sent outputs for other tokens (checksum "
                f"{checksum.item()} != {expected.item()}): teacher and student data are misaligned")
        self.unacked = True
        return dict(zip(self.names, bufs))
