"""Pipeline-parallel training through the real entry point (`launch/pretrain.py`'s `main`).

Each layout row (PP=2; PP=2 x TP=2 + SP; PP=2 x DP=2; interleaved PP=2 x 2 chunks with full
activation recompute) trains a tiny tied-embedding Llama with an MTP head for three steps and must
log the single-process run's losses, gradient norms and validation loss at rtol 1e-5 (fp32 round-off
of a few hundred operations, as tests/test_trainer.py); its final checkpoint, written per stage
and loaded at PP=1, must hold the single-process run's parameters (to PARAM_ATOL, below).
Resuming at PP=2 from a PP=2 checkpoint, at PP=2 from a PP=1 checkpoint and at PP=1 from a PP=2
checkpoint must continue like the uninterrupted single-process run (its step-3 record at rtol
1e-5). The PP=2 x TP=2 row's checkpoint exports to Hugging Face (verified against transformers)
with the single run's weights.

Distillation rows: a colocated teacher deeper and wider than the student (6 layers of 48 against 4
of 32, cut at the same depth fractions), logit distillation and one activation pair (with its own
learned projection, whose copies on the stages are kept in sync) on each of the first and the last
virtual stage; the same tolerances on every logged term (kd_loss and act_loss included); the
PP=2 x DP=2 row with the distributed optimizer. Two colocated teachers under interleaved PP; a
teacher on its own rank(s) feeding a PP=2 student (hidden and logits streams, its own TP).
"""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill.weights import load_weights
from engine.parallel import ParallelLayout
from engine.spawn import run_ranks
from layers.config import ModelConfig
from layers.model import TransformerLM
from tests.helpers import assert_same_run
from tests.trainer_utils import base_config, make_teacher, read_metrics, run_main, write_config
from tools import convert_hf  # noqa: E402

pytestmark = pytest.mark.slow  # multi-rank end-to-end runs through the entry point

RTOL = 1e-5
# Adam (lr 1e-2) turns fp32 round-off in near-zero gradient entries into parameter differences of a
# small fraction of lr (measured: 1.1e-5 at most, the embedding at TP=2+SP); other rows agree to 1e-6.
PARAM_ATOL = 5e-5
KEYS = ("loss", "lm_loss", "kd_loss", "act_loss", "grad_norm")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pp")
    cfg = base_config(tmp, cache=tmp / "cache")
    cfg["model"].update(layers=4, tie_embeddings=True, mtp_heads=1)
    cfg["train"].update(keep=3, save_interval=1)  # the resume test starts from the single run's step 2
    cfg["data"]["mask_across_documents"] = True  # unequal valid-token counts per micro-batch
    path = write_config(tmp / "run.yaml", cfg)
    single = _run(path, tmp / "single")
    return tmp, path, cfg, single


def _run(cfg_path, run_dir, *extra, distill=False):
    assert run_main(str(cfg_path), [f"train.run_dir={run_dir}", *extra], distill=distill) == 0
    return read_metrics(run_dir)


def _distill_run(cfg_path, run_dir, *extra):
    return _run(cfg_path, run_dir, *extra, distill=True)


PAIRS = [{"student": "decoder.0.mlp_output", "teacher": "decoder.0.mlp_output"},
         {"student": "decoder.3.output", "teacher": "decoder.5.output"}]


@pytest.fixture(scope="module")
def distill_setup(setup):
    tmp, _, cfg, _ = setup
    teacher = {**cfg, "model": {**cfg["model"], "layers": 6, "hidden": 48, "init_std": 0.3,
                                "mtp_heads": 0, "tie_embeddings": False}}
    cfg = {**cfg, "distill": {"teacher": str(make_teacher(tmp / "teacher", teacher)),
                              "logit": {"weight": 1.0, "temperature": 2.0}, "lm_weight": 0.5,
                              "activations": PAIRS, "projection": "per_pair"}}
    path = write_config(tmp / "distill.yaml", cfg)
    single = _distill_run(path, tmp / "distill_single")
    assert single[0]["kd_loss"] > 0 and single[0]["act_loss"] > 0
    return tmp, path, single


def _assert_same_run(got: list[dict], want: list[dict], *, val: bool = True,
                     keys: tuple[str, ...] = KEYS) -> None:
    assert_same_run(got, want, keys=keys, optional=["val_loss"] if val else [])


def _final_weights(cfg: dict, run_dir) -> dict[str, torch.Tensor]:
    model = TransformerLM(ModelConfig(**cfg["model"]), ParallelLayout.single())
    load_weights(run_dir / "checkpoints" / "step_00000003", model, ParallelLayout.single())
    return model.state_dict()


LAYOUTS = [  # (world size, DP degree, overrides of the pipeline run)
    pytest.param(2, 1, ["parallel.pp=2"], id="pp2"),
    pytest.param(4, 1, ["parallel.pp=2", "parallel.tp=2", "parallel.sp=true"], id="pp2-tp2-sp"),
    pytest.param(4, 2, ["parallel.pp=2"], id="pp2-dp2"),
    # interleaved, with full activation recompute inside each chunk's backward
    pytest.param(2, 1, ["parallel.pp=2", "parallel.virtual_stages=2", "train.recompute=full"],
                 id="pp2-interleaved-v2-recompute"),
]


@pytest.mark.parametrize("world,dp,parallel", LAYOUTS)
def test_pipeline_equals_single_process(setup, world, dp, parallel):
    tmp, path, cfg, single = setup
    run_dir = tmp / ("_".join(parallel).replace("=", "") + f"_dp{dp}")
    run_ranks(_run, world, path, run_dir, *parallel, timeout_s=180)
    # validation scores train.eval_batches micro-batches per DP rank: DP=2 scores other samples
    _assert_same_run(read_metrics(run_dir), single, val=dp == 1)
    assert "val_loss" in single[-1]
    want = _final_weights(cfg, tmp / "single")
    got = _final_weights(cfg, run_dir)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=RTOL, atol=PARAM_ATOL, msg=name)
    if "parallel.tp=2" in parallel:  # Hugging Face export of a checkpoint saved per stage and TP rank
        exported = {}
        for name, source in (("pp", run_dir), ("single", tmp / "single")):
            out = tmp / f"hf_{name}_{run_dir.name}"
            assert convert_hf.main(["export", "--ckpt", str(source / "checkpoints"), "--out",
                                    str(out), "--verify"]) == 0
            exported[name] = load_file(out / "model.safetensors")
        assert exported["pp"].keys() == exported["single"].keys()
        for name, tensor in exported["single"].items():
            torch.testing.assert_close(exported["pp"][name], tensor, rtol=RTOL, atol=PARAM_ATOL,
                                       msg=name)


def test_resume_across_pipeline_degrees(setup):
    tmp, path, cfg, single = setup
    run_ranks(_run, 2, path, tmp / "pp2_resume", "parallel.pp=2", "train.steps=2",
              timeout_s=180)
    run_ranks(_run, 2, path, tmp / "pp2_resume", "parallel.pp=2", "train.resume=auto",
              timeout_s=180)
    _assert_same_run(read_metrics(tmp / "pp2_resume")[-1:], single[-1:])
    from_pp1 = tmp / "single" / "checkpoints" / "step_00000002"
    run_ranks(_run, 2, path, tmp / "pp1_to_pp2", "parallel.pp=2", f"train.resume={from_pp1}",
              timeout_s=180)
    _assert_same_run(read_metrics(tmp / "pp1_to_pp2")[-1:], single[-1:])
    # and back: the PP=2 run's step-2 checkpoint (model and optimizer per stage) resumed at PP=1
    from_pp2 = tmp / "pp2_resume" / "checkpoints" / "step_00000002"
    _run(path, tmp / "pp2_to_pp1", f"train.resume={from_pp2}")
    _assert_same_run(read_metrics(tmp / "pp2_to_pp1")[-1:], single[-1:])


DISTILL_LAYOUTS = [*LAYOUTS[:2],
                   # and the distributed optimizer, which reduce-scatters the pipeline's gradients
                   pytest.param(4, 2, ["parallel.pp=2", "train.distributed_optimizer=true"],
                                id="pp2-dp2-distributed-optimizer"),
                   LAYOUTS[3]]


@pytest.mark.parametrize("world,dp,parallel", DISTILL_LAYOUTS)
def test_pipeline_distillation_equals_single_process(distill_setup, world, dp, parallel):
    tmp, path, single = distill_setup
    run_dir = tmp / ("distill_" + "_".join(parallel).replace("=", "") + f"_dp{dp}")
    run_ranks(_distill_run, world, path, run_dir, *parallel, timeout_s=180)
    _assert_same_run(read_metrics(run_dir), single, val=dp == 1)


def test_two_colocated_teachers_cut_into_stages(distill_setup):
    """distill.teachers (sum mode): the 6-layer wide teacher and a narrow 4-layer one, each cut at
    the student's depth fractions and run in lockstep, a pair with each on a different virtual
    stage, under interleaved PP=2 x 2: every term (kd_loss per teacher and the diagnostics
    included) equals the single-process run at rtol 1e-5."""
    tmp, path, _ = distill_setup
    cfg = yaml.safe_load(path.read_text())
    narrow = {**cfg, "model": {**cfg["model"], "hidden": 24, "ffn_hidden": 48, "init_std": 0.3,
                               "mtp_heads": 0, "tie_embeddings": False}}
    teachers = {"wide": cfg["distill"]["teacher"],
                "narrow": str(make_teacher(tmp / "teacher_narrow", narrow))}
    cfg["distill"] = {**{k: v for k, v in cfg["distill"].items() if k != "teacher"},
                      "teachers": [{"checkpoint": c, "name": n, "weight": w}
                                   for (n, c), w in zip(teachers.items(), (0.7, 0.3))],
                      "activations": [{**PAIRS[0], "teacher_name": "wide"},
                                      {"student": "decoder.3.output", "teacher": "decoder.3.output",
                                       "teacher_name": "narrow"}]}
    two = write_config(tmp / "two_teachers.yaml", cfg)
    single = _distill_run(two, tmp / "two_teachers_single")
    extra = ["kd_loss/wide", "kd_loss/narrow", "teacher_entropy/wide", "teacher_entropy/narrow",
             "top1_agreement/wide", "student_entropy"]
    assert all(single[0][k] > 0 for k in extra if not k.startswith("top1"))
    run_dir = tmp / "two_teachers_pp2_v2"
    run_ranks(_distill_run, 2, two, run_dir, "parallel.pp=2", "parallel.virtual_stages=2",
              timeout_s=180)
    got = read_metrics(run_dir)
    _assert_same_run(got, single, keys=(*KEYS, *extra))


TEACHER_RANK_LAYOUTS = [  # (world size, overrides): one teacher rank after the students
    pytest.param(3, ["parallel.virtual_stages=1"], id="hidden-stream"),
    pytest.param(3, ["parallel.virtual_stages=2", "distill.teacher_stream=logits"],
                 id="interleaved-logits-stream"),
    # the teacher at its own TP degree (1) feeding a PP=2 x TP=2 (+SP) student
    pytest.param(5, ["parallel.tp=2", "parallel.sp=true", "parallel.teacher_tp=1"],
                 id="student-tp2-sp-teacher-tp1"),
]


@pytest.mark.parametrize("world,extra", TEACHER_RANK_LAYOUTS)
def test_teacher_ranks_feed_a_pp2_student(distill_setup, world, extra):
    """The teacher on its own rank (no pipeline) runs each micro-batch once and streams its head
    input (or logits) to the last stage and each paired buffer to the stage that owns the student
    layer."""
    tmp, path, single = distill_setup
    run_dir = tmp / ("distill_teacher_ranks_pp2_" + "_".join(extra).replace("=", ""))
    run_ranks(_distill_run, world, path, run_dir, "parallel.pp=2", "parallel.teacher_ranks=1",
              "distill.schedule=teacher_ranks", *extra, timeout_s=180)
    _assert_same_run(read_metrics(run_dir), single)
