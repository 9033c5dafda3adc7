"""Activation losses on sharded buffers, and the projection, against a single-process reference.

Every case runs in float64: values to 1e-12, gradients of the student buffers (this rank's tokens)
and of the projection weights to 1e-12 relative.
"""

import pytest
import torch
import torch.nn.functional as F

from distill.activation import activation_pair_means, token_loss
from distill.config import ResolvedPair
from distill.projection import ActivationProjection
from engine import collectives as C
from engine.parallel import ParallelConfig, ParallelLayout, make_layout
from engine.spawn import run_ranks
from layers.buffers import ActivationBuffer

TOL = dict(rtol=1e-12, atol=1e-12)
PAIRS = [ResolvedPair("decoder.0.mixer_output", "decoder.1.mixer_output", "mse", 1.0),
         ResolvedPair("decoder.1.mlp_output", "decoder.3.mlp_output", "l2", 1.0),
         ResolvedPair("final_hidden", "final_hidden", "cosine", 1.0)]
COEFS = torch.tensor([1.0, 0.7, 1.3], dtype=torch.float64)  # distinct, so pairs cannot swap
BATCH, SEQ = 2, 8


def _data(*, seq_dim, student_width, teacher_width, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (BATCH, SEQ) if seq_dim == 1 else (SEQ, BATCH)
    students = [torch.randn(*shape, student_width, generator=g, dtype=torch.float64)
                for _ in PAIRS]
    teachers = [torch.randn(*shape, teacher_width, generator=g, dtype=torch.float64)
                for _ in PAIRS]
    mask = torch.rand(BATCH, SEQ, generator=g) > 0.3
    mask[0, 0] = True
    return students, teachers, mask


def _run(layout, students, teachers, mask, *, seq_dim, student_sharded, teacher_sharded,
         bare_teacher, projection):
    """Shard the full tensors as asked, compute the pair means, backward the weighted sum."""
    group = layout.tp_group

    def shard(t, sharded):
        return C.split_along(t, group, dim=seq_dim).clone() if sharded else t.clone()

    leaves = [shard(s, student_sharded).requires_grad_(True) for s in students]
    student = {p.student: ActivationBuffer(s, student_sharded, seq_dim) for p, s in zip(PAIRS, leaves)}
    teacher = {p.teacher: shard(t, student_sharded) if bare_teacher
               else ActivationBuffer(shard(t, teacher_sharded), teacher_sharded, seq_dim)
               for p, t in zip(PAIRS, teachers)}
    num_tokens = int(mask.sum())
    with C.count_collectives() as counts:
        values = activation_pair_means(PAIRS, student, teacher, token_mask=mask,
                                       num_tokens=num_tokens, projection=projection, group=group)
    (values * COEFS).sum().backward()
    proj_grads = [w.grad.clone() for w in projection.weights] if projection is not None else []
    return values.detach(), [x.grad for x in leaves], proj_grads, counts


def _projection(layout, kind, widths):
    if kind == "none":
        return None
    return ActivationProjection(pairs=len(PAIRS), shared=kind == "shared", student_width=widths[0],
                                teacher_width=widths[1], layout=layout, seed=5).double()


CASES = [  # sp, seq_dim, teacher sharded, bare teacher tensor, projection, (student, teacher) width
    (True, 1, True, False, "per_pair", (6, 10)),
    (True, 0, False, False, "shared", (6, 10)),
    (True, 1, True, True, "none", (6, 6)),
    (False, 1, True, False, "per_pair", (6, 10)),
    (False, 0, False, True, "shared", (6, 4)),
]


def _check_layouts():
    for sp, seq_dim, teacher_sharded, bare, proj_kind, widths in CASES:
        layout = make_layout(ParallelConfig(tp=2, sp=sp))
        students, teachers, mask = _data(seq_dim=seq_dim, student_width=widths[0],
                                         teacher_width=widths[1])
        ref_vals, ref_grads, ref_proj, _ = _run(
            ParallelLayout.single(), students, teachers, mask, seq_dim=seq_dim,
            student_sharded=False, teacher_sharded=False, bare_teacher=bare,
            projection=_projection(ParallelLayout.single(), proj_kind, widths))
        vals, grads, proj, counts = _run(
            layout, students, teachers, mask, seq_dim=seq_dim, student_sharded=sp,
            teacher_sharded=teacher_sharded and not bare, bare_teacher=bare,
            projection=_projection(layout, proj_kind, widths))
        case = (sp, seq_dim, teacher_sharded, bare, proj_kind)
        torch.testing.assert_close(vals, ref_vals, **TOL, msg=f"values {case}")
        for got, ref in zip(grads, ref_grads):
            want = C.split_along(ref, layout.tp_group, dim=seq_dim) if sp else ref
            torch.testing.assert_close(got, want, **TOL, msg=f"student grads {case}")
        for got, ref in zip(proj, ref_proj):
            torch.testing.assert_close(got, ref, **TOL, msg=f"projection grads {case}")
        gathers = len(PAIRS) * int(teacher_sharded and not bare and not sp)  # one per pair
        assert counts.calls["all_gather"] == gathers, (case, counts.calls)
        assert counts.calls["all_reduce"] == int(sp), (case, counts.calls)
    return True


def test_sharded_activation_losses_match_single_process():
    assert all(run_ranks(_check_layouts, 2))


def test_token_losses_are_their_definitions():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    torch.testing.assert_close(token_loss(s, t, "mse").mean(), F.mse_loss(s, t))
    torch.testing.assert_close(token_loss(s, t, "l2"), (s - t).pow(2).sum(-1).sqrt())
    cos = (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))
    torch.testing.assert_close(token_loss(s, t, "cosine"), 1 - cos)
    assert token_loss(s.bfloat16(), t.bfloat16(), "mse").dtype == torch.float32


def test_l2_gradient_is_finite_where_student_equals_teacher():
    s = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    token_loss(s, s.detach().clone(), "l2").sum().backward()
    assert torch.isfinite(s.grad).all() and not s.grad.any()


def test_unmasked_mean_and_mean_over_elements():
    s, t = torch.randn(2, 4, 8, dtype=torch.float64), torch.randn(2, 4, 8, dtype=torch.float64)
    pair = [ResolvedPair("final_hidden", "final_hidden", "mse", 1.0)]
    value = activation_pair_means(pair, {"final_hidden": ActivationBuffer(s, False, 1)},
                                  {"final_hidden": t}, token_mask=None, num_tokens=8)
    torch.testing.assert_close(value, F.mse_loss(s, t).reshape(1), **TOL)


def _buffers(student_width, teacher_width, *, teacher_seq=4):
    s = torch.randn(2, 4, student_width, dtype=torch.float64)
    t = torch.randn(2, teacher_seq, teacher_width, dtype=torch.float64)
    return {"final_hidden": ActivationBuffer(s, False, 1)}, {"final_hidden": t}


@pytest.mark.parametrize("student_width,teacher_width,teacher_seq,projection,message", [
    (6, 10, 4, None, "widths 6 and 10 differ without a projection"),
    (6, 6, 3, None, "holds tokens"),
    (6, 10, 4, "sp", "rely on buffers being sequence-sharded exactly under SP"),
])
def test_mismatches_are_clear_errors(student_width, teacher_width, teacher_seq, projection,
                                     message):
    student, teacher = _buffers(student_width, teacher_width, teacher_seq=teacher_seq)
    proj = None
    if projection == "sp":  # a layout that claims SP while the buffer is replicated
        layout = ParallelLayout(world_size=2, rank=0, tp=2, dp=1, sp=True, tp_rank=0, dp_rank=0)
        proj = ActivationProjection(pairs=1, shared=True, student_width=student_width,
                                    teacher_width=teacher_width, layout=layout).double()
    pair = [ResolvedPair("final_hidden", "final_hidden", "mse", 1.0)]
    with pytest.raises(ValueError, match=message):
        activation_pair_means(pair, student, teacher, token_mask=None, num_tokens=8,
                              projection=proj)


def test_projection_init_is_seeded_and_replicated():
    layout = ParallelLayout.single()
    a = ActivationProjection(pairs=3, shared=False, student_width=8, teacher_width=16,
                             layout=layout, seed=1)
    b = ActivationProjection(pairs=3, shared=False, student_width=8, teacher_width=16,
                             layout=layout, seed=1)
    assert len(a.weights) == 3 and all(w.tp_split_dim is None for w in a.weights)
    assert all(torch.equal(x, y) for x, y in zip(a.weights, b.weights))
    assert not torch.equal(a.weights[0], a.weights[1])
    shared = ActivationProjection(pairs=3, shared=True, student_width=8, teacher_width=16,
                                  layout=layout, seed=1)
    assert len(shared.weights) == 1 and set(dict(shared.named_parameters())) == {"weights.0"}
