"""tools/plan.py against the engine: communication per group and kind equal to the collective
counters of a real run through the entry point, parameter / gradient / optimizer bytes equal to the
allocated tensors, activation memory against the tensors autograd saves, and `--search` on a
mocked cluster."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from engine.parallel import STUDENT, ParallelConfig
from engine.spawn import run_ranks
from tests import trainer_utils as tu
from tools import plan as P

MEASURED_STEP = 1  # the second step: the teacher stream's first step also posts its prefetch


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> Path:
    """A tiny colocated distillation run (4-layer teacher, 2-layer student)."""
    tmp = tmp_path_factory.mktemp("plan")
    cfg = tu.base_config(tmp, cache=tmp / "cache")
    teacher = tu.teacher_config(cfg)
    teacher["model"]["layers"] = 4
    cfg["distill"] = {"teacher": str(tu.make_teacher(tmp / "teacher", teacher))}
    return tu.write_config(tmp / "run.yaml", cfg)


def _bytes_of(tensors) -> int:
    """Bytes of distinct storages among `tensors`."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _measure_rank(config: str, overrides: list[str]) -> dict:
    """Run the entry point on this rank; bring back each step's counted collectives and the bytes
    of the student's (and objective's) parameters, gradients, optimizer state and teacher."""
    import engine.collectives as C
    from distill.trainer import DistillTrainer
    from engine.optim import OptimizerStep

    steps, memory = [], {}
    count, init, call = C.count_collectives, DistillTrainer.__init__, OptimizerStep.__call__

    @contextlib.contextmanager
    def counting(groups=None):
        with count(groups) as counts:
            steps.append(counts)
            yield counts

    def trainer_init(self, **kwargs):
        init(self, **kwargs)
        memory["params"] = _bytes_of(self.module.parameters())
        # a colocated teacher's model, or (teacher ranks) this rank's shard of its output layer
        model = getattr(self.teacher, "model", None) or getattr(self.teacher, "head", None)
        memory["teacher_weights"] = _bytes_of(model.parameters()) if model is not None else 0

    def optimizer_step(self, step, *, loss):
        memory.setdefault("grads", _bytes_of(p.grad for p in self.params if p.grad is not None))
        stats = call(self, step, loss=loss)
        opt = self.optimizer
        memory.setdefault("optimizer", opt.state_bytes() if hasattr(opt, "state_bytes") else
                          _bytes_of(t for s in opt.state.values() for t in s.values()))
        return stats

    C.count_collectives, DistillTrainer.__init__ = counting, trainer_init
    OptimizerStep.__call__ = optimizer_step
    assert tu.run_main(config, overrides) == 0
    return {"comm": [{f"{g}/{k}": b for (g, k), b in c.group_bytes.items()} for c in steps],
            "memory": memory}


# (name, world size, overrides): every layout option the planner claims exact for
LAYOUTS = [
    ("tp2_sp_selective", 2, ["parallel.tp=2", "parallel.sp=true", "train.recompute=selective"]),
    ("tp2_full_fused", 2, ["parallel.tp=2", "train.recompute=full", "distill.fused_lm_head=true"]),
    ("tp2_sp_full", 2, ["parallel.tp=2", "parallel.sp=true", "train.recompute=full",
                        "distill.logit.kind=jsd", "distill.teacher_bf16=true"]),
    ("pp2_1f1b", 2, ["parallel.pp=2"]),
    ("pp2_interleaved", 2, ["parallel.pp=2", "parallel.virtual_stages=2", "model.layers=4"]),
    ("dp2_ddp", 2, []),
    ("dp2_distributed_optimizer", 2, ["train.distributed_optimizer=true"]),
    ("teacher_ranks_tp2_teacher_tp1", 3, ["parallel.tp=2", "parallel.teacher_ranks=1",
                                          "parallel.teacher_tp=1",
                                          "distill.schedule=teacher_ranks"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,world,overrides", LAYOUTS, ids=[row[0] for row in LAYOUTS])
def test_predicted_comm_and_state_bytes_equal_the_run(run_config, tmp_path, name, world,
                                                       overrides):
    run_dir = tmp_path / "run"
    overrides = [*overrides, f"train.run_dir={run_dir}"]
    ranks = run_ranks(_measure_rank, world, str(run_config), overrides, timeout_s=300)
    job = P.load_job(str(run_config), overrides, world=world)
    order = ParallelConfig(**{k.split(".")[1]: v for k, v in _parsed(overrides)}).rank_order(
        STUDENT, world)
    hw = P.Hardware()
    for rank in range(order.size):
        _, pp_rank, _ = order.coords(rank)
        measured = ranks[rank]
        predicted = P.student_comm(job, pp_rank, hw)
        assert measured["comm"][MEASURED_STEP] == {f"{g}/{k}": b for (g, k), b in predicted.items()}, rank
        memory = P.student_memory(job, pp_rank, hw)
        assert measured["memory"] == {"params": memory.params, "grads": memory.grads,
                                      "optimizer": memory.optimizer,
                                      "teacher_weights": memory.teacher_weights}, rank
    # rank 0's metrics carry its counts per group, and the peak memory
    record = tu.read_metrics(run_dir)[MEASURED_STEP]
    per_group: dict[str, int] = {}
    for key, nbytes in ranks[0]["comm"][MEASURED_STEP].items():
        group = key.split("/")[0]
        per_group[group] = per_group.get(group, 0) + nbytes
    assert {k[len("comm_bytes/"):]: v for k, v in record.items()
            if k.startswith("comm_bytes/")} == per_group
    assert record["peak_mem_bytes_max"] >= record["peak_mem_bytes"] > 0


def _parsed(overrides: list[str]) -> list[tuple[str, object]]:
    from engine.config import parse_overrides

    return [(".".join(path), value) for path, value in parse_overrides(overrides)
            if path[0] == "parallel"]


# ------------------------------------------------------------------------ activation memory
def saved_activation_bytes(model, input_ids, **forward) -> int:
    """Bytes of the distinct storages autograd saves for the backward during one forward of
    `model`, its parameters left out: what the activations cost until the backward frees them."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids, **forward)
    return sum(saved.values())


def _activation_ratio(run_config: str, overrides: list[str]) -> float:
    """Measured / predicted saved bytes of one micro-batch's student forward on this rank."""
    from engine.parallel import make_layout
    from layers.model import TransformerLM

    job = P.load_job(run_config, overrides, world=torch.distributed.get_world_size()
                     if torch.distributed.is_initialized() else None)
    cfg = job.cfg
    layout = make_layout(cfg.parallel)
    model = TransformerLM(cfg.model, layout, recompute=cfg.train.recompute)
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.data.micro_batch, cfg.data.seq_len),
                        generator=torch.Generator().manual_seed(0))
    measured = saved_activation_bytes(model, ids, compute_logits=not cfg.distill.fused_lm_head)
    predicted = P.activation_bytes(job, model, P.Hardware())
    print(f"activations {overrides}: measured {measured} predicted {predicted}")
    return measured / predicted


ACTIVATION_ROWS = [  # one process: recompute modes, fused head, families, widths
    ["train.recompute=none"],
    ["train.recompute=selective"],
    ["train.recompute=full"],
    ["distill.fused_lm_head=true", "model.qk_norm=true"],
    ["model.family=gpt2", "model.kv_heads=4", "data.seq_len=32"],
    ["model.hidden=64", "model.heads=8", "model.kv_heads=2", "model.ffn_hidden=96",
     "model.mtp_heads=1", "data.micro_batch=4", "data.global_batch=8"],
    ["model.mtp_heads=1", "train.recompute=full"],
]


@pytest.mark.parametrize("overrides", ACTIVATION_ROWS, ids=lambda o: ",".join(o))
def test_activation_memory_within_15_percent_of_saved_tensors(run_config, overrides):
    assert abs(_activation_ratio(str(run_config), overrides) - 1) <= 0.15


@pytest.mark.slow  # two ranks
def test_activation_memory_under_tp_and_sp(run_config):
    for sp in ("false", "true"):
        ratios = run_ranks(_activation_ratio, 2, str(run_config),
                           ["parallel.tp=2", f"parallel.sp={sp}"])
        assert all(abs(r - 1) <= 0.15 for r in ratios), (sp, ratios)
