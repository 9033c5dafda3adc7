"""Checkpoints in one process: exact resume, the `latest` pointer and pruning, atomicity under a
crash mid-save, refusal of damaged, crafted or mismatching checkpoints, preemption signals."""

import json
import os
import pickle
import signal

import pytest
import torch

import engine.checkpoint as ckpt_mod
from engine.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    safe_torch_load,
    save_checkpoint,
)
from engine.checkpoint_files import sha256_of
from engine.parallel import ParallelLayout
from engine.signals import PreemptionFlag
from tests.ckpt_worker import VOCAB, TinyTP, adamw, seed_all, train_step

SINGLE = ParallelLayout.single()


def _save(root, step, model, optimizer, *, keep=0, **kwargs):
    return save_checkpoint(root, step, layout=SINGLE, model=model, optimizer=optimizer,
                           state={"data_pos": step}, config={"train": {"lr": 0.01}}, keep=keep,
                           vocab_size=VOCAB, **kwargs)


def _load(path, model=None, optimizer=None, **kwargs):
    model = model if model is not None else TinyTP(SINGLE, seed=5)
    return load_checkpoint(path, layout=SINGLE, model=model, optimizer=optimizer,
                           vocab_size=kwargs.pop("vocab_size", VOCAB), **kwargs)


@pytest.fixture
def saved(tmp_path):
    """A trained model, its optimizer and its checkpoint at step 2."""
    seed_all(0)
    model = TinyTP(SINGLE, dropout=0.2)
    optimizer = adamw(model)
    for pos in range(2):
        train_step(model, optimizer, SINGLE, pos)
    return model, optimizer, _save(tmp_path / "ckpt", 2, model, optimizer)


# ----------------------------------------------------------------------------- exact resume

ON_CUDA = pytest.param("cuda", True, id="cuda-True", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU (run on the GPU machine)"))


@pytest.mark.parametrize("device,restore_rng", [("cpu", True), ("cpu", False), ON_CUDA])
def test_resume_reproduces_losses_bitwise(tmp_path, device, restore_rng):
    layout = ParallelLayout.single(device)
    seed_all(0)
    model = TinyTP(layout, dropout=0.2).to(device)
    optimizer = adamw(model)
    losses = [train_step(model, optimizer, layout, pos) for pos in range(3)]
    path = save_checkpoint(tmp_path, 3, layout=layout, model=model, optimizer=optimizer,
                           state={"data_pos": 3}, config={"train": {"lr": 0.01}}, keep=1,
                           vocab_size=VOCAB, rank_tensors={"gen": torch.arange(4)})
    losses += [train_step(model, optimizer, layout, pos) for pos in range(3, 6)]

    seed_all(99)  # scramble every generator; a different init; a fresh optimizer
    resumed_model = TinyTP(layout, seed=5, dropout=0.2).to(device)
    resumed_opt = adamw(resumed_model)
    out = load_checkpoint(path, layout=layout, model=resumed_model, optimizer=resumed_opt,
                          vocab_size=VOCAB, restore_rng=restore_rng)
    assert (out["step"], out["state"], out["same_layout"]) == (3, {"data_pos": 3}, True)
    assert out["config"] == {"train": {"lr": 0.01}} and out["layout"]["tp"] == 1
    assert torch.equal(out["rank_tensors"]["gen"], torch.arange(4))
    resumed = [train_step(resumed_model, resumed_opt, layout, pos) for pos in range(3, 6)]
    if restore_rng:
        # bit for bit: the same layout, and every state and RNG restored: the same operations
        assert resumed == losses[3:]
        for (name, p), q in zip(model.named_parameters(), resumed_model.parameters()):
            assert torch.equal(p, q), name
    else:  # the losses draw from torch, Python and NumPy generators: without them, no match
        assert resumed != losses[3:]


def test_tied_parameters_are_stored_once(tmp_path):
    model = TinyTP(SINGLE, tie=True)
    path = _save(tmp_path, 1, model, None)
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["model"]["aliases"] == {"head": "embed"}
    loaded = TinyTP(SINGLE, seed=5, tie=True)
    _load(path, loaded)
    assert loaded.head is loaded.embed and torch.equal(loaded.embed, model.embed)


# ----------------------------------------------------------------------------- latest, prune, atomicity

def test_latest_pointer_pruning_and_fallback(tmp_path):
    model, optimizer = TinyTP(SINGLE), None
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, optimizer, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003", "step_00000004"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000004"
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000004"

    # never-complete directories do not count, however new
    (tmp_path / "step_00000009.tmp").mkdir()
    (tmp_path / "step_00000008").mkdir()  # no metadata.json
    for pointer in ("step_00000007\n", "../../etc\n", "\xff garbage"):
        (tmp_path / "latest").write_text(pointer)
        assert latest_checkpoint(tmp_path) == tmp_path / "step_00000004"
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000004"
    assert latest_checkpoint(tmp_path / "nothing") is None

    # saving the same step again replaces it; a newer checkpoint from an abandoned run is left alone
    (tmp_path / "step_00000008").rmdir()
    (tmp_path / "step_00000009.tmp").rename(tmp_path / "step_00000009")
    (tmp_path / "step_00000009" / "metadata.json").write_text("{}")
    assert _save(tmp_path, 4, model, optimizer, keep=1) == tmp_path / "step_00000004"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000004", "step_00000009"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000004"


@pytest.mark.parametrize("crash_in", ["write_tensors", "write_json", "_point_latest"])
def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, crash_in):
    model, optimizer = TinyTP(SINGLE), None
    _save(tmp_path, 1, model, optimizer, keep=1)
    calls = []
    real = getattr(ckpt_mod, crash_in)

    def crash_on_second_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 or crash_in == "_point_latest":
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod, crash_in, crash_on_second_call)
    with pytest.raises(CheckpointError, match="saving .*step_00000002 failed .*disk full"):
        _save(tmp_path, 2, model, optimizer, keep=1)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    assert _load(tmp_path / "step_00000001")["step"] == 1
    _save(tmp_path, 3, model, optimizer, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003"]


# ----------------------------------------------------------------------------- refusing bad checkpoints

def _one_line_error(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        _load(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def _edit_metadata(path, edit):
    meta = json.loads((path / "metadata.json").read_text())
    edit(meta)
    (path / "metadata.json").write_text(json.dumps(meta))


def test_truncated_and_altered_files_are_refused(saved):
    _, _, path = saved
    shard = path / "model_tp000.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-7])
    assert "model_tp000.safetensors is truncated" in _one_line_error(path)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(flipped))
    assert "model_tp000.safetensors is corrupted or altered" in _one_line_error(path)
    shard.write_bytes(data)
    optim = path / "optim_tp000.safetensors"
    optim.write_bytes(optim.read_bytes()[:-1] + b"!")
    model = TinyTP(SINGLE)
    assert "optim_tp000.safetensors is corrupted" in _one_line_error(
        path, model=model, optimizer=adamw(model))


class _RunsCode:
    """Unpickling this object would create `marker`: the attack safe loading must stop."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_crafted_pickle_is_refused_without_running(saved, tmp_path):
    _, _, path = saved
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"weight": _RunsCode(marker)})
    shard = path / "model_tp000.safetensors"
    shard.write_bytes(payload)
    # even with a matching digest in metadata, a pickle is not a safetensors file
    _edit_metadata(path, lambda m: m["files"]["model_tp000.safetensors"].update(
        size=len(payload), sha256=sha256_of(shard)))
    assert "is not a valid safetensors file" in _one_line_error(path)
    torch.save(_RunsCode(marker), tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt: refused to unpickle"):
        safe_torch_load(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    assert torch.equal(safe_torch_load(tmp_path / "plain.pt")["w"], torch.ones(2))


def test_metadata_paths_cannot_leave_the_checkpoint(saved, tmp_path):
    _, _, path = saved
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((path / "rank_00000.safetensors").read_bytes())

    def escape(meta):
        meta["files"]["../outside.safetensors"] = meta["files"].pop("rank_00000.safetensors")
        meta["ranks"] = ["../outside.safetensors"]

    original = (path / "metadata.json").read_text()
    _edit_metadata(path, escape)
    assert "'../outside.safetensors' outside the checkpoint directory" in _one_line_error(path)
    (path / "metadata.json").write_text(original)
    (path / "rank_00000.safetensors").unlink()
    (path / "rank_00000.safetensors").symlink_to(outside)
    assert "leads outside the checkpoint directory" in _one_line_error(path)


def test_other_model_shapes_are_refused_naming_the_parameter(saved):
    _, _, path = saved
    message = _one_line_error(path, model=TinyTP(SINGLE, ffn=12))
    assert message.startswith("parameter 'up' has shape [8, 4] in the checkpoint but [12, 4]")
    tied = TinyTP(SINGLE, tie=True)
    assert "parameter 'head' of the model is missing" in _one_line_error(path, model=tied)
    smaller = TinyTP(SINGLE)
    del smaller.scale
    assert "checkpoint parameter 'scale' does not exist in the model" in _one_line_error(
        path, model=smaller)
    assert "vocab_size=11 but the checkpoint was saved with vocab_size=10" in _one_line_error(
        path, vocab_size=11)
    (path / "metadata.json").write_text("{not json")
    assert "metadata.json is not valid JSON" in _one_line_error(path)
    (path / "metadata.json").unlink()
    assert "is not a complete checkpoint" in _one_line_error(path)


def test_only_prefix_loads_part_of_a_larger_checkpoint(tmp_path):
    whole = torch.nn.Module()
    whole.student, whole.objective = TinyTP(SINGLE), torch.nn.Linear(2, 2)
    path = _save(tmp_path, 1, whole, None)
    part = torch.nn.Module()
    part.student = TinyTP(SINGLE, seed=5)
    _load(path, part, only_prefix="student.")
    assert all(torch.equal(p, q) for p, q in zip(part.parameters(), whole.student.parameters()))
    assert "checkpoint parameter 'objective.weight' does not exist in the model" in _one_line_error(
        path, model=part)


def test_bad_state_is_refused_and_nothing_is_published(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint state must be JSON-serializable"):
        save_checkpoint(tmp_path, 1, layout=SINGLE, model=TinyTP(SINGLE), optimizer=None,
                        state={"gen": torch.Generator()}, config={}, keep=1)
    assert latest_checkpoint(tmp_path) is None


# ----------------------------------------------------------------------------- preemption signals

def test_preemption_flag_records_signals_and_restores_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        with PreemptionFlag() as flag:
            assert not flag.requested and not flag.should_stop(SINGLE)
            os.kill(os.getpid(), signum)  # the handler runs before the next bytecode
            os.kill(os.getpid(), signal.SIGUSR1)
            assert flag.received == signum and flag.should_stop(SINGLE)
        assert {s: signal.getsignal(s) for s in before} == before
