"""KD diagnostics (teacher entropy, student entropy, top-1 agreement) against float64 references.

- Per token, from `lm_and_divergence` / `divergence` with `diagnostics=True`, at TP 1 and 2,
  every kind, temperatures 0.5 and 2, extreme logits (+-1e4,
  -inf columns) and a padded vocabulary holding NaN: equal to the definitions on the full
  vocabulary in float64 (rtol=atol=1e-5, fp32 round-off). The loss values and gradients are
  bitwise those of the call without diagnostics, and the collectives are the same calls.
- Through the objective at TP 1 and TP 2 with SP (float64 models): the logged means over the
  distilled positions (masked labels excluded) equal the reference to 1e-9 (forward and
  reverse KL with labels, jsd without; each with and without the fused LM head).
- The fused head's per-token diagnostics, both paths, every kind, TP 1/2/4: tests/test_fused.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill import KINDS, divergence, lm_and_divergence
from distill.config import SINGLE_TEACHER, DistillConfig
from distill.objective import DIAGNOSTICS, DistillObjective, count_tokens
from distill.teacher import TeacherOutputs
from engine import collectives as C
from engine.config import from_dict
from engine.data import IGNORE_INDEX
from engine.parallel import ParallelConfig, ParallelLayout, make_layout
from engine.spawn import run_ranks
from layers.config import ModelConfig
from layers.model import TransformerLM
from tests.references import VOCAB, make_labels, make_logits, reference_diagnostics, vocab_shard, world_group

TOL = dict(rtol=1e-5, atol=1e-5)


def _stack(diag) -> torch.Tensor:
    return torch.stack([getattr(diag, name) for name in DIAGNOSTICS], -1).double()


def _check_sharded_logits(kind: str, temperature: float, extreme: bool, group) -> None:
    s_full, t_full = make_logits(kind, extreme=extreme)
    labels = make_labels(s_full)
    ref = reference_diagnostics(s_full, t_full, temperature)
    results = {}
    for diagnostics in (False, True):
        s = vocab_shard(s_full, group).requires_grad_()
        with C.count_collectives() as counts:
            out = lm_and_divergence(s, vocab_shard(t_full, group), labels, kind=kind,
                                    temperature=temperature, vocab_size=VOCAB, group=group,
                                    chunk_tokens=3, chunk_vocab=5, diagnostics=diagnostics)
        (out[0] + out[1]).sum().backward()
        results[diagnostics] = (out, s.grad, dict(counts.calls))
    (ce, div, diag), grad, calls = results[True]
    (ce0, div0), grad0, calls0 = results[False]
    assert calls == calls0, (kind, calls, calls0)
    # exact: the diagnostics only read the loss's intermediates, which run as without them
    assert torch.equal(ce, ce0) and torch.equal(div, div0) and torch.equal(grad, grad0)
    torch.testing.assert_close(_stack(diag), ref, **TOL, msg=lambda m: f"{kind} T={temperature}"
                               f" extreme={extreme}: {m}")
    div_only, diag_only = divergence(vocab_shard(s_full, group), vocab_shard(t_full, group), kind=kind,
                                     temperature=temperature, vocab_size=VOCAB, group=group,
                                     diagnostics=True)
    torch.testing.assert_close(_stack(diag_only), ref, **TOL)


def _all_function_checks() -> int:
    group = world_group()
    checks = 0
    for kind in KINDS:
        for temperature in (0.5, 2.0):
            for extreme in (False, True):
                _check_sharded_logits(kind, temperature, extreme, group)
                checks += 1
    return checks


def test_diagnostics_exact_tp1():
    assert _all_function_checks() == len(KINDS) * 4


def test_diagnostics_exact_tp2():
    assert run_ranks(_all_function_checks, 2) == [len(KINDS) * 4] * 2


# ---- through the objective: masked means, TP=2+SP equals the float64 reference ---------------

MODEL_VOCAB = 50
# Large-init weights, so that both distributions are far from uniform.
STUDENT = ModelConfig(family="llama", vocab_size=MODEL_VOCAB, hidden=16, layers=1, heads=2,
                      kv_heads=2, ffn_hidden=32, max_seq_len=8, vocab_pad_multiple=4,
                      init_std=0.3)


def _models(layout: ParallelLayout) -> tuple[TransformerLM, TransformerLM]:
    """(student, teacher) in float64; the teacher is the student with every weight moved by an
    elementwise function of itself (so alike at any TP), so that they agree on some tokens."""
    student = TransformerLM(STUDENT, layout, seed=1).double()
    teacher = TransformerLM(STUDENT, layout, seed=1).double().eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.3 * 0.3 * torch.sin(p * 1e4))
    return student, teacher


CASES = {  # name: (distill section, labels?)
    "forward_kl": ({"logit": {"temperature": 2.0}}, True),
    "reverse_kl": ({"logit": {"kind": "reverse_kl", "temperature": 0.5}}, True),
    "jsd_pure_kd": ({"lm_weight": 0.0, "logit": {"kind": "jsd", "temperature": 1.5}}, False),
    # the fused LM head (grad-in-forward): forward KL at T = 1 keeps the exponentials, the others
    # take the general row-block path
    "forward_kl_fused": ({"fused_lm_head": True, "logit": {"temperature": 1.0}}, True),
    "reverse_kl_fused": ({"fused_lm_head": True,
                          "logit": {"kind": "reverse_kl", "temperature": 0.5}}, True),
    "jsd_pure_kd_fused": ({"fused_lm_head": True, "lm_weight": 0.0,
                           "logit": {"kind": "jsd", "temperature": 1.5}}, False),
}


def _micro_batches(labels: bool):
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(2):
        tokens = torch.randint(0, MODEL_VOCAB, (2, 9), generator=g)
        mb = {"input_ids": tokens[:, :-1].contiguous()}
        if labels:
            mb["labels"] = tokens[:, 1:].clone()
            mb["labels"][torch.rand(2, 8, generator=g) > 0.6] = IGNORE_INDEX
        batches.append(mb)
    return batches


def _objective_metrics(layout: ParallelLayout) -> dict[str, list[float]]:
    out = {}
    for name, (section, labels) in CASES.items():
        cfg = from_dict(DistillConfig, section, prefix="distill")
        student, teacher = _models(layout)
        objective = DistillObjective(cfg, STUDENT, STUDENT, layout)
        micro_batches = _micro_batches(labels)
        counts = count_tokens(micro_batches, layout)
        totals = torch.zeros(len(DIAGNOSTICS), dtype=torch.float64)
        for mb in micro_batches:
            with torch.no_grad():
                t = teacher(mb["input_ids"], compute_logits=not cfg.fused_lm_head)
            t_out = TeacherOutputs(head_hidden=t.head_hidden, output_weight=teacher.output_weight) \
                if cfg.fused_lm_head else TeacherOutputs(logits=t.logits)
            s = student(mb["input_ids"], compute_logits=not cfg.fused_lm_head)
            result = objective(s, {SINGLE_TEACHER: t_out}, mb.get("labels"), tokens_norm=counts,
                               output_weight=student.output_weight)
            totals += torch.stack([result.metrics[k].double() for k in DIAGNOSTICS])
        out[name] = totals.tolist()
    return out


def _reference_metrics() -> dict[str, list[float]]:
    layout = ParallelLayout.single()
    out = {}
    for name, (section, labels) in CASES.items():
        temperature = section["logit"]["temperature"]
        student, teacher = _models(layout)
        micro_batches = _micro_batches(labels)
        ids = torch.cat([mb["input_ids"] for mb in micro_batches])
        with torch.no_grad():
            per_token = reference_diagnostics(student(ids).logits, teacher(ids).logits,
                                              temperature, MODEL_VOCAB)
        if labels:
            per_token = per_token[torch.cat([mb["labels"] for mb in micro_batches])
                                  != IGNORE_INDEX]
        out[name] = per_token.reshape(-1, 3).mean(0).tolist()
    return out


def _tp2_sp_metrics():
    return _objective_metrics(make_layout(ParallelConfig(tp=2, sp=True)))


def test_objective_logs_masked_means_equal_to_reference_at_tp1_and_tp2_sp():
    ref = _reference_metrics()
    assert 0 < ref["forward_kl"][2] < 1  # some tokens agree, some do not
    runs = [_objective_metrics(ParallelLayout.single()), *run_ranks(_tp2_sp_metrics, 2)]
    for got in runs:
        for name in CASES:
            torch.testing.assert_close(torch.tensor(got[name]), torch.tensor(ref[name]),
                                       rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")
    # the masked positions matter: the unmasked mean differs
    student, _ = _models(ParallelLayout.single())
    ids = torch.cat([mb["input_ids"] for mb in _micro_batches(True)])
    with torch.no_grad():
        logp = F.log_softmax(student(ids).logits[..., :MODEL_VOCAB] / 2.0, -1)
    assert abs(-(logp.exp() * logp).sum(-1).mean() - ref["forward_kl"][1]) > 1e-6


def test_plot_metrics_plots_the_diagnostics(tmp_path):
    import json

    from tools.plot_metrics import expand_keys, main, variants

    assert expand_keys(["val_loss", "diagnostics", "top1_agreement"]) == \
        ["val_loss", *DIAGNOSTICS]
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": i, "teacher_entropy": 2.0 - 0.1 * i, "student_entropy": 3.0 - 0.2 * i,
                "top1_agreement": 0.1 * i} for i in range(1, 4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "diag.png"
    assert main([str(run), "--out", str(out), "--keys", "diagnostics"]) == 0
    assert out.stat().st_size > 1000
    several = [{"step": 1, "teacher_entropy/a": 1.0, "teacher_entropy/b": 2.0, "loss": 3.0}]
    assert variants(several, "teacher_entropy") == ["teacher_entropy/a", "teacher_entropy/b"]
    assert variants(several, "loss") == ["loss"] and variants(several, "lr") == []
