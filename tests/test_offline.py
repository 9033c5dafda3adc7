"""The `offline` schedule: teacher top-k logits from tools/export_teacher_logits.py, trained from.

- `teacher_topk` at TP=2 against the float64 top-k and log-sum-exp of the gathered vocabulary
  (padding excluded, a rank without real columns, k up to the vocabulary): values and indices
  exact, log-sum-exp to 1e-6; one all_gather of [tokens, 2k + 1].
- k = vocabulary: the objective on exported rows equals the colocated teacher's (KD term and every
  student gradient, fp32: atol 1e-6 / rtol 1e-5), and whole training runs (TP=1, and DP=2 with
  other micro-batches) log the same losses and gradient norms (rtol 1e-5; kd_loss atol 1e-6,
  since the random teacher's KD is ~1e-2 and fp32 round-off of its two formulas is ~1e-7).
- An export at TP=2 x DP=2 (4 ranks) holds the top-k of the single-process full export.
- A soft-capped teacher exports its capped logits.
- k < vocabulary: finite, and the KD loss falls under training.
- Metadata that does not match the run, and bad export arguments, stop with one-line ConfigErrors.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from distill.config import aligned_teacher_config
from distill.objective import DistillObjective, count_tokens
from distill.offline import OfflineTeacher, OfflineTeacherError, ShardedRows, read_metadata, teacher_topk
from distill.runconfig import load_run_config
from distill.teacher import TeacherRequest
from distill.teacher_sources import ColocatedTeacher
from distill.weights import load_weights
from engine import collectives as C
from engine.config import ConfigError
from engine.data import TokenBatches, write_indexed
from engine.parallel import ParallelConfig, ParallelLayout
from engine.spawn import run_ranks
from layers.model import TransformerLM
from tests.helpers import FP32_ATOL, FP32_RTOL, assert_same_run
from tests.trainer_utils import (
    VOCAB,
    base_config,
    make_teacher,
    read_metrics,
    run_main,
    teacher_config,
    write_config,
)
from tools import export_teacher_logits

TEMPERATURE = 2.0
SHARD = 5  # samples per shard: micro-batches straddle shard files
SMALL_K = 16


def _export(cfg_path: Path, out: Path, k: int, *overrides: str) -> int:
    return export_teacher_logits.main(["--config", str(cfg_path), "--top-k", str(k), "--out",
                                       str(out), "--shard-samples", str(SHARD), "--no-progress",
                                       *overrides])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A colocated run config (3 steps of 4 samples) and its full-vocabulary export."""
    tmp = tmp_path_factory.mktemp("offline")
    cfg = base_config(tmp, cache=tmp / "cache")
    teacher = make_teacher(tmp / "teacher", teacher_config(cfg))
    cfg["distill"] = {"teacher": str(teacher), "lm_weight": 0.5,
                      "logit": {"weight": 1.0, "temperature": TEMPERATURE}}
    cfg["data"]["mask_across_documents"] = True  # unequal valid-token counts per micro-batch
    path = write_config(tmp / "run.yaml", cfg)
    assert _export(path, tmp / "full", VOCAB) == 0
    return tmp, path


def _offline(export_dir: Path) -> list[str]:
    return ["distill.schedule=offline", f"distill.offline_dir={export_dir}"]


# ----------------------------------------------------------------------------- top-k under TP

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
            torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-6)
            assert calls == {"all_gather": 1} and nbytes == {"all_gather": 15 * (2 * k + 1) * 8}


# ------------------------------------------------------------------------ k = the vocabulary

def _objective_terms(cfg_path: Path, export_dir: Path) -> list[tuple[torch.Tensor, list]]:
    """KD term and student gradients of one micro-batch, colocated teacher vs exported rows."""
    cfg, teacher_cfg, _ = load_run_config(cfg_path, [], world_size=1)
    layout = ParallelLayout.single()
    student = TransformerLM(cfg.model, layout, seed=1)
    objective = DistillObjective(cfg.distill, cfg.model, teacher_cfg, layout)
    teacher = TransformerLM(aligned_teacher_config(cfg.model, teacher_cfg), layout)
    load_weights(cfg.distill.teacher, model=teacher, layout=layout)
    data = TokenBatches(cfg.data, seed=cfg.train.seed)
    data.next_step()  # the rows of the second step, so sample ids do not start at 0
    micro_batches = data.next_step()
    counts = count_tokens(micro_batches, layout)
    sources = [ColocatedTeacher(teacher, TeacherRequest(head="logits")),
               OfflineTeacher(export_dir, data=data)]
    results = []
    for source in sources:
        student.zero_grad()
        for mb in micro_batches:  # the offline source serves the step's micro-batches in order
            out = objective(student(mb["input_ids"]), source(mb), mb["labels"],
                            tokens_norm=counts)
            out.loss.backward()
        results.append((out.kd_loss, [p.grad.clone() for p in student.parameters()]))
    return results


def test_full_vocabulary_rows_give_the_colocated_objective_and_gradients(setup):
    tmp, cfg_path = setup
    colocated, offline = _objective_terms(cfg_path, tmp / "full")
    assert colocated[0] > 0
    torch.testing.assert_close(offline[0], colocated[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(offline[1], colocated[1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _assert_same_run(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [1, 2, 3]
    assert_same_run(got, want, keys=("loss", "lm_loss", "grad_norm", "kd_loss"), optional=["val_loss"],
                    key_atol={"kd_loss": 1e-6})


def _dp_offline_run(cfg_path: Path, run_dir: Path, export_dir: Path) -> int:
    return run_main(str(cfg_path), [f"train.run_dir={run_dir}", "data.micro_batch=1",
                                    *_offline(export_dir)])


@pytest.mark.slow  # a multi-rank end-to-end run
def test_full_vocabulary_training_equals_colocated(setup):
    tmp, cfg_path = setup
    assert run_main(str(cfg_path), [f"train.run_dir={tmp / 'colocated'}"]) == 0
    colocated = read_metrics(tmp / "colocated")
    assert run_main(str(cfg_path), [f"train.run_dir={tmp / 'off1'}", *_offline(tmp / "full")]) == 0
    _assert_same_run(read_metrics(tmp / "off1"), colocated)
    run_ranks(_dp_offline_run, 2, cfg_path, tmp / "off_dp2", tmp / "full", timeout_s=120)
    _assert_same_run(read_metrics(tmp / "off_dp2"), colocated)


def _pp_offline_run(cfg_path: Path, run_dir: Path, export_dir: Path) -> int:
    return run_main(str(cfg_path), [f"train.run_dir={run_dir}", "parallel.pp=2",
                                    *_offline(export_dir)])


@pytest.mark.slow  # a multi-rank end-to-end run
def test_offline_at_pp2_equals_single_process(setup):
    """The last pipeline stage reads the exported rows of its micro-batches, in order."""
    tmp, cfg_path = setup
    assert run_main(str(cfg_path), [f"train.run_dir={tmp / 'off_single'}",
                                    *_offline(tmp / "full")]) == 0
    run_ranks(_pp_offline_run, 2, cfg_path, tmp / "off_pp2", tmp / "full", timeout_s=120)
    _assert_same_run(read_metrics(tmp / "off_pp2"), read_metrics(tmp / "off_single"))


# --------------------------------------------------------------------- export at TP=2 x DP=2

def _parallel_export(cfg_path: Path, out: Path) -> int:
    return _export(cfg_path, out, SMALL_K, "parallel.tp=2")


def _all_rows(export_dir: Path) -> dict[str, torch.Tensor]:
    meta = read_metadata(export_dir)
    return ShardedRows(export_dir, meta).rows(range(meta["samples"]))


@pytest.mark.slow  # a multi-rank end-to-end run
def test_export_at_tp2_dp2_holds_the_top_k_of_the_full_export(setup):
    tmp, cfg_path = setup
    assert run_ranks(_parallel_export, 4, cfg_path, tmp / "tp2dp2", timeout_s=120) == [0] * 4
    meta = read_metadata(tmp / "tp2dp2")
    assert meta["exported_with"]["tp"] == 2 and meta["exported_with"]["dp"] == 2
    assert len(meta["shards"]) == 3 and meta["k"] == SMALL_K
    full, got = _all_rows(tmp / "full"), _all_rows(tmp / "tp2dp2")
    logits = torch.empty(*full["values"].shape[:2], VOCAB)  # every teacher logit, from TP=1
    logits.scatter_(-1, full["indices"].long(), full["values"])
    assert torch.equal(got["checksum"], full["checksum"])
    torch.testing.assert_close(got["logsumexp"], full["logsumexp"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["values"], full["values"][..., :SMALL_K], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits.gather(-1, got["indices"].long()), got["values"],
                               rtol=0, atol=1e-5)
    assert (got["indices"].long().sort(-1).values.diff(dim=-1) > 0).all()  # distinct ids


def test_export_of_a_soft_capped_teacher_holds_its_capped_logits(setup):
    """A teacher with model.final_logit_softcap = c and the setup teacher's weights exports
    c * tanh(that teacher's logits / c): the same ids (tanh keeps the order), the capped values,
    and the log-sum-exp of the capped logits at the run's temperature (fp32 round-off)."""
    tmp, cfg_path = setup
    cap = 2.0
    capped_cfg = teacher_config(base_config(tmp, cache=tmp / "cache"))  # the setup teacher's
    capped_cfg["model"]["final_logit_softcap"] = cap
    teacher = make_teacher(tmp / "capped_teacher", capped_cfg)
    assert _export(cfg_path, tmp / "capped", VOCAB, f"distill.teacher={teacher}") == 0
    plain, capped = _all_rows(tmp / "full"), _all_rows(tmp / "capped")
    assert plain["values"].max() > 2 * cap  # this peaked teacher's logits: the cap bites
    assert torch.equal(capped["indices"], plain["indices"])
    want = cap * torch.tanh(plain["values"].double() / cap)
    torch.testing.assert_close(capped["values"].double(), want, rtol=FP32_RTOL, atol=FP32_ATOL)
    torch.testing.assert_close(capped["logsumexp"].double(),
                               torch.logsumexp(want / TEMPERATURE, -1), rtol=FP32_RTOL,
                               atol=FP32_ATOL)


# --------------------------------------------------------------------------- k < vocabulary

def test_top_k_export_trains_and_kd_loss_falls(setup):
    """On a dataset of 4 samples per epoch the student can fit the teacher's top-k on every
    sample it sees again, so the KD term must fall far (random-teacher KD on fresh data only
    falls as far as the teacher's marginals)."""
    tmp, cfg_path = setup
    rng = np.random.default_rng(0)
    prefix = tmp / "tiny"  # train: one document of 4 windows of 16 + 1 tokens; valid: one
    write_indexed(prefix, [rng.integers(1, VOCAB, 65), rng.integers(1, VOCAB, 40)], np.uint16)
    data = [f"data.path={prefix}", "data.split=50,50", "train.steps=15"]
    assert _export(cfg_path, tmp / "top16", SMALL_K, *data) == 0
    run = ["distill.lm_weight=0", "train.lr=3e-2", f"train.run_dir={tmp / 'top16_run'}"]
    assert run_main(str(cfg_path), [*data, *run, *_offline(tmp / "top16")]) == 0
    kd = [r["kd_loss"] for r in read_metrics(tmp / "top16_run")]
    assert len(kd) == 15 and all(math.isfinite(x) and x > 0 for x in kd)
    assert kd[-1] < 0.3 * kd[0], kd


# ---------------------------------------------------------------------------- bad metadata

def _other_teacher(tmp: Path) -> Path:
    cfg = base_config(tmp, cache=tmp / "cache")
    cfg["train"]["seed"] = 99  # another checkpoint (its metadata records another run config)
    return make_teacher(tmp / "other_teacher", teacher_config(cfg))


def _altered_export(tmp: Path) -> Path:
    altered = tmp / "altered"
    if not altered.exists():
        shutil.copytree(tmp / "full", altered)
        with open(altered / "shard_00001.safetensors", "r+b") as f:
            f.truncate(100)
    return altered


MISMATCHES = [
    (["data.seq_len=8"], "exported for data.seq_len = 16 but this run has 8"),
    (["train.seed=8"], "exported for train.seed = 7 but this run has 8"),
    (["distill.logit.temperature=1.0"], "distill.logit.temperature = 2.0 but this run has 1.0"),
    (["model.vocab_size=384"], "exported for model.vocab_size = 320 but this run has 384"),
    (["data.split=80,20"], "exported for data.path / data.split"),
    (["data.corpus_max_bytes=120000"], "exported for data.path / data.split"),
    (["train.steps=4"], "covers 12 samples but this run needs train.steps * data.global_batch "
                        "= 16"),
    (["distill.offline_dir={tmp}/nowhere"], "no teacher export at"),
    (["distill.teacher={other_teacher}"], "not from distill.teacher"),
    (["distill.offline_dir={altered}"], "shard_00001.safetensors is missing or altered"),
]


@pytest.mark.parametrize("overrides, message", MISMATCHES)
def test_metadata_that_does_not_match_the_run_is_one_config_error(setup, overrides, message):
    tmp, cfg_path = setup
    names = {"tmp": tmp}
    if any("other_teacher" in o for o in overrides):
        names["other_teacher"] = _other_teacher(tmp)
    if any("altered" in o for o in overrides):
        names["altered"] = _altered_export(tmp)
    overrides = [o.format(**names) for o in overrides]
    with pytest.raises(ConfigError) as err:
        load_run_config(cfg_path, [*_offline(tmp / "full"), *overrides], world_size=1)
    assert err.value.key == "distill.offline_dir" and "\n" not in str(err.value)
    assert message in str(err.value), str(err.value)


def test_entry_point_stops_with_exit_code_2_on_a_mismatch(setup, capsys):
    tmp, cfg_path = setup
    assert run_main(str(cfg_path), [*_offline(tmp / "full"), "train.seed=9"]) == 2
    assert capsys.readouterr().err.strip().startswith("ConfigError: distill.offline_dir: ")


def _alter_in_place(export_dir: Path, shard: str, alter) -> None:
    """Rewrite one shard with `alter(tensors)` applied: the same size, another sha256."""
    path = export_dir / shard
    size = path.stat().st_size
    tensors = load_file(path)
    alter(tensors)
    save_file(tensors, path)
    assert path.stat().st_size == size


def _values_40(tensors: dict) -> None:
    tensors["values"].fill_(40.0)  # trained to a step-1 loss of 1.7e14 with exit 0


def _one_nan(tensors: dict) -> None:
    tensors["values"][0, 0, 0] = float("nan")  # trained on with slightly other losses


@pytest.mark.parametrize("alter", [_values_40, _one_nan])
def test_a_shard_altered_in_place_stops_the_run_before_its_rows_are_used(setup, capsys, alter):
    """Shard 1 holds samples 5..9: the second step (samples 4..7) is the first to need it, and
    stops before training, with one line naming the shard; the first step was trained."""
    tmp, cfg_path = setup
    export, run_dir = tmp / f"altered_{alter.__name__}", tmp / f"run_{alter.__name__}"
    shutil.copytree(tmp / "full", export)
    _alter_in_place(export, "shard_00001.safetensors", alter)
    capsys.readouterr()
    assert run_main(str(cfg_path), [f"train.run_dir={run_dir}", *_offline(export)]) == 2
    # the error lines only: a log handler left bound to an earlier test's closed capture stream
    # can add a "Logging error" report to stderr in a shared pytest worker
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("ConfigError: ")] == [
        f"ConfigError: distill.offline_dir: {export / 'shard_00001.safetensors'} is corrupted or "
        "altered: its sha256 does not match metadata; export it again with "
        "tools/export_teacher_logits.py"]
    assert [r["step"] for r in read_metrics(run_dir)] == [1]


@pytest.mark.slow  # a multi-rank end-to-end run
def test_an_altered_shard_stops_every_dp_rank_with_exit_2(setup):
    """Each DP rank checks the shards of the whole step, not only of its own rows, so both meet
    the altered shard at the same step and neither is left waiting for the other."""
    tmp, cfg_path = setup
    export = tmp / "altered_dp2"
    shutil.copytree(tmp / "full", export)
    _alter_in_place(export, "shard_00001.safetensors", _values_40)
    assert run_ranks(_dp_offline_run, 2, cfg_path, tmp / "altered_dp2_run", export,
                     timeout_s=120) == [2, 2]


def test_rows_of_other_tokens_stop_the_run(setup):
    tmp, cfg_path = setup
    cfg = load_run_config(cfg_path, _offline(tmp / "full"), world_size=1).cfg
    data = TokenBatches(cfg.data, seed=cfg.train.seed + 1)  # another sample order
    teacher = OfflineTeacher(tmp / "full", data=data)
    with pytest.raises(OfflineTeacherError, match="misaligned"):
        teacher(data.next_step()[0])
    for _ in range(3):
        batches = data.next_step()  # a fourth step: past the 12 exported samples
    with pytest.raises(OfflineTeacherError, match="outside the 12 samples"):
        teacher(batches[0])


@pytest.mark.parametrize("flags, message", [
    (["--top-k", "0"], "ConfigError: --top-k: must be in [1, 320] (got 0)"),
    (["--top-k", str(VOCAB + 1)], "ConfigError: --top-k: must be in [1, 320] (got 321)"),
    (["--top-k", "4", "--out", "{tmp}/full"], "ConfigError: --out: {tmp}/full exists"),
    (["--top-k", "4", "distill.logit.weight=0", "distill.lm_weight=1"],
     "ConfigError: distill.logit.weight: is 0"),
    (["--top-k", "4", "parallel.tp=3"], "ConfigError: parallel.tp: "),
])
def test_export_refuses_bad_arguments(setup, capsys, flags, message):
    tmp, cfg_path = setup
    flags = [f.format(tmp=tmp) for f in flags]
    out = [] if "--out" in flags else ["--out", str(tmp / "never")]
    assert export_teacher_logits.main(["--config", str(cfg_path), *out, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message.format(tmp=tmp)) and "\n" not in err, err
    assert not (tmp / "never").exists()
