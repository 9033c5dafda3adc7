"""Teacher ranks: the teacher runs on its own ranks and streams each micro-batch's outputs.

The teacher runs on `parallel.teacher_ranks` ranks (at its own TP degree `parallel.teacher_tp`):
`serve_teacher` is the teacher side, `RemoteTeacher` the students' source. The teacher streams each
micro-batch's outputs to the student ranks with asynchronous point-to-point sends, up to
`prefetch` micro-batches ahead. Only this module knows a wire format (`_Wire`): a header with the
shapes once, then per micro-batch a tag (a checksum of its token ids, where a mismatch stops the
run, and the signal the teacher rank received, if any, which the students then act on as their
own: preemption reaches the job from any rank), the teacher's final hidden states
`[batch, seq, H_t]` in its compute dtype, and each activation buffer in the layout of the
receiving student rank. Never logits: each student rank holds its vocabulary
shard of the teacher's output weight (`load_teacher_head`, read once from the teacher checkpoint
at any saved TP) and forms the teacher's logits itself. (`distill.teacher_stream=logits` sends
logit shards instead: the older protocol, kept as the benchmark's baseline.) A teacher with another
tokenizer (`distill.cross_tokenizer`) streams no head output but its statistics of the
micro-batch that the chunk term needs (distill/cross_tokenizer.py STATS, computed on the teacher
ranks by `ChunkStatsTeacher` from their own copy of the paired data), and its buffers already
taken at the chunk ends.

Teacher rank (dp d, tp t) serves the student ranks (dp d + k * teacher_dp, tp t + j * teacher_tp)
for every k and j, and every CP rank c of theirs with c % teacher_cp equal to its own CP rank,
so the teacher's DP degree must divide the students'. A context-parallel teacher
(`parallel.teacher_cp`) runs its CP rank's chunks of each sequence and all-gathers its outputs
over its CP group (whole sequences, as a teacher without CP has them); a context-parallel student
rank gets its chunks (`layers.context.cp_positions`) of the head output and buffers, and the
checksum of its chunks' token ids, whatever the two CP degrees.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from distill.config import SINGLE_TEACHER
from distill.teacher import StageTeacher, TeacherOutputs, TeacherRequest, token_checksum
from distill.teacher_sources import ColocatedTeacher
from engine import collectives as C
from engine.data import to_device
from engine.log import get_logger
from engine.parallel import STUDENT, TEACHER, ParallelLayout
from engine.signals import PreemptionFlag
from layers.context import cp_positions, global_order, split_for_cp
from layers.stages import StagePlan
from layers.tensor_parallel import SEQ_DIM, VocabParallelLMHead

log = get_logger(__name__)

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


class TeacherStreamError(RuntimeError):
    """The teacher's stream does not match what the student is training on."""


def stream_request(request: TeacherRequest, stream: Literal["hidden", "logits"]) -> TeacherRequest:
    """What the teacher ranks compute for students that need `request`: with `hidden` streaming,
    the head input whenever the objective needs the teacher's logits (fused or not)."""
    if stream == "hidden" and request.head != "none":
        return dataclasses.replace(request, head="hidden")
    return request


@dataclass(frozen=True)
class _Wire:
    """What travels per micro-batch after the checksum, in order: the teacher's head output (its
    final hidden states `[batch, seq, H_t]`, or with `logits` streaming its logit shard), then each
    activation buffer in the layout of the receiving student rank."""

    head: str | None  # TeacherOutputs field name
    buffers: tuple[str, ...]  # teacher buffer names
    stats: tuple[str, ...] = ()  # cross_tokenizer: chunk statistics, sent before the buffers

    @classmethod
    def of(cls, request: TeacherRequest) -> _Wire:
        if request.chunk_stats:  # the statistics replace the head output
            return cls(head=None, buffers=request.buffers, stats=request.chunk_stats)
        head = {"logits": "logits", "hidden": "head_hidden", "none": None}[request.head]
        return cls(head=head, buffers=request.buffers)

    def whole(self, outputs: TeacherOutputs, layout: ParallelLayout) -> list[torch.Tensor]:
        """The head output (or the chunk statistics) and each buffer whole over the sequence (a
        sequence-parallel teacher's shards are gathered, and a context-parallel teacher's chunks:
        every TP and CP rank of the teacher calls this for each micro-batch)."""
        tensors = [] if self.head is None else [getattr(outputs, self.head).detach()]
        tensors += [outputs.chunk_stats[name] for name in self.stats]
        for name in self.buffers:
            buffer = outputs.buffers[name]
            tensor = buffer.tensor.detach()
            if buffer.seq_sharded:
                tensor = C.all_gather(tensor, layout.tp_group, dim=buffer.seq_dim)
            tensors.append(tensor)
        if layout.cp > 1:
            tensors = [global_order(C.all_gather(t, layout.cp_group, dim=SEQ_DIM), layout.cp,
                                    dim=SEQ_DIM) for t in tensors]
        return tensors

    def for_student(self, whole: list[torch.Tensor], *, seq_shards: int, shard: int,
                    chunks: torch.Tensor | None = None) -> list[torch.Tensor]:
        """`whole` as student rank `shard` of `seq_shards` consumes it: the head output (or the
        chunk statistics) as is, each buffer cut to that rank's sequence shard (`seq_shards` > 1
        under the students' SP); with `chunks` (a CP student's positions) both taken at those
        positions first (no chunk statistics then: another tokenizer does not combine with CP)."""
        if chunks is not None:
            whole = [t.index_select(SEQ_DIM, chunks.to(t.device)) for t in whole]
        n_head = int(self.head is not None) + len(self.stats)
        cut = [b.chunk(seq_shards, dim=SEQ_DIM)[shard] for b in whole[n_head:]]
        return [t.contiguous() for t in whole[:n_head] + cut]

    def unflatten(self, tensors: list[torch.Tensor]) -> TeacherOutputs:
        out = TeacherOutputs()
        if self.head is not None:
            setattr(out, self.head, tensors.pop(0))
        if self.stats:
            out.chunk_stats = dict(zip(self.stats, tensors[:len(self.stats)]))
        for name, tensor in zip(self.buffers, tensors[len(self.stats):]):
            out.buffers[name] = tensor  # in the student's layout already
        return out


def _encode_specs(tensors: list[torch.Tensor]) -> torch.Tensor:
    values = [len(tensors)]
    for t in tensors:
        values += [_DTYPES.index(t.dtype), t.ndim, *t.shape]
    return torch.tensor(values, dtype=torch.int64)


def _decode_specs(values: list[int], pos: int = 0) -> tuple[list[tuple[torch.dtype, tuple]], int]:
    specs = []
    count, pos = values[pos], pos + 1
    for _ in range(count):
        dtype, ndim = _DTYPES[values[pos]], values[pos + 1]
        specs.append((dtype, tuple(values[pos + 2: pos + 2 + ndim])))
        pos += 2 + ndim
    return specs, pos


ACK_STOP, ACK_CONTINUE = 0, 1


class _StudentLink:
    """The teacher's side of one student: sends in flight, and the student's acknowledgements.

    The student acknowledges every micro-batch it has consumed (stop or continue); the teacher sends
    micro-batch j only after the acknowledgement of j - prefetch, so it runs at most `prefetch`
    ahead, and it learns at once when the students stop early (preemption)."""

    def __init__(self, peer: int, device: torch.device, *, shard: int, stage: int = 0,
                 cp_rank: int = 0):
        self.peer, self.device, self.shard = peer, device, shard  # shard: the student's TP rank
        self.stage, self.cp_rank = stage, cp_rank  # the student's pipeline and CP ranks
        self.sent = self.acked = 0
        self.pending: collections.deque = collections.deque()  # (works, tensors) per micro-batch
        self.stopped = False
        self.announced = False

    def _receive_ack(self) -> None:
        ack = torch.zeros(1, dtype=torch.int64, device=self.device)
        C.recv(ack, src=self.peer, channel="teacher")
        self.acked += 1
        works, _ = self.pending.popleft()  # the student had it before acknowledging
        for work in works:
            work.wait()
        self.stopped = int(ack.item()) == ACK_STOP

    def receive_samples(self, like: torch.Tensor) -> torch.Tensor | None:
        """The token ids of an on-policy micro-batch, which the student sends right after
        acknowledging the one before (so every acknowledgement is taken first); None once the
        student has stopped."""
        while not self.stopped and self.acked < self.sent:
            self._receive_ack()
        if self.stopped:
            return None
        return C.recv(torch.empty_like(like), src=self.peer, channel="teacher")

    def ready(self, prefetch: int) -> bool:
        """Wait until another micro-batch may be sent; False once the student has stopped."""
        while not self.stopped and self.sent - self.acked >= prefetch:
            self._receive_ack()
        return not self.stopped

    def announce(self, per_batch: list[torch.Tensor]) -> None:
        """Once per run: the header (its length, then the specs of the per-micro-batch tensors)."""
        header = _encode_specs(per_batch).to(self.device)
        C.send(torch.tensor([header.numel()], dtype=torch.int64, device=self.device), dst=self.peer,
               channel="teacher")
        C.send(header, dst=self.peer, channel="teacher")
        self.announced = True

    def send(self, tensors: list[torch.Tensor]) -> None:
        self.pending.append(([C.isend(t, dst=self.peer, channel="teacher") for t in tensors],
                             tensors))
        self.sent += 1

    def close(self) -> None:
        """Collect the outstanding acknowledgements, then wait for every send to complete."""
        while not self.stopped and self.acked < self.sent:
            self._receive_ack()
        for works, _ in self.pending:  # after a stop the student drains what it had posted
            for work in works:
                work.wait()
        self.pending.clear()


def stage_request(request: TeacherRequest, pairs: Sequence, plan: StagePlan) -> TeacherRequest:
    """What one student pipeline rank (`plan`) needs of the teacher: the head outputs on the last
    stage, and the teacher buffers of the activation pairs whose student buffer it publishes."""
    mine = {p.teacher for p in pairs if plan.runs(plan.buffer_stage(p.student))}
    return dataclasses.replace(request, head=request.head if plan.has_head else "none",
                               buffers=tuple(sorted(mine & set(request.buffers))))


def _served_links(layout: ParallelLayout, stages: int) -> dict[int, list[_StudentLink]]:
    """Teacher side: the links of this teacher rank, by student DP rank. Teacher replica d serves
    student replicas d, d + teacher_dp, ...; within one, teacher TP rank t serves the student TP
    ranks t, t + teacher_tp, ... of each of the replica's `stages` pipeline stages, and of their CP
    ranks c, c + teacher_cp, ... from its own CP rank c."""
    return {d: [_StudentLink(layout.global_rank(role=STUDENT, tp=s, pp=p, dp=d, cp=c),
                             layout.device, shard=s, stage=p, cp_rank=c)
                for p in range(stages) for c in range(layout.cp_rank, layout.students.cp, layout.cp)
                for s in range(layout.tp_rank, layout.students.tp, layout.tp)]
            for d in range(layout.dp_rank, layout.students.dp, layout.dp)}


def peer_teacher_rank(layout: ParallelLayout) -> int:
    """Student side: the teacher rank that streams to this student rank."""
    return layout.global_rank(role=TEACHER, tp=layout.tp_rank % layout.teacher_tp,
                              dp=layout.dp_rank % layout.teachers.dp,
                              cp=layout.cp_rank % layout.teachers.cp)


def _agree(ok: bool, layout: ParallelLayout) -> bool:
    """Whether every TP and CP rank of this teacher replica, and under `teacher_ep` every rank of
    its EP group, says go (they run each forward together: the CP ranks gather keys and values in
    it, the EP ranks exchange tokens): the minimum over TP, then CP, then EP."""
    flag = torch.tensor([int(ok)], dtype=torch.int64, device=layout.device)
    C.all_reduce(flag, layout.tp_group, op="min")
    C.all_reduce(flag, layout.cp_group, op="min")
    return bool(C.all_reduce(flag, layout.ep_group, op="min").item())


def serve_teacher(teacher: ColocatedTeacher, layout: ParallelLayout, *,
                  batches_for: Callable[[int], Iterator[dict]], prefetch: int,
                  student_sp: bool = False,
                  stage_requests: Sequence[TeacherRequest] | None = None,
                  on_policy: Callable[[int], bool] | None = None,
                  preempted: PreemptionFlag | None = None) -> tuple[int, bool]:
    """Teacher-rank loop: stream outputs for every micro-batch of each served student replica.

    `batches_for(student_dp_rank)` yields that replica's micro-batches in training order;
    `student_sp`: the students run sequence parallelism (each gets its sequence shard of the
    buffers). Replicas are served in turn, at most `prefetch` micro-batches ahead of each; the
    TP ranks of this teacher replica run each forward together and each sends to its own student
    ranks. Under student PP the teacher runs each micro-batch once and sends each pipeline rank
    of the replica what `stage_requests[pp_rank]` asks. `on_policy(k)`: whether a replica's k-th
    micro-batch (counted from the stream's start) is one the students continue themselves; its
    token ids then come from the replica's first rank (TP rank 0 of stage 0, received by this
    replica's TP rank 0 and broadcast over its TP group), so the teacher cannot run ahead of it.
    Under `teacher_ep` the replicas of one EP group take each decision together, so their
    forwards (which exchange tokens) stay paired: they serve equally many streams of equally many
    micro-batches.
    A signal this rank received (`preempted`) is sent with each micro-batch's tag from then on;
    the students stop at their next step boundary. The loop ends when every stream is done or its
    students stopped. Returns the number of micro-batches sent (per stage) and whether the
    students stopped before a stream was done.
    """
    wires = [_Wire.of(r) for r in (stage_requests or [teacher.request])]
    links = _served_links(layout, len(wires))
    streams = {d: batches_for(d) for d in links}
    served = dict.fromkeys(links, 0)  # micro-batches taken from each stream
    seq_shards = layout.students.tp if student_sp else 1
    early = False
    while streams:
        for d in list(streams):
            go = _agree(all([link.ready(prefetch) for link in links[d]]), layout)
            batch = next(streams[d], None)
            if batch is None or not go:
                early |= batch is not None
                del streams[d]
                continue
            batch = to_device(batch, layout.device)
            if on_policy is not None and on_policy(served[d]):
                batch = _with_samples(batch, links[d], layout)
                if batch is None:  # the students stopped before sending them
                    early = True
                    del streams[d]
                    continue
            served[d] += 1
            mine = batch if layout.cp == 1 else split_for_cp(batch, layout.cp, layout.cp_rank)
            (out,) = teacher(mine).values()  # teacher ranks serve one teacher
            whole = [wire.whole(out, layout) for wire in wires]
            for link in links[d]:
                chunks = _cp_chunks(batch, layout.students.cp, link.cp_rank)
                per_batch = wires[link.stage].for_student(whole[link.stage], seq_shards=seq_shards,
                                                          shard=link.shard, chunks=chunks)
                if not link.announced:
                    link.announce(per_batch)
                ids = batch["input_ids"] if chunks is None else batch["input_ids"][:, chunks]
                link.send([_tag(ids, preempted).to(layout.device), *per_batch])
    every = [link for served in links.values() for link in served]
    for link in every:
        link.close()
    if early:
        log.info("teacher rank %d: the students stopped early", layout.rank)
    return sum(link.sent for link in every) // len(wires), early


def _cp_chunks(batch: dict, cp: int, cp_rank: int) -> torch.Tensor | None:
    """The positions CP rank `cp_rank` of `cp` holds of the batch's sequences (None without CP)."""
    return None if cp == 1 else cp_positions(batch["input_ids"].shape[1], cp, cp_rank)


def _tag(input_ids: torch.Tensor, preempted: PreemptionFlag | None) -> torch.Tensor:
    """A micro-batch's tag, int64 [2]: the checksum of the token ids the student holds, and the
    signal this teacher rank received (0 if none)."""
    signum = 0 if preempted is None or preempted.received is None else int(preempted.received)
    return torch.cat([token_checksum(input_ids), torch.tensor([signum])])


def _with_samples(batch: dict, links: list[_StudentLink], layout: ParallelLayout) -> dict | None:
    """`batch` with the students' own token ids (see `serve_teacher`); None if they stopped."""
    first = layout.tp_rank == 0  # its first link is the replica's TP rank 0 of stage 0
    ids = links[0].receive_samples(batch["input_ids"]) if first else None
    if not _agree(ids is not None or not first, layout):
        return None
    ids = batch["input_ids"].clone() if ids is None else ids
    src = layout.global_rank(tp=0, dp=layout.dp_rank)
    return {**batch, "input_ids": C.broadcast(ids, layout.tp_group, src=src)}


class RemoteTeacher:
    """Student side of `serve_teacher`: receives the teacher outputs for each micro-batch, with
    receives posted up to `prefetch` micro-batches ahead so the teacher never waits on us, and
    acknowledges each consumed micro-batch (the last one of a step after the stop vote, through
    `end_step`). The header (the shapes) arrives once, before the first micro-batch.

    With `hidden` streaming, `head` is this rank's frozen shard of the teacher's output layer
    (`load_teacher_head`, soft-capped as the teacher is): the teacher's logits shard is formed
    here from the received hidden states, or (fused `request`) the hidden states, the head's
    weight and its soft-cap go to the fused loss.
    Under PP each stage has its own stream, so every stage calls it for each micro-batch. A
    signal the teacher rank sends along is recorded in `preempted`, this rank's own flag."""

    reaches_every_stage = True

    def __init__(self, layout: ParallelLayout, request: TeacherRequest, *, prefetch: int,
                 total: int, stream: Literal["hidden", "logits"] = "hidden",
                 head: VocabParallelLMHead | None = None,
                 on_policy: Callable[[int], bool] | None = None,
                 preempted: PreemptionFlag | None = None):
        wire_request = stream_request(request, stream)
        if wire_request.head == "hidden" and head is None and not wire_request.chunk_stats:
            raise ValueError("hidden streaming needs the teacher's output layer shard (head=)")
        self.layout, self.request, self.head = layout, request, head
        self.preempted = preempted
        self.wire, self.prefetch = _Wire.of(wire_request), prefetch
        self.unposted = total  # micro-batches the teacher will still send us
        self.src = peer_teacher_rank(layout)
        # on_policy(k): whether our k-th micro-batch holds our own samples, which the replica's
        # first rank (TP rank 0 of stage 0) sends the teacher (see serve_teacher)
        self.on_policy, self.calls = on_policy, 0
        self.sends_samples = on_policy is not None and layout.tp_rank == 0 and layout.pp_rank == 0
        self.specs: list | None = None  # (dtype, shape) of each per-micro-batch tensor
        self.posted: collections.deque = collections.deque()
        self.unacked = False  # the last micro-batch handed out awaits its acknowledgement
        self.acks: list[tuple[object, torch.Tensor]] = []

    def _receive_header(self) -> None:
        device = self.layout.device
        length = C.recv(torch.zeros(1, dtype=torch.int64, device=device), src=self.src,
                        channel="teacher")
        header = C.recv(torch.zeros(int(length.item()), dtype=torch.int64, device=device),
                        src=self.src, channel="teacher").tolist()
        self.specs, _ = _decode_specs(header)

    def _post_one(self) -> None:
        tag = torch.zeros(2, dtype=torch.int64, device=self.layout.device)  # see _tag
        bufs = [torch.empty(shape, dtype=dtype, device=self.layout.device)
                for dtype, shape in self.specs]
        works = [C.irecv(tag, src=self.src, channel="teacher")]
        works += [C.irecv(b, src=self.src, channel="teacher") for b in bufs]
        self.posted.append((works, tag, bufs))

    def _acknowledge(self, flag: int) -> None:
        if self.unacked:
            ack = torch.full((1,), flag, dtype=torch.int64, device=self.layout.device)
            self.acks.append((C.isend(ack, dst=self.src, channel="teacher"), ack))
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

    def stage_parts(self) -> dict[str, StageTeacher]:
        return {}

    def __call__(self, micro_batch: Mapping[str, torch.Tensor]) -> dict[str, TeacherOutputs]:
        self._acknowledge(ACK_CONTINUE)
        if self.sends_samples and self.on_policy(self.calls):  # after the acknowledgement
            C.send(micro_batch["input_ids"], dst=self.src, channel="teacher")
        self.calls += 1
        if self.specs is None:
            self._receive_header()
        while len(self.posted) < self.prefetch and self.unposted > 0:
            self._post_one()
            self.unposted -= 1
        if not self.posted:
            raise TeacherStreamError("the student asked for more micro-batches than the teacher "
                                     "sends")
        works, tag, bufs = self.posted.popleft()
        for work in works:
            work.wait()
        checksum, signum = tag[:1], int(tag[1].item())
        if signum and self.preempted is not None:
            self.preempted.record(signum)
        expected = token_checksum(micro_batch["input_ids"]).to(checksum.device)
        if not torch.equal(checksum, expected):
            raise TeacherStreamError(
                f"teacher rank {self.src} sent outputs for other tokens (checksum "
                f"{checksum.item()} != {expected.item()}): teacher and student data are misaligned")
        self.unacked = True
        return {SINGLE_TEACHER: self._with_head(self.wire.unflatten(bufs))}

    @torch.no_grad()
    def _with_head(self, out: TeacherOutputs) -> TeacherOutputs:
        """The received hidden states as the objective asked for the teacher's head (with chunk
        statistics: the head's weight shard, for mapped_kl's logits at the single chunks)."""
        if out.chunk_stats is not None and self.head is not None:
            out.output_weight, out.softcap = self.head.weight_shard(), self.head.softcap
        if out.head_hidden is None:
            return out
        if self.request.head == "logits":
            out.logits, out.head_hidden = self.head(out.head_hidden), None
        else:
            out.output_weight, out.softcap = self.head.weight_shard(), self.head.softcap
        return out
