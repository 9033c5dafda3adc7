"""The whole objective: distributed against the TP=1 reference, each term against its definition.

- TP=2 with SP and DP=2 (4 spawned ranks), LM head unfused and fused (its gradient computed in
  the forward from the objective's per-token weights), against the single-process
  TP=1 objective over the same global batch: the logged terms and the gradient of every student
  parameter (gathered) and of every projection weight, summed over DP (what the trainer's
  DP-scaled DDP average gives).
- Each term against a direct torch computation over the whole step (global-token means, not means
  of micro-batch means), with unequal valid-token counts across micro-batches.
- MTP: the logit term gives MTP-only parameters exactly zero gradient, the LM term does not.
- Pure KD, pure LM, activations only, the offline top-k teacher, and the run-time errors.
- Soft-capped student and/or teacher: the fused objective equals the unfused one.

Everything runs in float64; tolerance 1e-9 (values and gradients).
"""

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F

from distill.config import SINGLE_TEACHER, DistillConfig, aligned_teacher_config
from distill.evaluate import next_token_loss
from distill.objective import DistillObjective, TokenCounts, count_tokens
from distill.teacher import TeacherOutputs, TeacherRequest
from distill.teacher_sources import ColocatedTeacher
from distill.teacher_wire import _Wire
from engine import collectives as C
from engine.config import from_dict
from engine.data import IGNORE_INDEX, shift_labels
from engine.parallel import ParallelConfig, ParallelLayout, RankOrder, make_layout
from engine.spawn import run_ranks
from layers.buffers import ActivationBuffer
from layers.config import ModelConfig
from layers.model import TransformerLM
from layers.sharding import gather_full
from tests.helpers import FP32_ATOL, FP32_RTOL

TOL = dict(rtol=1e-9, atol=1e-9)
VOCAB = 100
STUDENT = ModelConfig(family="llama", vocab_size=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2,
                      ffn_hidden=64, max_seq_len=16, mtp_heads=1)
# Deeper, wider, other head counts, padded differently.
TEACHER = ModelConfig(family="llama", vocab_size=VOCAB, hidden=48, layers=3, heads=6, kv_heads=2,
                      ffn_hidden=96, max_seq_len=16, vocab_pad_multiple=48)
TEMPERATURE, KD_WEIGHT, LAMBDA = 2.0, 0.7, 0.3
DISTILL = {
    "lm_weight": 1.0, "mtp_weights": [0.5],
    "logit": {"kind": "forward_kl", "temperature": TEMPERATURE, "weight": KD_WEIGHT},
    "activations": ["all_mixers",
                    {"student": "decoder.1.mlp_output", "teacher": "decoder.2.mlp_output",
                     "loss": "cosine", "weight": 0.5},
                    {"student": "final_hidden", "teacher": "final_hidden", "loss": "l2",
                     "weight": 2.0}],
    "activation_coef": LAMBDA, "projection": "per_pair",
}
TERMS = ("total", "lm_loss", "kd_loss", "act_loss")


def _cfg(**overrides) -> DistillConfig:
    return from_dict(DistillConfig, {**DISTILL, **overrides}, prefix="distill")


def _micro_batches(*, labels=True):
    """Four micro-batches [2, 8] with very different numbers of valid labels."""
    g = torch.Generator().manual_seed(7)
    batches = []
    for keep in (0.9, 0.25, 0.6, 1.0):
        tokens = torch.randint(0, VOCAB, (2, 9), generator=g)
        mb = {"input_ids": tokens[:, :-1].contiguous()}
        if labels:
            mb["labels"] = tokens[:, 1:].clone()
            mb["labels"][torch.rand(2, 8, generator=g) > keep] = IGNORE_INDEX
            mb["labels"][0, 0] = tokens[0, 1]
        batches.append(mb)
    return batches


def _models(layout, cfg, *, with_teacher=True):
    student = TransformerLM(STUDENT, layout, seed=1).double()
    teacher = None
    if with_teacher:
        teacher = TransformerLM(aligned_teacher_config(STUDENT, TEACHER), layout, seed=2).double()
        teacher.eval().requires_grad_(False)
    objective = DistillObjective(cfg, STUDENT, TEACHER if with_teacher else None, layout,
                                 seed=3).double()
    return student, teacher, objective


def _teacher_outputs(teacher, objective, input_ids):
    with torch.no_grad():
        out = teacher(input_ids, buffers=objective.teacher_buffer_names(),
                      compute_logits=not objective.fused)
    if objective.fused:
        return TeacherOutputs(head_hidden=out.head_hidden, output_weight=teacher.output_weight,
                              buffers=out.buffers)
    return TeacherOutputs(logits=out.logits, buffers=out.buffers)


def _step(layout, cfg, micro_batches, *, with_teacher=True):
    """One optimizer step's forwards/backwards; the DP sum of the gradients done by hand (the
    objective's loss is each rank's share of the global means)."""
    student, teacher, objective = _models(layout, cfg, with_teacher=with_teacher)
    counts = count_tokens(micro_batches, layout, mtp_heads=STUDENT.mtp_heads)
    terms = torch.zeros(len(TERMS), dtype=torch.float64)
    for mb in micro_batches:
        teacher_out = {SINGLE_TEACHER: _teacher_outputs(teacher, objective, mb["input_ids"])} \
            if teacher else None
        out = student(mb["input_ids"], buffers=objective.student_buffer_names(),
                      compute_logits=not objective.fused)
        result = objective(out, teacher_out, mb.get("labels"), tokens_norm=counts,
                           output_weight=student.output_weight)
        result.loss.backward()
        terms += torch.stack([getattr(result, t).double() for t in TERMS])
    for p in [*student.parameters(), *objective.parameters()]:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        C.all_reduce(p.grad, layout.dp_group)
    C.all_reduce(terms, layout.dp_group)
    return {
        "terms": terms,
        "grads": {name: gather_full(p, layout=layout, vocab_size=VOCAB, tensor=p.grad)
                  for name, p in student.named_parameters()},
        "projection": [w.grad.clone() for w in objective.parameters()],
        "counts": counts,
        "fused_path": objective.fused_path,
    }


@functools.cache
def _reference(**overrides):
    return _step(ParallelLayout.single(), _cfg(**overrides), _micro_batches())


def _tp_sp_dp_run():
    layout = make_layout(ParallelConfig(tp=2, sp=True))
    mine = _micro_batches()[2 * layout.dp_rank: 2 * layout.dp_rank + 2]
    return {fused: _step(layout, _cfg(fused_lm_head=fused), mine) for fused in (False, True)}


def _assert_same_step(got, ref, label):
    torch.testing.assert_close(got["terms"], ref["terms"], **TOL, msg=f"{label}: terms")
    assert got["grads"].keys() == ref["grads"].keys()
    for name, grad in got["grads"].items():
        torch.testing.assert_close(grad, ref["grads"][name], **TOL,
                                   msg=lambda m: f"{label}: grad of {name}: {m}")
    assert len(got["projection"]) == len(ref["projection"]) == 4
    for i, (grad, want) in enumerate(zip(got["projection"], ref["projection"])):
        torch.testing.assert_close(grad, want, **TOL, msg=f"{label}: projection {i} grad")


def test_tp2_sp_dp2_objective_matches_tp1_reference():
    ref = _reference()
    assert ref["counts"].heads[0] != 4 * 16 and all(ref["terms"][1:] > 0)
    for rank, per_fused in enumerate(run_ranks(_tp_sp_dp_run, 4, timeout_s=120)):
        assert per_fused[False]["counts"] == ref["counts"]
        # training computes the fused head's gradient in its forward (no recomputed logits)
        assert (per_fused[False]["fused_path"], per_fused[True]["fused_path"]) == \
            (None, "grad_in_forward")
        for fused, result in per_fused.items():
            _assert_same_step(result, ref, f"rank {rank} fused={fused}")


# ------------------------------------------------------------------ each term by its definition
def _direct_terms(micro_batches):
    """The step's LM and KD terms straight from torch over all micro-batches at once."""
    layout = ParallelLayout.single()
    student, teacher, _ = _models(layout, _cfg())
    ids = torch.cat([mb["input_ids"] for mb in micro_batches])
    labels = torch.cat([mb["labels"] for mb in micro_batches])
    out, t_out = student(ids), teacher(ids)
    s, t = out.logits[..., :VOCAB], t_out.logits[..., :VOCAB]
    ce = F.cross_entropy(s.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    mtp = F.cross_entropy(out.mtp_logits[0][..., :VOCAB].flatten(0, 1),
                          shift_labels(labels, 1).flatten(), ignore_index=IGNORE_INDEX)
    kl = F.kl_div(F.log_softmax(s / TEMPERATURE, -1), F.log_softmax(t / TEMPERATURE, -1),
                  log_target=True, reduction="none").sum(-1)
    kd = TEMPERATURE ** 2 * KD_WEIGHT * kl[labels != IGNORE_INDEX].mean()
    return ce + 0.5 * mtp, kd


def test_terms_are_global_token_means_not_means_of_micro_batch_means():
    micro_batches = _micro_batches()
    lm, kd = _direct_terms(micro_batches)
    ref = _reference()
    torch.testing.assert_close(ref["terms"][1], lm.detach(), **TOL)
    torch.testing.assert_close(ref["terms"][2], kd.detach(), **TOL)
    per_batch = [_direct_terms([mb])[0].detach() for mb in micro_batches]
    assert abs(torch.stack(per_batch).mean() - lm) > 1e-3  # the unequal counts matter


def test_activation_term_by_its_definition():
    layout = ParallelLayout.single()
    cfg = _cfg(lm_weight=0.0, logit={"weight": 0.0})
    student, teacher, objective = _models(layout, cfg)
    mb = _micro_batches()[1]
    counts = count_tokens([mb], layout, mtp_heads=1)
    s_out = student(mb["input_ids"], buffers=objective.student_buffer_names())
    t_out = _teacher_outputs(teacher, objective, mb["input_ids"])
    result = objective(s_out, {SINGLE_TEACHER: t_out}, mb["labels"], tokens_norm=counts)
    valid = mb["labels"] != IGNORE_INDEX
    weights = objective.projection.weights
    pairs = [("decoder.0.mixer_output", "decoder.0.mixer_output", "mse", 1.0),
             ("decoder.1.mixer_output", "decoder.2.mixer_output", "mse", 1.0),
             ("decoder.1.mlp_output", "decoder.2.mlp_output", "cosine", 0.5),
             ("final_hidden", "final_hidden", "l2", 2.0)]
    total = 0.0
    for (s_name, t_name, loss, weight), w in zip(pairs, weights):
        s = (s_out.buffers[s_name].tensor @ w.t())[valid]
        t = t_out.buffers[t_name].tensor[valid]
        per_token = {"mse": ((s - t) ** 2).mean(-1), "l2": (s - t).norm(dim=-1),
                     "cosine": 1 - F.cosine_similarity(s, t, dim=-1)}[loss]
        total = total + weight * per_token.mean()
    torch.testing.assert_close(result.act_loss, LAMBDA * total.detach() / 4, **TOL)
    assert result.lm_loss == 0 and result.kd_loss == 0
    torch.testing.assert_close(result.loss.detach(), result.act_loss, **TOL)


def test_mtp_parameters_get_lm_gradient_and_exactly_zero_kd_gradient():
    def mtp_grads(**overrides):
        step = _step(ParallelLayout.single(), _cfg(activations=[], **overrides),
                     _micro_batches()[:2])
        return {n: g for n, g in step["grads"].items() if n.startswith("mtp.")}

    kd_only = mtp_grads(lm_weight=0.0)
    lm_only = mtp_grads(logit={"weight": 0.0})
    both = mtp_grads()
    assert kd_only and all(not g.any() for g in kd_only.values())
    assert all(g.abs().sum() > 0 for g in lm_only.values())
    assert all(torch.equal(both[n], lm_only[n]) for n in lm_only)


def test_pure_kd_without_labels():
    layout = ParallelLayout.single()
    micro_batches = _micro_batches(labels=False)
    step = _step(layout, _cfg(activations=[]), micro_batches)
    counts = step["counts"]
    assert counts.heads == (0, 0) and counts.distill == counts.tokens == 64
    student, teacher, _ = _models(layout, _cfg())
    ids = torch.cat([mb["input_ids"] for mb in micro_batches])
    s, t = student(ids).logits[..., :VOCAB], teacher(ids).logits[..., :VOCAB]
    kl = F.kl_div(F.log_softmax(s / TEMPERATURE, -1), F.log_softmax(t / TEMPERATURE, -1),
                  log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(step["terms"][2], TEMPERATURE ** 2 * KD_WEIGHT * kl.mean().detach(),
                               **TOL)
    assert step["terms"][1] == 0 and step["terms"][3] == 0


def test_pure_lm_without_teacher():
    cfg = _cfg(activations=[], logit={"weight": 0.0}, projection="none")
    step = _step(ParallelLayout.single(), cfg, _micro_batches(), with_teacher=False)
    lm, _ = _direct_terms(_micro_batches())
    torch.testing.assert_close(step["terms"][0], lm.detach(), **TOL)
    assert step["terms"][2] == 0 and step["terms"][3] == 0


def test_offline_topk_teacher_with_full_k_equals_full_logits():
    layout = ParallelLayout.single()
    cfg = _cfg(activations=[])
    student, teacher, objective = _models(layout, cfg)
    mb = _micro_batches()[0]
    counts = count_tokens([mb], layout, mtp_heads=1)
    t_logits = teacher(mb["input_ids"]).logits[..., :VOCAB]
    values, indices = t_logits.topk(VOCAB, dim=-1)
    topk = TeacherOutputs(topk_values=values, topk_indices=indices,
                          logsumexp=torch.logsumexp(t_logits / TEMPERATURE, dim=-1))
    results = []
    for teacher_out in (TeacherOutputs(logits=teacher(mb["input_ids"]).logits), topk):
        student.zero_grad()
        out = objective(student(mb["input_ids"]), {SINGLE_TEACHER: teacher_out}, mb["labels"],
                        tokens_norm=counts)
        out.loss.backward()
        results.append((out.kd_loss, [p.grad.clone() for p in student.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], **TOL)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, **TOL)


def test_fused_teacher_as_logits_or_as_hidden_states():
    layout = ParallelLayout.single()
    student, teacher, objective = _models(layout, _cfg(activations=[], fused_lm_head=True))
    mb = _micro_batches()[2]
    counts = count_tokens([mb], layout, mtp_heads=1)
    t_out = teacher(mb["input_ids"])
    results = []
    for teacher_out in (TeacherOutputs(logits=t_out.logits),
                        TeacherOutputs(head_hidden=t_out.head_hidden,
                                       output_weight=teacher.output_weight)):
        student.zero_grad()
        out = objective(student(mb["input_ids"], compute_logits=False), {SINGLE_TEACHER: teacher_out},
                        mb["labels"],
                        tokens_norm=counts, output_weight=student.output_weight)
        out.loss.backward()
        results.append((out.total, [p.grad.clone() for p in student.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], **TOL)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, **TOL)


def _capped_step(fused: bool, caps: tuple[float | None, float | None]):
    """(terms, student gradients) of one micro-batch with the student's and the teacher's
    final_logit_softcap = caps, the teacher run by ColocatedTeacher as the objective asks (its
    logits, or fused its head input with its cap)."""
    layout = ParallelLayout.single()
    s_cfg, t_cfg = (dataclasses.replace(c, final_logit_softcap=cap)
                    for c, cap in zip((STUDENT, TEACHER), caps, strict=True))
    student = TransformerLM(s_cfg, layout, seed=1).double()
    teacher = TransformerLM(aligned_teacher_config(s_cfg, t_cfg), layout, seed=2).double()
    objective = DistillObjective(_cfg(activations=[], fused_lm_head=fused), s_cfg, t_cfg, layout,
                                 seed=3).double()
    source = ColocatedTeacher(teacher, objective.teacher_request())
    mb = _micro_batches()[2]
    out = objective(student(mb["input_ids"], compute_logits=not fused), source(mb), mb["labels"],
                    tokens_norm=count_tokens([mb], layout, mtp_heads=1),
                    output_weight=student.output_weight)
    out.loss.backward()
    return (torch.stack([getattr(out, t) for t in TERMS]),
            [p.grad.clone() for p in student.parameters()])


def test_softcapped_models_fused_equals_unfused():
    """final_logit_softcap on the student, the teacher, or both (caps of the size of these
    models' logits, about 0.1, so that they bend them): the fused objective equals the unfused one
    on the models' capped logits, every term and every student gradient (the MTP head's too),
    and differs from the uncapped objective."""
    plain = _capped_step(True, (None, None))
    for caps in ((0.1, None), (None, 0.15), (0.1, 0.15)):
        unfused, fused = _capped_step(False, caps), _capped_step(True, caps)
        torch.testing.assert_close(fused[0], unfused[0], **TOL)
        for got, want in zip(fused[1], unfused[1], strict=True):
            torch.testing.assert_close(got, want, **TOL)
        assert not torch.allclose(fused[0], plain[0], **TOL), caps


@pytest.mark.parametrize("fused", [False, True])
def test_next_token_loss_for_validation(fused):
    layout = ParallelLayout.single()
    student, _, _ = _models(layout, _cfg())
    mb = _micro_batches()[1]
    per_token = next_token_loss(student, mb["input_ids"], mb["labels"], fused=fused)
    logits = student(mb["input_ids"]).logits[..., :VOCAB]
    want = F.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="none").view_as(per_token)
    torch.testing.assert_close(per_token, want, **TOL)


def test_projection_is_state_of_the_objective_not_the_student():
    student, _, objective = _models(ParallelLayout.single(), _cfg())
    state = objective.state_dict()
    assert sorted(state) == [f"projection.weights.{i}" for i in range(4)]
    assert all(p.tp_split_dim is None for p in objective.parameters())
    assert not any("projection" in name for name in student.state_dict())
    other = DistillObjective(_cfg(), STUDENT, TEACHER, ParallelLayout.single(), seed=9).double()
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), objective.parameters()))


def test_count_tokens_per_head():
    mb = {"input_ids": torch.zeros(2, 4, dtype=torch.long),
          "labels": torch.tensor([[1, 2, IGNORE_INDEX, 3], [4, IGNORE_INDEX, 5, 6]])}
    counts = count_tokens([mb, {"input_ids": torch.zeros(1, 4, dtype=torch.long)}],
                          ParallelLayout.single(), mtp_heads=2)
    # head 1 sees labels[:, 1:], head 2 labels[:, 2:]; the label-free batch counts for distillation.
    assert counts == TokenCounts(tokens=12, heads=(6, 4, 3), distill=10)
    assert shift_labels(mb["labels"], 2).tolist() == [[IGNORE_INDEX, 3, -100, -100],
                                                      [5, 6, -100, -100]]


def test_teacher_wire_format_round_trip():
    """The remote path's per-micro-batch tensors: the head input whole, each buffer cut to the
    receiving student rank's sequence shard (under the students' SP), restored by unflatten."""
    hidden, buf = torch.randn(2, 4, 3), torch.randn(2, 4, 5)
    wire = _Wire.of(TeacherRequest(head="hidden", buffers=("decoder.0.mlp_output",)))
    out = TeacherOutputs(head_hidden=hidden, buffers={
        "decoder.0.mlp_output": ActivationBuffer(buf, seq_sharded=False)})
    whole = wire.whole(out, ParallelLayout.single())
    for shard in range(2):
        back = wire.unflatten(wire.for_student(whole, seq_shards=2, shard=shard))
        assert torch.equal(back.head_hidden, hidden) and back.logits is None
        assert torch.equal(back.buffers["decoder.0.mlp_output"], buf[:, 2 * shard: 2 * shard + 2])
    back = wire.unflatten(wire.for_student(whole, seq_shards=1, shard=0))
    assert torch.equal(back.buffers["decoder.0.mlp_output"], buf)
    assert _Wire.of(TeacherRequest(head="logits")).head == "logits"
    assert _Wire.of(TeacherRequest(head="none", buffers=("final_hidden",))).head is None


def _save_teacher_at_tp2(root, config: ModelConfig):
    from distill.weights import save_weights

    layout = make_layout(ParallelConfig(tp=2))
    model = TransformerLM(config, layout, seed=5)
    return save_weights(root, model, layout, config={"model": dataclasses.asdict(config)})


@pytest.mark.parametrize("tied", [False, True])
def test_teacher_head_loads_the_output_rows_of_any_saved_tp(tmp_path, tied):
    """A student rank's frozen teacher head holds exactly the teacher's output-weight rows of its
    vocabulary shard, padded like the student, from a checkpoint saved at another TP degree (here
    saved at TP 2, read at TP 1; the end-to-end tests read TP 1 checkpoints at TP 2), and caps
    its logits as the teacher does; the students' end of teacher ranks (RemoteTeacher) forms the
    teacher's capped logits with it, or hands the fused loss its weight and cap."""
    from distill.teacher_load import load_teacher_head
    from distill.teacher_wire import RemoteTeacher

    teacher = ModelConfig(family="llama", vocab_size=300, hidden=16, layers=1, heads=2,
                          kv_heads=2, ffn_hidden=32, max_seq_len=8, tie_embeddings=tied,
                          final_logit_softcap=0.05)
    student = dataclasses.replace(teacher, hidden=8, heads=1, kv_heads=1, vocab_pad_multiple=64,
                                  tie_embeddings=False)
    path = run_ranks(_save_teacher_at_tp2, 2, tmp_path / "teacher", teacher, timeout_s=60)[0]
    layout = ParallelLayout.single()
    head = load_teacher_head(path, teacher, student, layout, bf16=False)
    reference = TransformerLM(teacher, layout, seed=5).output_weight  # same seeded full values
    assert head.weight.shape == (student.padded_vocab(1), 16) and not head.weight.requires_grad
    assert torch.equal(head.weight[:300], reference[:300])
    assert not head.weight[300:].any()  # the student's padding rows
    hidden = torch.randn(2, 3, 16)
    logits = head(hidden)
    assert logits.shape[-1] == student.padded_vocab(1)
    assert (logits[..., 300:] == torch.finfo(logits.dtype).min).all()
    raw = (hidden.double() @ reference[:300].double().T).float()
    torch.testing.assert_close(logits[..., :300], 0.05 * torch.tanh(raw / 0.05),
                               rtol=FP32_RTOL, atol=FP32_ATOL)
    with_teacher_rank = dataclasses.replace(layout, world_size=2,
                                            teachers=RankOrder(size=1, tp=1, offset=1))
    for head_kind in ("logits", "hidden"):
        remote = RemoteTeacher(with_teacher_rank, TeacherRequest(head=head_kind), prefetch=1,
                               total=0, head=head)
        out = remote._with_head(TeacherOutputs(head_hidden=hidden))
        if head_kind == "logits":
            assert out.head_hidden is None and torch.equal(out.logits, logits)
        else:
            assert out.output_weight is head.weight and out.softcap == 0.05


# --------------------------------------------------------------------------- run-time errors
@functools.cache
def _one_forward():
    layout = ParallelLayout.single()
    student, teacher, objective = _models(layout, _cfg())
    mb = _micro_batches()[0]
    s_out = student(mb["input_ids"], buffers=objective.student_buffer_names())
    return objective, s_out, _teacher_outputs(teacher, objective, mb["input_ids"]), mb


@pytest.mark.parametrize("case,message", [
    ("nothing", "nothing to optimize"),
    ("mtp_counts", "pass mtp_heads= to count_tokens"),
    ("padding", "aligned_teacher_config"),
    ("no_logits", "teacher outputs have no logits"),
    ("no_head", "the teacher outputs carry no logits"),
    ("missing_buffer", "lack activation buffer 'decoder.0.mixer_output'"),
    ("fused_weight", "needs the student's output_weight"),
])
def test_run_time_errors_are_clear(case, message):
    objective, s_out, t_out, mb = _one_forward()
    labels, counts = mb["labels"], TokenCounts(tokens=16, heads=(10, 9), distill=10)
    if case == "nothing":
        t_out, labels = None, None
    elif case == "mtp_counts":
        counts = TokenCounts(tokens=16, heads=(10,), distill=10)
    elif case == "padding":
        t_out = dataclasses.replace(t_out, logits=torch.zeros(2, 8, 96, dtype=torch.float64))
    elif case == "no_logits":
        t_out = dataclasses.replace(t_out, logits=None, head_hidden=torch.zeros(2, 8, 48))
    elif case == "no_head":
        t_out = dataclasses.replace(t_out, logits=None)
    elif case == "missing_buffer":
        t_out = dataclasses.replace(t_out, buffers={})
    elif case == "fused_weight":
        objective = DistillObjective(_cfg(fused_lm_head=True), STUDENT, TEACHER,
                                     ParallelLayout.single())
    with pytest.raises(ValueError, match=message):
        objective(s_out, None if t_out is None else {SINGLE_TEACHER: t_out}, labels,
                  tokens_norm=counts)
