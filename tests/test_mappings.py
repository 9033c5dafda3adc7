"""Every autograd mapping, forward and backward, against its single-process definition (float64)."""

import pytest
import torch
import torch.distributed as dist

from engine import mappings as M
from engine.spawn import run_ranks

TOL = dict(rtol=1e-12, atol=1e-12)


def _tensors(shape=(2, 8, 12)):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(shape, generator=g, dtype=torch.float64),
            torch.randn(shape, generator=g, dtype=torch.float64))


def _grad_of(fn, x, upstream):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    y.backward(upstream)
    return y.detach(), x.grad


def _check_mappings():
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    x, g = _tensors()
    scale = sum(range(1, world + 1))  # sum over ranks of (rank + 1)
    last = x.shape[-1] // world
    seq = x.shape[1] // world

    def tp_slice(t):
        return t[..., rank * last:(rank + 1) * last]

    def sp_slice(t):
        return t[:, rank * seq:(rank + 1) * seq]

    # copy_to_tp: identity forward; backward sums the ranks' upstream gradients.
    y, gx = _grad_of(lambda t: M.copy_to_tp(t, group), x, g * (rank + 1))
    torch.testing.assert_close(y, x, **TOL)
    torch.testing.assert_close(gx, g * scale, **TOL)

    # reduce_from_tp: forward sums the ranks' inputs; backward identity.
    y, gx = _grad_of(lambda t: M.reduce_from_tp(t, group), x * (rank + 1), g)
    torch.testing.assert_close(y, x * scale, **TOL)
    torch.testing.assert_close(gx, g, **TOL)

    # scatter_to_tp / gather_from_tp on the last dim.
    y, gx = _grad_of(lambda t: M.scatter_to_tp(t, group), x, tp_slice(g))
    torch.testing.assert_close(y, tp_slice(x), **TOL)
    torch.testing.assert_close(gx, g, **TOL)
    y, gx = _grad_of(lambda t: M.gather_from_tp(t, group), tp_slice(x), g)
    torch.testing.assert_close(y, x, **TOL)
    torch.testing.assert_close(gx, tp_slice(g), **TOL)

    # Sequence parallel along dim 1.
    y, gx = _grad_of(lambda t: M.scatter_to_sp(t, group, seq_dim=1), x, sp_slice(g))
    torch.testing.assert_close(y, sp_slice(x), **TOL)
    torch.testing.assert_close(gx, g, **TOL)
    y, gx = _grad_of(lambda t: M.gather_from_sp(t, group, seq_dim=1), sp_slice(x), g * (rank + 1))
    torch.testing.assert_close(y, x, **TOL)
    torch.testing.assert_close(gx, sp_slice(g) * scale, **TOL)
    y, gx = _grad_of(lambda t: M.gather_from_sp_replicated(t, group, seq_dim=1), sp_slice(x), g)
    torch.testing.assert_close(y, x, **TOL)
    torch.testing.assert_close(gx, sp_slice(g), **TOL)
    y, gx = _grad_of(lambda t: M.reduce_scatter_to_sp(t, group, seq_dim=1), x * (rank + 1),
                     sp_slice(g))
    torch.testing.assert_close(y, sp_slice(x) * scale, **TOL)
    torch.testing.assert_close(gx, g, **TOL)
    return True


@pytest.mark.parametrize("world", [1, 2, 4])
def test_mappings_forward_and_backward(world):
    assert all(run_ranks(_check_mappings, world))


def test_mappings_without_group_are_identity():
    x = torch.randn(2, 4, 4)
    for fn in (M.copy_to_tp, M.reduce_from_tp, M.scatter_to_tp, M.gather_from_tp):
        assert fn(x, None) is x
    for fn in (M.scatter_to_sp, M.gather_from_sp, M.gather_from_sp_replicated,
               M.reduce_scatter_to_sp):
        assert fn(x, None, seq_dim=1) is x
