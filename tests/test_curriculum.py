"""Curriculum by teacher confidence (`data.curriculum: teacher_confidence`).

- The order: `order` mode sorts by score (highest first, ties by sample index); `weight` mode is
  a seeded permutation that draws confident samples earlier; both deterministic.
- TokenBatches with a curriculum: the first N steps hold exactly the plain stream's first N steps'
  samples in curriculum order, later steps are the plain stream's; DP ranks see disjoint samples
  whose union is the DP=1 step; a resume from the saved position continues the order exactly.
- The pre-pass tool scores samples by the teacher's mean max-probability (checked against a direct
  computation), the run's first step gets the most confident samples, and a run resumed inside
  the curriculum logs exactly what the straight run logs.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data import TokenBatches
from engine.data.config import DataConfig
from engine.data.curriculum import curriculum_order
from tests.trainer_utils import (
    base_config,
    make_teacher,
    read_metrics,
    run_main,
    teacher_config,
    write_config,
)


def test_order_mode_sorts_by_score_highest_first_ties_by_index():
    scores = np.array([0.2, 0.9, 0.5, 0.9, 0.1])
    assert curriculum_order(scores, mode="order", seed=0).tolist() == [1, 3, 2, 0, 4]


def test_weight_mode_is_a_seeded_permutation_biased_to_confident_samples():
    scores = np.where(np.arange(2000) % 2 == 0, 0.9, 0.1)
    order = curriculum_order(scores, mode="weight", seed=3)
    assert sorted(order.tolist()) == list(range(2000))
    assert np.array_equal(order, curriculum_order(scores, mode="weight", seed=3))
    assert not np.array_equal(order, curriculum_order(scores, mode="weight", seed=4))
    first_half = scores[order[:1000]]
    assert (first_half == 0.9).mean() > 0.8  # confident samples come first, mostly
    assert not np.array_equal(order, curriculum_order(scores, mode="order", seed=3))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curriculum")
    cfg = base_config(tmp, cache=tmp / "cache")
    cfg["distill"] = {"teacher": str(make_teacher(tmp / "teacher", teacher_config(cfg)))}
    cfg["data"].update(curriculum_steps=3, global_batch=4, micro_batch=2)
    cfg["train"].update(steps=5, save_interval=2, keep=5)
    return tmp, cfg


def _rows(data: TokenBatches, steps: int) -> list[list[torch.Tensor]]:
    return [[row for mb in data.next_step() for row in mb["input_ids"]] for _ in range(steps)]


def test_token_batches_follow_the_order_then_the_plain_stream(setup):
    tmp, cfg = setup
    data_cfg = DataConfig(**cfg["data"])
    steps, batch = 5, data_cfg.global_batch
    plain = [r for step in _rows(TokenBatches(data_cfg, seed=7), steps) for r in step]
    order = np.random.default_rng(0).permutation(3 * batch)
    got = _rows(TokenBatches(data_cfg, seed=7, order=order), steps)
    flat = [r for step in got for r in step]
    for i in range(steps * batch):
        want = plain[order[i]] if i < 3 * batch else plain[i]
        assert torch.equal(flat[i], want), i
    # DP = 2: disjoint micro-batches whose union, in Megatron's order, is the DP = 1 step
    ranks = [_rows(TokenBatches(data_cfg, seed=7, order=order, dp=2, dp_rank=r), steps)
             for r in range(2)]
    for s in range(steps):
        union = [ranks[0][s][0], ranks[0][s][1], ranks[1][s][0], ranks[1][s][1]]
        assert all(torch.equal(a, b) for a, b in zip(union, got[s]))
    # resume inside the curriculum, from the saved position
    first = TokenBatches(data_cfg, seed=7, order=order)
    _rows(first, 2)
    resumed = TokenBatches(data_cfg, seed=7, order=order)
    resumed.load_state_dict(first.state_dict())
    rest = _rows(resumed, 3)
    assert all(torch.equal(a, b) for s in range(3) for a, b in zip(rest[s], got[2 + s]))


def test_scores_tool_takes_the_run_config_before_it_names_its_scores(setup, tmp_path):
    """The tool writes `data.curriculum_scores`: the run's config need not name it yet, and
    its curriculum settings leave the scores (of the plain stream) unchanged."""
    from tools.curriculum_scores import main as scores_main

    _, cfg = setup
    plain = copy.deepcopy(cfg)
    plain["data"].update(curriculum="none")
    plain["data"].pop("curriculum_scores", None)
    planned = copy.deepcopy(plain)
    planned["data"].update(curriculum="teacher_confidence")
    for name, config in (("plain", plain), ("planned", planned)):
        path = write_config(tmp_path / f"{name}.yaml", config)
        assert scores_main(["--config", str(path), "--out", str(tmp_path / name)]) == 0
    assert np.array_equal(np.load(tmp_path / "planned" / "scores.npy"),
                          np.load(tmp_path / "plain" / "scores.npy"))


def test_scores_tool_and_runs_resumed_inside_the_curriculum(setup):
    from distill.runconfig import curriculum, load_run_config
    from distill.teacher_load import load_teacher
    from engine.parallel import ParallelLayout
    from layers.config import ModelConfig
    from tools.curriculum_scores import main as scores_main

    tmp, cfg = setup
    scores_dir = tmp / "scores"
    path = write_config(tmp / "run.yaml", cfg)
    assert scores_main(["--config", str(path), "--out", str(scores_dir)]) == 0
    scores = np.load(scores_dir / "scores.npy")
    assert scores.shape == (12,) and (scores > 1 / 320).all() and (scores < 1).all()
    # against a direct computation: the teacher's mean max-probability of sample 5
    run_cfg = load_run_config(path, [], world_size=1).cfg
    teacher = load_teacher(Path(cfg["distill"]["teacher"]), ModelConfig(**teacher_config(cfg)["model"]),
                           run_cfg.model, ParallelLayout.single(), seed=7, bf16=False)
    sample = [r for step in _rows(TokenBatches(run_cfg.data, seed=7), 3) for r in step][5]
    with torch.no_grad():
        probs = torch.softmax(teacher(sample[None]).logits[0, :, :320].double(), -1)
    assert abs(probs.amax(-1).mean().item() - scores[5]) < 1e-6

    cfg["data"].update(curriculum="teacher_confidence", curriculum_scores=str(scores_dir))
    path = write_config(tmp / "curriculum.yaml", cfg)
    run_cfg = load_run_config(path, [], world_size=1).cfg
    order = curriculum(run_cfg)
    assert sorted(scores[order[:4]]) == sorted(scores)[-4:]  # step 1: the most confident
    weighted = dataclasses.replace(run_cfg, data=dataclasses.replace(run_cfg.data,
                                                                     curriculum_mode="weight"))
    assert sorted(curriculum(weighted).tolist()) == list(range(12))

    assert run_main(str(path), [f"train.run_dir={tmp / 'straight'}"]) == 0
    assert run_main(str(path), [f"train.run_dir={tmp / 'resumed'}", "train.steps=2"]) == 0
    assert run_main(str(path), [f"train.run_dir={tmp / 'resumed'}", "train.resume=auto"]) == 0
    keys = ("loss", "lm_loss", "kd_loss", "grad_norm", "top1_agreement")
    straight, resumed = read_metrics(tmp / "straight"), read_metrics(tmp / "resumed")
    assert len(straight) == len(resumed) == 5
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]
    assert resumed[-1]["val_loss"] == straight[-1]["val_loss"]
    # the curriculum changes what the first steps train on
    assert run_main(str(path), [f"train.run_dir={tmp / 'plain'}", "data.curriculum=none"]) == 0
    assert read_metrics(tmp / "plain")[0]["loss"] != straight[0]["loss"]
