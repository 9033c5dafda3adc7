"""Distributed checkpoints on spawned gloo ranks: a TP=2 x DP=2 save (DDP-wrapped, with a rank
failing mid-save and a preemption signal on one rank) loaded back at TP=1, TP=2 and TP=4.

Reference: the saved TP shards gathered in this test (concatenate along `tp_split_dim`, drop the
vocabulary padding, re-pad with zeros, slice). Loading is pure copying, so shards must match
exactly; the next loss after loading matches across TP degrees to float64 round-off (1e-12).
"""

import os
import signal

import torch
from torch.nn.parallel import DistributedDataParallel

import engine.checkpoint as ckpt_mod
from engine.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from engine.parallel import ParallelConfig, ParallelLayout, make_layout
from engine.signals import PreemptionFlag
from engine.spawn import run_ranks
from tests.ckpt_worker import SPLITS, VOCAB, TinyTP, adamw, batch, seed_all, shard_of, train_step

LOSS_TOL = dict(rtol=1e-12, atol=0.0)
PAD = 99.0  # the saving model's vocabulary padding rows: must never reach another TP degree


def _next_loss(model, layout) -> float:
    """The loss on a fixed batch of DP rank 0, drawing no random numbers."""
    return model(batch(layout, 5)).square().mean().item()


def _shards(model, optimizer) -> dict[str, torch.Tensor]:
    """Parameters and optimizer moments of this rank, by name (`name` and `name/exp_avg`, ...)."""
    out = {name: p.detach().clone() for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        for key, value in optimizer.state[p].items():
            out[f"{name}/{key}"] = value.detach().clone()
    return out


def _save(root, step, layout, model, optimizer):
    return save_checkpoint(root, step, layout=layout, model=model, optimizer=optimizer,
                           state={"rank": layout.rank}, config={"tp": layout.tp}, keep=2,
                           vocab_size=VOCAB)


def _fail_writes(*args, **kwargs):
    raise OSError("disk quota exceeded")


def _save_tp2_dp2(root: str, layout: ParallelLayout) -> dict:
    seed_all(layout.dp_rank)  # TP ranks of one replica draw the same loss jitter
    model = TinyTP(layout, pad_value=PAD)
    ddp = DistributedDataParallel(model, process_group=layout.dp_group)
    optimizer = adamw(model)
    for pos in range(2):
        train_step(ddp, optimizer, layout, pos)
    with PreemptionFlag() as flag:
        stop_before = flag.should_stop(layout)
        if layout.rank == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        stop_after = flag.should_stop(layout)
    _save(root, 1, layout, ddp, optimizer)
    real_write, failure = ckpt_mod.write_tensors, None
    if layout.rank == 1:
        ckpt_mod.write_tensors = _fail_writes
    try:
        _save(root, 2, layout, ddp, optimizer)
    except CheckpointError as err:
        failure = str(err)
    ckpt_mod.write_tensors = real_write
    after_failure = latest_checkpoint(root).name
    path = _save(root, 3, layout, ddp, optimizer)
    return {"stop": (stop_before, stop_after), "failure": failure, "after_failure": after_failure,
            "files": sorted(os.listdir(path)), "steps": sorted(os.listdir(root)),
            "shards": _shards(model, optimizer), "draws": torch.rand(3),
            "loss": _next_loss(model, layout), "tp_rank": layout.tp_rank}


def _load(root, layout) -> dict:
    seed_all(1234)  # whatever the generators held before, a same-layout load restores them
    model = TinyTP(layout, seed=7)
    optimizer = adamw(model)
    out = load_checkpoint(latest_checkpoint(root), layout=layout, model=model, optimizer=optimizer,
                          vocab_size=VOCAB)
    draws = torch.rand(3)
    return {"shards": _shards(model, optimizer), "draws": draws, "state": out["state"],
            "same_layout": out["same_layout"], "loss": _next_loss(model, layout),
            "tp_rank": layout.tp_rank}


def _save_then_load_at_tp2_and_tp4(root: str) -> dict:
    tp2, tp4 = make_layout(ParallelConfig(tp=2)), make_layout(ParallelConfig(tp=4))
    return {"saved": _save_tp2_dp2(root, tp2), "tp2": _load(root, tp2), "tp4": _load(root, tp4)}


def _expected(saved_by_tp_rank: list[dict], key: str, tp: int, tp_rank: int) -> torch.Tensor:
    """The reference reshard of one tensor from the TP=2 shards."""
    name = key.partition("/")[0]
    split, vocab_parallel = SPLITS[name]
    pieces = [s[key] for s in saved_by_tp_rank]
    if split is None or pieces[0].dim() == 0:
        return pieces[0]
    full = torch.cat(pieces, split)
    if vocab_parallel:
        full = full[:VOCAB]
    return shard_of(full, name, tp, tp_rank)


def _assert_shards_match(loaded: dict, saved_by_tp_rank: list[dict], tp: int, tp_rank: int):
    assert loaded.keys() == saved_by_tp_rank[0].keys()
    for key, value in loaded.items():
        expected = _expected(saved_by_tp_rank, key, tp, tp_rank)
        assert torch.equal(value, expected), f"{key} at tp={tp} rank {tp_rank}"


def test_tp2_checkpoint_loads_at_tp1_tp2_and_tp4(tmp_path):
    root = str(tmp_path)
    results = run_ranks(_save_then_load_at_tp2_and_tp4, 4, root, timeout_s=120)
    saved = [r["saved"] for r in results]
    assert all(s["stop"] == (False, True) for s in saved)  # SIGUSR1 on rank 2 stops everyone
    assert "disk quota exceeded" in saved[1]["failure"]
    assert all("failed on another rank" in s["failure"] for s in saved if s is not saved[1])
    assert all(s["after_failure"] == "step_00000001" for s in saved)
    assert saved[0]["steps"] == ["latest", "step_00000001", "step_00000003"]  # .tmp cleaned
    assert saved[0]["files"] == [  # model and optimizer once per TP rank, RNG and state per rank
        "metadata.json", "model_tp000.safetensors", "model_tp001.safetensors",
        "optim_tp000.safetensors", "optim_tp001.safetensors", *(
            f"rank_{r:05d}.safetensors" for r in range(4))]
    by_tp_rank = [saved[0]["shards"], saved[1]["shards"]]  # DP rank 0 of TP ranks 0 and 1
    assert saved[1]["shards"]["embed"][-1].gt(PAD / 2).all()  # padding rows were saved non-zero

    for rank, (result, before) in enumerate(zip(results, saved)):
        same = result["tp2"]
        assert same["same_layout"] and same["state"] == {"rank": rank}
        assert torch.equal(same["draws"], before["draws"])  # this rank's RNG restored
        assert same["shards"].keys() == before["shards"].keys()
        assert all(torch.equal(v, before["shards"][k]) for k, v in same["shards"].items())
        other = result["tp4"]
        assert not other["same_layout"] and other["state"] == {"rank": 0}
        _assert_shards_match(other["shards"], by_tp_rank, 4, other["tp_rank"])
        torch.testing.assert_close(other["loss"], saved[0]["loss"], **LOSS_TOL)

    single = _load(root, ParallelLayout.single())
    _assert_shards_match(single["shards"], by_tp_rank, 1, 0)
    assert single["state"] == {"rank": 0} and not single["same_layout"]
    torch.testing.assert_close(single["loss"], saved[0]["loss"], **LOSS_TOL)
