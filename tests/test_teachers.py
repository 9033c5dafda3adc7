"""Several teachers (`distill.teachers`, `distill.teacher_mode: sum | mixture`).

- The mixture's log-probabilities, and every divergence kind to the mixture, against the float64
  full-vocabulary definition at TP 1, 2 and 4 with a padded vocabulary (NaN padding): values and
  gradients (rtol=atol=1e-5, fp32 round-off), with the collectives counted.
- The objective with two teachers of different depths and widths, sum and mixture, against a
  direct float64 torch computation of the whole LM + KD objective over the step (terms, the
  per-teacher `kd_loss/<name>`, and the gradient of every student parameter) at TP 1 and TP 2
  with SP (rtol=atol=1e-9); both modes fused as well. With activation pairs naming each teacher
  (each through its own projection), TP 2 + SP equals TP 1 (terms and every gradient).
- Two identical teachers, in either mode, equal one teacher (terms and gradients, 1e-12).
- The entry point trains a student from two colocated teachers and logs kd_loss/<name>; sum
  mode from the two teachers' full-vocabulary offline exports logs what the colocated run logs.
"""

from __future__ import annotations

import functools
import json
import math

import torch
import torch.nn.functional as F

from distill import KINDS, divergence
from distill.config import DistillConfig
from distill.mixture import mixture_log_probs
from distill.objective import DistillObjective, count_tokens
from distill.teacher import TeacherOutputs
from engine import collectives as C
from engine.config import from_dict
from engine.data import IGNORE_INDEX
from engine.parallel import ParallelConfig, ParallelLayout, make_layout
from engine.spawn import run_ranks
from layers.config import ModelConfig
from layers.model import TransformerLM
from layers.sharding import gather_full
from tests.helpers import FP32_ATOL, FP32_RTOL
from tests.references import VOCAB, make_logits, reference, reference_grad, vocab_shard, world_group
from tests.trainer_utils import VOCAB as CORPUS_VOCAB
from tests.trainer_utils import (
    base_config,
    make_teacher,
    read_metrics,
    run_main,
    teacher_config,
    write_config,
)
from tools import export_teacher_logits

# ---- the mixture on vocabulary shards ---------------------------------------------------------

WEIGHTS = (0.2, 0.5, 0.3)


def reference_log_mixture(teachers, weights, temperature, vocab_size=VOCAB) -> torch.Tensor:
    logs = [torch.log_softmax(t[..., :vocab_size].double().nan_to_num(neginf=-1e30) / temperature,
                              -1) + math.log(w / sum(weights)) for t, w in zip(teachers, weights)]
    return torch.logsumexp(torch.stack(logs), 0)


def _mixture_checks() -> int:
    group = world_group()
    checks = 0
    for kind in KINDS:
        for temperature in (0.5, 2.0):
            # extreme teachers (+-1e4, -inf columns) and one ordinary teacher that covers their
            # -inf columns, so that the divergence is finite for every kind
            _, t0 = make_logits(kind, extreme=True, seed=0)
            s_full, t1 = make_logits(kind, extreme=False, seed=1)
            _, t2 = make_logits(kind, extreme=True, seed=2)
            teachers = [t0, t1, t2 * 0.5]
            ref_mix = reference_log_mixture(teachers, WEIGHTS, temperature)
            with C.count_collectives() as counts:
                mix = mixture_log_probs([vocab_shard(t, group) for t in teachers], WEIGHTS,
                                        temperature=temperature, vocab_size=VOCAB, group=group)
            if C.group_size(group) > 1:
                assert dict(counts.calls) == {"all_gather": 1}
            full_mix = torch.cat([ref_mix, torch.full((ref_mix.shape[0], 3), float("-inf"),
                                                      dtype=torch.float64)], -1)
            torch.testing.assert_close(mix.double(), vocab_shard(full_mix, group), rtol=1e-5,
                                       atol=1e-5)
            s = vocab_shard(s_full, group).requires_grad_()
            div = divergence(s, mix * temperature, kind=kind, temperature=temperature,
                             vocab_size=VOCAB, group=group)
            w = torch.linspace(0.5, 1.5, div.numel(), dtype=torch.float64)
            (div * w.to(div.dtype)).sum().backward()
            ref, ref_grad = reference_grad(
                lambda x: reference(kind, x, ref_mix * temperature, temperature=temperature),
                s_full, w)
            torch.testing.assert_close(div.double(), ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(s.grad.double(), vocab_shard(ref_grad, group), rtol=1e-5,
                                       atol=1e-5)
            checks += 1
    return checks


def test_mixture_divergence_exact_tp1():
    assert _mixture_checks() == 2 * len(KINDS)


def test_mixture_divergence_exact_tp2_tp4():
    for world in (2, 4):
        assert run_ranks(_mixture_checks, world) == [2 * len(KINDS)] * world


# ---- the objective with two teachers ----------------------------------------------------------

V = 60
STUDENT = ModelConfig(family="llama", vocab_size=V, hidden=16, layers=2, heads=2, kv_heads=2,
                      ffn_hidden=32, max_seq_len=8, vocab_pad_multiple=4, init_std=0.2)
TEACHERS = {  # different widths and depths, the same vocabulary
    "wide": ModelConfig(family="llama", vocab_size=V, hidden=24, layers=1, heads=2, kv_heads=2,
                        ffn_hidden=48, max_seq_len=8, vocab_pad_multiple=4, init_std=0.3),
    "deep": ModelConfig(family="llama", vocab_size=V, hidden=8, layers=3, heads=2, kv_heads=2,
                        ffn_hidden=16, max_seq_len=8, vocab_pad_multiple=4, init_std=0.3),
}
T_WEIGHTS = {"wide": 0.7, "deep": 0.4}
TEMPERATURE, KD_WEIGHT = 1.5, 0.8
TOL = dict(rtol=1e-9, atol=1e-9)


def _cfg(mode: str, **extra) -> DistillConfig:
    return from_dict(DistillConfig, {
        "teachers": [{"checkpoint": f"/ckpt/{n}", "name": n, "weight": w}
                     for n, w in T_WEIGHTS.items()],
        "teacher_mode": mode, "logit": {"temperature": TEMPERATURE, "weight": KD_WEIGHT},
        **extra}, prefix="distill")


def _micro_batches():
    g = torch.Generator().manual_seed(5)
    batches = []
    for keep in (0.5, 0.9):
        tokens = torch.randint(0, V, (2, 9), generator=g)
        mb = {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].clone()}
        mb["labels"][torch.rand(2, 8, generator=g) > keep] = IGNORE_INDEX
        batches.append(mb)
    return batches


def _teachers(layout, configs=TEACHERS):
    return {n: TransformerLM(c, layout, seed=10 + i).double().eval().requires_grad_(False)
            for i, (n, c) in enumerate(configs.items())}


def _outputs(teacher, objective, name, ids):
    hidden = objective.teacher_request(name).head == "hidden"
    with torch.no_grad():
        out = teacher(ids, buffers=objective.teacher_buffer_names(name), compute_logits=not hidden)
    if hidden:
        return TeacherOutputs(head_hidden=out.head_hidden, output_weight=teacher.output_weight,
                              buffers=out.buffers)
    return TeacherOutputs(logits=out.logits, buffers=out.buffers)


def _step(layout, cfg, micro_batches, configs=TEACHERS):
    """One step's forwards and backwards: logged terms (summed over micro-batches) and the
    full gradient of every student and objective parameter."""
    student = TransformerLM(STUDENT, layout, seed=1).double()
    teachers = _teachers(layout, configs)
    objective = DistillObjective(cfg, STUDENT, configs, layout, seed=3).double()
    counts = count_tokens(micro_batches, layout)
    terms: dict[str, float] = {}
    for mb in micro_batches:
        t_out = {n: _outputs(t, objective, n, mb["input_ids"]) for n, t in teachers.items()}
        out = student(mb["input_ids"], buffers=objective.student_buffer_names(),
                      compute_logits=not objective.fused)
        result = objective(out, t_out, mb["labels"], tokens_norm=counts,
                           output_weight=student.output_weight)
        result.loss.backward()
        values = {k: getattr(result, k) for k in ("total", "lm_loss", "kd_loss", "act_loss")}
        for key, value in {**values, **result.metrics}.items():
            terms[key] = terms.get(key, 0.0) + float(value)
    grads = {name: gather_full(p, layout=layout, vocab_size=V, tensor=p.grad)
             for name, p in student.named_parameters()}
    grads.update({f"objective.{n}": p.grad.clone() for n, p in objective.named_parameters()})
    return terms, grads


def _direct(mode: str):
    """The LM + KD objective of the step straight from torch in float64: terms and gradients."""
    layout = ParallelLayout.single()
    student = TransformerLM(STUDENT, layout, seed=1).double()
    teachers = _teachers(layout)
    micro_batches = _micro_batches()
    ids = torch.cat([mb["input_ids"] for mb in micro_batches])
    labels = torch.cat([mb["labels"] for mb in micro_batches])
    valid = labels != IGNORE_INDEX
    s = student(ids).logits[..., :V]
    with torch.no_grad():
        t_logits = {n: t(ids).logits[..., :V] for n, t in teachers.items()}
    log_p = F.log_softmax(s / TEMPERATURE, -1)

    def kl(log_q):  # KL(q || p) per token
        return (log_q.exp() * (log_q - log_p)).sum(-1)

    lm = F.cross_entropy(s[valid], labels[valid])
    log_qs = {n: F.log_softmax(t / TEMPERATURE, -1) for n, t in t_logits.items()}
    scale = KD_WEIGHT * TEMPERATURE ** 2
    terms = {"lm_loss": lm}
    if mode == "sum":
        for n, log_q in log_qs.items():
            terms[f"kd_loss/{n}"] = scale * T_WEIGHTS[n] * kl(log_q)[valid].mean()
        terms["kd_loss"] = sum(terms[f"kd_loss/{n}"] for n in log_qs)
    else:
        total = sum(T_WEIGHTS.values())
        log_m = torch.logsumexp(torch.stack([log_q + math.log(T_WEIGHTS[n] / total)
                                             for n, log_q in log_qs.items()]), 0)
        terms["kd_loss"] = scale * kl(log_m)[valid].mean()
    terms["total"] = lm + terms["kd_loss"]
    terms["total"].backward()
    grads = {name: p.grad for name, p in student.named_parameters()}
    return {k: float(v.detach()) for k, v in terms.items()}, grads


def _assert_same(got, want, *, tol=TOL, label=""):
    (terms, grads), (ref_terms, ref_grads) = got, want
    for key, value in ref_terms.items():
        assert math.isclose(terms[key], value, rel_tol=tol["rtol"], abs_tol=tol["atol"]), \
            (label, key, terms[key], value)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, **tol, msg=lambda m: f"{label} {name}: {m}")


CASES = {"sum": ("sum", {}), "mixture": ("mixture", {}),
         "sum_fused": ("sum", {"fused_lm_head": True}),
         # the fused head distils towards the mixture of the teachers' logits
         "mixture_fused": ("mixture", {"fused_lm_head": True})}


def _all_cases(layout) -> dict:
    return {case: _step(layout, _cfg(mode, **extra), _micro_batches())
            for case, (mode, extra) in CASES.items()}


def _tp2_sp_cases():
    layout = make_layout(ParallelConfig(tp=2, sp=True))
    return _all_cases(layout)


@functools.cache
def _reference(mode):
    return _direct(mode)


def test_sum_and_mixture_equal_the_float64_reference_at_tp1_and_tp2_sp():
    results = [_all_cases(ParallelLayout.single()), *run_ranks(_tp2_sp_cases, 2)]
    for rank, by_case in enumerate(results):
        for case, (mode, _) in CASES.items():
            _assert_same(by_case[case], _reference(mode), label=f"{rank} {case}")
        # the logged per-teacher terms add up to the KD term; the mixture is one term
        terms = by_case["sum"][0]
        assert math.isclose(terms["kd_loss/wide"] + terms["kd_loss/deep"], terms["kd_loss"],
                            rel_tol=1e-12)
        assert not any(k.startswith("kd_loss/") for k in by_case["mixture"][0])
        assert {"teacher_entropy/wide", "top1_agreement/deep", "student_entropy"} <= \
            set(terms)
    # the two modes really differ
    assert abs(_reference("sum")[0]["kd_loss"] - _reference("mixture")[0]["kd_loss"]) > 1e-3


ACTIVATIONS = {"projection": "per_pair", "activation_coef": 0.5, "activations": [
    {"student": "all_mlps", "teacher_name": "deep"},
    {"student": "decoder.1.output", "teacher": "decoder.0.output", "teacher_name": "wide",
     "loss": "cosine"}]}


def _activation_steps(layout) -> dict:
    return {mode: _step(layout, _cfg(mode, **ACTIVATIONS), _micro_batches())
            for mode in ("sum", "mixture")}


def _tp2_sp_activation_steps():
    return _activation_steps(make_layout(ParallelConfig(tp=2, sp=True)))


def test_activation_pairs_name_their_teacher_tp2_sp_equals_tp1():
    ref = _activation_steps(ParallelLayout.single())
    for mode in ("sum", "mixture"):
        terms, grads = ref[mode]
        assert terms["act_loss"] > 0
        assert {n for n in grads if n.startswith("objective.")} == {
            "objective.projections.deep.weights.0", "objective.projections.deep.weights.1",
            "objective.projections.wide.weights.0"}
        assert grads["objective.projections.wide.weights.0"].shape == (24, 16)
        assert grads["objective.projections.deep.weights.0"].shape == (8, 16)
    for rank, got in enumerate(run_ranks(_tp2_sp_activation_steps, 2)):
        for mode in ("sum", "mixture"):
            _assert_same(got[mode], ref[mode], label=f"rank {rank} {mode}")


def test_two_identical_teachers_equal_one_teacher():
    """One teacher model serves as both teachers: sum with weights 1/2 and 1/2, and a mixture
    with any weights, equal that teacher alone (terms and gradients)."""
    single, same = {"a": TEACHERS["wide"]}, {"a": TEACHERS["wide"], "b": TEACHERS["wide"]}
    halves = [{"checkpoint": "/a", "name": n, "weight": 0.5} for n in "ab"]
    shares = [{"checkpoint": "/a", "name": "a", "weight": 0.3},
              {"checkpoint": "/a", "name": "b", "weight": 0.9}]
    layout = ParallelLayout.single()
    student = TransformerLM(STUDENT, layout, seed=1).double()
    teacher = _teachers(layout, single)["a"]
    micro_batches = _micro_batches()
    counts = count_tokens(micro_batches, layout)
    results = []
    for teachers, mode, configs in (([{"checkpoint": "/a", "name": "a"}], "sum", single),
                                    (halves, "sum", same), (shares, "mixture", same)):
        cfg = from_dict(DistillConfig, {"teachers": teachers, "teacher_mode": mode,
                                        "logit": {"temperature": TEMPERATURE}}, prefix="distill")
        objective = DistillObjective(cfg, STUDENT, configs, layout).double()
        student.zero_grad()
        total = 0.0
        for mb in micro_batches:
            t_out = _outputs(teacher, objective, "a", mb["input_ids"])
            result = objective(student(mb["input_ids"]), {n: t_out for n in configs},
                               mb["labels"], tokens_norm=counts)
            result.loss.backward()
            total += float(result.total)
        results.append((total, [p.grad.clone() for p in student.parameters()]))
    for total, grads in results[1:]:
        assert math.isclose(total, results[0][0], rel_tol=1e-12)
        for g, want in zip(grads, results[0][1]):
            torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)


def test_entry_point_trains_from_two_colocated_teachers(tmp_path):
    cfg = base_config(tmp_path, cache=tmp_path / "cache")
    wide = teacher_config(cfg)
    narrow = teacher_config(cfg)
    narrow["model"].update(hidden=24, layers=1, ffn_hidden=48)
    cfg["distill"] = {"teacher_mode": "sum", "teachers": [
        {"checkpoint": str(make_teacher(tmp_path / "wide", wide)), "name": "wide", "weight": 0.6},
        {"checkpoint": str(make_teacher(tmp_path / "narrow", narrow)), "name": "narrow",
         "weight": 0.4}]}
    cfg["train"]["steps"] = 2
    path = write_config(tmp_path / "run.yaml", cfg)
    assert run_main(str(path), []) == 0
    records = read_metrics(tmp_path / "run")
    assert len(records) == 2
    for r in records:
        assert r["kd_loss/wide"] > 0 and r["kd_loss/narrow"] > 0
        # logged float32 values, summed in another order than the run's own sum: fp32 round-off
        assert math.isclose(r["kd_loss/wide"] + r["kd_loss/narrow"], r["kd_loss"],
                            rel_tol=FP32_RTOL, abs_tol=FP32_ATOL)
        assert 0 <= r["top1_agreement/wide"] <= 1 and r["teacher_entropy/narrow"] > 0
    assert run_main(str(path), [f"train.run_dir={tmp_path / 'mix'}",
                                "distill.teacher_mode=mixture"]) == 0
    mixed = read_metrics(tmp_path / "mix")
    assert "kd_loss/wide" not in mixed[0] and mixed[0]["kd_loss"] > 0


def test_offline_exports_of_two_teachers_equal_colocated_sum(tmp_path):
    """Sum mode from two full-vocabulary offline exports logs what two colocated teachers log
    (fp32 round-off of the two formulas: rtol 1e-5, kd terms atol 1e-6)."""
    cfg = base_config(tmp_path, cache=tmp_path / "cache")
    cfg["data"]["corpus_max_bytes"] = 30000  # a small sample map: the stores hold every column
    narrow = teacher_config(cfg)
    narrow["model"].update(hidden=24, layers=1, ffn_hidden=48)
    ckpts = {"wide": make_teacher(tmp_path / "wide", teacher_config(cfg)),
             "narrow": make_teacher(tmp_path / "narrow", narrow)}
    cfg["distill"] = {"logit": {"temperature": 2.0}, "lm_weight": 0.5}
    exports = {}
    for name, ckpt in ckpts.items():
        one = write_config(tmp_path / f"{name}.yaml",
                           {**cfg, "distill": {**cfg["distill"], "teacher": str(ckpt)}})
        exports[name] = tmp_path / f"export_{name}"
        assert export_teacher_logits.main(["--config", str(one), "--top-k", str(CORPUS_VOCAB),
                                           "--value-bits", "32", "--out", str(exports[name]),
                                           "--no-progress"]) == 0
    weights = {"wide": 0.7, "narrow": 0.3}
    cfg["distill"]["teachers"] = [{"checkpoint": str(ckpts[n]), "name": n, "weight": weights[n]}
                                  for n in ckpts]
    path = write_config(tmp_path / "run.yaml", cfg)
    assert run_main(str(path), [f"train.run_dir={tmp_path / 'colocated'}"]) == 0
    offline = json.dumps([{"offline_dir": str(exports[n]), "checkpoint": str(ckpts[n]),
                           "name": n, "weight": weights[n]} for n in ckpts])
    assert run_main(str(path), [f"train.run_dir={tmp_path / 'offline'}",
                                "distill.schedule=offline", f"distill.teachers={offline}"]) == 0
    colocated, got = read_metrics(tmp_path / "colocated"), read_metrics(tmp_path / "offline")
    assert len(got) == len(colocated) == 3
    for a, b in zip(got, colocated):
        for key in ("loss", "lm_loss", "grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5), (key, a, b)
        for key in ("kd_loss", "kd_loss/wide", "kd_loss/narrow"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-6), (key, a, b)
