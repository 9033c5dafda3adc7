"""On-policy distillation (distill/on_policy.py).

- One step of two micro-batches (one on-policy, one not) at TP=2 with SP for the training forward
  equals TP=1 in float64: the student's samples, the loss terms and every gathered gradient
  (rtol/atol 1e-10).
- The prompt mask: the on-policy micro-batch has no LM loss and no loss on prompt positions;
  changing student or teacher logits at positions outside the generated tokens changes neither the
  loss nor the gradient, and the gradient there is exactly zero.
- Through the real entry point: a run with on-policy micro-batches resumes exactly (2 + 2 steps
  equal 4 steps bit for bit in every logged term), and at TP=2 with SP equals TP=1 (fp32, rtol
  1e-5); the fraction spreads evenly and bad configs stop with one line.
"""

from __future__ import annotations

import math

import pytest
import torch

from distill.config import SINGLE_TEACHER, DistillConfig, LogitKDConfig, OnPolicyConfig
from distill.objective import DistillObjective, count_tokens
from distill.on_policy import OnPolicy, is_on_policy
from distill.teacher import TeacherOutputs
from engine.config import ConfigError
from engine.data import IGNORE_INDEX, shift_labels
from engine.parallel import ParallelConfig, ParallelLayout, make_layout
from engine.spawn import run_ranks
from layers.config import ModelConfig
from layers.model import ModelOutput, TransformerLM
from layers.sharding import gather_full
from tests.helpers import RUN_KEYS, assert_same_run
from tests.trainer_utils import (
    base_config,
    make_teacher,
    read_metrics,
    run_main,
    teacher_config,
    write_config,
)

TOL = dict(rtol=1e-10, atol=1e-10)
VOCAB, SEQ, NEW, STEP = 70, 12, 5, 3
STUDENT = ModelConfig(family="llama", vocab_size=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2,
                      ffn_hidden=64, max_seq_len=16, init_std=0.2)
TEACHER = ModelConfig(family="llama", vocab_size=VOCAB, hidden=48, layers=2, heads=4, kv_heads=2,
                      ffn_hidden=64, max_seq_len=16, init_std=0.4)
DISTILL = DistillConfig(lm_weight=1.0, logit=LogitKDConfig(kind="reverse_kl", temperature=1.5),
                        on_policy=OnPolicyConfig(fraction=0.5, max_new_tokens=NEW,
                                                 temperature=0.9, top_p=0.95))


def _micro_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    out = []
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (2, SEQ + 1), generator=g)
        out.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    return out


def _one_step(tp: int, sp: bool) -> dict:
    """One accumulated step (2 micro-batches, STEP-th of the run) at this layout, float64."""
    layout = make_layout(ParallelConfig(tp=tp, sp=sp))
    student = TransformerLM(STUDENT, layout, seed=1).double()
    teacher = TransformerLM(TEACHER, layout, seed=2).double().eval()
    objective = DistillObjective(DISTILL, STUDENT, TEACHER, layout).double()
    micro_batches = OnPolicy(DISTILL.on_policy, student, layout, seed=7)(_micro_batches(), STEP)
    assert student.training and student.layout.sp == sp  # generation left the student as it was
    counts = count_tokens(micro_batches, layout)
    terms = []
    for mb in micro_batches:
        with torch.no_grad():
            teacher_out = {SINGLE_TEACHER: TeacherOutputs(logits=teacher(mb["input_ids"]).logits)}
        out = objective(student(mb["input_ids"]), teacher_out, mb["labels"], tokens_norm=counts,
                        kd_mask=mb.get("kd_mask"))
        out.loss.backward()
        terms.append([float(out.total), float(out.lm_loss), float(out.kd_loss)])
    grads = {name: gather_full(p, layout=layout, vocab_size=VOCAB, tensor=p.grad)
             for name, p in student.named_parameters()}
    return {"ids": [mb["input_ids"] for mb in micro_batches], "terms": terms, "grads": grads,
            "on_policy": ["kd_mask" in mb for mb in micro_batches], "counts": counts}


def test_on_policy_step_tp2_sp_equals_tp1():
    expected = _one_step(1, False)
    assert expected["on_policy"] == [False, True]  # global micro-batches 6 and 7 at fraction 0.5
    assert expected["counts"].distill == 2 * SEQ + 2 * NEW  # labels of one, kd_mask of the other
    original = _micro_batches()[1]["input_ids"]
    assert torch.equal(expected["ids"][1][:, :SEQ - NEW], original[:, :SEQ - NEW])
    assert not torch.equal(expected["ids"][1], original)  # the tail is the student's
    for rank, got in enumerate(run_ranks(_one_step, 2, 2, True, timeout_s=120)):
        for a, b in zip(got["ids"], expected["ids"]):
            assert torch.equal(a, b), rank
        torch.testing.assert_close(torch.tensor(got["terms"]), torch.tensor(expected["terms"]), **TOL)
        for name, grad in expected["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, **TOL,
                                       msg=lambda m: f"rank {rank} {name}: {m}")


def test_prompt_positions_carry_no_loss():
    layout = ParallelLayout.single()
    student = TransformerLM(STUDENT, layout, seed=1).double()
    teacher = TransformerLM(TEACHER, layout, seed=2).double().eval()
    objective = DistillObjective(DISTILL, STUDENT, TEACHER, layout).double()
    on_policy = OnPolicy(DISTILL.on_policy, student, layout, seed=7)
    mb = on_policy.continued(_micro_batches()[0], step=0, index=0)
    assert (mb["labels"] == IGNORE_INDEX).all()
    assert mb["kd_mask"].sum() == 2 * NEW and mb["kd_mask"][:, SEQ - NEW - 1:SEQ - 1].all()
    counts = count_tokens([mb], layout)
    with torch.no_grad():
        student_logits = student(mb["input_ids"]).logits
        teacher_logits = teacher(mb["input_ids"]).logits

    def loss_and_grad(s_logits, t_logits):
        s_logits = s_logits.clone().requires_grad_()
        out = objective(ModelOutput(logits=s_logits), {SINGLE_TEACHER: TeacherOutputs(logits=t_logits)},
                        mb["labels"],
                        tokens_norm=counts, kd_mask=mb["kd_mask"])
        out.loss.backward()
        return out, s_logits.grad

    out, grad = loss_and_grad(student_logits, teacher_logits)
    assert float(out.lm_loss) == 0 and float(out.kd_loss) > 0
    outside = ~mb["kd_mask"]
    assert (grad[outside] == 0).all() and (grad[mb["kd_mask"]] != 0).any()
    noise = torch.randn(student_logits.shape, dtype=torch.float64) * outside[..., None]
    for s_logits, t_logits in ((student_logits + 3 * noise, teacher_logits),
                               (student_logits, teacher_logits - 3 * noise)):
        changed, changed_grad = loss_and_grad(s_logits, t_logits)
        # exact: the changed positions are masked out, the others go through the same operations
        assert float(changed.total) == float(out.total)
        assert torch.equal(changed_grad, grad)
    # A micro-batch that is not on-policy counts its labels, as before.
    plain = _micro_batches()[0]
    assert count_tokens([plain], layout).distill == int((plain["labels"] != IGNORE_INDEX).sum())
    assert torch.equal(shift_labels(plain["input_ids"], 1)[:, :-1], plain["labels"][:, :-1])


def test_fraction_spreads_evenly():
    for fraction in (0.0, 0.25, 0.5, 1 / 3, 1.0):
        chosen = [is_on_policy(g, fraction) for g in range(120)]
        assert sum(chosen) == round(120 * fraction)
        assert all(sum(chosen[g:g + 12]) in (math.floor(12 * fraction), math.ceil(12 * fraction))
                   for g in range(0, 108, 12))


def test_config_checks():
    with pytest.raises(ConfigError, match="fraction: must be in"):
        OnPolicyConfig(fraction=1.5)
    with pytest.raises(ConfigError, match="on_policy.fraction: needs schedule colocated"):
        DistillConfig(schedule="offline", offline_dir="x", on_policy=OnPolicyConfig(fraction=0.5))
    with pytest.raises(ConfigError, match="needs a distillation term"):
        DistillConfig(logit=LogitKDConfig(weight=0), on_policy=OnPolicyConfig(fraction=0.5))


# ------------------------------------------------------------------------------ entry point

@pytest.fixture
def run_setup(tmp_path):
    cfg = base_config(tmp_path, cache=tmp_path / "cache")
    cfg["train"].update(steps=4, save_interval=2)
    cfg["distill"] = {"teacher": str(make_teacher(tmp_path / "teacher", teacher_config(cfg))),
                      "logit": {"kind": "reverse_kl"}, "lm_weight": 1.0,
                      "on_policy": {"fraction": 0.5, "max_new_tokens": 6, "top_p": 0.9}}
    return tmp_path, write_config(tmp_path / "run.yaml", cfg)


def _run(cfg, run_dir, *extra) -> int:
    return run_main(str(cfg), [f"train.run_dir={run_dir}", *extra])


@pytest.mark.slow  # a multi-rank end-to-end run
def test_entry_point_resumes_exactly_and_other_layouts_equal_tp1(run_setup):
    """TP=2 + SP, PP=2, a teacher rank (also resumed mid-run, and feeding a PP=2 student) and
    two teacher ranks at TP=2 log the single-process colocated run's losses."""
    tmp, cfg = run_setup
    assert _run(cfg, tmp / "full") == 0
    assert run_main(str(cfg), [f"train.run_dir={tmp / 'cut'}", "train.steps=2"]) == 0
    assert run_main(str(cfg), [f"train.run_dir={tmp / 'cut'}", "train.resume=auto"]) == 0
    full, cut = read_metrics(tmp / "full"), read_metrics(tmp / "cut")
    # Bit for bit: the resumed run has the same layout and restores every state and RNG (the
    # on-policy choice included), so it runs the same operations in the same order.
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    assert_same_run(cut, full, rtol=0, atol=0)
    assert all(r["kd_loss"] > 0 for r in full)
    ranks = ["parallel.teacher_ranks=1", "distill.schedule=teacher_ranks"]
    for name, world, layout in (
            ("tp2", 2, ["parallel.tp=2", "parallel.sp=true"]),
            ("pp2", 2, ["parallel.pp=2"]),  # the samples decoded stage by stage
            # a teacher rank scores the samples the students send it
            ("teacher_rank", 2, ranks),
            ("teacher_rank_cut", 2, [*ranks, "train.steps=2"]),
            ("teacher_rank_cut", 2, [*ranks, "train.resume=auto"]),  # counts from step 2 on
            ("pp2_teacher_rank", 3, [*ranks, "parallel.pp=2", "distill.prefetch=8"]),
            # two teacher ranks at TP=2: the one that receives the samples broadcasts them
            ("teacher_tp2", 3, ["parallel.teacher_ranks=2", "distill.schedule=teacher_ranks",
                                "parallel.teacher_tp=2"])):
        run_ranks(_run, world, cfg, tmp / name, *layout, timeout_s=180)
        got = read_metrics(tmp / name)  # (the cut run: its steps so far)
        want = [r for r in full if r["step"] in {g["step"] for g in got}]
        assert_same_run(got, want, keys=RUN_KEYS)  # fp32 round-off of the reductions
    assert len(read_metrics(tmp / "teacher_rank_cut")) == len(full)
    bad = run_main(str(cfg), [f"train.run_dir={tmp / 'bad'}", "distill.on_policy.max_new_tokens=16"])
    assert bad == 2
