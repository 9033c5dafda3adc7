"""Autograd-aware collectives at the seams of tensor- and sequence-parallel layers.

Each is one `torch.autograd.Function` with a public wrapper named for its forward pass; the
docstring of each wrapper states both passes. Tensor-parallel splits are along the last dimension
(the hidden/vocabulary dimension); sequence-parallel splits are along `seq_dim`, which callers pass
explicitly for their activation layout. A group of `None` or of size 1 makes every mapping the
identity in both directions.
"""

from __future__ import annotations

import torch

from engine import collectives as C
from engine.collectives import Group


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return C.all_reduce(grad.contiguous().clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return C.all_reduce(x.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return C.split_along(x, group, dim=-1).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return C.all_gather(grad, ctx.group, dim=-1), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return C.all_gather(x, group, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return C.split_along(grad, ctx.group, dim=-1).contiguous(), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, seq_dim):
        ctx.group, ctx.seq_dim = group, seq_dim
        return C.split_along(x, group, dim=seq_dim).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return C.all_gather(grad, ctx.group, dim=ctx.seq_dim), None, None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, seq_dim, reduce_grad):
        ctx.group, ctx.seq_dim, ctx.reduce_grad = group, seq_dim, reduce_grad
        return C.all_gather(x, group, dim=seq_dim)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:
            grad = C.reduce_scatter(grad, ctx.group, dim=ctx.seq_dim)
        else:
            grad = C.split_along(grad, ctx.group, dim=ctx.seq_dim).contiguous()
        return grad, None, None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, seq_dim):
        ctx.group, ctx.seq_dim = group, seq_dim
        return C.reduce_scatter(x, group, dim=seq_dim)

    @staticmethod
    def backward(ctx, grad):
        return C.all_gather(grad, ctx.group, dim=ctx.seq_dim), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, send_splits, recv_splits):
        ctx.group, ctx.splits = group, (send_splits, recv_splits)
        return C.all_to_all_single(x, group, send_splits=send_splits, recv_splits=recv_splits)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        back = C.all_to_all_single(grad, ctx.group, send_splits=recv_splits, recv_splits=send_splits)
        return back, None, None, None


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward: identity. Backward: all-reduce the gradient over the TP group."""
    return _CopyToTP.apply(x, group) if C.group_size(group) > 1 else x


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward: all-reduce (sum) over the TP group. Backward: identity."""
    return _ReduceFromTP.apply(x, group) if C.group_size(group) > 1 else x


def scatter_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward: keep this rank's slice of the last dim. Backward: all-gather along the last dim."""
    return _ScatterToTP.apply(x, group) if C.group_size(group) > 1 else x


def gather_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward: all-gather along the last dim. Backward: keep this rank's slice of the gradient."""
    return _GatherFromTP.apply(x, group) if C.group_size(group) > 1 else x


def scatter_to_sp(x: torch.Tensor, group: Group, *, seq_dim: int) -> torch.Tensor:
    """Forward: keep this rank's slice of the sequence. Backward: all-gather the sequence."""
    return _ScatterToSP.apply(x, group, seq_dim) if C.group_size(group) > 1 else x


def gather_from_sp(x: torch.Tensor, group: Group, *, seq_dim: int) -> torch.Tensor:
    """Forward: all-gather the sequence. Backward: reduce-scatter the gradient over the sequence.

    For inputs of tensor-parallel compute, where each rank's gradient is a partial sum.
    """
    return _GatherFromSP.apply(x, group, seq_dim, True) if C.group_size(group) > 1 else x


def gather_from_sp_replicated(x: torch.Tensor, group: Group, *, seq_dim: int) -> torch.Tensor:
    """Forward: all-gather the sequence. Backward: keep this rank's slice of the gradient.

    For inputs of replicated compute, where every rank already holds the full gradient.
    """
    return _GatherFromSP.apply(x, group, seq_dim, False) if C.group_size(group) > 1 else x


def reduce_scatter_to_sp(x: torch.Tensor, group: Group, *, seq_dim: int) -> torch.Tensor:
    """Forward: sum over the TP group and keep this rank's sequence slice. Backward: all-gather."""
    return _ReduceScatterToSP.apply(x, group, seq_dim) if C.group_size(group) > 1 else x


def all_to_all(x: torch.Tensor, group: Group, *, send_splits: list[int],
               recv_splits: list[int]) -> torch.Tensor:
    """Forward: rows `send_splits[r]` of `x` go to group rank r, the rows received come back in rank
    order. Backward: each gradient row returns to the rank its row came from."""
    if C.group_size(group) == 1:
        return x
    return _AllToAll.apply(x, group, send_splits, recv_splits)
