"""The GPU path (runs only where CUDA is present; CI machines without a GPU skip it).

- training on CUDA gives the CPU run's losses (fp32, TF32 off) and a finite bf16-autocast run;
- an NCCL process group of one rank initializes through `init_parallel` and carries collectives.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from tests.trainer_utils import (
    base_config,
    make_teacher,
    read_metrics,
    run_main,
    teacher_config,
    write_config,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def config(tmp_path):
    cfg = base_config(tmp_path, cache=tmp_path / "cache")
    cfg["train"]["steps"] = 4
    cfg["distill"] = {"teacher": str(make_teacher(tmp_path / "teacher", teacher_config(cfg))),
                      "activations": ["all_mlps"], "projection": "per_pair"}
    return tmp_path, write_config(tmp_path / "run.yaml", cfg)


def _run(cfg, run_dir, *extra):
    assert run_main(str(cfg), [f"train.run_dir={run_dir}", *extra]) == 0
    return read_metrics(run_dir)


def test_cuda_training_matches_cpu(config, monkeypatch):
    tmp, cfg = config
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gpu = _run(cfg, tmp / "gpu", "train.bf16=false")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = _run(cfg, tmp / "cpu")
    for g, c in zip(gpu, cpu):
        for key in ("loss", "kd_loss", "act_loss", "grad_norm"):
            assert math.isclose(g[key], c[key], rel_tol=1e-4, abs_tol=1e-6), (key, g, c)


def test_cuda_bf16_autocast_is_finite(config):
    tmp, cfg = config
    records = _run(cfg, tmp / "bf16", "train.bf16=true", "distill.teacher_bf16=true")
    assert all(math.isfinite(r["loss"]) and r["skipped_steps"] == 0 for r in records)
    assert records[-1]["kd_loss"] > 0


def test_nccl_single_rank(monkeypatch, tmp_path):
    from engine.parallel import LaunchEnv, ParallelConfig, destroy_parallel, init_parallel

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29531")
    env = {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}
    layout = init_parallel(ParallelConfig(), backend="nccl", launch=LaunchEnv.from_env(env))
    try:
        assert dist.get_backend() == "nccl" and layout.device.type == "cuda"
        x = torch.arange(4.0, device=layout.device)
        dist.all_reduce(x)
        assert torch.equal(x.cpu(), torch.arange(4.0))
    finally:
        destroy_parallel()
