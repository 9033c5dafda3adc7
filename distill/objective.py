"""The distillation objective: LM loss, logit distillation and activation distillation, weighted.

    total = lm_weight * (CE_0 + sum_j mtp_weights[j] * CE_j)           every head, on labels
          + logit.weight * T^2 * D(teacher || student)                  next-token head only
          + activation_coef * (1/P) * sum_p weight_p * loss_p           P activation pairs

With several teachers (`distill.teachers`) the logit term is sum_k w_k D(teacher_k || student)
(teacher_mode sum) or D(sum_k w_k p_k || student) (mixture, w normalized; distill/mixture.py),
and the activation pairs each read the teacher they name.

lm_weight, logit.weight, T and activation_coef are the values in force at the step being trained
(`DistillObjective.values`, which the trainer sets each step from `distill.schedules.Schedules`).
A term that is on at some step of the run is computed at every step (times 0 where its weight is
0), so the set of parameters that get gradients never changes during a run.

Global-token averaging. Every term is a mean over the valid tokens of the whole optimizer step (all
micro-batches, all DP ranks), not a mean of per-micro-batch means: `count_tokens` counts them once
per step with one all-reduce over DP, and each micro-batch contributes its token *sum* divided by
those global counts. Summing `ObjectiveOutput.total` (or any term) over the step's micro-batches
and then over DP ranks gives the step's means exactly.

Gradients. `ObjectiveOutput.loss` is this micro-batch's share of the global-token means, so the
sum of its gradients over micro-batches and DP ranks is the gradient of the step's means (the
trainer, which chooses DistributedDataParallel, undoes DDP's averaging over DP). The values are
replicated over TP (vocab-parallel losses return per-token values on every rank; sharded activation
sums are combined with one all-reduce), and each rank's backward produces gradients of its own
shards only, so no TP correction is needed afterwards.

Which tokens count: LM head j counts positions whose target (`shift_labels(labels, j)`) is not
`IGNORE_INDEX`; the logit and activation terms count the positions of the micro-batch's `kd_mask`
when it has one (on-policy micro-batches, distill/on_policy.py: the positions whose next token the
student generated), else the positions with a valid next-token label, or every position when the
micro-batch has no labels (pure distillation).

A teacher with another tokenizer (`distill.cross_tokenizer`, distill/cross_tokenizer.py): the
logit term is the chunk term, a mean over the step's aligned chunks (`likelihood`) or over its
chunks of one token in both tokenizations (`mapped_kl`, `uld`); activation pairs compare both
models at the chunks' ends, a mean over those; `student_bpb` and `teacher_bpb` are logged.
Several such teachers (`distill.teachers`, each with its own paired tokenization `tokenizer`):
sum_k w_k x teacher k's chunk term, each a mean over its own alignment's chunks (counted per
tokenization, `TokenCounts.by_tokenizer`), logged as `kd_loss/<name>` with each one's
`student_bpb/<name>` and `teacher_bpb/<name>`.

Any term may be absent at run time: no labels (pure KD) drops the LM term, no teacher outputs (pure
LM) drop the distillation terms. MTP heads are only trained on labels: the logit term reads the
next-token head alone, so the MTP blocks get no distillation gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from distill._plan import KDDiagnostics
from distill.activation import activation_pair_means
from distill.config import (
    ROUTER,
    SINGLE_TEACHER,
    DistillConfig,
    ResolvedPair,
    check_compatibility,
    named_teachers,
)
from distill.cross_tokenizer import STATS, CrossTokenizerTerm, aligned_buffers
from distill.divergence import cross_entropy, divergence, lm_and_divergence, topk_divergence
from distill.fused import FusedHeadLoss, fused_head_loss
from distill.mixture import mixture_log_probs
from distill.projection import ActivationProjection
from distill.schedules import Schedules, StepValues, ever_positive
from distill.teacher import TeacherOutputs, TeacherRequest
from engine import collectives as C
from engine.data import IGNORE_INDEX, shift_labels
from engine.data.dataset import alignment_key
from engine.data.paired import NO_CHUNK
from engine.log import get_logger
from engine.parallel import ParallelLayout
from layers.buffers import ActivationBuffer
from layers.config import ModelConfig
from layers.context import MTP_LABELS
from layers.model import ModelOutput

log = get_logger(__name__)

# Per-token KDDiagnostics fields, logged as step means over the distilled positions.
DIAGNOSTICS = ("teacher_entropy", "student_entropy", "top1_agreement")


@dataclass(frozen=True)
class TokenCounts:
    """The step's global token counts (all micro-batches, all DP ranks): the denominators."""

    tokens: int  # every input position (for throughput)
    heads: tuple[int, ...]  # valid targets of each output head: 0 next token, j MTP head j
    distill: int  # positions the logit and activation terms average over
    chunks: int = 0  # cross_tokenizer: aligned chunks, which the chunk term averages over
    chunk_bytes: int = 0  # cross_tokenizer: their bytes (the bits-per-byte denominator)
    single_chunks: int = 0  # cross_tokenizer: chunks of one token in both (mapped_kl's)
    chunk_ends: int = 0  # cross_tokenizer: chunks whose ends both windows hold (activation pairs)
    # several teacher tokenizations: each named one's counts (its chunk fields), by name (the
    # fields above are the unnamed tokenization's, 0 without it)
    by_tokenizer: dict[str, TokenCounts] = field(default_factory=dict)

    def of_tokenizer(self, tokenizer: str) -> TokenCounts:
        """The counts with the chunk fields of teacher tokenization `tokenizer` ("": these)."""
        return self.by_tokenizer[tokenizer] if tokenizer else self


def head_targets(labels: torch.Tensor, mtp_labels: torch.Tensor | None, head: int) -> torch.Tensor:
    """Head `head`'s targets [batch, seq] (0: next token, j: MTP head j): `mtp_labels`
    [batch, seq, heads] where the micro-batch carries them (a CP rank's chunks: shifted on the
    whole sequence before the split, layers/context.py `split_for_cp`), else `labels` shifted."""
    if head == 0 or mtp_labels is None:
        return shift_labels(labels, head)
    return mtp_labels[..., head - 1]


def micro_batch_tokenizers(micro_batch: Mapping[str, torch.Tensor]) -> list[str]:
    """The teacher tokenizations whose alignment the micro-batch carries ("": the unnamed one),
    from its keys (engine/data/dataset.py `alignment_key`), sorted."""
    return sorted(key.partition("/")[2] for key in micro_batch
                  if key.partition("/")[0] == "chunk_bytes")


def _chunk_counts(micro_batch: Mapping[str, torch.Tensor], tokenizer: str) -> list[int]:
    chunk_bytes = micro_batch.get(alignment_key("chunk_bytes", tokenizer))
    if chunk_bytes is None:  # (no unnamed tokenization: its slot stays, zeros)
        return [0, 0, 0, 0]
    return [int((chunk_bytes > 0).sum()), int(chunk_bytes.sum()),
            int((micro_batch[alignment_key("single", tokenizer)] != NO_CHUNK).sum()),
            int((micro_batch[alignment_key("chunk_ends", tokenizer)] != NO_CHUNK).sum())]


def _micro_batch_counts(micro_batch: Mapping[str, torch.Tensor], mtp_heads: int,
                        tokenizers: list[str]) -> list[int]:
    tokens = micro_batch["input_ids"].numel()
    labels, kd_mask = micro_batch.get("labels"), micro_batch.get("kd_mask")
    mtp_labels = micro_batch.get(MTP_LABELS)
    heads = [0] * (1 + mtp_heads) if labels is None else \
        [int((head_targets(labels, mtp_labels, j) != IGNORE_INDEX).sum()) for j in range(1 + mtp_heads)]
    distill = int(kd_mask.sum()) if kd_mask is not None else \
        tokens if labels is None else heads[0]
    chunks = [n for name in tokenizers for n in _chunk_counts(micro_batch, name)]
    return [tokens, *heads, distill, *chunks]


def count_tokens(micro_batches: Iterable[Mapping[str, torch.Tensor]], layout: ParallelLayout, *,
                 mtp_heads: int = 0) -> TokenCounts:
    """Global counts for one step from this rank's micro-batches ({"input_ids", "labels"?}, and
    the alignment of each teacher tokenization); one all-reduce over the DP (x CP) group.
    `mtp_heads` is the student's `config.mtp_heads`."""
    micro_batches = list(micro_batches)
    # (every rank's micro-batches carry the same keys: they follow from the config) The unnamed
    # tokenization's four counts are always there, zeros without it; each named one adds four.
    named = [t for t in micro_batch_tokenizers(micro_batches[0]) if t] if micro_batches else []
    tokenizers = ["", *named]
    per_batch = [_micro_batch_counts(mb, mtp_heads, tokenizers) for mb in micro_batches]
    width = 3 + mtp_heads + 4 * len(tokenizers)
    totals = torch.tensor(per_batch, dtype=torch.int64).reshape(-1, width).sum(dim=0)
    # over DP x CP: context-parallel ranks hold other tokens of the same sequences
    totals = C.all_reduce(totals.to(layout.device), layout.dp_cp_group)  # NCCL needs device memory
    values = totals.tolist()
    base = TokenCounts(tokens=values[0], heads=tuple(values[1:2 + mtp_heads]),
                       distill=values[2 + mtp_heads])
    chunks = {name: dataclasses.replace(base, **dict(zip(
        ("chunks", "chunk_bytes", "single_chunks", "chunk_ends"),
        values[3 + mtp_heads + 4 * i:7 + mtp_heads + 4 * i])))
        for i, name in enumerate(tokenizers)}
    return dataclasses.replace(chunks[""], by_tokenizer={name: chunks[name] for name in named})


@dataclass
class ObjectiveOutput:
    """One micro-batch's objective. `loss` is the one to backward; the rest are detached shares
    of the step's global means (sum them over micro-batches, then all-reduce over DP, to log)."""

    loss: torch.Tensor  # the total, with graph
    total: torch.Tensor  # lm_loss + kd_loss + act_loss
    lm_loss: torch.Tensor  # LM term of every head, weights included
    kd_loss: torch.Tensor  # logit term, weight and temperature**2 included
    act_loss: torch.Tensor  # activation term, activation_coef included
    # further shares of step means to log, by metric name: `kd_divergence` (the logit term's mean
    # divergence before its weight and T^2) and, with distill.diagnostics, DIAGNOSTICS (teacher
    # and student entropy at the temperature in force, top-1 agreement), none for a top-k teacher
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def _share(per_token: torch.Tensor, count: int) -> torch.Tensor:
    return per_token.sum() / max(count, 1)


def _masked_share(per_token: torch.Tensor, mask: torch.Tensor | None,
                  count: int) -> torch.Tensor:
    """`_share` over the positions of `mask` (None: all)."""
    if mask is not None:
        per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    return _share(per_token, count)


def _detached(term: torch.Tensor | None) -> torch.Tensor:
    return torch.zeros(()) if term is None else term.detach()


class DistillObjective(nn.Module):
    """The objective of one run; holds the trainable activation projections, if any.

    Call once per micro-batch with the student's `ModelOutput` (asked for
    `student_buffer_names()`, logits unless `fused`), the teachers' outputs by name (asked for
    `teacher_buffer_names()`; a teacher source's, distill/teacher.py) or None, the next-token
    labels [batch, seq] or None, and the step's `count_tokens(...)`. The fused path also needs the
    student's `output_weight` shard.

    Several teachers (`distill.teachers`): `teacher_config` maps each name to its config.
    `teacher_mode` sum adds
    weight_k * D(teacher_k || student), each logged as `kd_loss/<name>`; mixture takes
    D(sum_k w_k p_k || student) with the weights normalized (distill/mixture.py). Activation pairs
    read the buffers of the teacher they name, through a projection of their own teacher's width.
    """

    def __init__(self, cfg: DistillConfig, student_config: ModelConfig,
                 teacher_config: ModelConfig | Mapping[str, ModelConfig] | None,
                 layout: ParallelLayout, *, seed: int = 0,
                 shared_vocab: torch.Tensor | Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        self.cfg, self.layout = cfg, layout
        self.pairs = check_compatibility(cfg, student_config, teacher_config,
                                         layout.teacher_tp)
        teachers = named_teachers(cfg, teacher_config)
        self.teacher_names = list(teachers)
        # sum: each divergence's weight (distill.teacher: 1); mixture: shares, normalized there
        # (offline teachers have no model config here: their names come from the entries)
        weights = {e.name: e.weight for e in cfg.teacher_entries}
        several = len(cfg.teachers) > 1
        self.teacher_weights = {name: w if several or cfg.teacher_mode == "sum" else 1.0
                                for name, w in weights.items()}
        self.vocab_size = student_config.vocab_size
        # cross_tokenizer: each teacher's paired tokenization ("": the unnamed one) and chunk term
        self.teacher_tokenizers = {e.name: e.tokenizer for e in cfg.teacher_entries}
        self.chunk_terms = self._chunk_terms_of(cfg, student_config, teachers, shared_vocab)
        self.softcap = student_config.final_logit_softcap  # the fused head caps as the model
        self.mtp_weights = cfg.mtp_weights or (1.0,) * student_config.mtp_heads
        self.values: StepValues = Schedules(cfg).at(0)  # the trainer sets each step's values
        # which path the fused head last ran ("grad_in_forward" in training; see fused_head_loss)
        self.fused_path: str | None = None
        self.projection = self.projections = None
        projected = self._projected(self.pairs)
        if projected and cfg.projection != "none":
            by_source = {name: ActivationProjection(
                pairs=sum(p.source == name for p in projected),
                shared=cfg.projection == "shared", student_width=student_config.hidden,
                teacher_width=teachers[name].hidden, layout=layout, seed=seed)
                for name in teachers if any(p.source == name for p in projected)}
            if len(teachers) == 1:  # its parameter names stay those of one-teacher checkpoints
                self.projection = next(iter(by_source.values()))
            else:
                self.projections = nn.ModuleDict(by_source)

    def _chunk_terms_of(self, cfg: DistillConfig, student_config: ModelConfig,
                        teachers: dict[str, ModelConfig],
                        shared_vocab: torch.Tensor | Mapping[str, torch.Tensor] | None,
                        ) -> dict[str, CrossTokenizerTerm]:
        """Each teacher's chunk term by name ({} without cross_tokenizer); offline, with no
        teacher model (its statistics come from the store), one under SINGLE_TEACHER."""
        cross = cfg.cross_tokenizer
        if not cross.on:
            return {}
        vocabs = {name: t.vocab_size for name, t in teachers.items()} or \
            ({SINGLE_TEACHER: 0} if cfg.schedule == "offline" else {})
        return {name: CrossTokenizerTerm(
            loss=cross.loss, divergence=cross.divergence, kind=cfg.logit.kind,
            student_vocab=student_config.vocab_size, teacher_vocab=vocab,
            group=self.layout.tp_group, uld_top_k=cross.uld_top_k,
            shared_vocab=shared_vocab.get(name) if isinstance(shared_vocab, Mapping)
            else shared_vocab) for name, vocab in vocabs.items()}

    @property
    def chunk_term(self) -> CrossTokenizerTerm | None:
        """The one teacher's chunk term (None without cross_tokenizer)."""
        return next(iter(self.chunk_terms.values()), None)

    @staticmethod
    def _projected(pairs: Sequence[ResolvedPair]) -> list[ResolvedPair]:
        """The pairs the projection maps (a `router` pair compares [.., experts] on both sides)."""
        return [p for p in pairs if p.loss != ROUTER]

    @property
    def fused(self) -> bool:
        """Whether the LM head and its losses run fused (forwards need no logits)."""
        return self.cfg.fused_lm_head

    def student_buffer_names(self) -> set[str]:
        return {p.student for p in self.pairs}

    def teacher_buffer_names(self, name: str | None = None) -> set[str]:
        """The buffers asked of teacher `name` (None: of the one teacher, or of all)."""
        return {p.teacher for p in self.pairs if name is None or p.source == name}

    def teacher_request(self, name: str | None = None) -> TeacherRequest:
        """What live teacher `name` (None: the one teacher) must produce per micro-batch: its
        logits, or with the fused head its head input (a mixture mixes the teachers' logits, so
        the fused head then takes the mixture's)."""
        mixes = self.several and self.cfg.teacher_mode == "mixture"
        # (cross_tokenizer: mapped_kl needs the teacher's head input, and logits come from it)
        head = "none" if not self.cfg.logit.on else \
            "hidden" if (self.fused and not mixes) or self.cfg.cross_tokenizer.on else "logits"
        stats = STATS[self.cfg.cross_tokenizer.loss] if self.cfg.cross_tokenizer.on and \
            self.cfg.schedule == "teacher_ranks" else ()
        return TeacherRequest(head=head, buffers=tuple(sorted(self.teacher_buffer_names(name))),
                              chunk_stats=stats)

    @property
    def several(self) -> bool:
        return len(self.teacher_names) > 1

    def metric_names(self) -> tuple[str, ...]:
        """Every `ObjectiveOutput.metrics` key this run's micro-batches produce (all ranks of a
        pipeline sum them, in this order, though only the last stage computes them)."""
        if not self.cfg.logit.on:
            return ()
        entries = [e.name for e in self.cfg.teacher_entries]
        per_teacher = len(entries) > 1 and self.cfg.teacher_mode == "sum"
        suffixes = [f"/{name}" for name in entries] if per_teacher else [""]
        names = ["kd_divergence", *([f"kd_loss{s}" for s in suffixes] if per_teacher else [])]
        if self.cfg.cross_tokenizer.on:  # (each teacher's chunks cover other bytes)
            return (*names, *(f"{key}{s}" for s in suffixes
                              for key in ("student_bpb", "teacher_bpb")))
        if self.cfg.diagnostics and self.cfg.schedule != "offline":
            names += ["student_entropy", *(f"{key}{s}" for s in suffixes
                                           for key in DIAGNOSTICS if key != "student_entropy")]
        return tuple(names)

    def _by_name(self, teacher: Mapping[str, TeacherOutputs] | None) -> dict[str, TeacherOutputs]:
        if teacher is None:
            return {}
        missing = [n for n in self.teacher_names if n not in teacher]
        if missing:
            raise ValueError(f"no outputs of teacher {missing[0]!r}")
        return dict(teacher)

    def forward(self, student: ModelOutput, teacher: Mapping[str, TeacherOutputs] | None,
                labels: torch.Tensor | None, *, tokens_norm: TokenCounts,
                output_weight: torch.Tensor | None = None,
                kd_mask: torch.Tensor | None = None,
                pairs: Sequence[ResolvedPair] | None = None,
                mtp_labels: torch.Tensor | None = None) -> ObjectiveOutput:
        """`pairs`: the activation pairs whose buffers this forward has (all when None; a
        pipeline stage's own, see `activation_share`); `mtp_labels`: the micro-batch's MTP
        targets when it carries them (`head_targets`)."""
        metrics: dict[str, torch.Tensor] = {}
        mask = distill_mask(labels, kd_mask)
        teacher = self._by_name(teacher) or None
        fused: list[torch.Tensor] = []  # weighted losses of the fused head's calls, with graph
        lm, kd = self._logit_terms(student, teacher, labels, tokens_norm, output_weight, metrics,
                                   mask, fused, mtp_labels)
        if self.chunk_terms and teacher and self.pairs:  # at the chunks' ends
            student_buffers, teacher, mask, act_counts = self._at_chunk_ends(student, teacher,
                                                                             tokens_norm)
        else:
            student_buffers, act_counts = student.buffers, tokens_norm
        act = self.activation_share(self.pairs if pairs is None else pairs, student_buffers,
                                    teacher, mask, act_counts)
        terms = [t for t in (lm, kd, act) if t is not None]
        if not terms:
            raise ValueError("nothing to optimize in this micro-batch: the configured terms need "
                             "labels (LM) or teacher outputs (distillation), and neither was given")
        total = torch.stack(terms).sum()
        # Fused: lm and kd are detached values; the fused calls' losses carry their gradient.
        loss = total if not fused else \
            torch.stack(fused + ([] if act is None else [act.to(fused[0].dtype)])).sum()
        return ObjectiveOutput(loss=loss, total=_detached(total),
                               lm_loss=_detached(lm), kd_loss=_detached(kd),
                               act_loss=_detached(act), metrics=metrics)

    # ---------------------------------------------------------------------------- logit terms
    def _logit_terms(self, student: ModelOutput, teacher: dict[str, TeacherOutputs] | None,
                     labels: torch.Tensor | None, counts: TokenCounts,
                     output_weight: torch.Tensor | None, metrics: dict[str, torch.Tensor],
                     mask: torch.Tensor | None, fused: list[torch.Tensor],
                     mtp_labels: torch.Tensor | None = None):
        want_lm = labels is not None and self.cfg.lm_on
        want_kd = teacher is not None and self.cfg.logit.on
        if not (want_lm or want_kd):
            return None, None
        if want_kd and not all(t.has_logits for t in teacher.values()):
            raise ValueError("distill.logit.weight > 0 but the teacher outputs carry no logits "
                             "(logits, head_hidden + output_weight, or top-k)")
        if want_lm and len(counts.heads) < 1 + len(self.mtp_weights):
            raise ValueError(f"tokens_norm counts {len(counts.heads)} heads, the student has "
                             f"{1 + len(self.mtp_weights)}: pass mtp_heads= to count_tokens")
        if self.fused and output_weight is None:
            raise ValueError("distill.fused_lm_head needs the student's output_weight shard")
        labels = labels if want_lm else None
        if want_kd and self.cfg.cross_tokenizer.on:
            return self._chunk_terms(student, teacher, labels, counts, metrics)
        if not want_kd:
            ce, _, _ = self._next_token(student, None, labels, output_weight, counts, mask, fused)
            return self._lm_term(student, ce, labels, counts, output_weight, fused,
                                 mtp_labels), None
        lm, shares = None, []
        targets = self._logit_targets(teacher)
        for i, (name, weight, target) in enumerate(targets):
            # the cross-entropy comes with the first divergence, from the same statistics
            ce, div, diag = self._next_token(student, target, labels if i == 0 else None,
                                             output_weight, counts, mask, fused, weight)
            if i == 0 and labels is not None:
                lm = self._lm_term(student, ce, labels, counts, output_weight, fused, mtp_labels)
            share = weight * _masked_share(div, mask, counts.distill)
            shares.append(share)
            suffix = f"/{name}" if len(targets) > 1 else ""
            if suffix:
                metrics[f"kd_loss{suffix}"] = (self.values.kd_scale * share).detach()
            for key in DIAGNOSTICS if diag is not None else ():
                if key != "student_entropy" or i == 0:  # the student's is the same for all
                    metrics[key + ("" if key == "student_entropy" else suffix)] = \
                        _masked_share(getattr(diag, key), mask, counts.distill)
        divergence_sum = torch.stack(shares).sum()
        metrics["kd_divergence"] = divergence_sum.detach()
        return lm, self.values.kd_scale * divergence_sum

    def _at_chunk_ends(self, student: ModelOutput, teacher: dict[str, TeacherOutputs],
                       counts: TokenCounts):
        """Cross-tokenizer activation pairs: (student buffers, teacher outputs, mask, counts) with
        both models' buffers at the ends of the chunks (distill/cross_tokenizer.py
        `aligned_buffers`), averaged over the step's chunk ends."""
        (name, out), = teacher.items()
        align = out.alignment
        student_buffers, teacher_buffers = aligned_buffers(student.buffers, out.buffers, align,
                                                           self.layout.tp_group)
        aligned = dataclasses.replace(out, buffers=teacher_buffers)
        return (student_buffers, {name: aligned}, align["chunk_ends"] != NO_CHUNK,
                dataclasses.replace(counts, distill=counts.chunk_ends))

    def _chunk_terms(self, student: ModelOutput, teacher: dict[str, TeacherOutputs],
                     labels: torch.Tensor | None, counts: TokenCounts,
                     metrics: dict[str, torch.Tensor]):
        """(LM term, chunk term) against teachers with other tokenizers
        (distill/cross_tokenizer.py): sum_k weight_k x teacher k's chunk term, each over its own
        alignment and counts, and both models' bits per byte of each teacher's chunks' text into
        `metrics` (several teachers: each teacher's `kd_loss/<name>`, `student_bpb/<name>`,
        `teacher_bpb/<name>`)."""
        if any(out.alignment is None for out in teacher.values()):
            raise ValueError("distill.cross_tokenizer: the teacher outputs carry no alignment "
                             "(run the teacher through OtherTokenizerTeacher)")
        first = next(iter(teacher.values()))
        ce = cross_entropy(student.logits, first.alignment["labels"], **self._loss_kwargs())
        lm = None if labels is None else self._lm_term(student, ce, labels, counts, None, [])
        shares = []
        for name, out in teacher.items():
            term = self.chunk_terms.get(name) or self.chunk_term  # (offline: the one term)
            mine = counts.of_tokenizer(self.teacher_tokenizers.get(name, ""))
            sums = term(student.logits, out, student_ce=ce, temperature=self.values.temperature)
            items = mine.chunks if self.cfg.cross_tokenizer.loss == "likelihood" \
                else mine.single_chunks
            share = self.teacher_weights.get(name, 1.0) * sums.divergence / max(items, 1)
            shares.append(share)
            suffix = f"/{name}" if len(teacher) > 1 else ""
            if suffix:
                metrics[f"kd_loss{suffix}"] = (self.values.kd_scale * share).detach()
            metrics[f"student_bpb{suffix}"] = sums.student_bits / max(mine.chunk_bytes, 1)
            metrics[f"teacher_bpb{suffix}"] = sums.teacher_bits / max(mine.chunk_bytes, 1)
        divergence_sum = torch.stack(shares).sum()
        metrics["kd_divergence"] = divergence_sum.detach()
        return lm, self.values.kd_scale * divergence_sum

    def _logit_targets(self, teacher: dict[str, TeacherOutputs],
                       ) -> list[tuple[str, float, TeacherOutputs]]:
        """(name, weight, outputs) of each distribution the student is distilled towards: each
        teacher (sum mode, or the one teacher), or the teachers' mixture."""
        if not self.several or self.cfg.teacher_mode == "sum":
            # (an offline teacher has no model config, hence no name: its outputs still come)
            return [(n, self.teacher_weights.get(n, 1.0), out) for n, out in teacher.items()]
        logits = [teacher[n].logits for n in self.teacher_names]
        if any(x is None for x in logits):
            raise ValueError("teacher_mode mixture needs every teacher's logits")
        for x in logits:
            _check_teacher_logits(logits[0], x)
        temperature = self.values.temperature
        log_mix = mixture_log_probs(logits, [self.teacher_weights[n] for n in self.teacher_names],
                                    temperature=temperature, **self._loss_kwargs())
        # times T: the divergence divides the teacher's logits by T, giving back log m
        return [("mixture", 1.0, TeacherOutputs(logits=log_mix * temperature))]

    def _lm_term(self, student: ModelOutput, ce: torch.Tensor, labels: torch.Tensor,
                 counts: TokenCounts, output_weight: torch.Tensor | None,
                 fused: list[torch.Tensor], mtp_labels: torch.Tensor | None = None) -> torch.Tensor:
        heads = [_share(ce, counts.heads[0])]
        for j, weight in enumerate(self.mtp_weights, start=1):
            scale = self.values.lm_weight * weight / max(counts.heads[j], 1)
            ce_j = self._mtp_cross_entropy(student, j, head_targets(labels, mtp_labels, j),
                                           output_weight, scale, fused)
            heads.append(weight * _share(ce_j, counts.heads[j]))
        return self.values.lm_weight * torch.stack(heads).sum()

    def _loss_kwargs(self) -> dict:
        return dict(vocab_size=self.vocab_size, group=self.layout.tp_group)

    def _kd_kwargs(self) -> dict:
        logit = self.cfg.logit
        return dict(kind=logit.kind, temperature=self.values.temperature, beta=logit.beta,
                    skew=logit.skew, **self._loss_kwargs())

    def _full_kwargs(self) -> dict:
        """`_kd_kwargs` for the full-vocabulary losses, which also give the diagnostics."""
        return dict(self._kd_kwargs(), diagnostics=self.cfg.diagnostics)

    def _next_token(self, student: ModelOutput, teacher: TeacherOutputs | None,
                    labels: torch.Tensor | None, output_weight: torch.Tensor | None,
                    counts: TokenCounts, mask: torch.Tensor | None, fused: list[torch.Tensor],
                    weight: float = 1.0):
        """Per-token (cross-entropy or None, divergence or None, KDDiagnostics or None) of the
        next-token head (fused: detached, their weighted loss, the divergence's times `weight`,
        appended to `fused`). A top-k teacher gives no diagnostics."""
        if self.fused:
            return self._fused_next_token(student, teacher, labels, output_weight, counts, mask,
                                          fused, weight)
        logits = student.logits  # [batch, seq, padded_vocab/tp]
        if teacher is None:
            return cross_entropy(logits, labels, **self._loss_kwargs()), None, None
        if teacher.topk_values is not None:
            ce = None if labels is None else cross_entropy(logits, labels, **self._loss_kwargs())
            div = topk_divergence(logits, teacher.topk_values, teacher.topk_indices,
                                  teacher.logsumexp, **self._kd_kwargs())
            return ce, div, None
        _check_teacher_logits(logits, teacher.logits)
        if labels is None:
            out = divergence(logits, teacher.logits, **self._full_kwargs())
            return (None, *out) if self.cfg.diagnostics else (None, out, None)
        out = lm_and_divergence(logits, teacher.logits, labels, **self._full_kwargs())
        return out if self.cfg.diagnostics else (*out, None)

    def _fused_next_token(self, student: ModelOutput, teacher: TeacherOutputs | None,
                          labels: torch.Tensor | None, output_weight: torch.Tensor,
                          counts: TokenCounts, mask: torch.Tensor | None,
                          fused: list[torch.Tensor], weight: float = 1.0):
        hidden = student.head_hidden  # [batch, seq, hidden]
        lead = hidden.shape[:-1]
        kwargs = self._kd_kwargs() if teacher is not None else self._loss_kwargs()
        if teacher is not None:
            kwargs.update(teacher_logits=_flat(teacher.logits), teacher_hidden=_flat(
                teacher.head_hidden), teacher_weight_shard=teacher.output_weight,
                teacher_softcap=teacher.softcap,
                div_weight=_token_weights(weight * self.values.kd_scale / max(counts.distill, 1),
                                          mask, lead, hidden.device),
                diagnostics=self.cfg.diagnostics)
        if labels is not None:  # ignored labels get no weight inside
            kwargs.update(labels=labels.reshape(-1), ce_weight=_token_weights(
                self.values.lm_weight / max(counts.heads[0], 1), None, lead, hidden.device))
        out = self._fused_call(_flat(hidden), output_weight, kwargs, fused)
        diag = None if out.diag is None else KDDiagnostics(
            out.diag.teacher_entropy.reshape(lead), out.diag.student_entropy.reshape(lead),
            out.diag.top1_agreement.reshape(lead))
        return (*(None if x is None else x.detach().reshape(lead) for x in (out.ce, out.div)),
                diag)

    def _fused_call(self, hidden: torch.Tensor, output_weight: torch.Tensor, kwargs: dict,
                    fused: list[torch.Tensor]) -> FusedHeadLoss:
        out = fused_head_loss(hidden, output_weight, softcap=self.softcap, **kwargs)
        fused.append(out.loss)
        if out.path != self.fused_path:
            log.info("fused LM head: %s%s", out.path, "" if out.block_rows is None else
                     f" (row blocks of {out.block_rows} tokens)")
            self.fused_path = out.path
        return out

    def _mtp_cross_entropy(self, student: ModelOutput, head: int, labels: torch.Tensor,
                           output_weight: torch.Tensor | None, scale: float,
                           fused: list[torch.Tensor]) -> torch.Tensor:
        if self.fused:
            hidden = student.mtp_hidden[head - 1]  # [batch, seq, hidden]
            weights = _token_weights(scale, None, hidden.shape[:-1], hidden.device)
            out = self._fused_call(_flat(hidden), output_weight, dict(
                labels=labels.reshape(-1), ce_weight=weights, **self._loss_kwargs()), fused)
            return out.ce.detach()
        return cross_entropy(student.mtp_logits[head - 1], labels, **self._loss_kwargs())

    # ----------------------------------------------------------------------- activation term
    def activation_share(self, pairs: Sequence[ResolvedPair],
                         student_buffers: Mapping[str, ActivationBuffer],
                         teacher: Mapping[str, TeacherOutputs] | None,
                         mask: torch.Tensor | None, counts: TokenCounts) -> torch.Tensor | None:
        """The activation term's share from `pairs` (a subset of the run's, e.g. those of one
        pipeline stage: the shares of disjoint subsets add up to the term); None when off."""
        if not pairs or not teacher or not ever_positive(self.cfg.activation_coef):
            return None
        teacher = self._by_name(teacher)
        sums = []
        for name in dict.fromkeys(p.source for p in pairs):  # teachers in pair order
            everyone = [p for p in self._projected(self.pairs) if p.source == name]  # projected
            mine = [p for p in pairs if p.source == name]
            buffers = teacher[name].buffers
            missing = sorted({p.teacher for p in mine} - set(buffers))
            if missing:
                raise ValueError(f"teacher outputs lack activation buffer {missing[0]!r}: ask the "
                                 "teacher forward for objective.teacher_buffer_names()")
            # (none for a teacher with router pairs only)
            projections = {name: self.projection} if self.projections is None else \
                dict(self.projections.items())
            projection = projections.get(name)
            means = activation_pair_means(
                mine, student_buffers, buffers, token_mask=mask, num_tokens=counts.distill,
                projection=projection, group=self.layout.tp_group,
                pair_indices=[next(i for i, q in enumerate(everyone) if q is p)
                              for p in self._projected(mine)])
            weights = torch.tensor([p.weight for p in mine], dtype=means.dtype,
                                   device=means.device)
            sums.append((means * weights).sum())
        return self.values.activation_coef * torch.stack(sums).sum() / len(self.pairs)


def distill_mask(labels: torch.Tensor | None, kd_mask: torch.Tensor | None) -> torch.Tensor | None:
    """`[batch, seq]` True where the distillation terms count (None: everywhere)."""
    if kd_mask is not None:
        return kd_mask
    return None if labels is None else labels != IGNORE_INDEX


def _token_weights(scale: float, mask: torch.Tensor | None, shape: torch.Size,
                   device: torch.device) -> torch.Tensor:
    """[tokens] weights of a fused head call: `scale` where `mask` (None: everywhere), else 0."""
    weights = torch.full(shape, scale, dtype=torch.float64, device=device)  # cast inside
    return (weights if mask is None else weights * mask).reshape(-1)


def _flat(x: torch.Tensor | None) -> torch.Tensor | None:
    """[batch, seq, width] -> [tokens, width]."""
    return None if x is None else x.reshape(-1, x.shape[-1])


def _check_teacher_logits(student_logits: torch.Tensor,
                          teacher_logits: torch.Tensor | None) -> None:
    if teacher_logits is None:
        raise ValueError("teacher outputs have no logits (with distill.fused_lm_head off the "
                         "teacher forward must compute them)")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"teacher logits shard has {teacher_logits.shape[-1]} columns, the student's "
            f"{student_logits.shape[-1]}: build the teacher from "
            "distill.config.aligned_teacher_config(student, teacher) so both pad alike")
