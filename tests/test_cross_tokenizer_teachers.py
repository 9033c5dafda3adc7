"""Several teachers, each with its own tokenizer: paired data written for two teacher tokenizers
beside one student dataset (tools/preprocess_data.py --teacher-tokenizer NAME=T.json), each
teacher naming its tokenization (distill.teachers[i].tokenizer). Three byte-level BPEs of
different sizes are trained here on the same text. The two-teacher objective is the sum of each
teacher's single-teacher terms; the named single-teacher path equals the unnamed one; TP=2 + SP
equals TP=1 through the entry point; bad configs are one-line ConfigErrors."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from distill.runconfig import load_run_config
from engine.config import ConfigError
from engine.data import IndexedTokens
from engine.spawn import run_ranks
from tests.helpers import FP32_ATOL, FP32_RTOL, RUN_KEYS, assert_same_run
from tests.test_paired_data import tokenizers_and_documents
from tests.trainer_utils import base_config, make_teacher, read_metrics, run_in, write_config
from tools import preprocess_data

STUDENT_VOCAB = 320
TEACHERS = {"a": (512, 48, 3, 0.7), "b": (400, 40, 2, 0.3)}  # vocab, hidden, layers, weight
SOURCES = ("textwrap.py", "json/decoder.py", "shlex.py", "glob.py", "fnmatch.py", "this.py")


def _entry(tmp: Path, name: str) -> str:
    """Teacher `name` as a distill.teachers entry (YAML flow)."""
    weight = TEACHERS[name][3]
    return f"{{checkpoint: {tmp / name}, name: {name}, tokenizer: {name}, weight: {weight}}}"


def _teachers(tmp: Path, *names: str) -> str:
    return f"distill.teachers=[{', '.join(_entry(tmp, n) for n in names)}]"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(dir, config of the two-teacher run, dataset prefix). The data holds teacher a's tokens
    twice: named (a) and unnamed (the single-teacher form), for the comparison of both paths."""
    tmp = tmp_path_factory.mktemp("xtok_teachers")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text(encoding="utf-8") for name in SOURCES]
    tokenizers, inputs = tokenizers_and_documents(
        tmp, texts, {"student": STUDENT_VOCAB, **{n: t[0] for n, t in TEACHERS.items()}})
    prefix = tmp / "data" / "corpus"
    assert preprocess_data.main([
        "--input", *map(str, inputs), "--tokenizer", str(tokenizers["student"]),
        "--teacher-tokenizer", str(tokenizers["a"]), "--teacher-tokenizer",
        f"a={tokenizers['a']}", "--teacher-tokenizer", f"b={tokenizers['b']}",
        "--output-prefix", str(prefix), "--no-progress"]) == 0
    cfg = base_config(tmp, cache=tmp / "cache")
    cfg["model"]["vocab_size"] = STUDENT_VOCAB
    cfg["data"].update(path=str(prefix), seq_len=16)
    for name, (vocab, hidden, layers, _) in TEACHERS.items():
        make_teacher(tmp / name, {"model": {**cfg["model"], "vocab_size": vocab, "hidden": hidden,
                                            "layers": layers, "ffn_hidden": 2 * hidden,
                                            "init_std": 0.3, "max_seq_len": 64}})
    cfg["distill"] = {"cross_tokenizer": {"loss": "likelihood", "teacher_seq_len": 24},
                      "logit": {"weight": 1.0, "temperature": 1.5}}
    path = write_config(tmp / "xtok.yaml", cfg)
    return tmp, path, prefix


def test_preprocess_writes_each_teacher_tokenization_beside_one_student(setup, tmp_path, capsys):
    tmp, _, prefix = setup
    unnamed, named = IndexedTokens(f"{prefix}.teacher"), IndexedTokens(f"{prefix}.teacher-a")
    other = IndexedTokens(f"{prefix}.teacher-b")
    assert np.array_equal(unnamed.lengths, named.lengths)
    assert np.array_equal(unnamed.tokens, named.tokens)
    assert other.num_tokens > named.num_tokens  # (the smaller vocabulary: more tokens)
    for ends in (f"{prefix}.teacher_offsets", f"{prefix}.teacher-a.offsets",
                 f"{prefix}.teacher-b.offsets", f"{prefix}.offsets"):
        last = IndexedTokens(ends)
        assert np.array_equal(last.tokens[last.starts + last.lengths - 1],
                              IndexedTokens(f"{prefix}.offsets").tokens[
                                  IndexedTokens(f"{prefix}.offsets").starts
                                  + IndexedTokens(f"{prefix}.offsets").lengths - 1])
    assert np.array_equal(np.load(f"{prefix}.shared_vocab.npy"),
                          np.load(f"{prefix}.teacher-a.shared_vocab.npy"))
    # a name given twice, or a bad name: one error line, nothing written
    doc = tmp / "doc0.txt"
    for flags, message in ((["a=x.json", "a=y.json"], "the name 'a' is given twice"),
                           (["a b=x.json"], "the name must be letters")):
        out = tmp_path / "bad"
        args = ["--input", str(doc), "--tokenizer", str(tmp / "student.json"),
                "--output-prefix", str(out), "--no-progress"]
        for flag in flags:
            args += ["--teacher-tokenizer", flag]
        capsys.readouterr()
        assert preprocess_data.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not list(tmp_path.glob("bad*"))


def _step1(tmp: Path, cfg_path: Path, name: str, overrides: list[str]) -> dict:
    """The first step's metrics of a one-step run."""
    run_dir = tmp / name
    assert run_in(cfg_path, run_dir, ["train.steps=1", *overrides]) == 0
    (record,) = read_metrics(run_dir)
    return record


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=FP32_RTOL, abs_tol=FP32_ATOL)


LOSSES = {"likelihood": [],
          # (forward_kl is infinite here: the student's BPE is inside each teacher's)
          "mapped_kl": ["distill.cross_tokenizer.loss=mapped_kl", "distill.logit.kind=reverse_kl"]}


@pytest.mark.parametrize("loss", LOSSES)
def test_two_teachers_sum_their_single_teacher_terms(setup, loss):
    """Step 1 (before any update) of the two-teacher run: each teacher's kd_loss/<name> and bits
    per byte are those of a run with that teacher alone (same weight), kd_loss their sum; and the
    named single-teacher run is the unnamed (distill.teacher) one's, times its weight."""
    tmp, cfg_path, _ = setup
    both = _step1(tmp, cfg_path, f"both_{loss}", [*LOSSES[loss], _teachers(tmp, "a", "b")])
    alone = {n: _step1(tmp, cfg_path, f"{n}_{loss}", [*LOSSES[loss], _teachers(tmp, n)])
             for n in TEACHERS}
    unnamed = _step1(tmp, cfg_path, f"unnamed_{loss}",
                     [*LOSSES[loss], f"distill.teacher={tmp / 'a'}"])
    for name, single in alone.items():
        assert single["kd_loss"] > 0 and _close(both[f"kd_loss/{name}"], single["kd_loss"])
        for key in ("student_bpb", "teacher_bpb"):
            assert _close(both[f"{key}/{name}"], single[key]), (key, name)
        assert _close(both["lm_loss"], single["lm_loss"])
    assert _close(both["kd_loss"], alone["a"]["kd_loss"] + alone["b"]["kd_loss"])
    assert _close(both["loss"], both["lm_loss"] + both["kd_loss"])
    # the teachers differ (else the sum would test little)
    assert not _close(alone["a"]["teacher_bpb"], alone["b"]["teacher_bpb"])
    assert not _close(alone["a"]["kd_loss"] / TEACHERS["a"][3],
                      alone["b"]["kd_loss"] / TEACHERS["b"][3])
    weight = TEACHERS["a"][3]
    assert _close(alone["a"]["kd_loss"], weight * unnamed["kd_loss"])
    for key in ("student_bpb", "teacher_bpb", "lm_loss"):
        assert _close(alone["a"][key], unnamed[key]), key


TEACHER_KEYS = tuple(f"{key}/{name}" for name in TEACHERS
                     for key in ("kd_loss", "student_bpb", "teacher_bpb"))


def _single_process(tmp: Path, cfg_path: Path, loss: str) -> list[dict]:
    """Three steps of the two-teacher run of `loss` in one process (run once per module)."""
    run_dir = tmp / f"tp1_{loss}"
    if not (run_dir / "metrics.jsonl").exists():
        assert run_in(cfg_path, run_dir, [*LOSSES[loss], _teachers(tmp, "a", "b")]) == 0
    want = read_metrics(run_dir)
    assert [r["step"] for r in want] == [1, 2, 3]
    assert all(r[key] > 0 for r in want for key in TEACHER_KEYS)
    return want


@pytest.mark.slow
@pytest.mark.parametrize("loss", LOSSES)
def test_tp2_sp_equals_tp1(setup, loss):
    """Three steps of the two-teacher run through the entry point: TP=2 + SP (each teacher's
    chunk term vocab-parallel over its own vocabulary) equals one process."""
    tmp, cfg_path, _ = setup
    want = _single_process(tmp, cfg_path, loss)
    assert run_ranks(run_in, 2, cfg_path, tmp / f"tp2_{loss}",
                     [*LOSSES[loss], _teachers(tmp, "a", "b"), "parallel.tp=2", "parallel.sp=true"],
                     timeout_s=180) == [0, 0]
    assert_same_run(read_metrics(tmp / f"tp2_{loss}"), want,
                    keys=(*RUN_KEYS, "kd_divergence", *TEACHER_KEYS),
                    optional=("val_loss", "val_bpb"))


def test_dp2_equals_one_process(setup):
    """DP=2: each teacher's chunk counts cross the step's one DP all-reduce (its means are over
    the global batch's chunks of its own tokenization), so the run equals one process."""
    tmp, cfg_path, _ = setup
    want = _single_process(tmp, cfg_path, "likelihood")
    assert run_ranks(run_in, 2, cfg_path, tmp / "dp2_likelihood", [_teachers(tmp, "a", "b")],
                     timeout_s=180) == [0, 0]
    # (validation scores eval_batches micro-batches per DP rank: other data at DP=2)
    assert_same_run(read_metrics(tmp / "dp2_likelihood"), want,
                    keys=(*RUN_KEYS, "kd_divergence", *TEACHER_KEYS))


BAD = [  # (overrides beyond the two teachers, the key named, part of the message)
    (["distill.teacher_mode=mixture"], "distill.teacher_mode",
     "mixture has no meaning across vocabularies"),
    (["distill.cross_tokenizer.loss=none"], "distill.teachers[0].tokenizer",
     "'a' needs distill.cross_tokenizer.loss"),
    (["distill.activations=[{student: decoder.0.mlp_output, teacher: decoder.0.mlp_output, "
      "teacher_name: a}]"], "distill.activations", "not yet"),
    (["distill.cross_tokenizer.loss=mapped_kl"], "distill.logit.kind",
     "forward_kl is infinite for mapped_kl here"),
]


@pytest.mark.parametrize("overrides, key, message", BAD)
def test_bad_configs_are_one_line_config_errors(setup, overrides, key, message):
    tmp, cfg_path, _ = setup
    with pytest.raises(ConfigError) as err:
        load_run_config(cfg_path, [_teachers(tmp, "a", "b"), *overrides], world_size=1)
    assert err.value.key == key and "\n" not in str(err.value), str(err.value)
    assert message in str(err.value), str(err.value)


def test_bad_teacher_entries_are_one_line_config_errors(setup):
    tmp, cfg_path, _ = setup
    a, b = _entry(tmp, "a"), _entry(tmp, "b")
    cases = [  # (distill.teachers, extra overrides, the key named, part of the message)
        (f"[{a}, {{checkpoint: {tmp / 'b'}, name: b}}]", [], "distill.teachers[1].tokenizer",
         "is required with cross_tokenizer"),
        (f"[{a}, {b.replace('tokenizer: b', 'tokenizer: c')}]", [],
         "distill.teachers[1].tokenizer", "corpus.teacher-c.bin/.idx not found"),
        (f"[{a.replace('}', ', offline_dir: x}')}, {b.replace('}', ', offline_dir: y}')}]",
         ["distill.schedule=offline"], "distill.schedule", "(offline: not yet)"),
        # teacher b's 400-token vocabulary does not cover teacher a's tokenization
        (f"[{a}, {b.replace('tokenizer: b', 'tokenizer: a')}]", [],
         "distill.teachers[1].checkpoint", "(the teacher's)"),
    ]
    for teachers, extra, key, message in cases:
        with pytest.raises(ConfigError) as err:
            load_run_config(cfg_path, [f"distill.teachers={teachers}", *extra], world_size=1)
        assert err.value.key.startswith(key) and "\n" not in str(err.value), str(err.value)
        assert message in str(err.value), str(err.value)
