"""The one collective module: every byte that crosses processes goes through here.

Works on both backends with the native op on each: with torch 2.13 gloo (CPU) runs all_reduce,
all_gather, gather, broadcast, send/recv, reduce_scatter and all_to_all_single, as NCCL does, so
nothing here is emulated (torch's gloo backend itself runs reduce_scatter_tensor as a clone of the
input, an all_reduce and a copy of the chunk, so on CPU it costs what all_reduce does; NCCL's
writes only the slice). A `group` of `None` or of size 1 means "no communication": every function
then returns its input unchanged (or a view of it).

`count_collectives()` records calls and bytes per kind while it is active; bytes are the payload
this rank hands to the collective (its input tensor's size: for reduce_scatter the full tensor it
contributes to the sum, for all_to_all_single everything it sends, its own part included), whatever
the backend does underneath. Given names for the run's groups (`groups={"tp": layout.tp_group,
...}`) it also records them per (group, kind); point-to-point messages have no group and count
under the `channel` their caller names ("pp" for the pipeline, "teacher" for the teacher stream).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None

# torch renamed the flat-buffer collectives; use whichever this release has.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


@dataclass
class CollectiveCounts:
    """Calls and bytes per collective kind, recorded while a `count_collectives()` block runs."""

    calls: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    group_calls: Counter = field(default_factory=Counter)  # (group name, kind) -> calls
    group_bytes: Counter = field(default_factory=Counter)  # (group name, kind) -> bytes
    # the process groups to name, by identity; groups not listed count as "other"
    names: dict = field(default_factory=dict, repr=False)

    def group_name(self, group: Group | str) -> str:
        if isinstance(group, str):
            return group
        return self.names.get(id(group), "other")

    def bytes_per_group(self) -> dict[str, int]:
        """Bytes summed over kinds, per group name."""
        totals: Counter = Counter()
        for (name, _), nbytes in self.group_bytes.items():
            totals[name] += nbytes
        return dict(totals)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


# Active counters (instrumentation only, never parallel state); nested blocks all record.
_active_counters: list[CollectiveCounts] = []


@contextlib.contextmanager
def count_collectives(groups: dict[str, Group] | None = None) -> Iterator[CollectiveCounts]:
    """Record every collective of the block; `groups` names the process groups to count apart
    (the first name given to a group object wins, so list the specific ones first)."""
    names: dict[int, str] = {}
    for name, group in (groups or {}).items():
        if group is not None:
            names.setdefault(id(group), name)
    counts = CollectiveCounts(names=names)
    _active_counters.append(counts)
    try:
        yield counts
    finally:
        _active_counters[:] = [c for c in _active_counters if c is not counts]


def record(kind: str, tensor: torch.Tensor, group: Group | str) -> None:
    """Count one collective of `kind` on `tensor` (this rank's payload) in the active counters;
    the wrappers here call it, and so does communication that torch runs itself (DDP's hook)."""
    if not _active_counters:
        return
    nbytes = tensor.numel() * tensor.element_size()
    for counts in _active_counters:
        counts.calls[kind] += 1
        counts.bytes[kind] += nbytes
        key = (counts.group_name(group), kind)
        counts.group_calls[key] += 1
        counts.group_bytes[key] += nbytes


def group_size(group: Group) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: Group) -> int:
    if group is None or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def all_reduce(tensor: torch.Tensor, group: Group, *, op: str = "sum") -> torch.Tensor:
    """Reduce `tensor` in place over `group` (`op` in sum|max|min) and return it."""
    if group_size(group) == 1:
        return tensor
    record("all_reduce", tensor, group)
    dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=group)
    return tensor


def all_gather(tensor: torch.Tensor, group: Group, *, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's `tensor` (all the same shape) along `dim`, in rank order."""
    world = group_size(group)
    if world == 1:
        return tensor
    record("all_gather", tensor, group)
    tensor = tensor.contiguous()
    out = torch.empty((world * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype,
                      device=tensor.device)
    _all_gather_single(out, tensor, group=group)
    if dim == 0:
        return out
    return torch.cat(out.chunk(world, dim=0), dim=dim)


def gather(tensor: torch.Tensor, group: Group, *, dst: int) -> torch.Tensor | None:
    """Every rank's `tensor` (all the same shape) concatenated along dim 0, in rank order, on
    global rank `dst` only (None on the others, which allocate nothing)."""
    world = group_size(group)
    if world == 1:
        return tensor
    record("gather", tensor, group)
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world)] if dist.get_rank() == dst else None
    dist.gather(tensor, parts, dst=dst, group=group)
    return None if parts is None else torch.cat(parts)


def split_along(tensor: torch.Tensor, group: Group, *, dim: int) -> torch.Tensor:
    """This rank's equal slice of `tensor` along `dim` (no communication)."""
    world = group_size(group)
    if world == 1:
        return tensor
    size = tensor.shape[dim]
    if size % world:
        raise ValueError(f"dimension {dim} of size {size} does not split over {world} ranks")
    return tensor.narrow(dim, group_rank(group) * (size // world), size // world)


def reduce_scatter(tensor: torch.Tensor, group: Group, *, dim: int = 0) -> torch.Tensor:
    """Sum `tensor` over `group` and keep this rank's equal slice along `dim`."""
    world = group_size(group)
    if world == 1:
        return tensor
    if tensor.shape[dim] % world:
        raise ValueError(f"dimension {dim} of size {tensor.shape[dim]} does not split over {world} ranks")
    record("reduce_scatter", tensor, group)
    moved = tensor.movedim(dim, 0).contiguous()
    out = torch.empty((moved.shape[0] // world, *moved.shape[1:]), dtype=tensor.dtype,
                      device=tensor.device)
    _reduce_scatter_single(out, moved, group=group)
    return out.movedim(0, dim).contiguous()


def all_to_all_single(tensor: torch.Tensor, group: Group, *, send_splits: list[int] | None = None,
                      recv_splits: list[int] | None = None) -> torch.Tensor:
    """Send rows `send_splits[r]` of `tensor` (dim 0, in order) to group rank r and return the rows
    received, concatenated in rank order (`recv_splits[r]` from rank r). Without splits every rank
    sends and receives equal parts of dim 0."""
    world = group_size(group)
    if world == 1:
        return tensor
    if (send_splits is None) != (recv_splits is None):
        raise ValueError("give both send_splits and recv_splits, or neither")
    if send_splits is None and tensor.shape[0] % world:
        raise ValueError(f"dimension 0 of size {tensor.shape[0]} does not split over {world} ranks")
    if send_splits is not None and (len(send_splits) != world or len(recv_splits) != world
                                    or sum(send_splits) != tensor.shape[0]):
        raise ValueError(f"splits {send_splits} / {recv_splits} do not fit dimension 0 of size "
                         f"{tensor.shape[0]} over {world} ranks")
    record("all_to_all", tensor, group)
    rows = tensor.shape[0] if recv_splits is None else sum(recv_splits)
    out = torch.empty((rows, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    dist.all_to_all_single(out, tensor.contiguous(), output_split_sizes=recv_splits,
                           input_split_sizes=send_splits, group=group)
    return out


def broadcast(tensor: torch.Tensor, group: Group, *, src: int) -> torch.Tensor:
    """Overwrite `tensor` in place with global rank `src`'s copy and return it."""
    if group_size(group) == 1:
        return tensor
    record("broadcast", tensor, group)
    dist.broadcast(tensor, src=src, group=group)
    return tensor


def send(tensor: torch.Tensor, *, dst: int, group: Group = None, channel: str = "p2p") -> None:
    record("send", tensor, channel)
    dist.send(tensor.contiguous(), dst=dst, group=group)


def recv(tensor: torch.Tensor, *, src: int, group: Group = None,
         channel: str = "p2p") -> torch.Tensor:
    record("recv", tensor, channel)
    dist.recv(tensor, src=src, group=group)
    return tensor


def isend(tensor: torch.Tensor, *, dst: int, group: Group = None,
          channel: str = "p2p") -> dist.Work:
    """Asynchronous send; keep `tensor` alive until the returned work is waited on."""
    record("send", tensor, channel)
    return dist.isend(tensor, dst=dst, group=group)


def irecv(tensor: torch.Tensor, *, src: int, group: Group = None,
          channel: str = "p2p") -> dist.Work:
    record("recv", tensor, channel)
    return dist.irecv(tensor, src=src, group=group)


def exchange(sends: list[tuple[torch.Tensor, int]], receives: list[tuple[torch.Tensor, int]], *,
             channel: str = "p2p") -> tuple[list[dist.Work], list[dist.Work]]:
    """Post point-to-point sends and receives (peers are global ranks) as ONE batch and return
    (send works, receive works). Batching is what lets two ranks send to each other and receive
    from each other at the same time on NCCL without deadlock; on gloo it is isend/irecv. Keep
    every tensor alive until its work is waited on. Counted as "send" and "recv" on `channel`."""
    for tensor, _ in sends:
        record("send", tensor, channel)
    for tensor, _ in receives:
        record("recv", tensor, channel)
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer) for t, peer in receives]
    works = dist.batch_isend_irecv(ops) if ops else []
    return works[:len(sends)], works[len(sends):]


def barrier(group: Group = None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)
