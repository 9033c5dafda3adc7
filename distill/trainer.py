"""The distillation training loop: one optimizer step reads top to bottom.

    scheduled values -> micro-batches -> teacher outputs -> student forward + objective
    -> backward (per micro-batch) -> clip / skip -> optimizer step -> adaptive rule
    -> maybe save -> maybe validate -> log

Data parallelism is torch's DistributedDataParallel over the DP group, wrapped around the student
*and* the objective (its projections train with the student); gradient sync happens only on the
last micro-batch of a step. With `train.distributed_optimizer` there is no DDP: the optimizer
reduce-scatters the summed gradients over DP (engine/dist_optim.py). Tensor- and sequence-parallel
gradients need no fix-up afterwards: the layers produce complete gradients inside autograd
(layers/tensor_parallel.py).

Pipeline parallelism (`parallel.pp > 1`): the step's micro-batches go through the 1F1B schedule
(interleaved with `parallel.virtual_stages > 1`) of engine/pipeline.py (distill/pipeline_step.py):
the LM and logit terms run on the last stage, each activation pair on the stage that owns it, a
colocated teacher in lockstep on the same stages, a teacher on its own ranks streams each stage
what it needs, an offline teacher's rows are read by the last stage. Gradients are summed over
the tied embedding's two copies, over the projection's copies and (without the distributed
optimizer, which reduce-scatters them itself) over DP after the schedule (no DDP); the gradient
norm covers every stage, and the step's loss terms are summed over the pipeline group so that
every rank holds (and rank 0 logs) them.
"""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from distill.evaluate import validation
from distill.objective import DistillObjective, count_tokens, distill_mask
from distill.on_policy import OnPolicy
from distill.pipeline_step import StudentStage, pipeline_copies, run_pipeline, sync_pipeline_grads
from distill.schedules import Schedules
from distill.teacher import TeacherSource
from engine import collectives as C
from engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from engine.data import DataConfig, to_device
from engine.log import get_logger
from engine.metrics import MetricsWriter
from engine.optim import OptimizerStep, StepStats, reduce_expert_gradients
from engine.parallel import ParallelLayout
from engine.param_tags import param_tags
from engine.signals import PreemptionFlag
from engine.train_config import TrainConfig, resume_failure, resume_path
from layers.context import MTP_LABELS, sequence_kwargs, split_for_cp

log = get_logger(__name__)

TERMS = ("loss", "lm_loss", "kd_loss", "act_loss")


def _counted_allreduce(group, bucket):
    """DDP's own gradient all-reduce, counted like the collective module's (DP bytes per step)."""
    C.record("all_reduce", bucket.buffer(), group)
    return default_hooks.allreduce_hook(group, bucket)


class StudentWithObjective(nn.Module):
    """Student forward and objective in one module, so DDP sees every trained parameter."""

    def __init__(self, student: nn.Module, objective: DistillObjective):
        super().__init__()
        self.student, self.objective = student, objective

    def forward(self, input_ids, labels, teacher, counts, kd_mask=None, sequence=None,
                mtp_labels=None):
        """`sequence`: the micro-batch's positions / documents / CP chunks (`sequence_kwargs`);
        `mtp_labels`: its MTP targets when it carries them (CP chunks)."""
        fused = self.objective.fused
        out = self.student(input_ids, buffers=self.objective.student_buffer_names(),
                           compute_logits=not fused, **(sequence or {}))
        return self.objective(out, teacher, labels, tokens_norm=counts,
                              output_weight=self.student.output_weight if fused else None,
                              kd_mask=kd_mask, mtp_labels=mtp_labels)


@dataclass
class RunState:
    """Everything besides tensors that an exact resume needs."""

    step: int = 0
    data: dict = field(default_factory=dict)
    optimizer_step: dict = field(default_factory=dict)
    schedules: dict = field(default_factory=dict)  # the adaptive temperature rule's state


def _accumulate(totals: dict[str, float], out) -> None:
    """Add one micro-batch's shares of the step means (`ObjectiveOutput`) to `totals`."""
    for key in TERMS:
        totals[key] += float(getattr(out, "total" if key == "loss" else key))
    for key, value in out.metrics.items():
        totals[key] = totals.get(key, 0.0) + float(value)


class DistillTrainer:
    """Trains `student` (optionally from `teacher`) with `objective` on `data`, under `layout`.

    `teacher` gives the teacher outputs of each micro-batch (a colocated forward, a stream from
    teacher ranks, or offline top-k), None for plain LM training; validation draws from
    `data_cfg`'s validation split. `on_policy` (distill/on_policy.py) replaces some micro-batches
    of each step by the student's continuations of their prompts before the teacher sees them.
    """

    def __init__(self, *, cfg: TrainConfig, layout: ParallelLayout, student: nn.Module,
                 objective: DistillObjective, data, data_cfg: DataConfig,
                 teacher: TeacherSource | None = None, run_config: dict, vocab_size: int,
                 on_policy: OnPolicy | None = None):
        self.cfg, self.layout, self.on_policy = cfg, layout, on_policy
        self.student, self.objective, self.teacher = student, objective, teacher
        self.data, self.data_cfg = data, data_cfg
        self.run_config, self.vocab_size = run_config, vocab_size
        self.mtp_heads = student.config.mtp_heads
        self.run_dir = Path(cfg.run_dir)
        self.module = StudentWithObjective(student, objective)
        # MTP heads get no gradient when their only loss (LM) is off; DDP must then look for them.
        unused = student.config.mtp_heads > 0 and not objective.cfg.lm_on
        # The distributed optimizer reduce-scatters the gradients itself: no DDP then.
        # Under context parallelism the ranks of a DP x CP group hold the same parameters and other
        # tokens: their gradients are summed like data-parallel ones.
        use_ddp = layout.dp * layout.cp > 1 and layout.pp == 1 and not cfg.distributed_optimizer
        if use_ddp:  # routed experts are summed over the expert-DP group instead (train_step)
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                self.module, [n for n, p in self.module.named_parameters() if param_tags(p).expert])
        self.ddp = DistributedDataParallel(self.module, process_group=layout.dp_cp_group,
                                           find_unused_parameters=unused) if use_ddp else None
        # The objective's loss is this rank's share of the step's global means, whose gradient is
        # the SUM over DP ranks; DDP averages, so each rank's loss is scaled by DP to compensate
        # (the distributed optimizer sums).
        self.dp_scale = layout.dp * layout.cp if self.ddp is not None else 1
        if layout.pp > 1:
            pipeline_copies(objective, layout)
        self.count_comm = cfg.comm_metrics == "on" or (cfg.comm_metrics == "auto"
                                                       and layout.device.type == "cpu")
        if self.ddp is not None and self.count_comm:
            self.ddp.register_comm_hook(layout.dp_cp_group, _counted_allreduce)
        self.opt = OptimizerStep(cfg, layout, list(self.module.parameters()))
        self.schedules = Schedules(objective.cfg)
        self.state = RunState()

    # ----------------------------------------------------------------------------- one step
    def train_step(self, step: int) -> dict:
        values = self.objective.values = self.schedules.at(step)
        micro_batches = [to_device(mb, self.layout.device) for mb in self.data.next_step()]
        if self.layout.cp > 1:  # this rank's chunks of every sequence
            micro_batches = [split_for_cp(mb, self.layout.cp, self.layout.cp_rank,
                                          mtp_heads=self.mtp_heads) for mb in micro_batches]
        if self.on_policy is not None:
            micro_batches = self.on_policy(micro_batches, step)
        counts = count_tokens(micro_batches, self.layout, mtp_heads=self.mtp_heads)
        # The step's auxiliary MoE loss is the mean over every micro-batch of every DP rank.
        self.student.set_moe_loss_scale(self.dp_scale / (self.layout.dp * len(micro_batches)))
        totals = self._pipeline(micro_batches, counts) if self.layout.pp > 1 else \
            self._micro_batches(micro_batches, counts)
        if self.layout.pp == 1 and not self.cfg.distributed_optimizer:
            reduce_expert_gradients(self.module.parameters(), self.layout, scale=1 / self.dp_scale)
        totals = self._global_mean({**totals, **self._moe_losses()})
        stats = self.opt(step, loss=totals["loss"])
        if "kd_divergence" in totals:
            self.schedules.observe(step, totals["kd_divergence"])
        return self._record(step, {**totals, **values.metrics()}, stats, counts)

    def _micro_batches(self, micro_batches: list[dict], counts) -> dict[str, float]:
        """Forward and backward of each micro-batch in turn; the totals of the step's terms."""
        totals: dict[str, float] = dict.fromkeys(TERMS, 0.0)
        for i, mb in enumerate(micro_batches):
            teacher_out = self.teacher(mb) if self.teacher is not None else None
            with self._sync(last=i == len(micro_batches) - 1):
                with self._autocast():
                    out = (self.ddp or self.module)(mb["input_ids"], mb.get("labels"),
                                                    teacher_out, counts, mb.get("kd_mask"),
                                                    sequence_kwargs(mb), mb.get(MTP_LABELS))
                (out.loss * self.dp_scale).backward()
            _accumulate(totals, out)
            del teacher_out, out
        return totals

    def _pipeline(self, micro_batches: list[dict], counts) -> dict[str, float]:
        """The step's micro-batches through the pipeline schedule. The totals are this stage's
        shares (the activation pairs it owns; the LM and logit terms on the last stage)."""
        objective, fused = self.objective, self.objective.fused
        totals = dict.fromkeys((*TERMS, *objective.metric_names()), 0.0)
        plan = self.student.plan
        pairs = {v: [p for p in objective.pairs if plan.buffer_stage(p.student) == v]
                 for v in range(plan.virtual_stages)}

        in_stages = self.teacher.stage_parts() if self.teacher is not None else {}
        fetched: dict[int, object] = {}

        def fetch(i: int, teacher_out):
            """A teacher that is not cut into stages: one call per micro-batch on this rank, in
            order (the stream from teacher ranks reaches every stage; offline rows the last)."""
            if in_stages or self.teacher is None:
                return teacher_out
            if i not in fetched:
                fetched[i] = self.teacher(micro_batches[i])
            return fetched[i]

        def last(i: int, out, teacher_out) -> torch.Tensor:
            mb = micro_batches[i]
            teacher_out = fetch(i, teacher_out)
            result = objective(out, teacher_out, mb.get("labels"), tokens_norm=counts,
                               output_weight=self.student.output_weight if fused else None,
                               kd_mask=mb.get("kd_mask"), pairs=pairs[plan.virtual_stages - 1],
                               mtp_labels=mb.get(MTP_LABELS))
            _accumulate(totals, result)
            return result.loss

        def activations(i: int, virtual: int, buffers: dict, teacher_out) -> torch.Tensor | None:
            mb = micro_batches[i]
            if self.teacher is not None and self.teacher.reaches_every_stage:
                teacher_out = fetch(i, teacher_out)
            share = objective.activation_share(
                pairs[virtual], buffers, teacher_out,
                distill_mask(mb.get("labels"), mb.get("kd_mask")), counts)
            if share is not None:
                for key in ("loss", "act_loss"):
                    totals[key] += float(share.detach())
            return share

        stage = StudentStage(self.student, micro_batches, last=last, compute_logits=not fused,
                             autocast=self._autocast, teachers=in_stages,
                             buffers=objective.student_buffer_names(), activations=activations)
        run_pipeline(stage, self.layout, train=True)
        sync_pipeline_grads(self.module, self.student, self.objective, self.layout,
                            sum_dp=not self.cfg.distributed_optimizer)
        unlisted = sorted(set(totals) - {*TERMS, *objective.metric_names()})
        if unlisted:  # the stages would sum different lists over the pipeline group
            raise RuntimeError(f"objective metrics {unlisted} are missing from metric_names()")
        return totals

    def _moe_losses(self) -> dict[str, float]:
        """This rank's share of the MoE blocks' auxiliary losses, means over blocks, micro-batches
        and DP ranks once summed over DP x CP and the pipeline (empty for a dense student). The CP
        ranks of a sequence hold the same values (summed over CP in the block)."""
        blocks = sum(self.student.config.is_moe_layer(i) for i in range(self.student.config.layers))
        if not blocks:
            return {}
        sums = self.student.pop_moe_losses()
        return {name: sums.get(name, 0.0) / (blocks * self.layout.dp * self.layout.cp)
                for name in ("moe_aux_loss", "moe_z_loss")}

    def _autocast(self):
        """bf16 autocast of the forward on GPU (`train.bf16`); the losses upcast to fp32 inside."""
        on_gpu = self.layout.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu and self.cfg.bf16)

    def _sync(self, *, last: bool):
        if self.ddp is None or last:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def _global_mean(self, totals: dict) -> dict:
        """Each rank holds its share of the global-token means; summing over DP (and over the
        pipeline, where only the last stage has them) gives the means. (Every rank has the same
        keys: they follow from the config.)"""
        keys = list(totals)
        values = torch.tensor([totals[k] for k in keys], dtype=torch.float64,
                              device=self.layout.device)
        C.all_reduce(values, self.layout.dp_cp_group)  # CP ranks hold shares of the same sequences
        C.all_reduce(values, self.layout.pp_group)  # each stage holds the terms it owns
        return dict(zip(keys, values.tolist()))

    def _record(self, step: int, totals: dict, stats: StepStats, counts) -> dict:
        return {"step": step + 1, **totals, "lr": stats.lr, "grad_norm": stats.grad_norm,
                "skipped_steps": self.opt.skipped_total, "tokens": counts.tokens}

    # ------------------------------------------------------------------------------ validation
    def validate(self) -> dict[str, float]:
        """{"val_loss": the student's mean next-token loss over `eval_batches` validation
        micro-batches, and on paired data "val_bpb": the same in bits per byte}."""
        scores = validation(self.student, self.data_cfg, micro_batches=self.cfg.eval_batches,
                            seed=self.cfg.seed, fused=self.objective.fused,
                            teacher_len=self.data.teacher_len,
                            teacher_tokenizers=self.data.teacher_tokenizers)
        bpb = {} if scores.bits_per_byte is None else {"val_bpb": scores.bits_per_byte}
        return {"val_loss": scores.loss, **bpb}

    # ---------------------------------------------------------------------------- checkpoints
    def save(self, step: int) -> Path:
        self.state.step = step
        self.state.data = self.data.state_dict()
        self.state.optimizer_step = self.opt.state_dict()
        self.state.schedules = self.schedules.state_dict()
        return save_checkpoint(self.run_dir / "checkpoints", step, layout=self.layout,
                               model=self.module, optimizer=self.opt.optimizer,
                               state=self.state.__dict__, config=self.run_config,
                               keep=self.cfg.keep, vocab_size=self.vocab_size,
                               rank_tensors=self.student.rng.state_dict())

    def maybe_resume(self) -> int:
        path = resume_path(self.cfg)
        if path is None:
            return 0
        try:
            loaded = load_checkpoint(path, layout=self.layout, model=self.module,
                                     optimizer=self.opt.optimizer, vocab_size=self.vocab_size)
        except CheckpointError as err:
            raise resume_failure(path, err, search=self.layout.is_rank0) from None
        state = loaded["state"]
        if loaded["same_layout"]:  # dropout streams are per rank: only an identical layout resumes them
            self.student.rng.load_state_dict(loaded["rank_tensors"])
        self.data.load_state_dict(state["data"])
        self.opt.load_state_dict(state["optimizer_step"])
        self.schedules.load_state_dict(state.get("schedules", {}))
        log.info("resumed from %s at step %d", path, loaded["step"])
        return int(loaded["step"])

    # ------------------------------------------------------------------------------- the run
    def run(self, preempted: PreemptionFlag) -> int:
        """Train until `train.steps` or until a signal to any rank (`preempted`: this rank's flag,
        installed by the caller); returns the last completed step."""
        start = self.maybe_resume()
        if not self.data_cfg.has_validation:
            log.info("data.split=%s leaves no validation data: validation is skipped",
                     self.data_cfg.split)
        metrics = MetricsWriter(self.run_dir, enabled=self.layout.is_rank0,
                                total_steps=self.cfg.steps, start_step=start,
                                progress=self.cfg.progress)
        try:
            step = self._loop(start, metrics, preempted)
        finally:
            metrics.close()
        if self.teacher is not None:
            self.teacher.close()
        return step

    def _loop(self, start: int, metrics: MetricsWriter, preempted: PreemptionFlag) -> int:
        for step in range(start, self.cfg.steps):
            with self._counting() as comm:
                began = time.perf_counter()
                record = self.train_step(step)
                record["tokens_per_s"] = record.pop("tokens") / (time.perf_counter() - began)
                stop = preempted.should_stop(self.layout)
                if self.teacher is not None:  # teacher ranks learn whether to go on
                    self.teacher.end_step(stop=stop)
            if comm is not None:
                record.update({f"comm_bytes/{name}": nbytes
                               for name, nbytes in sorted(comm.bytes_per_group().items())})
            record.update(self._peak_memory())
            last = step + 1 == self.cfg.steps
            # Save first: a validation that fails must not cost the steps it follows.
            if stop or last or self._due(step, self.cfg.save_interval):
                self.save(step + 1)
            if self.data_cfg.has_validation and (last or self._due(step, self.cfg.eval_interval)):
                record.update(self.validate())
            if (step + 1) % self.cfg.log_interval == 0 or "val_loss" in record:
                metrics.log(record)
            metrics.advance()
            if stop:
                log.info("preempted: saved step %d", step + 1)
                return step + 1
        return self.cfg.steps

    def _counting(self):
        """The step's collectives counted per group (tools/plan.py predicts them), when on."""
        if not self.count_comm:
            return contextlib.nullcontext()
        layout = self.layout
        return C.count_collectives({"tp": layout.tp_group, "pp": layout.pp_group,
                                    "dp": layout.dp_group, "embedding": layout.embedding_group,
                                    "ep": layout.ep_group, "expert_dp": layout.expert_dp_group,
                                    "cp": layout.cp_group, "dp_cp": layout.dp_cp_group,
                                    "role": layout.role_group})

    def _peak_memory(self) -> dict[str, int]:
        """This rank's peak memory so far, and the largest over the student ranks: the CUDA
        allocator's peak on GPU, the process's peak resident set on CPU (torch's CPU allocator
        keeps no statistics)."""
        if self.layout.device.type == "cuda":
            mine = torch.cuda.max_memory_allocated(self.layout.device)
        else:  # Linux reports kilobytes
            mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = torch.tensor([mine], dtype=torch.int64, device=self.layout.device)
        C.all_reduce(peak, self.layout.role_group, op="max")
        return {"peak_mem_bytes": mine, "peak_mem_bytes_max": int(peak.item())}

    @staticmethod
    def _due(step: int, interval: int) -> bool:
        return interval > 0 and (step + 1) % interval == 0
