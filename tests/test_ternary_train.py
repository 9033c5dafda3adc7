"""Ternary students through the real entry point: distillation at TP=2 + SP, checkpoint, exact
resume, and loading the TP=2 checkpoint at another TP degree.

- Resume: 2 steps, stop, resume to 3 equals 3 uninterrupted steps bit for bit (same layout).
- Resharding: the TP=2 checkpoint loaded at TP=1 and TP=2 (float64) gives the same logits to 1e-10
  and the same quantized weights exactly; training resumes from it at TP=1.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from engine.checkpoint import resolve_checkpoint
from engine.config import from_dict
from engine.mappings import gather_from_tp
from engine.parallel import ParallelConfig, ParallelLayout, make_layout
from engine.spawn import run_ranks
from layers.config import ModelConfig
from layers.quant import quantized_full_state_dict
from tests.trainer_utils import (
    base_config,
    make_teacher,
    read_metrics,
    run_main,
    teacher_config,
    write_config,
)
from tools.score import load_model

TP2_SP = ["parallel.tp=2", "parallel.sp=true"]


def _run(cfg_path, run_dir, *extra):
    assert run_main(str(cfg_path), [f"train.run_dir={run_dir}", *extra]) == 0
    return read_metrics(run_dir)


def _config(tmp_path):
    cfg = base_config(tmp_path, cache=tmp_path / "cache")
    teacher_dir = make_teacher(tmp_path / "teacher", teacher_config(cfg))
    cfg["model"].update(quant="ternary")
    cfg["distill"] = {"teacher": str(teacher_dir), "lm_weight": 0.5,
                      "logit": {"weight": 0.5, "temperature": 5.0}}
    return write_config(tmp_path / "run.yaml", cfg)


def _logits_and_weights(step_dir: str, model_dict: dict, tp: int):
    layout = make_layout(ParallelConfig(tp=tp)) if tp > 1 else ParallelLayout.single()
    cfg = from_dict(ModelConfig, model_dict)
    model = load_model(step_dir, cfg, layout, dtype=torch.float64)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = gather_from_tp(model(ids).logits, layout.tp_group)[..., :cfg.vocab_size]
    return logits, quantized_full_state_dict(model)[0]


@pytest.mark.slow  # a multi-rank end-to-end run
def test_ternary_student_resumes_exactly_and_reshards(tmp_path):
    cfg = _config(tmp_path)
    straight = run_ranks(_run, 2, cfg, tmp_path / "straight", *TP2_SP, timeout_s=180)[0]
    run_ranks(_run, 2, cfg, tmp_path / "resumed", *TP2_SP, "train.steps=2", timeout_s=180)
    resumed = run_ranks(_run, 2, cfg, tmp_path / "resumed", *TP2_SP, "train.resume=auto",
                        timeout_s=180)[0]
    keys = ("loss", "lm_loss", "kd_loss", "grad_norm")
    # bit for bit: the same layout, and every state and RNG restored: the same operations
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]
    assert all(r["kd_loss"] > 0 for r in straight)

    step_dir = str(resolve_checkpoint(str(tmp_path / "resumed" / "checkpoints" / "step_00000002"),
                                      key="test"))
    model_dict = yaml.safe_load(cfg.read_text())["model"]
    tp1 = _logits_and_weights(step_dir, model_dict, 1)
    tp2 = run_ranks(_logits_and_weights, 2, step_dir, model_dict, 2, timeout_s=120)[0]
    torch.testing.assert_close(tp2[0], tp1[0], rtol=1e-10, atol=1e-10)
    for name, tensor in tp1[1].items():
        assert torch.equal(tp2[1][name], tensor), name

    # The TP=2 checkpoint resumes at TP=1 (resharded on load) and finishes the run.
    resharded = _run(cfg, tmp_path / "resharded", "train.steps=3",
                     f"train.resume={tmp_path / 'resumed' / 'checkpoints' / 'step_00000002'}")
    assert [r["step"] for r in resharded] == [3]
    torch.testing.assert_close(resharded[0]["loss"], straight[2]["loss"], rtol=1e-3, atol=0)
