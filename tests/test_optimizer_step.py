"""The optimizer step: non-finite steps are skipped and counted, too many in a row stop the run;
the global gradient norm counts sharded parameters once per shard and replicated ones once."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from engine.optim import LRSchedule, NonFiniteError, OptimizerStep, grad_norm
from engine.parallel import ParallelConfig, ParallelLayout, make_layout
from engine.spawn import run_ranks
from engine.train_config import TrainConfig


def _params(grads):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.ones_like(g))
        p.grad = g.clone()
        params.append(p)
    return params


def test_non_finite_steps_are_skipped_then_stop_the_run():
    cfg = TrainConfig(max_skipped_steps=3, lr=0.1, warmup_steps=0)
    params = _params([torch.ones(4)])
    step = OptimizerStep(cfg, ParallelLayout.single(), params)
    stats = step(0, loss=1.0)
    assert not stats.skipped and not torch.equal(params[0].data, torch.ones(4))
    before = params[0].data.clone()
    for i in range(2):
        params[0].grad = torch.full((4,), float("nan"))
        assert step(1 + i, loss=1.0).skipped
        assert torch.equal(params[0].data, before)  # nothing applied
    params[0].grad = torch.ones(4)
    assert step(3, loss=float("inf")).skipped is True and step.skipped_total == 3
    with pytest.raises(NonFiniteError, match="4 consecutive steps"):
        params[0].grad = torch.ones(4)
        step(4, loss=float("nan"))
    state = step.state_dict()
    fresh = OptimizerStep(cfg, ParallelLayout.single(), _params([torch.ones(4)]))
    fresh.load_state_dict(state)
    assert fresh.skipped_total == 4


def _tp_norm():
    layout = make_layout(ParallelConfig(tp=2))
    rank = dist.get_rank()
    full = torch.arange(8.0)
    shard = torch.nn.Parameter(torch.zeros(4))
    shard.tp_split_dim = 0
    shard.grad = full[rank * 4:(rank + 1) * 4].clone()
    replicated = torch.nn.Parameter(torch.zeros(3))
    replicated.tp_split_dim = None
    replicated.grad = torch.tensor([1.0, 2.0, 2.0])
    return grad_norm([shard, replicated], layout).item()


def test_grad_norm_counts_shards_once_and_replicas_once():
    expected = math.sqrt(float((torch.arange(8.0) ** 2).sum()) + 9.0)
    assert run_ranks(_tp_norm, 2) == pytest.approx([expected, expected], rel=1e-6)


def test_lr_schedule_warmup_then_decay():
    cosine = LRSchedule(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14)
    assert [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(4) == 1.0 and cosine(14) == pytest.approx(0.1)
    assert cosine(9) == pytest.approx(0.55)
    linear = LRSchedule(lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=10, decay="linear")
    assert linear(5) == pytest.approx(0.5)
