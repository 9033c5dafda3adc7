"""The `distill:` section, the layer-mapping shortcuts and the start-up compatibility errors."""

import dataclasses

import pytest
import torch

from distill import KINDS, divergence
from distill.config import (
    ActivationPairConfig,
    DistillConfig,
    LogitKDConfig,
    ResolvedPair,
    aligned_teacher_config,
    check_compatibility,
    resolve_pairs,
    teacher_layer,
)
from distill.schedules import Schedules
from engine.config import ConfigError, apply_overrides, from_dict, to_dict
from engine.parallel import ParallelLayout
from layers.buffers import buffer_names
from layers.config import ModelConfig
from layers.model import TransformerLM

STUDENT = ModelConfig(vocab_size=100, hidden=32, layers=2, heads=4, ffn_hidden=64, mtp_heads=1)
TEACHER = ModelConfig(vocab_size=100, hidden=48, layers=4, heads=6, kv_heads=2, ffn_hidden=96)


def _parse(data: dict) -> DistillConfig:
    return from_dict(DistillConfig, data, prefix="distill")


def _depths(student: int, teacher: int) -> tuple[ModelConfig, ModelConfig]:
    return (dataclasses.replace(STUDENT, layers=student),
            dataclasses.replace(TEACHER, layers=teacher))


def test_yaml_shapes_and_round_trip():
    cfg = _parse({"logit": {"kind": "jsd", "temperature": 2, "beta": 0.3},
                  "activations": ["all_mlps", {"student": "all_mixers", "loss": "cosine"},
                                  {"student": "final_hidden", "teacher": "final_hidden",
                                   "loss": "l2", "weight": 0.5}],
                  "activation_coef": 0.1, "projection": "shared", "mtp_weights": [0.3]})
    assert cfg.logit == LogitKDConfig(kind="jsd", temperature=2.0, beta=0.3)
    assert Schedules(cfg).at(0).kd_scale == 4.0
    assert cfg.pair_configs[0] == ActivationPairConfig(student="all_mlps")
    assert cfg.pair_configs[1].loss == "cosine" and cfg.pair_configs[2].weight == 0.5
    assert _parse(to_dict(cfg)) == cfg
    overridden = _parse(apply_overrides(to_dict(cfg), ["logit.temperature_squared=false",
                                                       "activations=[all_outputs]"]))
    assert Schedules(overridden).at(0).kd_scale == 1.0 and overridden.activations == ("all_outputs",)


def test_needs_teacher():
    assert DistillConfig().needs_teacher
    assert not _parse({"logit": {"weight": 0}}).needs_teacher
    assert _parse({"logit": {"weight": 0}, "activations": ["all_mlps"]}).needs_teacher
    assert not _parse({"schedule": "offline", "offline_dir": "x"}).needs_teacher


@pytest.mark.parametrize("data,message", [
    ({"logit": {"kind": "kl"}}, "distill.logit.kind: must be one of"),
    ({"logit": {"temperature": 0}}, "distill.logit.temperature: must be > 0 (got 0.0)"),
    ({"logit": {"weight": -1}}, "distill.logit.weight: must be >= 0 (got -1.0)"),
    ({"logit": {"kind": "jsd", "beta": 1.5}}, "distill.logit.beta: must be in (0, 1) for jsd (got 1.5)"),
    ({"logit": {"kind": "jsd", "beta": 0}}, "distill.logit.beta: must be in (0, 1) for jsd (got 0.0)"),
    ({"logit": {"kind": "skew_forward_kl", "skew": 0}},
     "distill.logit.skew: must be in (0, 1) for skew_forward_kl (got 0.0)"),
    ({"logit": {"kind": "skew_reverse_kl", "skew": 1}},
     "distill.logit.skew: must be in (0, 1) for skew_reverse_kl (got 1.0)"),
    ({"lm_weight": -0.1}, "distill.lm_weight: must be >= 0 (got -0.1)"),
    ({"activation_coef": -1}, "distill.activation_coef: must be >= 0"),
    ({"mtp_weights": [1, -1]}, "distill.mtp_weights[1]: must be >= 0"),
    ({"prefetch": 0}, "distill.prefetch: must be >= 1 (got 0)"),
    ({"projection": "linear"}, "distill.projection: must be one of 'none', 'per_pair', 'shared'"),
    ({"activations": ["all_mlp"]}, "distill.activations[0]: unknown shortcut 'all_mlp'"),
    ({"activations": [{"student": "decoder.0.mlp_output"}]},
     "distill.activations[0].teacher: is required for student buffer 'decoder.0.mlp_output'"),
    ({"activations": [{"student": "all_mlps", "teacher": "all_mixers"}]},
     "distill.activations[0].teacher: must be left out with the shortcut 'all_mlps'"),
    ({"activations": [{"student": "x", "teacher": "y", "loss": "huber"}]},
     "distill.activations[0].loss: must be one of 'mse', 'l2', 'cosine', 'router' (got 'huber')"),
    ({"activations": [{"teacher": "y"}]}, "distill.activations[0].student: is required"),
    ({"lm_weight": 0, "logit": {"weight": 0}}, "distill.lm_weight: every loss term is off"),
    ({"schedule": "offline"}, "distill.offline_dir: is required with schedule offline"),
    ({"schedule": "offline", "offline_dir": "d", "activations": ["all_mlps"]},
     "distill.activations: the offline schedule stores teacher logits only"),
    ({"schedule": "offline", "offline_dir": "d", "fused_lm_head": True},
     "distill.fused_lm_head: is not supported with schedule offline"),
])
def test_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        _parse(data)
    assert str(err.value).startswith(message), str(err.value)


# ------------------------------------------------------------------------------ layer mapping
@pytest.mark.parametrize("student,teacher,expected", [
    (4, 4, [0, 1, 2, 3]),  # equal depths: identity
    (2, 4, [1, 3]),
    (3, 8, [1, 4, 7]),
    (4, 6, [0, 2, 3, 5]),
    (1, 5, [4]),
])
def test_uniform_layer_mapping(student, teacher, expected):
    assert [teacher_layer(i, student, teacher) for i in range(student)] == expected
    cfg = _parse({"activations": ["all_mixers", {"student": "all_mlps", "loss": "l2",
                                                 "weight": 0.5}]})
    pairs = resolve_pairs(cfg, *_depths(student, teacher))
    assert pairs == [ResolvedPair(f"decoder.{i}.mixer_output", f"decoder.{j}.mixer_output",
                                  "mse", 1.0) for i, j in enumerate(expected)] + \
                    [ResolvedPair(f"decoder.{i}.mlp_output", f"decoder.{j}.mlp_output", "l2", 0.5)
                     for i, j in enumerate(expected)]


def test_shortcut_needs_a_teacher_at_least_as_deep():
    with pytest.raises(ConfigError, match=r"distill.activations\[0\]: shortcut 'all_outputs' "
                                          "needs a teacher at least as deep"):
        resolve_pairs(_parse({"activations": ["all_outputs"]}), *_depths(4, 2))


@pytest.mark.parametrize("pair,message", [
    ({"student": "decoder.2.mlp_output", "teacher": "decoder.0.mlp_output"},
     "distill.activations[0].student: student buffer 'decoder.2.mlp_output' names layer 2, but "
     "the student has 2 layers (0..1)"),
    ({"student": "decoder.0.mlp_output", "teacher": "decoder.0.attn_out"},
     "distill.activations[0].teacher: unknown teacher buffer 'decoder.0.attn_out'"),
    ({"student": "hidden", "teacher": "final_hidden"},
     "distill.activations[0].student: unknown student buffer 'hidden'"),
    ({"student": "mtp.2.output", "teacher": "final_hidden"},
     "distill.activations[0].student: student buffer 'mtp.2.output' names MTP head 2, but the "
     "student has 1"),
])
def test_unknown_buffer_names(pair, message):
    with pytest.raises(ConfigError) as err:
        resolve_pairs(_parse({"activations": [pair]}), *_depths(2, 4))
    assert str(err.value).startswith(message), str(err.value)


def test_every_published_buffer_is_accepted():
    """The model publishes `embedding` and the MTP blocks' buffers: the config takes them too."""
    for name in buffer_names(STUDENT.layers, STUDENT.mtp_heads):
        pair = {"student": name, "teacher": "embedding"}
        assert resolve_pairs(_parse({"activations": [pair]}), STUDENT, TEACHER)[0].student == name


def test_buffer_names_are_the_models():
    """Names checked at start-up are names the model publishes."""
    model = TransformerLM(STUDENT, ParallelLayout.single())
    assert buffer_names(STUDENT.layers, STUDENT.mtp_heads) == model.buffer_names()
    assert "embedding" in model.buffer_names() and "mtp.1.mlp_output" in model.buffer_names()


# ------------------------------------------------------------------------------ compatibility
def test_compatible_teacher_deeper_wider_other_heads():
    cfg = _parse({"activations": ["all_mlps"], "projection": "per_pair"})
    pairs = check_compatibility(cfg, STUDENT, TEACHER, tp=2)
    assert [p.teacher for p in pairs] == ["decoder.1.mlp_output", "decoder.3.mlp_output"]


def test_vocab_padding_may_differ():
    teacher = dataclasses.replace(TEACHER, vocab_pad_multiple=48)
    check_compatibility(DistillConfig(), STUDENT, teacher, tp=2)
    assert teacher.padded_vocab(2) != STUDENT.padded_vocab(2)
    aligned = aligned_teacher_config(STUDENT, teacher)
    assert aligned.padded_vocab(2) == STUDENT.padded_vocab(2)
    assert dataclasses.replace(aligned, vocab_pad_multiple=48) == teacher
    assert aligned_teacher_config(STUDENT, TEACHER) is TEACHER


@pytest.mark.parametrize("cfg,teacher,message", [
    ({}, dataclasses.replace(TEACHER, vocab_size=101),
     "distill.teacher: the teacher's vocabulary has 101 tokens and the student's 100"),
    ({"activations": ["all_mlps"]}, TEACHER,
     "distill.projection: the student is 32 wide and the teacher 48"),
    ({"activations": [{"student": "final_hidden", "teacher": "decoder.4.output"}],
      "projection": "shared"}, TEACHER,
     "distill.activations[0].teacher: teacher buffer 'decoder.4.output' names layer 4"),
    ({}, None, "distill.teacher: logit or activation distillation needs a teacher model"),
    ({"mtp_weights": [1, 1]}, TEACHER, "distill.mtp_weights: has 2 entries for model.mtp_heads=1"),
    ({}, dataclasses.replace(TEACHER, heads=5, kv_heads=5, hidden=40),
     "distill.teacher(model.heads): 5 query heads do not split over parallel.tp=2"),
])
def test_incompatible_setups_fail_at_start_up(cfg, teacher, message):
    with pytest.raises(ConfigError) as err:
        check_compatibility(_parse(cfg), STUDENT, teacher, tp=2)
    assert str(err.value).startswith(message), str(err.value)


def test_pure_lm_needs_no_teacher():
    assert check_compatibility(_parse({"logit": {"weight": 0}}), STUDENT, None, tp=1) == []


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_config_accepts_exactly_what_the_losses_accept(kind, value):
    """One source for the divergence parameter ranges: a setting the config takes never fails in
    the loss, and one the loss refuses never passes the config."""
    logits = torch.zeros(2, 8)
    try:
        divergence(logits, logits, kind=kind, beta=value, skew=value)
        loss_ok = True
    except ValueError:
        loss_ok = False
    try:
        _parse({"logit": {"kind": kind, "beta": value, "skew": value}})
        config_ok = True
    except ConfigError:
        config_ok = False
    assert loss_ok == config_ok
