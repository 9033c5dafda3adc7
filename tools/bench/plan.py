"""tools/plan.py's predictions against tiny CPU runs of the real entry point.

    python tools/bench/plan.py [--out runs/bench_plan]

Each row of LAYOUTS trains a 2-layer Llama student from a 4-layer teacher for 3 steps on spawned
gloo ranks (launch's own code path: distill.run.main) and compares, on every student rank:
communication of the second step per group and collective kind (the collective counters), and the
bytes of parameters, gradients, optimizer state and teacher weights (the allocated tensors), with
what the planner predicts. Then the activation memory of one micro-batch's student forward per
recompute mode: the planner's bytes, the bytes of the tensors autograd saves for the backward
(`saved_activation_bytes`) and what the forward leaves allocated per the profiler's allocator
records (tools/bench/memory.py's `kept_bytes`: the saved tensors plus the forward's output, the
logits). Prints markdown tables (the README's "Planning a run" numbers).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

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
    ("offline_top16_tp2", 2, ["parallel.tp=2", "distill.schedule=offline",
                              "distill.offline_dir={export}"]),
]
EXPORT_K = 16  # the top-k of the offline export that `{export}` in LAYOUTS names
MEASURED_STEP = 1  # the second step: the teacher stream's first also posts its prefetch


def bytes_of(tensors) -> int:
    """Bytes of the distinct storages among `tensors`."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


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


def measure_rank(config: str, overrides: list[str]) -> dict:
    """Run the entry point on this rank (inside `run_ranks`); bring back each step's counted
    collectives per "group/kind" and the bytes of the student's (and objective's) parameters,
    its gradients before the first optimizer step, the optimizer state after it, and the teacher
    weights this rank holds."""
    import engine.collectives as C
    from distill.run import main
    from distill.trainer import DistillTrainer
    from engine.optim import OptimizerStep
    from tools.bench.memory import optimizer_state_bytes

    steps, memory = [], {}
    count, init, call = C.count_collectives, DistillTrainer.__init__, OptimizerStep.__call__

    @contextlib.contextmanager
    def counting(groups=None):
        with count(groups) as counts:
            steps.append(counts)
            yield counts

    def trainer_init(self, **kwargs):
        init(self, **kwargs)
        memory["params"] = bytes_of(self.module.parameters())
        # a colocated teacher's model, or (teacher ranks) this rank's shard of its output layer
        model = getattr(self.teacher, "model", None) or getattr(self.teacher, "head", None)
        memory["teacher_weights"] = bytes_of(model.parameters()) if model is not None else 0

    def optimizer_step(self, step, *, loss):
        memory.setdefault("grads", bytes_of(p.grad for p in self.params if p.grad is not None))
        stats = call(self, step, loss=loss)
        memory.setdefault("optimizer", optimizer_state_bytes(self.optimizer))
        return stats

    C.count_collectives, DistillTrainer.__init__ = counting, trainer_init
    OptimizerStep.__call__ = optimizer_step
    if main(["--config", config, *overrides]) != 0:
        raise RuntimeError(f"the run {overrides} failed")
    return {"comm": [{f"{g}/{k}": b for (g, k), b in c.group_bytes.items()} for c in steps],
            "memory": memory}


def tiny_run(out: Path) -> Path:
    """The config of a tiny colocated distillation run and its saved 4-layer teacher."""
    from distill.weights import save_weights
    from engine.parallel import ParallelLayout
    from layers.config import ModelConfig
    from layers.model import TransformerLM

    student = dict(family="llama", vocab_size=320, hidden=32, layers=2, heads=4, kv_heads=2,
                   ffn_hidden=64, max_seq_len=32)
    teacher = {**student, "hidden": 48, "layers": 4, "ffn_hidden": 96}
    single = ParallelLayout.single()
    checkpoint = save_weights(out / "teacher", TransformerLM(ModelConfig(**teacher), single),
                              single, config={"model": teacher})
    config = {"model": student, "parallel": {"timeout_s": 120},
              "data": {"path": "default", "vocab_size": 320, "cache_dir": str(out / "cache"),
                       "corpus_max_bytes": 150000, "seq_len": 16, "micro_batch": 2,
                       "global_batch": 4, "split": "90,10"},
              "distill": {"teacher": str(checkpoint)},
              "train": {"steps": 3, "warmup_steps": 0, "eval_batches": 2, "progress": False,
                        "run_dir": str(out / "run"), "overwrite": True, "resume": "none"}}
    path = out / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def export_top_k(config: Path, out: Path) -> Path:
    """The run's offline teacher export (top EXPORT_K), which LAYOUTS' `{export}` names."""
    from tools import export_teacher_logits

    if export_teacher_logits.main(["--config", str(config), "--top-k", str(EXPORT_K), "--out",
                                   str(out), "--no-progress"]) != 0:
        raise RuntimeError("the offline export failed")
    return out


def comm_row(config: Path, name: str, world: int, overrides: list[str]) -> str:
    from engine.parallel import STUDENT
    from engine.spawn import run_ranks
    from tools import plan as P

    ranks = run_ranks(measure_rank, world, str(config), overrides, timeout_s=600)
    job = P.load_job(str(config), overrides, world=world)
    order = job.par.rank_order(STUDENT, world)
    equal, total_measured, total_predicted = True, 0, 0
    for rank in range(order.size):
        stage = order.coords(rank)[1]
        predicted = {f"{g}/{k}": b for (g, k), b in P.student_comm(job, stage, P.Hardware()).items()}
        memory = P.student_memory(job, stage, P.Hardware())
        equal &= ranks[rank]["comm"][MEASURED_STEP] == predicted and ranks[rank]["memory"] == {
            "params": memory.params, "grads": memory.grads, "optimizer": memory.optimizer,
            "teacher_weights": memory.teacher_weights}
        total_measured += sum(ranks[rank]["comm"][MEASURED_STEP].values())
        total_predicted += sum(predicted.values())
    rank0 = ", ".join(f"{k} {v:,}" for k, v in sorted(ranks[0]["comm"][MEASURED_STEP].items())
                      if not k.startswith("role/"))
    mem = ranks[0]["memory"]
    return (f"| {name} | {rank0} | {total_predicted:,} | {total_measured:,} | "
            f"{mem['params']:,} / {mem['grads']:,} / {mem['optimizer']:,} | "
            f"{'yes' if equal else 'NO'} |")


def activation_row(config: Path, overrides: list[str]) -> str:
    from layers.model import TransformerLM
    from tools import plan as P
    from tools.bench.memory import kept_bytes

    job = P.load_job(str(config), overrides)
    model = TransformerLM(job.cfg.model, P.ParallelLayout.single(),
                          recompute=job.cfg.train.recompute)
    ids = torch.randint(0, 320, (job.cfg.data.micro_batch, job.cfg.data.seq_len))
    fused = job.cfg.distill.fused_lm_head
    saved = saved_activation_bytes(model, ids, compute_logits=not fused)
    kept = kept_bytes(lambda: model(ids, compute_logits=not fused))
    predicted = P.activation_bytes(job, model, P.Hardware())
    return f"| {' '.join(overrides)} | {predicted:,} | {saved:,} | {kept:,} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_plan")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_run(out)
    export = export_top_k(config, out / "export")
    print("| layout | rank 0 bytes/step by group/kind (measured = predicted) | all ranks predicted | "
          "all ranks measured | rank 0 params / grads / optimizer bytes | every rank equal |")
    print("|---|---|---|---|---|---|")
    for name, world, overrides in LAYOUTS:
        overrides = [o.format(export=export) for o in overrides]
        print(comm_row(config, name, world, overrides), flush=True)
    print("\n| student forward (1 micro-batch of 2 x 16 tokens) | predicted | saved for backward "
          "| kept allocated (profiler) |")
    print("|---|---|---|---|")
    for overrides in (["train.recompute=none"], ["train.recompute=selective"],
                      ["train.recompute=full"], ["distill.fused_lm_head=true"]):
        print(activation_row(config, overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
