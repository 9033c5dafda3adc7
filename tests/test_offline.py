"""The offline teacher store (tools/export_teacher_logits.py, distill/offline.py) and its tools.

- One export (top-16, float32 log-probs) of the corpus's train sample map serves students at
  seed 1 and 2, DP 1 and 2, global batch 8 and 16, PP=2 and a curriculum whose scores come from
  the store: each logs what a colocated teacher truncated to the same top-k logs (rtol 1e-5,
  kd_loss atol 1e-6: the two formulas' fp32 round-off) over 3 steps, through the entry point.
- The sample map does not depend on the seed: a stream's micro-batches are its windows.
- Compression (distill/offline_codec.py): ids round-trip exactly for V = 2048, 151936, 262208
  and k = V; at the default 6 bits the KD term of every divergence kind on random and on
  trained-teacher logits stays within the stated per-token bound of the uncompressed top-k, and
  the mean (the logged loss) within 1e-3 nats/token at k = 64.
- `teacher_topk` at TP=2 against the float64 top-k of the gathered vocabulary.
- An export cut by SIGTERM resumes to the same store byte for byte; exports of disjoint ranges
  merge into the store of their union byte for byte; info / verify.
- Settings that do not match, a truncated or altered shard, a store that lacks a drawn sample:
  one-line errors naming the field or file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import distill.run
from distill import topk_divergence
from distill.config import SINGLE_TEACHER
from distill.offline import (
    OfflineTeacher,
    OfflineTeacherError,
    TeacherStore,
    sample_checksums,
    teacher_topk,
    topk_logprobs,
)
from distill.offline_codec import EXP_GOLOMB, PLAIN, RICE, Codec, decode_fields, encode_fields, kd_bound
from distill.runconfig import load_run_config
from distill.teacher import TeacherOutputs
from engine import collectives as C
from engine.checkpoint import resolve_checkpoint
from engine.config import ConfigError
from engine.data import TokenBatches, write_indexed
from engine.parallel import ParallelConfig, ParallelLayout
from engine.spawn import run_ranks
from layers.config import ModelConfig
from layers.model import TransformerLM
from tests.helpers import assert_same_run
from tests.trainer_utils import (
    VOCAB,
    base_config,
    make_teacher,
    read_metrics,
    run_main,
    teacher_config,
    write_config,
)
from tools import curriculum_scores, export_teacher_logits, offline_store

TEMPERATURE = 2.0
K = 16
SHARD = 64  # samples per shard file
ROOT = Path(__file__).resolve().parents[1]
EXACT = ["--value-bits", "32"]  # float32 log-probs: the exactness tests compare to 1e-5


def _export(cfg_path: Path, out: Path, *flags: str) -> int:
    return export_teacher_logits.main(["--config", str(cfg_path), "--top-k", str(K), "--out",
                                       str(out), "--shard-samples", str(SHARD), "--no-progress",
                                       *flags])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A run config (3 steps), its teacher and the one store of the train split."""
    tmp = tmp_path_factory.mktemp("offline")
    cfg = base_config(tmp, cache=tmp / "cache")
    teacher = make_teacher(tmp / "teacher", teacher_config(cfg))
    cfg["distill"] = {"teacher": str(teacher), "lm_weight": 0.5,
                      "logit": {"weight": 1.0, "temperature": TEMPERATURE}}
    cfg["data"]["mask_across_documents"] = True  # unequal valid-token counts per micro-batch
    path = write_config(tmp / "run.yaml", cfg)
    assert _export(path, tmp / "store", *EXACT) == 0
    return tmp, path


def _offline(store: Path) -> list[str]:
    return ["distill.schedule=offline", f"distill.offline_dir={store}"]


# ----------------------------------------------------------------- students of any layout

class TruncatedTeacher:
    """The reference: the colocated teacher with its logits cut to the top-k (and log-sum-exp)."""

    reaches_every_stage = False

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, micro_batch):
        logits = self.inner(micro_batch)[SINGLE_TEACHER].logits
        values, indices, lse = teacher_topk(logits, k=K, vocab_size=VOCAB, temperature=TEMPERATURE)
        return {SINGLE_TEACHER: TeacherOutputs(topk_values=values, topk_indices=indices.long(),
                                               logsumexp=lse)}

    def stage_parts(self):
        return {}

    def end_step(self, *, stop):
        pass

    def close(self):
        pass


def _truncated_run(cfg_path: Path, run_dir: Path, overrides: list[str], monkeypatch) -> list[dict]:
    colocated = distill.run._colocated
    monkeypatch.setattr(distill.run, "_colocated",
                        lambda *args, **kwargs: TruncatedTeacher(colocated(*args, **kwargs)))
    assert run_main(str(cfg_path), [f"train.run_dir={run_dir}", "distill.diagnostics=false",
                                    *overrides]) == 0
    monkeypatch.undo()
    return read_metrics(run_dir)


def _student_run(cfg_path: Path, run_dir: Path, overrides: list[str]) -> int:
    return run_main(str(cfg_path), [f"train.run_dir={run_dir}", *overrides])


def _curriculum(tmp: Path, cfg_path: Path, student: list[str]) -> list[str]:
    """Curriculum scores of this student's stream, read from the store (no teacher runs)."""
    scores = tmp / f"scores_{'_'.join(student).replace('=', '')}"
    if not scores.exists():
        assert curriculum_scores.main(["--config", str(cfg_path), "--out", str(scores), "--store",
                                       str(tmp / "store"), "data.curriculum_steps=2",
                                       *student]) == 0
    return ["data.curriculum=teacher_confidence", "data.curriculum_steps=2",
            f"data.curriculum_scores={scores}"]


STUDENTS = [  # (id, the student's data settings, ranks, the layout's overrides)
    pytest.param(["train.seed=1", "data.global_batch=8"], 1, [], id="seed1-gb8"),
    pytest.param(["train.seed=2", "data.global_batch=8", "curriculum"], 1, [],
                 id="seed2-gb8-curriculum"),
    pytest.param(["train.seed=2", "data.global_batch=16"], 2, [], id="seed2-gb16-dp2",
                 marks=pytest.mark.slow),  # a multi-rank end-to-end run
    pytest.param(["train.seed=1", "data.global_batch=8"], 2, ["parallel.pp=2"], id="seed1-gb8-pp2",
                 marks=pytest.mark.slow),
    # each CP rank reads its chunks of the stored rows, checked by a checksum summed over CP
    pytest.param(["train.seed=1", "data.global_batch=8"], 2, ["parallel.cp=2"], id="seed1-gb8-cp2",
                 marks=pytest.mark.slow),
    pytest.param(["train.seed=2", "data.global_batch=16"], 4, ["parallel.cp=2", "parallel.pp=2"],
                 id="seed2-gb16-cp2-pp2", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("student, ranks, layout", STUDENTS)
def test_one_store_serves_students_of_any_seed_batch_and_layout(setup, monkeypatch, student,
                                                                ranks, layout):
    tmp, cfg_path = setup
    if "curriculum" in student:
        student = [s for s in student if s != "curriculum"]
        student += _curriculum(tmp, cfg_path, student)
    name = "_".join(s.split("=")[-1][-6:] for s in student)
    reference = tmp / f"truncated_{name}"
    want = read_metrics(reference) if reference.exists() else \
        _truncated_run(cfg_path, reference, student, monkeypatch)
    run_dir = tmp / f"offline_{name}_{ranks}{''.join(layout)}"
    overrides = [*student, *layout, *_offline(tmp / "store")]
    if ranks == 1:
        assert _student_run(cfg_path, run_dir, overrides) == 0
    else:
        assert run_ranks(_student_run, ranks, cfg_path, run_dir, overrides,
                         timeout_s=120) == [0] * ranks
    got = read_metrics(run_dir)
    assert [r["step"] for r in got] == [1, 2, 3] and want[0]["kd_loss"] > 0
    assert_same_run(got, want, keys=("loss", "lm_loss", "grad_norm", "kd_loss"),
                    key_atol={"kd_loss": 1e-6})


def test_the_sample_map_does_not_depend_on_the_seed(setup):
    """Stream samples are windows of the sample map; two seeds draw the same windows' tokens."""
    _, cfg_path = setup
    cfg = load_run_config(cfg_path, [], world_size=1).cfg
    for seed in (1, 2):
        data = TokenBatches(cfg.data, seed=seed)
        micro_batches = data.next_step()
        got = torch.cat([mb["input_ids"] for mb in micro_batches])
        assert torch.equal(got, data.map_inputs(data.step_sample_ids))
        assert np.array_equal(data.stream_sample_ids(cfg.data.global_batch), data.step_sample_ids)


# --------------------------------------------------------------------------- compression

@pytest.mark.parametrize("vocab, k", [(2048, 64), (151936, 64), (262208, 256), (262208, 1),
                                      (320, 320)])
def test_ids_round_trip_exactly(vocab, k):
    rng = np.random.default_rng(vocab + k)
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(3 * 7)]).reshape(3, 7, k)
    if 2 <= k < vocab:  # one position holds the first and the last id
        ids[0, 0] = np.concatenate([[0, vocab - 1], rng.choice(np.arange(1, vocab - 1), k - 2,
                                                               replace=False)])
    logp = np.log(rng.dirichlet(np.ones(k + 1), (3, 7))[..., :k])
    leftover = -np.expm1(np.logaddexp.reduce(logp, axis=-1))
    codec = Codec(vocab, k, 6)
    arrays = codec.encode(ids, logp, leftover)
    for j in range(3):
        got, _ = _decode(codec, arrays, j)
        assert np.array_equal(got, np.sort(ids[j], -1))


@pytest.mark.parametrize("mode", [PLAIN, RICE, EXP_GOLOMB])
def test_each_field_code_round_trips_exactly(mode):
    """Uniform fields over the width take plain fields, geometric ones Rice codes, heavy-tailed
    ones Exp-Golomb codes; every one decodes to the fields, sample by sample."""
    rng = np.random.default_rng(mode)
    width, shape = 12, (5, 33, 7)
    fields = {PLAIN: rng.integers(0, 1 << width, shape),
              RICE: rng.geometric(1 / 40, shape) - 1,
              EXP_GOLOMB: np.minimum(rng.zipf(1.6, shape) - 1, (1 << width) - 1)}[mode]
    arrays = encode_fields("f", fields, width)
    assert arrays["f_code"][0] == mode
    for j in range(shape[0]):
        got = decode_fields(arrays.__getitem__, "f", j, 33 * 7)
        assert np.array_equal(got, fields[j].reshape(-1))


def _decode(codec: Codec, arrays: dict, j: int) -> tuple[np.ndarray, np.ndarray]:
    return codec.decode(arrays.__getitem__, j)


KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")


def _check_bound(teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, k: int) -> None:
    """Per token, |KD(decoded) - KD(exact top-k)| <= the stated bound for every kind; the mean
    over tokens within 1e-3 nats. Logits [tokens, V] float64."""
    vocab = teacher_logits.shape[-1]
    values, indices, lse = teacher_topk(teacher_logits, k=k, vocab_size=vocab,
                                        temperature=TEMPERATURE)
    logp, leftover = topk_logprobs(values, lse, temperature=TEMPERATURE, vocab_size=vocab)
    codec = Codec(vocab, k, 6)
    arrays = codec.encode(indices.numpy()[None], logp[None], leftover[None])
    ids, decoded = _decode(codec, arrays, 0)
    order = np.argsort(indices.numpy(), -1)
    exact = np.take_along_axis(logp, order, -1)  # in the decoded (ascending id) order
    stored_leftover = arrays["leftover"][0].astype(np.float64)
    eta = codec.error_bound(exact, stored_leftover)
    assert (np.abs(decoded - exact) <= eta + 1e-6).all()
    ids_t = torch.from_numpy(ids)
    student_logq = (student_logits / TEMPERATURE).log_softmax(-1).gather(-1, ids_t).numpy()
    bound = kd_bound(exact, eta, student_logq)
    for kind in KINDS:
        kd = [topk_divergence(student_logits, torch.from_numpy(v) * TEMPERATURE, ids_t,
                              torch.zeros(len(v), dtype=torch.float64), kind=kind,
                              temperature=TEMPERATURE, vocab_size=vocab).numpy()
              for v in (exact, decoded.astype(np.float64))]
        change = np.abs(kd[1] - kd[0])
        assert (change <= bound + 1e-9).all(), (kind, (change - bound).max())
        assert abs(kd[1].mean() - kd[0].mean()) <= 1e-3, kind


def test_quantized_kd_is_within_the_bound_on_random_logits():
    g = torch.Generator().manual_seed(0)
    for scale in (2.0, 6.0):
        teacher = torch.randn(2048, 2048, generator=g, dtype=torch.float64) * scale
        student = teacher + torch.randn(2048, 2048, generator=g, dtype=torch.float64) * scale / 2
        _check_bound(teacher, student, k=64)


def test_quantized_kd_is_within_the_bound_on_trained_teacher_logits(setup):
    """A teacher trained 40 steps on the corpus, against the random student of the same size."""
    tmp, cfg_path = setup
    trained = tmp / "trained_teacher"
    teacher_cfg = write_config(tmp / "teacher.yaml", {
        **teacher_config(base_config(tmp, cache=tmp / "cache")),
        "train": {**base_config(tmp, cache=tmp / "cache")["train"], "steps": 40, "lr": 3e-3,
                  "run_dir": str(trained)}})
    assert run_main(str(teacher_cfg), [], distill=False) == 0
    model_cfg = ModelConfig(**teacher_config(base_config(tmp, cache=tmp / "cache"))["model"])
    layout = ParallelLayout.single()
    from distill.weights import load_weights

    teacher = TransformerLM(model_cfg, layout)
    load_weights(resolve_checkpoint(trained, key="trained"), model=teacher, layout=layout)
    student = TransformerLM(model_cfg, layout, seed=5)
    cfg = load_run_config(cfg_path, [], world_size=1).cfg
    input_ids = torch.cat([mb["input_ids"] for mb in
                           TokenBatches(cfg.data, seed=3).next_step()])  # [4, 16]
    with torch.no_grad():
        t, s = (m(input_ids).logits.reshape(-1, VOCAB).double() for m in (teacher, student))
    _check_bound(t, s, k=64)


def _topk_ranks(cases):
    from engine.parallel import make_layout

    layout = make_layout(ParallelConfig(tp=2))
    out = []
    for full, vocab, k in cases:
        shard = full.chunk(2, dim=-1)[layout.tp_rank]
        with C.count_collectives() as counts:
            got = teacher_topk(shard, k=k, vocab_size=vocab, temperature=TEMPERATURE,
                               group=layout.tp_group)
        out.append((got, dict(counts.calls), dict(counts.bytes)))
    return out


def test_teacher_topk_over_vocab_shards_matches_full_vocabulary():
    g = torch.Generator().manual_seed(3)
    cases = [(torch.randn(3, 5, 384, generator=g) * 4, vocab, k)
             for vocab, k in ((300, 1), (300, 7), (300, 150), (300, 300), (150, 40))]
    results = run_ranks(_topk_ranks, 2, cases)
    for (full, vocab, k), *ranks in zip(cases, *results):
        real = full[..., :vocab].double()  # [3, 5, vocab]
        want_values, want_indices = real.topk(k, dim=-1)
        want_lse = torch.logsumexp(real / TEMPERATURE, dim=-1)
        for (values, indices, lse), calls, nbytes in ranks:
            assert values.dtype == torch.float32 and indices.dtype == torch.int32
            assert torch.equal(values.double(), want_values)  # exact: picked, not computed
            assert torch.equal(indices.long(), want_indices)
            torch.testing.assert_close(lse, want_lse, rtol=1e-7, atol=1e-7)  # float32 exps
            assert calls == {"all_gather": 1} and nbytes == {"all_gather": 15 * (2 * k + 1) * 8}


# ------------------------------------------------------------------- resume, merge, tools

def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_an_export_cut_by_sigterm_resumes_to_the_same_store(setup):
    tmp, cfg_path = setup
    out = tmp / "resumed"
    partial = tmp / ".resumed.tmp"
    command = [sys.executable, str(ROOT / "tools/export_teacher_logits.py"), "--config",
               str(cfg_path), "--top-k", str(K), "--out", str(out), "--shard-samples", str(SHARD),
               "--no-progress", *EXACT]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and \
            len(list(partial.glob("train_*.safetensors"))) < 3:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == -signal.SIGTERM
    written = len(list(partial.glob("train_*.safetensors")))
    assert not out.exists() and 3 <= written < len(list((tmp / "store").glob("train_*")))
    assert _export(cfg_path, out, *EXACT) == 0
    assert _files(out) == _files(tmp / "store")


def test_exports_of_disjoint_ranges_merge_into_the_store_of_their_union(setup, capsys):
    tmp, cfg_path = setup
    parts = [tmp / "part0", tmp / "part1"]
    assert _export(cfg_path, parts[0], "--samples", "128", *EXACT) == 0
    assert _export(cfg_path, parts[1], "--first", "128", "--samples", "64", *EXACT) == 0
    merged = tmp / "merged"
    assert offline_store.main(["merge", *map(str, parts), "--out", str(merged)]) == 0
    store = json.loads((tmp / "store" / "metadata.json").read_text())
    meta = json.loads((merged / "metadata.json").read_text())
    assert meta["splits"]["train"]["shards"] == store["splits"]["train"]["shards"][:3]
    assert {k: v for k, v in meta.items() if k != "splits"} == \
        {k: v for k, v in store.items() if k != "splits"}
    for name in ("train_00000.safetensors", "train_00001.safetensors", "train_00002.safetensors"):
        assert (merged / name).read_bytes() == (tmp / "store" / name).read_bytes()
    capsys.readouterr()
    assert offline_store.main(["info", str(merged)]) == 0
    assert "train: 192 of 5767 samples in 3 shards" in capsys.readouterr().out
    assert offline_store.main(["verify", str(merged)]) == 0
    assert offline_store.main(["merge", str(parts[0]), str(merged), "--out", str(tmp / "x")]) == 2
    assert "the ranges overlap" in capsys.readouterr().err


def test_verify_names_an_altered_shard(setup, capsys):
    tmp, _ = setup
    altered = _altered_copy(tmp, "verify", "train_00002.safetensors", _values_40)
    capsys.readouterr()
    assert offline_store.main(["verify", str(altered)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"StoreError: {altered / 'train_00002.safetensors'} is corrupted or "
                          "altered: its sha256 does not match metadata") and "\n" not in err, err


# ------------------------------------------------------------------ wrong stores, bad input

def _altered_copy(tmp: Path, name: str, shard: str, alter) -> Path:
    """A copy of the store with `alter(tensors)` applied to one shard: same size, other sha256."""
    export = tmp / f"altered_{name}"
    shutil.copytree(tmp / "store", export)
    path = export / shard
    size = path.stat().st_size
    tensors = load_file(path)
    alter(tensors)
    save_file(tensors, path)
    assert path.stat().st_size == size
    return export


def _values_40(tensors: dict) -> None:
    tensors["values"].fill_(40.0)


def _one_nan(tensors: dict) -> None:
    tensors["values"][0, 0, 0] = float("nan")


def _truncated(tmp: Path) -> Path:
    out = tmp / "truncated"
    if not out.exists():
        shutil.copytree(tmp / "store", out)
        with open(out / "train_00001.safetensors", "r+b") as f:
            f.truncate(100)
    return out


def _edited(tmp: Path, field: str, value) -> Path:
    out = tmp / f"edited_{field}"
    if not out.exists():
        shutil.copytree(tmp / "store", out)
        meta = json.loads((out / "metadata.json").read_text())
        meta[field] = value
        (out / "metadata.json").write_text(json.dumps(meta))
    return out


def _partial(tmp: Path) -> Path:
    out = tmp / "first64"
    if not out.exists():
        assert _export(tmp / "run.yaml", out, "--samples", "64") == 0
    return out


def _other_teacher(tmp: Path) -> Path:
    cfg = base_config(tmp, cache=tmp / "cache")
    other = teacher_config(cfg)
    other["model"]["init_std"] = 0.2  # other weights
    return make_teacher(tmp / "other_teacher", other)


MISMATCHES = [
    (["data.seq_len=8"], "exported for data.seq_len = 16 but this run has 8"),
    (["distill.logit.temperature=1.0"], "distill.logit.temperature = 2.0 but this run has 1.0"),
    (["model.vocab_size=384"], "exported for model.vocab_size = 320 but this run has 384"),
    (["data.split=80,20"], "exported for data.path / data.split"),
    (["data.corpus_max_bytes=120000"], "exported for data.path / data.split"),
    (["distill.offline_top_k=32"], "holds the top-16 but this run has distill.offline_top_k = 32"),
    (["distill.offline_dir={tmp}/nowhere"], "no teacher store at"),
    (["distill.teacher={other_teacher}"], "not from distill.teacher"),
    (["distill.offline_dir={truncated}"], "train_00001.safetensors is missing or altered"),
    (["distill.offline_dir={tokenizer}"], "exported for the tokenizer (tokenizer.json beside "
                                          "data.path) = other but"),
    (["distill.offline_dir={version1}"], "is not a megadistill-teacher-store version 2 store"),
    (["distill.offline_dir={partial}"], "holds 64 of the 5767 train samples, not sample"),
]


@pytest.mark.parametrize("overrides, message", MISMATCHES)
def test_a_store_that_does_not_serve_the_run_is_one_config_error(setup, overrides, message):
    tmp, cfg_path = setup
    makers = {"other_teacher": _other_teacher, "truncated": _truncated, "partial": _partial,
              "tokenizer": lambda t: _edited(t, "tokenizer", "other"),
              "version1": lambda t: _edited(t, "version", 1)}
    names = {"tmp": tmp, **{n: make(tmp) for n, make in makers.items()
                            if any(f"{{{n}}}" in o for o in overrides)}}
    overrides = [o.format(**names) for o in overrides]
    with pytest.raises(ConfigError) as err:
        load_run_config(cfg_path, [*_offline(tmp / "store"), *overrides], world_size=1)
    assert err.value.key == "distill.offline_dir" and "\n" not in str(err.value)
    assert message in str(err.value), str(err.value)


def test_entry_point_stops_with_exit_code_2_on_a_mismatch(setup, capsys):
    tmp, cfg_path = setup
    assert run_main(str(cfg_path), [*_offline(tmp / "store"), "data.seq_len=8"]) == 2
    assert capsys.readouterr().err.strip().startswith("ConfigError: distill.offline_dir: ")


def _first_needed_at_step_2(cfg_path: Path) -> str:
    """A shard that the second step of the run reads and the first does not."""
    cfg = load_run_config(cfg_path, [], world_size=1).cfg
    ids = TokenBatches(cfg.data, seed=cfg.train.seed).stream_sample_ids(2 * cfg.data.global_batch)
    first, second = (set(part // SHARD) for part in np.split(ids, 2))
    return f"train_{min(second - first):05d}.safetensors"


@pytest.mark.parametrize("alter", [_values_40, _one_nan])
def test_a_shard_altered_in_place_stops_the_run_before_its_rows_are_used(setup, capsys, alter):
    tmp, cfg_path = setup
    shard = _first_needed_at_step_2(cfg_path)
    export = _altered_copy(tmp, alter.__name__, shard, alter)
    run_dir = tmp / f"run_{alter.__name__}"
    capsys.readouterr()
    assert run_main(str(cfg_path), [f"train.run_dir={run_dir}", *_offline(export)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("ConfigError: ")] == [
        f"ConfigError: distill.offline_dir: {export / shard} is corrupted or altered: its sha256 "
        "does not match metadata; export it again with tools/export_teacher_logits.py"]
    assert [r["step"] for r in read_metrics(run_dir)] == [1]


def test_rows_of_other_tokens_stop_the_run(setup):
    tmp, cfg_path = setup
    cfg = load_run_config(cfg_path, _offline(tmp / "store"), world_size=1).cfg
    data = TokenBatches(cfg.data, seed=cfg.train.seed)
    teacher = OfflineTeacher(tmp / "store", data=data, temperature=TEMPERATURE)
    micro_batches = data.next_step()
    data.step_sample_ids = data.step_sample_ids + 1  # rows of other windows
    with pytest.raises(OfflineTeacherError, match="misaligned"):
        teacher(micro_batches[0])


def test_a_small_store_trains_and_kd_loss_falls(setup):
    """The default (6-bit) store of a dataset of 4 samples: the student fits the teacher's top-k
    on samples it sees again, so the KD term must fall far."""
    tmp, cfg_path = setup
    rng = np.random.default_rng(0)
    prefix = tmp / "tiny"  # train: one document of 4 windows of 16 + 1 tokens; valid: one
    write_indexed(prefix, [rng.integers(1, VOCAB, 65), rng.integers(1, VOCAB, 40)], np.uint16)
    data = [f"data.path={prefix}", "data.split=50,50", "train.steps=15"]
    assert _export(cfg_path, tmp / "tiny_store", *data) == 0
    run = ["distill.lm_weight=0", "train.lr=3e-2", f"train.run_dir={tmp / 'tiny_run'}"]
    assert run_main(str(cfg_path), [*data, *run, *_offline(tmp / "tiny_store")]) == 0
    kd = [r["kd_loss"] for r in read_metrics(tmp / "tiny_run")]
    assert len(kd) == 15 and all(math.isfinite(x) and x > 0 for x in kd)
    assert kd[-1] < 0.3 * kd[0], kd


def _parallel_export(cfg_path: Path, out: Path) -> int:
    return _export(cfg_path, out, "--samples", "256", *EXACT, "parallel.tp=2")


@pytest.mark.slow  # a multi-rank end-to-end run
def test_an_export_at_tp2_dp2_holds_the_single_process_store(setup):
    tmp, cfg_path = setup
    assert run_ranks(_parallel_export, 4, cfg_path, tmp / "tp2dp2", timeout_s=120) == [0] * 4
    ids = np.arange(256)
    want, got = (TeacherStore(d).rows("train", ids) for d in (tmp / "store", tmp / "tp2dp2"))
    assert torch.equal(got["ids"], want["ids"]) and torch.equal(got["checksum"], want["checksum"])
    torch.testing.assert_close(got["logp"], want["logp"], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["leftover"], want["leftover"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("flags, message", [
    (["--top-k", "0"], "ConfigError: --top-k: must be in [1, 320] (got 0)"),
    (["--top-k", str(VOCAB + 1)], "ConfigError: --top-k: must be in [1, 320] (got 321)"),
    (["--top-k", "4", "--out", "{tmp}/store"], "ConfigError: --out: {tmp}/store exists"),
    (["--top-k", "4", "--split", "test"], "ConfigError: --split: must be train, valid or all"),
    (["--top-k", "4", "--value-bits", "20"], "ConfigError: --value-bits: must be in 2..16 or 32"),
    (["--top-k", "4", "--first", "10"], "ConfigError: --first: must be a multiple of"),
    (["--top-k", "4", "distill.logit.weight=0", "distill.lm_weight=1"],
     "ConfigError: distill.logit.weight: is 0"),
    (["--top-k", "4", "parallel.tp=3"], "ConfigError: parallel.tp: "),
])
def test_export_refuses_bad_arguments(setup, capsys, flags, message):
    tmp, cfg_path = setup
    flags = [f.format(tmp=tmp) for f in flags]
    out = [] if "--out" in flags else ["--out", str(tmp / "never")]
    capsys.readouterr()
    assert export_teacher_logits.main(["--config", str(cfg_path), *out, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message.format(tmp=tmp)) and "\n" not in err, err
    assert not (tmp / "never").exists() and not (tmp / ".never.tmp").exists()


def test_a_resumed_export_with_other_settings_is_refused(setup, capsys):
    tmp, cfg_path = setup
    partial = tmp / ".other.tmp"
    partial.mkdir()
    (partial / "export.json").write_text(json.dumps({"k": 8}))
    capsys.readouterr()
    assert _export(cfg_path, tmp / "other") == 2
    # the error line (the last: pytest's captures can leave earlier logging noise on stderr)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"ConfigError: --out: {partial} holds an interrupted export with other "
                          "settings (") and "k" in err, err


def test_curriculum_scores_from_a_store_are_the_teachers(setup):
    """At temperature 1 the store's top-1 log-probability is the teacher's: the scores read from
    a (top-1, float32) store equal those of a teacher pass (float32 round-off)."""
    tmp, cfg_path = setup
    t1 = ["distill.logit.temperature=1.0"]
    assert export_teacher_logits.main(["--config", str(cfg_path), "--top-k", "1", "--out",
                                       str(tmp / "top1"), "--no-progress", *EXACT, *t1]) == 0
    scores = {}
    for name, flags in (("teacher", []), ("store", ["--store", str(tmp / "top1")])):
        out = tmp / f"scores_from_{name}"
        assert curriculum_scores.main(["--config", str(cfg_path), "--out", str(out), *flags,
                                       "data.curriculum_steps=2", *t1]) == 0
        scores[name] = np.load(out / "scores.npy")
    assert scores["teacher"].shape == (8,)
    np.testing.assert_allclose(scores["store"], scores["teacher"], rtol=1e-6)


def test_an_export_of_both_splits_holds_each_splits_windows(setup, capsys):
    tmp, cfg_path = setup
    out = tmp / "both_splits"
    assert _export(cfg_path, out, "--split", "all", "--samples", "40") == 0
    cfg = load_run_config(cfg_path, [], world_size=1).cfg
    store = TeacherStore(out)
    for split in ("train", "valid"):
        windows = TokenBatches(cfg.data, seed=0, split=split)
        count = min(40, windows.map_samples)
        assert store.covered(split) == count and store.map_samples(split) == windows.map_samples
        rows = store.rows(split, np.arange(count))
        assert torch.equal(rows["checksum"],
                           sample_checksums(windows.map_inputs(range(count))))
    capsys.readouterr()
    assert offline_store.main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "train: 40 of 5767 samples" in info and "valid: 25 of 25 samples" in info, info
