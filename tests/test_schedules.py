"""Scheduled temperature and weights, the adaptive temperature rule, and their exact resume."""

from __future__ import annotations

import math

import pytest

from distill.config import DistillConfig
from distill.schedules import AdaptiveTemperatureConfig, ScheduleConfig, Schedules
from engine.config import ConfigError, from_dict
from tests.helpers import FP32_ATOL, FP32_RTOL
from tests.trainer_utils import (
    base_config,
    make_teacher,
    read_metrics,
    run_main,
    teacher_config,
    write_config,
)


def _parse(data: dict) -> DistillConfig:
    return from_dict(DistillConfig, data, prefix="distill")


@pytest.mark.parametrize("schedule,expected", [
    ("linear", {0: 4.0, 5: 2.5, 10: 1.0, 20: 1.0}),
    ("cosine", {0: 4.0, 5: 2.5, 10: 1.0, 20: 1.0}),
    ("step", {0: 4.0, 9: 4.0, 10: 1.0, 20: 1.0}),
])
def test_schedule_values_at_chosen_steps(schedule, expected):
    s = ScheduleConfig(start=4.0, end=1.0, schedule=schedule, steps=10)
    for step, value in expected.items():
        assert math.isclose(s.at(step), value, rel_tol=1e-12), (step, s.at(step))
    assert math.isclose(ScheduleConfig(0.0, 1.0, "cosine", 4).at(1),
                        (1 - math.cos(math.pi / 4)) / 2, rel_tol=1e-12)


def test_schedules_from_yaml():
    cfg = _parse({"lm_weight": {"start": 1, "end": 0.5, "steps": 4},
                  "activation_coef": {"start": 0, "end": 1, "schedule": "step", "steps": 2},
                  "activations": ["all_mlps"],
                  "logit": {"temperature": {"start": 4, "end": 1, "schedule": "cosine",
                                            "steps": 8},
                            "weight": 2}})
    at = Schedules(cfg).at
    assert at(0).temperature == 4.0 and at(8).temperature == 1.0
    assert at(2).lm_weight == 0.75 and at(7).lm_weight == 0.5
    assert at(1).activation_coef == 0.0 and at(2).activation_coef == 1.0
    assert at(3).logit_weight == 2.0 and at(0).kd_scale == 2.0 * 16
    assert at(5).metrics() == {"temperature": at(5).temperature, "logit_weight": 2.0,
                               "lm_weight": 0.5, "activation_coef": 1.0}


@pytest.mark.parametrize("data,message", [
    ({"logit": {"temperature": {"start": 2, "end": 0}}},
     "distill.logit.temperature.end: must be > 0 (got 0.0)"),
    ({"logit": {"weight": {"start": -1, "end": 1}}},
     "distill.logit.weight.start: must be >= 0 (got -1.0)"),
    ({"lm_weight": {"start": 1, "end": -0.5}}, "distill.lm_weight.end: must be >= 0 (got -0.5)"),
    ({"activation_coef": {"start": 1, "end": 1, "steps": 0}},
     "distill.activation_coef.steps: must be >= 1 (got 0)"),
    ({"logit": {"temperature": {"start": 1, "schedule": "exp"}}},
     "distill.logit.temperature.schedule: must be one of"),
    ({"logit": {"adaptive": {"patience": 3, "factor": 1.5}}},
     "distill.logit.adaptive.factor: must be in (0, 1) (got 1.5)"),
    ({"logit": {"adaptive": {"min_temperature": 0}}},
     "distill.logit.adaptive.min_temperature: must be > 0 (got 0.0)"),
    ({"schedule": "offline", "offline_dir": "x",
      "logit": {"temperature": {"start": 2, "end": 1}}}, "distill.logit.temperature: must be a "
                                                         "constant with schedule offline"),
    ({"schedule": "offline", "offline_dir": "x", "logit": {"adaptive": {"patience": 2}}},
     "distill.logit.temperature: must be a constant with schedule offline"),
])
def test_schedule_errors(data, message):
    with pytest.raises(ConfigError) as err:
        _parse(data)
    assert str(err.value).startswith(message), str(err.value)


def test_adaptive_rule_fires_after_patience_and_stops_at_the_floor():
    rule = AdaptiveTemperatureConfig(patience=2, threshold=0.1, factor=0.5, min_temperature=1.0)
    schedules = Schedules(_parse({"logit": {"temperature": 4.0, "adaptive": vars(rule)}}))
    fired = [schedules.observe(step, d) for step, d in
             enumerate([0.05, 0.2, 0.05, 0.05, 0.01, 0.01, 0.0, 0.0, 0.0, 0.0])]
    # below, reset, below, fire (T 2), below, fire (T 1), below, would be 0.5 < 1: no, ...
    assert fired == [False, False, False, True, False, True, False, False, False, False]
    assert schedules.at(10).temperature == 1.0
    restored = Schedules(schedules.cfg)
    restored.load_state_dict(schedules.state_dict())
    assert restored.state_dict() == schedules.state_dict()


@pytest.fixture(scope="module")
def scheduled_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schedules")
    cfg = base_config(tmp, cache=tmp / "cache")
    cfg["distill"] = {
        "teacher": str(make_teacher(tmp / "teacher", teacher_config(cfg))),
        "lm_weight": {"start": 1.0, "end": 0.25, "schedule": "cosine", "steps": 5},
        "logit": {"temperature": {"start": 3.0, "end": 1.5, "schedule": "linear", "steps": 4},
                  "weight": {"start": 0.5, "end": 1.0, "schedule": "step", "steps": 2},
                  # threshold above any divergence here: the rule fires every `patience` steps
                  "adaptive": {"patience": 2, "threshold": 100.0, "factor": 0.5,
                               "min_temperature": 0.3}}}
    cfg["train"].update(steps=6, save_interval=3, keep=3)
    return tmp, write_config(tmp / "run.yaml", cfg)


def test_values_in_force_are_logged_and_resume_exactly(scheduled_run):
    tmp, cfg = scheduled_run
    assert run_main(str(cfg), [f"train.run_dir={tmp / 'straight'}"]) == 0
    straight = read_metrics(tmp / "straight")
    linear = [3.0, 2.625, 2.25, 1.875, 1.5, 1.5]
    factor = [1, 1, 0.5, 0.5, 0.25, 0.25]  # fired after steps 2 and 4
    for record, t, f in zip(straight, linear, factor):
        assert math.isclose(record["temperature"], t * f, rel_tol=1e-12), record
    assert [r["logit_weight"] for r in straight] == [0.5, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert straight[0]["lm_weight"] == 1.0 and straight[5]["lm_weight"] == 0.25
    assert all(r["kd_divergence"] > 0 for r in straight)
    # KD diagnostics every step: entropies within [0, log V], agreement a fraction
    for r in straight:
        assert 0 < r["teacher_entropy"] < math.log(320) and 0 < r["student_entropy"] < math.log(320)
        assert 0 <= r["top1_agreement"] <= 1
    # The logged kd_loss is the divergence times the weight and T^2 in force (logged float32
    # values, multiplied here in another order: fp32 round-off).
    for r in straight:
        assert math.isclose(r["kd_loss"], r["kd_divergence"] * r["logit_weight"]
                            * r["temperature"] ** 2, rel_tol=FP32_RTOL, abs_tol=FP32_ATOL)

    resumed = tmp / "resumed"  # stop after step 3 (mid-schedule, one step below threshold)
    assert run_main(str(cfg), [f"train.run_dir={resumed}", "train.steps=3"]) == 0
    assert run_main(str(cfg), [f"train.run_dir={resumed}", "train.resume=auto"]) == 0
    again = read_metrics(resumed)
    keys = ("loss", "lm_loss", "kd_loss", "kd_divergence", "grad_norm", "temperature",
            "logit_weight", "lm_weight", "teacher_entropy", "student_entropy", "top1_agreement")
    assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in straight]
