"""The training loop end to end on tiny models: accumulation, data parallelism, teacher schedules.

Each case runs the real entry point (`distill.run.main`) and compares `metrics.jsonl` records. The
tolerance is fp32 round-off of a few hundred operations (rtol 1e-5 on losses and gradient norms).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distill.config import SINGLE_TEACHER
from distill.teacher import TeacherOutputs, TeacherRequest
from engine.spawn import run_ranks
from tests.helpers import assert_same_run
from tests.trainer_utils import (
    base_config,
    make_teacher,
    read_metrics,
    run_main,
    teacher_config,
    write_config,
)

PREEMPT_STEPS = 40  # long enough that the signal lands before the end even on a loaded machine


@pytest.fixture
def setup(tmp_path):
    cache = tmp_path / "cache"
    cfg = base_config(tmp_path, cache=cache)
    teacher_dir = make_teacher(tmp_path / "teacher", teacher_config(cfg))
    cfg["distill"] = {"teacher": str(teacher_dir), "logit": {"weight": 1.0, "temperature": 2.0},
                      "lm_weight": 0.5}
    cfg["data"]["mask_across_documents"] = True  # unequal valid-token counts per micro-batch
    return tmp_path, write_config(tmp_path / "run.yaml", cfg)


def _run(cfg_path, run_dir, *extra):
    assert run_main(str(cfg_path), [f"train.run_dir={run_dir}", *extra]) == 0
    return read_metrics(run_dir)


def test_accumulation_equals_one_big_micro_batch(setup):
    tmp, cfg = setup
    small = _run(cfg, tmp / "mb1", "data.micro_batch=1", "data.global_batch=4")
    big = _run(cfg, tmp / "mb4", "data.micro_batch=4", "data.global_batch=4")
    assert_same_run(small, big)
    assert small[0]["kd_loss"] > 0 and small[0]["lm_loss"] > 0


TEACHER_RANKS = ["distill.schedule=teacher_ranks", "parallel.teacher_ranks=1"]
TEACHER_TP2 = ["distill.schedule=teacher_ranks", "parallel.teacher_ranks=2", "parallel.teacher_tp=2"]
TP2_SP = ["parallel.tp=2", "parallel.sp=true"]
ACTIVATIONS = ["distill.activations=[all_mlps]", "distill.projection=shared"]
FUSED = ["distill.fused_lm_head=true"]
LAYOUTS = [  # (world size, overrides of the parallel run only, overrides of both runs)
    pytest.param(2, [], ["data.micro_batch=2"], id="dp2-vs-accumulation"),
    pytest.param(2, TP2_SP, ACTIVATIONS, id="tp2-sp"),
    pytest.param(2, TEACHER_RANKS, [], id="teacher-rank-1+1"),
    pytest.param(3, TEACHER_RANKS, [], id="teacher-rank-serving-dp2"),
    pytest.param(2, [*TEACHER_RANKS, "distill.teacher_stream=logits"], [],
                 id="teacher-rank-1+1-logits-stream"),
    # the teacher ranks at their own TP degree, streaming hidden states
    pytest.param(3, TEACHER_TP2, [], id="teacher-tp2-to-student-tp1"),
    pytest.param(3, TEACHER_TP2, FUSED, id="teacher-tp2-to-student-tp1-fused"),
    pytest.param(4, [*TEACHER_TP2, *TP2_SP], ACTIVATIONS, id="teacher-tp2-sp-to-student-tp2-sp"),
    pytest.param(4, TEACHER_TP2, [*FUSED, *ACTIVATIONS], id="teacher-tp2-serving-dp2-fused"),
]


@pytest.mark.slow  # a multi-rank end-to-end run
@pytest.mark.parametrize("world,parallel,common", LAYOUTS)
def test_parallel_layout_equals_single_process(setup, world, parallel, common):
    """Each row: a distributed layout against the single-process colocated run on the same data,
    three optimizer steps, every logged term and the gradient norm at rtol 1e-5."""
    tmp, cfg = setup
    single = _run(cfg, tmp / "single", *common)
    run_ranks(_run, world, cfg, tmp / "parallel", *common, *parallel, timeout_s=120)
    assert_same_run(read_metrics(tmp / "parallel"), single,
                     keys=("loss", "lm_loss", "kd_loss", "act_loss", "grad_norm"))


def _teacher_ranks_run(cfg, run_dir, *extra):
    return _run(cfg, run_dir, *TEACHER_RANKS, *extra)


@pytest.mark.slow  # a multi-rank end-to-end run
def test_teacher_ranks_resume(setup):
    # The schedule is constant, so stopping after 2 of 3 steps changes nothing but the stop: the
    # teacher ranks must skip what the students already trained on when the run resumes.
    tmp, cfg = setup
    colocated = _run(cfg, tmp / "colocated")
    run_ranks(_teacher_ranks_run, 2, cfg, tmp / "remote", "train.steps=2", timeout_s=120)
    run_ranks(_teacher_ranks_run, 2, cfg, tmp / "remote", "train.resume=auto", timeout_s=120)
    assert_same_run(read_metrics(tmp / "remote"), colocated)


def _preempted_teacher_ranks_run(cfg, run_dir, *extra):
    """The student (rank 0) sends itself SIGTERM once step 2 is logged, as SLURM would."""
    import os
    import signal
    import threading
    import time

    def preempt():
        path = run_dir / "metrics.jsonl"
        while not path.exists() or len(path.read_text().splitlines()) < 2:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)

    if dist.get_rank() == 0:
        threading.Thread(target=preempt, daemon=True).start()
    return run_main(str(cfg), [f"train.run_dir={run_dir}", *TEACHER_RANKS,
                               f"train.steps={PREEMPT_STEPS}", *extra])


@pytest.mark.slow  # a multi-rank end-to-end run
@pytest.mark.parametrize("world,extra", [
    pytest.param(2, [], id="1+1"),
    pytest.param(3, ["parallel.teacher_ranks=2", "parallel.teacher_tp=2"],
                 id="teacher-tp2-to-student-tp1")])
def test_teacher_ranks_preemption_stops_both_roles_cleanly(setup, world, extra):
    # The students stop at a step boundary and save; the teacher learns it from their
    # acknowledgement and exits cleanly instead of waiting on sends nobody will receive, with the
    # students' 124 (a stopped job: the signal went to one rank, not to the whole job). The
    # resumed run equals an uninterrupted one: colocated when the teacher runs at the students' TP
    # (bit for bit), else the same layout uninterrupted (a teacher at another TP degree differs
    # from the colocated one by round-off, which 40 training steps amplify past rtol 1e-5).
    tmp, cfg = setup
    if extra:
        run_ranks(_teacher_ranks_run, world, cfg, tmp / "reference", f"train.steps={PREEMPT_STEPS}",
                  *extra, timeout_s=120)
        reference = read_metrics(tmp / "reference")
    else:
        reference = _run(cfg, tmp / "colocated", f"train.steps={PREEMPT_STEPS}")
    codes = run_ranks(_preempted_teacher_ranks_run, world, cfg, tmp / "remote", *extra,
                      timeout_s=120)
    assert codes == [124] * world
    stopped_at = len(read_metrics(tmp / "remote"))
    assert 2 <= stopped_at < PREEMPT_STEPS
    run_ranks(_teacher_ranks_run, world, cfg, tmp / "remote", f"train.steps={PREEMPT_STEPS}",
              "train.resume=auto", *extra, timeout_s=120)
    assert_same_run(read_metrics(tmp / "remote"), reference)


def test_distillation_drives_kd_loss_down(tmp_path):
    # A teacher briefly trained on the corpus (what it knows is learnable in a few steps; a random
    # teacher's context function is not), then pure KD: the student must move towards it.
    cfg = base_config(tmp_path, cache=tmp_path / "cache")
    teacher_cfg = write_config(tmp_path / "teacher.yaml", teacher_config(cfg))
    assert run_main(str(teacher_cfg), [f"train.run_dir={tmp_path / 'teacher'}", "train.steps=25"],
                    distill=False) == 0
    cfg["distill"] = {"teacher": str(tmp_path / "teacher"), "lm_weight": 0.0}
    records = _run(write_config(tmp_path / "kd.yaml", cfg), tmp_path / "kd", "train.steps=15")
    first, last = records[0]["kd_loss"], records[-1]["kd_loss"]
    assert all(r["lm_loss"] == 0 for r in records)
    assert last < 0.5 * first, (first, last)


class _FakeTeacher:
    """Stands in for a ColocatedTeacher: 'logits' that encode the token ids."""

    request = TeacherRequest(head="logits")

    def __call__(self, mb):
        return {SINGLE_TEACHER: TeacherOutputs(
            logits=mb["input_ids"].float().unsqueeze(-1).repeat(1, 1, 4))}


def _stream_with_corruption():
    """Teacher rank 1 streams for token ids that differ from student rank 0's in one place."""
    from distill.teacher_wire import RemoteTeacher, TeacherStreamError, serve_teacher
    from engine.parallel import ParallelConfig, make_layout

    layout = make_layout(ParallelConfig(tp=1, teacher_ranks=1))
    batches = [{"input_ids": torch.arange(12).reshape(2, 6) + i} for i in range(3)]
    if layout.is_teacher:
        corrupted = [dict(b) for b in batches]
        corrupted[1] = {"input_ids": batches[1]["input_ids"].clone()}
        corrupted[1]["input_ids"][0, 3] += 1
        serve_teacher(_FakeTeacher(), layout, batches_for=lambda _: iter(corrupted), prefetch=2)
        return "served"
    remote = RemoteTeacher(layout, _FakeTeacher.request, prefetch=2, total=3, stream="logits")
    first = remote(batches[0])[SINGLE_TEACHER]
    assert torch.equal(first.logits[..., 0], batches[0]["input_ids"].float())
    with pytest.raises(TeacherStreamError, match="misaligned"):
        remote(batches[1])
    remote(batches[2])  # drain the last message so the teacher's sends complete
    remote.end_step(stop=True)
    remote.close()
    return "detected"


def test_corrupted_teacher_stream_is_detected():
    assert run_ranks(_stream_with_corruption, 2, timeout_s=60) == ["detected", "served"]


def _counted_teacher_ranks_run(cfg, run_dir, *extra):
    from engine.collectives import count_collectives

    with count_collectives() as counts:
        assert run_main(str(cfg), [f"train.run_dir={run_dir}", *TEACHER_RANKS, *extra]) == 0
    return dict(counts.calls), dict(counts.bytes)


@pytest.mark.slow  # a multi-rank end-to-end run
def test_teacher_tp1_streams_hidden_states_to_student_tp2_sp(setup):
    """Teacher TP 1 -> students at TP 2 with SP, fused head and activation pairs: the losses are
    the colocated ones, and each student rank receives per micro-batch exactly its tag (checksum
    and signal), the teacher's final hidden states and its sequence shard of each buffer: nothing
    vocabulary-sized, no output weight (each student read its shard of it from the checkpoint)."""
    tmp, cfg = setup
    colocated = _run(cfg, tmp / "colocated", *FUSED, *ACTIVATIONS)
    results = run_ranks(_counted_teacher_ranks_run, 3, cfg, tmp / "remote", *FUSED, *ACTIVATIONS,
                        *TP2_SP, "parallel.teacher_tp=1", timeout_s=120)
    assert_same_run(read_metrics(tmp / "remote"), colocated,
                     keys=("loss", "lm_loss", "kd_loss", "act_loss", "grad_norm"))
    micro_batches, (mb, seq, hidden_t) = 6, (2, 16, 48)  # 3 steps x 2; fp32 teacher
    buffers = 2  # all_mlps: student layers 0, 1 -> teacher layers 0, 2
    tag = 2 * 8  # int64 checksum of the token ids and the teacher rank's signal (0: none)
    per_micro_batch = tag + mb * seq * hidden_t * 4 + buffers * mb * (seq // 2) * hidden_t * 4
    header = 8 + (1 + 3 * 5) * 8  # its length, then (3, then dtype, ndim, mb, seq, H per tensor)
    for calls, received in results[:2]:  # the two student ranks
        assert received["recv"] == header + micro_batches * per_micro_batch
        assert calls["recv"] == 2 + micro_batches * (1 + 1 + buffers)
    _, teacher_sent = results[2]
    assert teacher_sent["send"] == 2 * (header + micro_batches * per_micro_batch)


@pytest.mark.slow  # a multi-rank end-to-end run
def test_bf16_teacher_streams_bf16_hidden_states(setup):
    """With distill.teacher_bf16 the hidden states cross the wire in bfloat16 (2 bytes each) and
    the student forms the teacher's logits in bfloat16 as the teacher's own head would."""
    tmp, cfg = setup
    colocated = _run(cfg, tmp / "colocated", "distill.teacher_bf16=true")
    results = run_ranks(_counted_teacher_ranks_run, 2, cfg, tmp / "remote",
                        "distill.teacher_bf16=true", timeout_s=120)
    assert_same_run(read_metrics(tmp / "remote"), colocated)
    micro_batches, (mb, seq, hidden_t) = 6, (2, 16, 48)
    header = 8 + (1 + 5) * 8
    tag = 2 * 8  # int64 checksum and signal
    assert results[0][1]["recv"] == header + micro_batches * (tag + mb * seq * hidden_t * 2)


def _exit_code(cfg, run_dir, *extra):
    return run_main(str(cfg), [f"train.run_dir={run_dir}", *extra])


@pytest.mark.slow  # a multi-rank end-to-end run
def test_runtime_failure_is_one_line_from_one_rank_and_non_zero_on_all(setup, capfd):
    """A run-time failure every rank meets alike (here: the learning rate blows the weights up
    and the run stops on non-finite steps) is one line, printed once, and exit 3 everywhere."""
    tmp, cfg = setup
    codes = run_ranks(_exit_code, 2, cfg, tmp / "blowup", "data.micro_batch=1", "train.lr=1e30",
                      "train.grad_clip=0", "train.max_skipped_steps=1", "train.steps=6",
                      timeout_s=120)
    assert codes == [3, 3]
    err = capfd.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("NonFiniteError: ")] == [
        line for line in err.splitlines() if "consecutive steps had a non-finite" in line]
    assert sum(line.startswith("NonFiniteError: ") for line in err.splitlines()) == 1
    assert "Traceback" not in err
