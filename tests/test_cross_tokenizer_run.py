"""Cross-tokenizer distillation through the entry point: a student with one byte-level BPE
distilled from a tiny random teacher with another (both trained here on the same text, paired
data from tools/preprocess_data.py --teacher-tokenizer). TP=2 + SP and DP=2 equal TP=1; bad
inputs are one-line ConfigErrors."""

from __future__ import annotations

import json
import math
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from distill.runconfig import load_run_config
from engine.config import ConfigError
from engine.spawn import run_ranks
from tests.helpers import RUN_KEYS, assert_same_run
from tests.test_paired_data import make_paired
from tests.trainer_utils import base_config, make_teacher, read_metrics, run_main, write_config
from tools import export_teacher_logits, offline_store, score
from tools import plan as P
from tools.bench.plan import MEASURED_STEP, measure_rank

STUDENT_VOCAB, TEACHER_VOCAB = 320, 512
SOURCES = ("textwrap.py", "json/decoder.py", "json/encoder.py", "shlex.py", "glob.py",
           "fnmatch.py", "this.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xtok_run")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text(encoding="utf-8") for name in SOURCES]
    prefix, _, _ = make_paired(tmp, texts, student_vocab=STUDENT_VOCAB,
                               teacher_vocab=TEACHER_VOCAB)
    cfg = base_config(tmp, cache=tmp / "cache")
    cfg["model"]["vocab_size"] = STUDENT_VOCAB
    cfg["data"].update(path=str(prefix), seq_len=16)
    teacher = {"model": {**cfg["model"], "vocab_size": TEACHER_VOCAB, "hidden": 48, "layers": 3,
                         "ffn_hidden": 96, "init_std": 0.3, "max_seq_len": 64}}
    cfg["distill"] = {"teacher": str(make_teacher(tmp / "teacher", teacher)),
                      "cross_tokenizer": {"loss": "likelihood", "teacher_seq_len": 24},
                      "logit": {"weight": 1.0, "temperature": 1.5}}
    return tmp, write_config(tmp / "xtok.yaml", cfg)


def _run(cfg_path: Path, run_dir: Path, overrides: list[str]) -> int:
    return run_main(str(cfg_path), [f"train.run_dir={run_dir}", *overrides])


LOSSES = {  # name: overrides
    "likelihood-binary_kl": ["distill.cross_tokenizer.divergence=binary_kl"],
    "likelihood-both": ["distill.cross_tokenizer.divergence=both"],
    # (forward_kl is infinite here: the student's BPE is inside the teacher's; see BAD)
    "mapped_kl-reverse": ["distill.cross_tokenizer.loss=mapped_kl", "distill.logit.kind=reverse_kl"],
    "uld": ["distill.cross_tokenizer.loss=uld", "distill.cross_tokenizer.uld_top_k=16"],
    # activation pairs at the chunks' ends, through a projection (student 32 wide, teacher 48)
    "likelihood-mlps": ["distill.activations=[all_mlps]", "distill.projection=per_pair"],
}


LAYOUTS = {"tp2-sp": ["parallel.tp=2", "parallel.sp=true"], "dp2": []}  # on two ranks


def _single_process(tmp: Path, cfg_path: Path, loss: str) -> list[dict]:
    """The TP=1 reference run of `loss` (run once per module)."""
    run_dir = tmp / f"tp1_{loss}"
    if not (run_dir / "metrics.jsonl").exists():
        assert _run(cfg_path, run_dir, LOSSES[loss]) == 0
    return read_metrics(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("loss, layout", [*((loss, "tp2-sp") for loss in LOSSES),
                                          ("likelihood-both", "dp2")])
def test_two_ranks_equal_one(setup, loss, layout):
    tmp, cfg_path = setup
    want = _single_process(tmp, cfg_path, loss)
    assert run_ranks(_run, 2, cfg_path, tmp / f"{layout}_{loss}",
                     [*LOSSES[loss], *LAYOUTS[layout]], timeout_s=180) == [0, 0]
    got = read_metrics(tmp / f"{layout}_{loss}")
    assert [r["step"] for r in want] == [1, 2, 3]
    assert all(r["kd_loss"] > 0 and 0 < r["student_bpb"] < 16 and 0 < r["teacher_bpb"] < 16
               for r in want)
    assert all(r["act_loss"] > 0 for r in want) == ("distill.activations=[all_mlps]" in
                                                     LOSSES[loss])
    assert 0 < want[-1]["val_bpb"] < 16
    # (validation scores eval_batches micro-batches per DP rank: other data at DP=2)
    assert_same_run(got, want, keys=(*RUN_KEYS, "act_loss", "student_bpb", "teacher_bpb",
                                     "kd_divergence"),
                    optional=("val_loss", "val_bpb") if layout != "dp2" else ())


TEACHER_RANKS = ["distill.schedule=teacher_ranks", "parallel.teacher_ranks=1"]  # rank 1


@pytest.mark.parametrize("loss", ["likelihood-both", "mapped_kl-reverse", "uld",
                                  "likelihood-mlps"])
def test_teacher_ranks_equal_colocated(setup, loss):
    """The teacher on its own rank streams its chunk statistics (and its buffers at the chunk
    ends): the student's run is the colocated one's."""
    tmp, cfg_path = setup
    want = _single_process(tmp, cfg_path, loss)
    run_dir = tmp / f"ranks_{loss}"
    overrides = [*LOSSES[loss], *TEACHER_RANKS, f"train.run_dir={run_dir}"]
    student, _ = run_ranks(measure_rank, 2, str(cfg_path), overrides, timeout_s=180)
    got = read_metrics(run_dir)
    assert [r["step"] for r in got] == [1, 2, 3] and all(r["kd_loss"] > 0 for r in got)
    assert_same_run(got, want, keys=(*RUN_KEYS, "act_loss", "student_bpb", "teacher_bpb",
                                     "kd_divergence"), optional=("val_loss", "val_bpb"))
    # the stream's bytes are tools/plan.py's (the activation buffers aside, which it leaves out)
    if "distill.activations=[all_mlps]" not in LOSSES[loss]:
        predicted = P.student_comm(P.load_job(str(cfg_path), overrides, world=2), 0, P.Hardware())
        assert student["comm"][MEASURED_STEP] == {f"{g}/{k}": b for (g, k), b in
                                                  predicted.items()}


@pytest.mark.slow
@pytest.mark.parametrize("loss, teacher_tp", [("mapped_kl-reverse", 1), ("likelihood-mlps", 1),
                                              ("uld", 2)])
def test_teacher_ranks_serve_a_tp2_sp_student(setup, loss, teacher_tp):
    """Teacher ranks (at teacher_tp 1, or 2: their statistics vocab-parallel) streaming to a
    TP=2 + SP student: each student rank's shard of the teacher's output layer (mapped_kl) and
    its sequence shard of the buffers taken at the chunk ends; the run is the TP=1 colocated
    one's."""
    tmp, cfg_path = setup
    want = _single_process(tmp, cfg_path, loss)
    run_dir = tmp / f"ranks_tp2_{loss}"
    ranks = [*TEACHER_RANKS[:1], f"parallel.teacher_ranks={teacher_tp}",
             f"parallel.teacher_tp={teacher_tp}"]
    assert run_ranks(_run, 2 + teacher_tp, cfg_path, run_dir,
                     [*LOSSES[loss], *ranks, *LAYOUTS["tp2-sp"]],
                     timeout_s=180) == [0] * (2 + teacher_tp)
    assert_same_run(read_metrics(run_dir), want,
                    keys=(*RUN_KEYS, "act_loss", "student_bpb", "teacher_bpb", "kd_divergence"),
                    optional=("val_loss", "val_bpb"))


@pytest.fixture(scope="module")
def store(setup) -> Path:
    """One export of the teacher's chunk statistics, for both likelihood and uld (top 16)."""
    tmp, cfg_path = setup
    out = tmp / "store"
    assert export_teacher_logits.main(["--config", str(cfg_path), "--top-k", "16", "--out",
                                       str(out), "--no-progress"]) == 0
    assert offline_store.verify(str(out)) == 2805  # every train sample, each in range
    assert "chunk statistics (version 1) of a teacher with another tokenizer, 24 teacher tokens " \
        "per window, top-16 probabilities" in offline_store.info(str(out))[0]
    return out


OFFLINE = ["distill.schedule=offline"]


@pytest.mark.parametrize("loss", ["likelihood-both", "uld"])
def test_offline_equals_colocated(setup, store, loss):
    """The store holds the teacher's chunk statistics keyed to the student's samples: a run
    from it is the colocated one's (its validation has no teacher: val_bpb, not teacher_bpb)."""
    tmp, cfg_path = setup
    want = _single_process(tmp, cfg_path, loss)
    run_dir = tmp / f"offline_{loss}"
    assert _run(cfg_path, run_dir, [*LOSSES[loss], *OFFLINE, f"distill.offline_dir={store}"]) == 0
    got = read_metrics(run_dir)
    assert [r["step"] for r in got] == [1, 2, 3] and all(r["kd_loss"] > 0 for r in got)
    assert_same_run(got, want, keys=(*RUN_KEYS, "student_bpb", "teacher_bpb", "kd_divergence"),
                    optional=("val_loss", "val_bpb"))


def test_mismatched_stores_are_one_line_config_errors(setup, store, tmp_path):
    _, cfg_path = setup
    at = [*OFFLINE, f"distill.offline_dir={store}"]
    cases = [  # (overrides, part of the message)
        (["distill.cross_tokenizer.teacher_seq_len=32"],
         "exported for distill.cross_tokenizer.teacher_seq_len = 24 but this run has 32"),
        (["distill.cross_tokenizer.loss=uld", "distill.cross_tokenizer.uld_top_k=17"],
         "holds the teacher's top-16 probabilities but this run has "
         "distill.cross_tokenizer.uld_top_k = 17"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError) as err:
            load_run_config(cfg_path, [*at, *overrides], world_size=1)
        assert err.value.key == "distill.offline_dir" and "\n" not in str(err.value)
        assert message in str(err.value), str(err.value)
    # a store of chunk statistics of another version is refused
    old = tmp_path / "old"
    shutil.copytree(store, old)
    meta = json.loads((old / "metadata.json").read_text())
    meta["cross_tokenizer"]["version"] = 0
    (old / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="exported for the chunk statistics' version = 0 but "
                                          "this run has 1"):
        load_run_config(cfg_path, [*OFFLINE, f"distill.offline_dir={old}"], world_size=1)
    # and a store without chunk statistics (a same-tokenizer export)
    del meta["cross_tokenizer"]
    (old / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="holds top-k logits of a teacher with the student's "
                                          "tokenizer but this run has distill.cross_tokenizer"):
        load_run_config(cfg_path, [*OFFLINE, f"distill.offline_dir={old}"], world_size=1)


BAD = [  # (overrides, the key named, part of the message)
    (["distill.schedule=offline", "distill.offline_dir=x", "distill.cross_tokenizer.loss=mapped_kl",
      "distill.logit.kind=reverse_kl"], "distill.cross_tokenizer.loss",
     "mapped_kl needs schedule colocated or teacher_ranks"),
    ([*TEACHER_RANKS, "distill.teacher_stream=logits"], "distill.teacher_stream",
     "must be hidden with cross_tokenizer"),
    (["distill.logit.weight=0"], "distill.cross_tokenizer.loss", "needs logit.weight > 0"),
    (["distill.cross_tokenizer.loss=mapped_kl", "distill.logit.kind=jsd"], "distill.logit.kind",
     "must be forward_kl or reverse_kl with cross_tokenizer mapped_kl"),
    (["distill.cross_tokenizer.loss=mapped_kl"], "distill.logit.kind",
     "forward_kl is infinite for mapped_kl here: every student token is in the teacher's"),
    (["distill.fused_lm_head=true"], "distill.cross_tokenizer.loss", "needs logits"),
    (["distill.cross_tokenizer.loss=tokens"], "distill.cross_tokenizer.loss",
     "must be one of 'none', 'likelihood', 'mapped_kl', 'uld'"),
    (["distill.cross_tokenizer.teacher_seq_len=128"], "distill.cross_tokenizer.teacher_seq_len",
     "exceed the teacher's max_seq_len 64"),
    (["parallel.tp=2", "parallel.sp=true", "distill.cross_tokenizer.teacher_seq_len=25"],
     "distill.cross_tokenizer.teacher_seq_len", "do not split over parallel.tp=2"),
    (["data.path=default"], "data.path", "needs paired data"),
    (["distill.teacher=null", "distill.teachers=[{checkpoint: t, name: a}, {checkpoint: t, name: b}]"],
     "distill.teachers[0].tokenizer", "is required with cross_tokenizer: the paired tokenization"),
    (["distill.cross_tokenizer.loss=none"], "distill.teacher", "needs the same tokenizer"),
]


@pytest.mark.parametrize("overrides, key, message", BAD)
def test_bad_inputs_are_one_line_config_errors(setup, overrides, key, message):
    _, cfg_path = setup
    world = 2 if "parallel.tp=2" in overrides else 1
    with pytest.raises(ConfigError) as err:
        load_run_config(cfg_path, overrides, world_size=world)
    assert err.value.key == key and "\n" not in str(err.value), str(err.value)
    assert message in str(err.value), str(err.value)


def test_paired_data_of_other_documents_stops_the_entry_point(setup, tmp_path, capsys):
    tmp, cfg_path = setup
    prefix = load_run_config(cfg_path, [], world_size=1).cfg.data.path
    other, *_ = make_paired(tmp_path, ["another text", "and another"])
    for ext in (".bin", ".idx"):
        shutil.copy(f"{prefix}{ext}", tmp_path / f"mixed{ext}")
        for suffix in (".teacher", ".offsets"):
            shutil.copy(f"{prefix}{suffix}{ext}", tmp_path / f"mixed{suffix}{ext}")
        shutil.copy(f"{other}.teacher_offsets{ext}", tmp_path / f"mixed.teacher_offsets{ext}")
    code = run_main(str(cfg_path), [f"data.path={tmp_path / 'mixed'}",
                                    f"train.run_dir={tmp_path / 'run'}"])
    # the error lines (pytest's captures can leave earlier logging noise on stderr)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "Error: " in line
           and not line.startswith(("ValueError: I/O operation", "--- Logging error"))]
    assert code == 2 and len(err) == 1 and err[0].startswith("ConfigError: data.path: "), err
    assert "does not match" in err[0]


BPB_SPLIT, BPB_BATCHES = "70,30", 48  # every validation window (fnmatch.py, this.py), EODs too


def _direct_bits_per_byte(ckpt: Path, prefix: Path, tokenizer: Path) -> tuple[float, int]:
    """Bits per byte from the definition: the model's float64 log-softmax over its whole
    vocabulary at each label of the validation windows score.py draws, over the bytes of the
    labels' text decoded by the tokenizer (the end-of-document token: one byte); and the
    end-of-document labels scored."""
    from tokenizers import Tokenizer

    from engine.data import DataConfig, TokenBatches
    from engine.data.corpus import EOD_TOKEN
    from engine.parallel import ParallelLayout

    step_dir, _, model_cfg = score.checkpoint_model_config(ckpt)
    model = score.load_model(step_dir, model_cfg, ParallelLayout.single())
    stream = TokenBatches(DataConfig(path=str(prefix), seq_len=16, micro_batch=4, global_batch=4,
                                     split=BPB_SPLIT), seed=7, split="valid")
    tok = Tokenizer.from_file(str(tokenizer))
    eod = tok.token_to_id(EOD_TOKEN)
    nats, nbytes, eods = 0.0, 0, 0
    for mb in [mb for _ in range(BPB_BATCHES) for mb in stream.next_step()]:
        with torch.no_grad():
            logits = model(mb["input_ids"]).logits.double()[..., :model_cfg.vocab_size]
        labels = mb["labels"]
        scored = labels != -100
        nats -= logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0][
            scored].sum().item()
        for row, keep in zip(labels.tolist(), scored.tolist()):
            ids = [i for i, k in zip(row, keep) if k]
            text = tok.decode([i for i in ids if i != eod])
            assert "\ufffd" not in text  # (ASCII text: no window splits a character)
            nbytes += len(text.encode("utf-8")) + ids.count(eod)
            eods += ids.count(eod)
    return nats / math.log(2) / nbytes, eods


def test_score_bpb_equals_the_direct_computation(setup, tmp_path, capsys):
    """`tools/score.py --bpb` on paired data (its offsets) and on the same tokens as plain data
    (the tokenizer's bytes per id) against the definition."""
    tmp, cfg_path = setup
    _single_process(tmp, cfg_path, "likelihood-both")
    ckpt = tmp / "tp1_likelihood-both" / "checkpoints"
    prefix = Path(load_run_config(cfg_path, [], world_size=1).cfg.data.path)
    tokenizer = prefix.parent.parent / "student.json"  # make_paired's
    plain = tmp_path / "plain" / "corpus"
    plain.parent.mkdir()
    for ext in (".bin", ".idx"):
        shutil.copy(f"{prefix}{ext}", f"{plain}{ext}")
    flags = ["--ckpt", str(ckpt), "--seq-len", "16", "--batches", str(BPB_BATCHES),
             "--batch-size", "4", "--split", BPB_SPLIT, "--seed", "7", "--bpb"]
    want, eods = _direct_bits_per_byte(ckpt, prefix, tokenizer)
    assert 0.5 < want < 16 and eods > 0
    for data, extra in ((prefix, []), (plain, ["--tokenizer", str(tokenizer)])):
        capsys.readouterr()
        assert score.main([*flags, "--data", str(data), *extra]) == 0
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert math.isclose(line["bits_per_byte"], want, rel_tol=1e-5), (data, line, want)
    # plain data needs its tokenizer: beside it (default), or named
    assert score.main([*flags, "--data", str(plain)]) == 2
    err = capsys.readouterr().err
    assert "ConfigError: --tokenizer: " in err and "needs the tokenizer that made it" in err
    shutil.copy(tokenizer, plain.parent / "tokenizer.json")
    assert score.main([*flags, "--data", str(plain)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert math.isclose(line["bits_per_byte"], want, rel_tol=1e-5)
