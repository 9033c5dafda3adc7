"""The distributed optimizer (`train.distributed_optimizer`, engine/dist_optim.py) against the
replicated AdamW, through the real entry point.

Equality rows: DP 2 (clipping active: `train.grad_clip` below the gradient norm) and TP 2 x DP 2
with SP (no clipping), sharded against replicated at the same layout; parameters after each of 3
steps within 1e-6 relative (per tensor: max |a - b| <= 1e-6 * max |b|, fp32), and the saved AdamW
moments after step 3 alike. A unit row checks slices that cut parameters, padding, a parameter
without gradient (skipped, as torch skips it) and the per-parameter state dict. Checkpoints: a
sharded run resumed from its step-2 checkpoint equals it bit for bit; loaded with the option off,
at DP 1, and a DP 1 replicated checkpoint loaded sharded
at DP 2, each continues to step 3 equal to its reference.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine import collectives as C
from engine.dist_optim import ShardedAdamW
from engine.optim import adamw_groups, build_adamw
from engine.parallel import ParallelConfig, make_layout
from engine.spawn import run_ranks
from tests.trainer_utils import base_config, read_metrics, run_main, write_config

RTOL = 1e-6  # sharded vs replicated at the same layout (the same arithmetic, other reduction order)
RTOL_DP = 1e-5  # across DP degrees (other accumulation order), as tests/test_trainer.py
CLIP = 0.05  # below the gradient norm of these steps (asserted), so clipping scales every step
STEPS = 3


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("distopt")
    config = base_config(tmp, cache=tmp / "cache")
    config["train"].update(steps=STEPS, save_interval=1, keep=STEPS, grad_clip=0.0)
    return write_config(tmp / "run.yaml", config)


def _run(cfg_path, run_dir, *extra) -> None:
    assert run_main(str(cfg_path), [f"train.run_dir={run_dir}", *extra], distill=False) == 0


def _step(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def _tensors(run_dir: Path, step: int, kind: str) -> dict[str, torch.Tensor]:
    """Every saved tensor of `kind` (model | optim) at `step`, keyed by (TP file, name)."""
    out = {}
    for path in sorted(_step(run_dir, step).glob(f"{kind}_tp*.safetensors")):
        out.update({f"{path.name}:{k}": v for k, v in load_file(path).items()})
    return out


def _assert_close(a: dict, b: dict, rtol: float, where: str) -> None:
    assert a.keys() == b.keys() and a, where
    for name in a:
        bound = rtol * b[name].abs().max().item()
        diff = (a[name].double() - b[name].double()).abs().max().item()
        assert diff <= bound, f"{where} {name}: max diff {diff:.3g} > {bound:.3g}"


def _assert_equal(a: dict, b: dict, where: str) -> None:
    """Bit for bit: for a run resumed at its own layout, which restores every state and so runs
    the same operations in the same order."""
    assert a.keys() == b.keys() and a, where
    for name in a:
        assert torch.equal(a[name], b[name]), f"{where} {name}"


ROWS = [  # (world, overrides of both runs)
    pytest.param(2, [f"train.grad_clip={CLIP}"], id="dp2-clipped"),
    pytest.param(4, ["parallel.tp=2", "parallel.sp=true"], id="tp2-sp-dp2"),
]


@pytest.fixture(scope="module")
def runs(cfg, tmp_path_factory):
    """The DP-2 clipped pair, shared by the checkpoint tests."""
    tmp = tmp_path_factory.mktemp("dp2")
    for name, flag in (("sharded", "true"), ("replicated", "false")):
        run_ranks(_run, 2, cfg, tmp / name, f"train.grad_clip={CLIP}",
                  f"train.distributed_optimizer={flag}", timeout_s=180)
    return tmp


@pytest.mark.slow  # a multi-rank end-to-end run
@pytest.mark.parametrize("world,common", ROWS)
def test_sharded_equals_replicated(cfg, runs, tmp_path, world, common):
    if world == 2:
        sharded, replicated = runs / "sharded", runs / "replicated"
    else:
        sharded, replicated = tmp_path / "sharded", tmp_path / "replicated"
        for run_dir, flag in ((sharded, "true"), (replicated, "false")):
            run_ranks(_run, world, cfg, run_dir, *common, f"train.distributed_optimizer={flag}",
                      timeout_s=240)
    for step in range(1, STEPS + 1):
        _assert_close(_tensors(sharded, step, "model"), _tensors(replicated, step, "model"), RTOL,
                      f"step {step}")
    _assert_close(_tensors(sharded, STEPS, "optim"), _tensors(replicated, STEPS, "optim"), RTOL,
                  "AdamW state")
    ours, theirs = read_metrics(sharded), read_metrics(replicated)
    for a, b in zip(ours, theirs):
        assert abs(a["grad_norm"] - b["grad_norm"]) <= RTOL * b["grad_norm"], (a, b)
        assert a["grad_norm"] > CLIP or not common[0].startswith("train.grad_clip")


@pytest.mark.slow  # a multi-rank end-to-end run
def test_resume_exact(cfg, runs, tmp_path):
    run_ranks(_run, 2, cfg, tmp_path / "resumed", f"train.grad_clip={CLIP}",
              "train.distributed_optimizer=true", f"train.resume={_step(runs / 'sharded', 2)}",
              timeout_s=180)
    for kind in ("model", "optim"):
        _assert_equal(_tensors(tmp_path / "resumed", STEPS, kind),
                      _tensors(runs / "sharded", STEPS, kind), kind)


@pytest.mark.slow  # a multi-rank end-to-end run
@pytest.mark.parametrize("world,flag,rtol", [
    pytest.param(2, "false", RTOL, id="on-to-off"),
    pytest.param(1, "true", RTOL_DP, id="dp2-to-dp1"),
])
def test_sharded_checkpoint_loads_elsewhere(cfg, runs, tmp_path, world, flag, rtol):
    args = (cfg, tmp_path / "resumed", f"train.grad_clip={CLIP}",
            f"train.distributed_optimizer={flag}", f"train.resume={_step(runs / 'sharded', 2)}")
    if world == 1:
        _run(*args)
    else:
        run_ranks(_run, world, *args, timeout_s=180)
    for kind in ("model", "optim"):
        _assert_close(_tensors(tmp_path / "resumed", STEPS, kind),
                      _tensors(runs / "sharded", STEPS, kind), rtol, kind)


@pytest.mark.slow  # a multi-rank end-to-end run
def test_dp1_checkpoint_loads_sharded_at_dp2(cfg, tmp_path):
    single = tmp_path / "single"
    _run(cfg, single, f"train.grad_clip={CLIP}")
    run_ranks(_run, 2, cfg, tmp_path / "resumed", f"train.grad_clip={CLIP}",
              "train.distributed_optimizer=true", f"train.resume={_step(single, 2)}", timeout_s=180)
    for kind in ("model", "optim"):
        _assert_close(_tensors(tmp_path / "resumed", STEPS, kind), _tensors(single, STEPS, kind),
                      RTOL_DP, kind)


def _toy_rank() -> dict:
    """ShardedAdamW against torch's AdamW on the DP-summed gradients, bit for bit, at DP 2."""
    layout = make_layout(ParallelConfig(tp=1))
    torch.manual_seed(0)
    shapes = [(5, 3), (7,), (4, 2), (3,)]  # 23 matrix and 10 vector elements: slices cut both
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    sharded = ShardedAdamW(adamw_groups(ours, weight_decay=0.1), lr=0.1, betas=(0.9, 0.95),
                           eps=1e-8, layout=layout)
    replicated = build_adamw(ref, lr=0.1, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(layout.dp_rank)
    for _ in range(3):
        for i, (a, b) in enumerate(zip(ours, ref)):
            if i == 2:  # no gradient on any rank: left alone
                continue
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = C.all_reduce(a.grad.clone(), layout.dp_group)
        sharded.reduce_gradients()
        sharded.step()
        sharded.zero_grad()
        replicated.step()
        # exact: a DP-2 sum has two addends (the same in either order), and the shards run the
        # replicated optimizer's per-tensor arithmetic (foreach=False)
        assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    theirs, mine = replicated.state_dict(), sharded.state_dict()
    # optimizer order: matrices (5, 3), (4, 2), then vectors (7,), (3,); (4, 2) never had a gradient
    assert mine["state"].keys() == theirs["state"].keys() == {0, 2, 3}
    for index, entry in theirs["state"].items():
        assert all(torch.equal(mine["state"][index][k], v) for k, v in entry.items()), index
    fresh = ShardedAdamW(adamw_groups([torch.nn.Parameter(p.detach().clone()) for p in ours],
                                      weight_decay=0.1), lr=0.1, betas=(0.9, 0.95), eps=1e-8,
                         layout=layout)
    fresh.load_state_dict(theirs)
    again = fresh.state_dict()["state"]
    assert all(torch.equal(again[i][k], v) for i, e in theirs["state"].items() for k, v in e.items())
    # gathered to one DP rank (a checkpoint save): that rank gets all of it, the others nothing
    to_last = sharded.state_dict(to_dp_rank=layout.dp - 1)
    if layout.dp_rank == layout.dp - 1:
        assert to_last["state"].keys() == mine["state"].keys()
        assert all(torch.equal(to_last["state"][i][k], v) for i, e in mine["state"].items()
                   for k, v in e.items())
    else:
        assert to_last["state"] == {}
    assert to_last["param_groups"] == mine["param_groups"]
    return {"moments": sum(b.exp_avg.nbytes + b.exp_avg_sq.nbytes for b in sharded._all_buckets())}


def test_sharded_adamw_matches_torch_adamw_on_cut_parameters():
    results = run_ranks(_toy_rank, 2, timeout_s=120)
    # 23 matrix elements pad to 24, 10 vector elements to 10: 12 + 5 per rank, two fp32 moments
    assert [r["moments"] for r in results] == [2 * 4 * (12 + 5)] * 2
