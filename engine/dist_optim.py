"""The distributed optimizer (ZeRO-1, `train.distributed_optimizer`): AdamW whose states are
sharded over data parallelism.

Layout. The parameters are grouped as `engine.optim.build_adamw` groups them (matrices with weight
decay, 1-D tensors without) and, within a group, by dtype. Each (group, dtype) pair is one *bucket*:
a flat buffer holding its parameters one after another in model order, zero-padded at the end to a
multiple of DP; every parameter's `.data` becomes a view into its bucket. DP rank r owns elements
[r*S, (r+1)*S) of every bucket (S = padded size / DP) and keeps the AdamW moments (`exp_avg`,
`exp_avg_sq`, flat, S elements each) of exactly that slice, so optimizer-state bytes per rank are
1/DP of the replicated optimizer's plus at most DP-1 padding elements per bucket. TP ranks have
identical bucket layouts (their shards have equal shapes), so a DP group always slices the same
parameter elements.

A step: every rank's accumulated gradients (local micro-batches only: no DDP) are flattened per
bucket and reduce-scattered (summed) over DP through `engine.collectives` (the native op on NCCL
and on gloo); the global norm is the sum of squares over the slices, reduced over DP
and, for TP-split parameters, over TP (the replicated optimizer's rule, `engine.optim.grad_norm`);
clipping scales the slices; AdamW updates the rank's slice in place through one *segment* per
parameter (the part of a parameter inside the slice, with that parameter's own step count, so the
arithmetic is torch's AdamW element for element); the updated slices are all-gathered back into
the buckets. The parameters are the master weights: they are fp32 in this engine (bf16 is autocast
only), and a parameter of another dtype is updated in its own dtype, as torch's AdamW does.

A parameter that has no gradient on any DP rank in a step is skipped, as torch's AdamW skips a
parameter whose `.grad` is None (no moment update, no weight decay, no step count).

Checkpoints use the replicated optimizer's per-parameter form: `state_dict()` all-gathers the
moments over DP (a collective: every DP rank calls it) and returns what `torch.optim.AdamW` over the
model's parameters would return (a save gathers them to DP rank 0 only, `to_dp_rank=0`, so the
other ranks never hold the full state); `load_state_dict()` takes that form and keeps this rank's slice.
A checkpoint therefore loads at any DP degree, with the option on or off.

Expert parallelism. With `ep > 1` the routed experts' weights (tagged `expert`) go into buckets of
their own, sliced over the expert-DP group (the `dp x cp / ep` ranks holding the same experts) instead
of the DP x CP group: their gradients are reduce-scattered, their slices updated and all-gathered there.
The ranks of an EP group hold other experts in buckets of equal layout. Every expert element then
lies in exactly one rank's slice of the whole DP group, so one sum of squares over DP covers dense
slices and experts alike. The has-gradient vote and the step counts use one vector over DP in which
each EP rank fills its own copy of the expert entries. A save gathers the experts' moments to the
expert-DP group's first rank, DP x CP place `ep_rank`: the writer of that EP rank's checkpoint file (the
dense moments, in DP rank 0's file, are not repeated in the others').
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine import collectives as C
from engine.parallel import ParallelLayout
from engine.param_tags import param_tags


@dataclass
class _Segment:
    """The part of parameter `index` that lies in this rank's slice of its bucket."""

    index: int  # the parameter's position in the optimizer's flat order
    param_lo: int  # the segment's first element within the flattened parameter
    slice_lo: int  # ... and within the rank's slice
    tensor: torch.Tensor  # the view slice[slice_lo:slice_lo+n], optimized by the inner AdamW

    def of(self, flat: torch.Tensor) -> torch.Tensor:
        """The part of a slice-shaped tensor `flat` [S] that this segment covers."""
        return flat[self.slice_lo:self.slice_lo + self.tensor.numel()]


class _Bucket:
    """One flat buffer of same-group, same-dtype parameters and this rank's slice of it, sliced
    over `group` (`dp` ranks, this one at `dp_rank`; DP x CP place `first_dp` of this (TP, PP)
    position is the group's first rank)."""

    def __init__(self, params: list[tuple[int, nn.Parameter]], *, dp: int, dp_rank: int,
                 group, expert: bool = False, first_dp: int = 0):
        self.params = params  # (optimizer index, parameter)
        self.group, self.expert, self.first_dp = group, expert, first_dp
        total = sum(p.numel() for _, p in params)
        self.shard = -(-total // dp)  # S: elements per DP rank
        first = params[0][1]
        self.buffer = torch.zeros(self.shard * dp, dtype=first.dtype, device=first.device)
        self.lo = dp_rank * self.shard
        self.offsets = []
        offset = 0
        with torch.no_grad():
            for _, p in params:
                view = self.buffer[offset:offset + p.numel()].view_as(p)
                view.copy_(p.data)
                p.data = view
                self.offsets.append(offset)
                offset += p.numel()
        self.slice = self.buffer[self.lo:self.lo + self.shard]  # [S]: what this rank updates
        self.exp_avg = torch.zeros_like(self.slice)
        self.exp_avg_sq = torch.zeros_like(self.slice)
        self.grad: torch.Tensor | None = None  # [S] reduce-scattered gradient of the slice
        self.segments = []
        for (index, p), start in zip(params, self.offsets):
            lo, hi = max(start, self.lo), min(start + p.numel(), self.lo + self.shard)
            if lo < hi:
                self.segments.append(_Segment(index, lo - start, lo - self.lo,
                                              self.slice[lo - self.lo:hi - self.lo]))

    def flat_grad(self) -> torch.Tensor:
        """[S*DP] this rank's local gradients of the bucket (zeros where a parameter has none)."""
        flat = torch.zeros_like(self.buffer)
        for (_, p), start in zip(self.params, self.offsets):
            if p.grad is not None:
                flat[start:start + p.numel()].copy_(p.grad.reshape(-1))
        return flat


class ShardedAdamW:
    """AdamW with its states sharded over `layout`'s DP group (see the module docstring).

    Presents the optimizer interface the trainer and checkpoints use: `param_groups` (over the
    model's parameters, with torch AdamW's hyperparameter keys), `zero_grad`, `state_dict`,
    `load_state_dict`; the step itself is `reduce_gradients` -> `grad_squares` -> `scale_grads`
    -> `step`.
    """

    def __init__(self, groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float,
                 layout: ParallelLayout):
        self.layout = layout
        # The ranks with the same parameters: DP, and under context parallelism DP x CP (their
        # tokens differ, their gradients are summed the same way).
        self.group = layout.dp_cp_group
        self.params = [p for g in groups for p in g["params"]]
        # under EP the routed experts' own buckets (the module docstring); without, every bucket is dense
        self.expert = [layout.ep > 1 and param_tags(p).expert for p in self.params]
        self.buckets: list[list[_Bucket]] = []  # per group
        index = 0
        for group in groups:
            indexed = list(enumerate(group["params"], start=index))
            index += len(indexed)
            by_kind: dict[tuple[bool, torch.dtype], list] = {}
            for i, p in indexed:
                by_kind.setdefault((self.expert[i], p.dtype), []).append((i, p))
            self.buckets.append([self._bucket(members, expert=expert)
                                 for (expert, _), members in by_kind.items()])
        self._broadcast_buckets()
        inner_groups = [{"params": [s.tensor for b in buckets for s in b.segments],
                         "weight_decay": g["weight_decay"]}
                        for g, buckets in zip(groups, self.buckets)]
        # foreach=False: the same per-tensor arithmetic as the replicated optimizer.
        self.inner = torch.optim.AdamW(inner_groups, lr=lr, betas=betas, eps=eps, foreach=False)
        for buckets in self.buckets:
            for bucket in buckets:
                for seg in bucket.segments:
                    self.inner.state[seg.tensor] = {
                        "step": torch.tensor(0.0), "exp_avg": seg.of(bucket.exp_avg),
                        "exp_avg_sq": seg.of(bucket.exp_avg_sq)}
        self.param_groups = [dict({k: v for k, v in inner.items() if k != "params"},
                                  params=list(g["params"]))
                             for g, inner in zip(groups, self.inner.param_groups)]
        self._active = torch.zeros(len(self.params), dtype=torch.bool)

    def _bucket(self, members: list[tuple[int, nn.Parameter]], *, expert: bool) -> _Bucket:
        layout = self.layout
        dp_cp = layout.dp * layout.cp
        if expert:  # sliced over the expert-DP group: DP x CP ranks ep_rank, ep_rank + ep, ...
            return _Bucket(members, dp=dp_cp // layout.ep, dp_rank=layout.dp_cp_index // layout.ep,
                           group=layout.expert_dp_group, expert=True, first_dp=layout.ep_rank)
        return _Bucket(members, dp=dp_cp, group=self.group, dp_rank=layout.dp_cp_index)

    def _all_buckets(self) -> list[_Bucket]:
        return [b for buckets in self.buckets for b in buckets]

    def _group_rank(self, bucket: _Bucket, position: int) -> int:
        """The global rank at `position` of `bucket`'s group (same TP and PP coordinates; the
        groups run over DP x CP, DP-major)."""
        layout = self.layout
        index = bucket.first_dp + position * layout.ep if bucket.expert else position
        return layout.global_rank(tp=layout.tp_rank, pp=layout.pp_rank, dp=index // layout.cp,
                                  cp=index % layout.cp)

    def _broadcast_buckets(self) -> None:
        """Start from DP rank 0's parameters (each expert's from its expert-DP group's first
        rank), as DDP does."""
        for bucket in self._all_buckets():
            C.broadcast(bucket.buffer, bucket.group, src=self._group_rank(bucket, 0))

    def _over_dp(self, values: torch.Tensor, op: str) -> torch.Tensor:
        """Reduce per-parameter `values` over DP, each expert entry only over the ranks holding
        that expert: one vector in which every EP rank fills its own copy of the expert entries."""
        layout, n = self.layout, len(self.params)
        if layout.ep == 1:
            return C.all_reduce(values, self.group, op=op)
        expert = torch.tensor(self.expert, device=values.device)
        wide = values.new_zeros(layout.ep, n)
        wide[0] = torch.where(expert, 0, values)
        wide[layout.ep_rank] += torch.where(expert, values, 0)
        wide = C.all_reduce(wide.reshape(-1), self.group, op=op).view(layout.ep, n)
        return torch.where(expert, wide[layout.ep_rank], wide[0])

    # ------------------------------------------------------------------------------ the step
    def reduce_gradients(self) -> None:
        """Sum the gradients over DP into each bucket's slice; free the full-size gradients."""
        has_grad = torch.tensor([p.grad is not None for p in self.params], dtype=torch.int32,
                                device=self.layout.device)
        self._active = self._over_dp(has_grad, "max").bool().cpu()
        for bucket in self._all_buckets():
            bucket.grad = C.reduce_scatter(bucket.flat_grad(), bucket.group)
            for _, p in bucket.params:
                p.grad = None

    def grad_squares(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of squares over TP-split parameters, over TP-replicated ones) of this rank's
        slices, summed over DP (not yet over TP). Routed experts count by their TP split like any
        parameter (whole: replicated; `etp`: split); their slices over DP cover each expert once."""
        sq = torch.zeros(2, dtype=torch.float64, device=self.layout.device)
        for bucket in self._all_buckets():
            for seg in bucket.segments:
                param = self.params[seg.index]
                tags = param_tags(param)
                if tags.pp_duplicate:
                    continue  # the last stage's copy of a tied embedding: counted on the first
                split = tags.tp_split_dim is not None
                sq[0 if split else 1] += seg.of(bucket.grad).double().pow(2).sum()
        C.all_reduce(sq, self.group)
        return sq[0], sq[1]

    def scale_grads(self, scale: float) -> None:
        for bucket in self._all_buckets():
            bucket.grad.mul_(scale)

    def step(self) -> None:
        """Update this rank's slices (AdamW), then all-gather every bucket over DP."""
        for outer, inner in zip(self.param_groups, self.inner.param_groups):
            inner.update({k: v for k, v in outer.items() if k != "params"})
        for bucket in self._all_buckets():
            for seg in bucket.segments:
                seg.tensor.grad = seg.of(bucket.grad) if self._active[seg.index] else None
        self.inner.step()
        self._gather()

    def _gather(self) -> None:
        for bucket in self._all_buckets():
            full = C.all_gather(bucket.slice, bucket.group)
            if full is not bucket.slice:
                bucket.buffer.copy_(full)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        for bucket in self._all_buckets():
            bucket.grad = None
            for seg in bucket.segments:
                seg.tensor.grad = None

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (moments and step counters)."""
        return sum(b.exp_avg.nbytes + b.exp_avg_sq.nbytes for b in self._all_buckets()) + sum(
            s["step"].nbytes for s in self.inner.state.values())

    # ------------------------------------------------------------------------------ checkpoints
    def _steps(self) -> list[float]:
        """Every parameter's step count, the same on all ranks (segments know only their own)."""
        steps = torch.zeros(len(self.params), dtype=torch.float64, device=self.layout.device)
        for bucket in self._all_buckets():
            for seg in bucket.segments:
                steps[seg.index] = float(self.inner.state[seg.tensor]["step"])
        return self._over_dp(steps, "max").tolist()

    def state_dict(self, *, to_dp_rank: int | None = None) -> dict:
        """torch AdamW's state dict over the model's parameters (collective over DP). With
        `to_dp_rank`, only that DP rank gets the moments (the others get none, and allocate no
        full-size buffer): what a checkpoint save, written by DP rank 0, needs. Under EP the
        experts' moments go to the rank at that place of the expert-DP group instead (with 0: DP
        rank `ep_rank`, the writer of this EP rank's file)."""
        steps = self._steps()
        state: dict[int, dict] = {}
        for bucket in self._all_buckets():
            moments = {key: self._gathered(bucket, getattr(bucket, key), to_dp_rank)
                       for key in ("exp_avg", "exp_avg_sq")}
            if moments["exp_avg"] is None:  # not the receiving rank
                continue
            for (index, p), start in zip(bucket.params, bucket.offsets):
                if steps[index] > 0:
                    state[index] = {"step": torch.tensor(steps[index], dtype=torch.float32), **{
                        key: flat[start:start + p.numel()].view_as(p).clone()
                        for key, flat in moments.items()}}
        groups, index = [], 0
        for group in self.param_groups:
            groups.append(dict(group, params=list(range(index, index + len(group["params"])))))
            index += len(group["params"])
        return {"state": state, "param_groups": groups}

    def _gathered(self, bucket: _Bucket, flat: torch.Tensor,
                  to_dp_rank: int | None) -> torch.Tensor | None:
        """A bucket's flat moment over every slice of its group (on the rank at `to_dp_rank` of
        that group only, if given)."""
        if to_dp_rank is None:
            return C.all_gather(flat, bucket.group)
        return C.gather(flat, bucket.group, dst=self._group_rank(bucket, to_dp_rank))

    def load_state_dict(self, saved: dict) -> None:
        """Keep this rank's slice of a per-parameter AdamW state dict (any DP degree saved it)."""
        for group, loaded in zip(self.param_groups, saved["param_groups"]):
            group.update({k: v for k, v in loaded.items() if k != "params"})
        with torch.no_grad():
            for bucket in self._all_buckets():
                bucket.exp_avg.zero_()
                bucket.exp_avg_sq.zero_()
                for seg in bucket.segments:
                    entry = saved["state"].get(seg.index, {})
                    inner = self.inner.state[seg.tensor]
                    inner["step"] = torch.tensor(float(entry.get("step", 0.0)))
                    for key in ("exp_avg", "exp_avg_sq"):
                        if key in entry:
                            flat = entry[key].reshape(-1)[seg.param_lo:seg.param_lo + seg.tensor.numel()]
                            inner[key].copy_(flat)
