"""The `distill:` section, the student->teacher layer mapping and the start-up compatibility checks.

The objective is

    loss = lm_weight * (CE_0 + sum_j mtp_weights[j] * CE_j)              labels, every head
         + logit.weight * T^2 * D(teacher || student)                    next-token head only
         + activation_coef * (1/P) * sum_p weight_p * loss_p(S_p, T_p)   P resolved pairs

each term a mean over the valid tokens of the global batch (see `distill.objective`). A weight of 0
turns a term off; so does a missing input at run time (no labels, no teacher). `lm_weight`,
`logit.weight`, `logit.temperature` and `activation_coef` may follow a schedule
(distill/schedules.py); a term whose weight is 0 at some steps only stays in the graph with
weight 0 there.

Activation pairs name buffers the model publishes (`layers.buffers.buffer_names`: `embedding`,
`decoder.{i}.mixer_output`, `decoder.{i}.mlp_output`, `decoder.{i}.output`, `final_hidden`,
`mtp.{j}.*`), or use a shortcut that pairs every
student layer with a teacher layer: `all_mixers`, `all_mlps`, `all_outputs`. Student layer i maps
to teacher layer floor((i + 1) * Lt / Ls) - 1, which is the identity when the depths match and
spreads the student uniformly over a deeper teacher, always ending on the last layer.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from distill.kinds import DivergenceArgumentError, Kind, check_divergence_args
from distill.schedules import (
    AdaptiveTemperatureConfig,
    ScheduleConfig,
    Scheduled,
    check_scheduled,
    ever_positive,
    scheduled_ends,
)
from engine.config import ConfigError, check
from layers.buffers import (
    BLOCK_BUFFERS,
    ROUTER_LOGITS,
    block_buffer,
    block_name,
    buffer_names,
    parse_block_buffer,
)
from layers.config import ModelConfig, check_model_layout

SHORTCUTS = {"all_mixers": "mixer_output", "all_mlps": "mlp_output", "all_outputs": "output"}


@dataclass(frozen=True)
class LogitKDConfig:
    """Distillation of the next-token distribution."""

    kind: Kind = "forward_kl"  # divergence between teacher and student (distill/kinds.py)
    # softmax temperature of both distributions: a number or {start, end, schedule, steps}
    temperature: Scheduled = 1.0
    # weight of the term (0 turns logit distillation off): a number or {start, end, schedule, steps}
    weight: Scheduled = 1.0
    temperature_squared: bool = True  # times temperature**2, so gradients keep their size (Hinton)
    beta: float = 0.5  # jsd: weight of the teacher in the mixture, in (0, 1)
    skew: float = 0.1  # skew kinds: weight of the first distribution in the mixture, in (0, 1)
    # lower the temperature when the divergence stays below a threshold (distill/schedules.py)
    adaptive: AdaptiveTemperatureConfig = field(default_factory=AdaptiveTemperatureConfig)

    def __post_init__(self) -> None:
        for key, temperature in scheduled_ends(self.temperature, "temperature"):
            try:  # the ranges the losses themselves enforce (distill/kinds.py), at every step
                check_divergence_args(self.kind, temperature=temperature, beta=self.beta,
                                      skew=self.skew)
            except DivergenceArgumentError as err:
                raise ConfigError(key if err.argument == "temperature" else err.argument,
                                  err.message) from None
        check_scheduled(self.weight, "weight", lambda w: w >= 0, "must be >= 0")

    @property
    def on(self) -> bool:
        """Whether logit distillation is on at some step of the run."""
        return ever_positive(self.weight)

    @property
    def varying_temperature(self) -> bool:
        """Whether the temperature can change during the run (a schedule or the adaptive rule)."""
        return isinstance(self.temperature, ScheduleConfig) or self.adaptive.enabled


@dataclass(frozen=True)
class TeacherEntryConfig:
    """One teacher of `distill.teachers`."""

    checkpoint: str = ""  # teacher checkpoint directory (offline: optional, checks the export)
    weight: float = 1.0  # sum: weight of its divergence; mixture: its share (weights normalized)
    name: str = ""  # names its metrics (kd_loss/<name>) and its activation pairs
    offline_dir: str | None = None  # schedule offline: this teacher's export
    # cross_tokenizer: the paired tokenization this teacher reads, PREFIX.teacher-NAME
    # (tools/preprocess_data.py --teacher-tokenizer NAME=T.json); "" = the student's tokenizer
    tokenizer: str = ""

    def __post_init__(self) -> None:
        check(bool(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name or "")), "name",
              f"is required: letters, digits, '_', '.', '-' (got {self.name!r})")
        check(not self.tokenizer or bool(re.fullmatch(r"[A-Za-z0-9_.-]+", self.tokenizer)),
              "tokenizer", f"must be letters, digits, '_', '.', '-' (got {self.tokenizer!r})")
        check(self.weight >= 0, "weight", f"must be >= 0 (got {self.weight})")


SINGLE_TEACHER = "teacher"  # the name of the teacher given as `distill.teacher`
PAIR_LOSSES = ("mse", "l2", "cosine", "router")
ROUTER = "router"  # the pair loss between router distributions (no projection: widths are experts)


@dataclass(frozen=True)
class ActivationPairConfig:
    """One activation term: a student buffer against a teacher buffer (or a shortcut's pairs)."""

    student: str = ""  # student buffer name, or a shortcut: all_mixers | all_mlps | all_outputs
    teacher: str | None = None  # teacher buffer name; leave out with a shortcut
    # per element | L2 per token | 1 - cos per token | router: KL(teacher || student) of the router
    # distributions, softmax over experts (two decoder.{i}.router_logits, same expert count)
    loss: Literal["mse", "l2", "cosine", "router"] = "mse"
    weight: float = 1.0  # weight of this pair (of each pair of a shortcut)
    # with distill.teachers: the name of the teacher whose buffer this is (one teacher: optional)
    teacher_name: str | None = None

    def __post_init__(self) -> None:
        check(bool(self.student), "student", "is required (a buffer name or a shortcut)")
        check(self.loss in PAIR_LOSSES, "loss",
              f"must be one of {', '.join(map(repr, PAIR_LOSSES))} (got {self.loss!r})")
        check(self.weight >= 0, "weight", f"must be >= 0 (got {self.weight})")
        if self.student in SHORTCUTS:
            check(self.teacher in (None, self.student), "teacher",
                  f"must be left out with the shortcut {self.student!r} (got {self.teacher!r})")
        else:
            check(bool(self.teacher), "teacher", f"is required for student buffer {self.student!r}")
            check(self.teacher not in SHORTCUTS, "teacher",
                  f"shortcut {self.teacher!r} must be given as the student name")


@dataclass(frozen=True)
class OnPolicyConfig:
    """On-policy distillation: micro-batches the student continues itself (distill/on_policy.py)."""

    fraction: float = 0.0  # share of micro-batches whose tail the student generates (0: off)
    max_new_tokens: int = 16  # tokens the student generates per row; the row's head is the prompt
    temperature: float = 1.0  # the student's sampling temperature
    top_p: float = 1.0  # the student's sampling nucleus (1: the whole distribution)

    def __post_init__(self) -> None:
        check(0.0 <= self.fraction <= 1.0, "fraction", f"must be in [0, 1] (got {self.fraction})")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1 (got {self.max_new_tokens})")
        check(self.temperature > 0, "temperature", f"must be > 0 (got {self.temperature})")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1] (got {self.top_p})")

    @property
    def on(self) -> bool:
        return self.fraction > 0


@dataclass(frozen=True)
class CrossTokenizerConfig:
    """A teacher with another tokenizer: the logit term compares the two models on aligned chunks
    of text (distill/cross_tokenizer.py) instead of token by token; its weight and temperature
    are distill.logit's. Needs paired data (tools/preprocess_data.py --teacher-tokenizer)."""

    # none: the teacher shares the student's tokenizer | likelihood: per chunk, each model's
    # log-likelihood of the chunk's text, compared by `divergence` | mapped_kl: on chunks of one
    # token in both, logit.kind (forward_kl or reverse_kl) on the shared vocabulary + 1 bucket |
    # uld: on those chunks, L1 between both models' top uld_top_k probabilities sorted decreasing
    loss: Literal["none", "likelihood", "mapped_kl", "uld"] = "none"
    # likelihood: binary_kl (KL of the chunk probabilities as Bernoulli events) | log_ratio
    # (|teacher - student| chunk log-likelihood) | both (their sum)
    divergence: Literal["binary_kl", "log_ratio", "both"] = "binary_kl"
    teacher_seq_len: int = 0  # teacher tokens per window (0: 2 x data.seq_len); more are cut off
    uld_top_k: int = 64  # uld: probabilities compared per position (zero-padded past a vocabulary)

    def __post_init__(self) -> None:
        check(self.uld_top_k >= 1, "uld_top_k", f"must be >= 1 (got {self.uld_top_k})")
        check(self.teacher_seq_len >= 0, "teacher_seq_len",
              f"must be >= 0 (got {self.teacher_seq_len})")

    @property
    def on(self) -> bool:
        return self.loss != "none"

    def teacher_tokens(self, seq_len: int) -> int:
        """Teacher tokens per window for student windows of `seq_len` tokens."""
        return self.teacher_seq_len or 2 * seq_len


@dataclass(frozen=True)
class DistillConfig:
    """Loss terms, their weights, and where the teacher comes from."""

    # Where the teacher runs: on the student ranks, on its own ranks, or exported beforehand.
    schedule: Literal["colocated", "teacher_ranks", "offline"] = "colocated"
    prefetch: int = 2  # teacher_ranks: micro-batches the teacher may run ahead of the students
    # teacher_ranks: what crosses the wire per micro-batch: hidden (the teacher's final hidden
    # states; students form its logits from their shard of its output weight) | logits (logit
    # shards, the older protocol kept as the benchmark's baseline; needs teacher_tp == tp)
    teacher_stream: Literal["hidden", "logits"] = "hidden"
    teacher: str | None = None  # teacher checkpoint directory (colocated / teacher_ranks)
    # several teachers [{checkpoint, weight, name}] (offline: + offline_dir; cross_tokenizer: +
    # tokenizer); not with `teacher`
    teachers: tuple[TeacherEntryConfig, ...] = ()
    # several teachers: sum of weighted divergences | divergence to the weighted mixture
    teacher_mode: Literal["sum", "mixture"] = "sum"
    teacher_bf16: bool = False  # run the frozen teacher in bfloat16
    offline_dir: str | None = None  # offline: directory of the teacher store (top-k logits)
    offline_top_k: int = 0  # offline: the k the store must hold (0: whatever it holds)
    # weight of the LM (cross-entropy on labels) term: a number or {start, end, schedule, steps}
    lm_weight: Scheduled = 1.0
    mtp_weights: tuple[float, ...] = ()  # LM weight of each MTP head (times lm_weight); () = 1 each
    logit: LogitKDConfig = field(default_factory=LogitKDConfig)  # logit distillation
    activations: tuple[ActivationPairConfig | str, ...] = ()  # activation pairs or shortcut names
    # lambda, the scale of the mean of the activation terms: a number or {start, end, schedule,
    # steps}
    activation_coef: Scheduled = 1.0
    projection: Literal["none", "per_pair", "shared"] = "none"  # learned student->teacher width map
    fused_lm_head: bool = False  # LM head and losses fused: never materialize [tokens, vocab]
    # log teacher/student entropy and top-1 agreement (no extra collective; not with a top-k teacher)
    diagnostics: bool = True
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)  # student-generated batches
    # a teacher with another tokenizer (distill/cross_tokenizer.py)
    cross_tokenizer: CrossTokenizerConfig = field(default_factory=CrossTokenizerConfig)

    def __post_init__(self) -> None:
        check(self.prefetch >= 1, "prefetch", f"must be >= 1 (got {self.prefetch})")
        check_scheduled(self.lm_weight, "lm_weight", lambda w: w >= 0, "must be >= 0")
        check_scheduled(self.activation_coef, "activation_coef", lambda w: w >= 0, "must be >= 0")
        for i, w in enumerate(self.mtp_weights):
            check(w >= 0, f"mtp_weights[{i}]", f"must be >= 0 (got {w})")
        for i, entry in enumerate(self.activations):
            check(not isinstance(entry, str) or entry in SHORTCUTS, f"activations[{i}]",
                  f"unknown shortcut {entry!r} (use {', '.join(SHORTCUTS)} or a "
                  "{student, teacher} mapping)")
        check(self.lm_on or self.logit.on or bool(self.activations), "lm_weight",
              "every loss term is off (lm_weight, logit.weight and activations)")
        if self.schedule == "offline":
            self._check_offline()
        if self.on_policy.on:
            self._check_on_policy()
        if self.teachers:
            self._check_teachers()
        if self.cross_tokenizer.on:
            self._check_cross_tokenizer()

    def _check_cross_tokenizer(self) -> None:
        key = "cross_tokenizer.loss"
        check(self.schedule != "offline" or self.cross_tokenizer.loss != "mapped_kl", key,
              "mapped_kl needs schedule colocated or teacher_ranks (it forms the teacher's "
              "logits from its output layer; offline stores hold likelihood and uld statistics)")
        check(self.schedule != "teacher_ranks" or self.teacher_stream == "hidden",
              "teacher_stream", "must be hidden with cross_tokenizer (teacher ranks stream the "
              "teacher's chunk statistics, never its logits)")
        check(self.logit.on, key, "needs logit.weight > 0 (the weight of the chunk term)")
        if self.teachers:
            self._check_cross_teachers()
        check(not self.fused_lm_head, key, "needs logits (fused_lm_head false)")
        check(not self.on_policy.on, key, "does not combine with on_policy yet")
        check(not self.logit.varying_temperature, "logit.temperature",
              "must be a constant with cross_tokenizer")
        check(self.cross_tokenizer.loss != "mapped_kl" or
              self.logit.kind in ("forward_kl", "reverse_kl"), "logit.kind",
              f"must be forward_kl or reverse_kl with cross_tokenizer mapped_kl "
              f"(got {self.logit.kind})")

    def _check_cross_teachers(self) -> None:
        """Several teachers with their own tokenizers: each names its paired tokenization."""
        for i, entry in enumerate(self.teachers):
            check(bool(entry.tokenizer), f"teachers[{i}].tokenizer",
                  "is required with cross_tokenizer: the paired tokenization this teacher reads "
                  "(tools/preprocess_data.py --teacher-tokenizer NAME=T.json; a teacher with the "
                  "student's tokenizer beside them is not supported yet)")
        check(self.teacher_mode == "sum", "teacher_mode",
              "mixture has no meaning across vocabularies: use sum with cross_tokenizer")
        check(self.schedule == "colocated", "schedule", "several teachers with cross_tokenizer "
                                                        "run colocated (offline: not yet)")
        check(not self.activations, "activations", "with distill.teachers and cross_tokenizer: "
                                                   "not yet (activation pairs need distill.teacher)")

    def _check_teachers(self) -> None:
        check(self.teacher is None, "teachers", "give distill.teacher or distill.teachers, not both")
        names = [t.name for t in self.teachers]
        for i, name in enumerate(names):
            check(name not in names[:i], f"teachers[{i}].name", f"{name!r} is used twice")
        check(sum(t.weight for t in self.teachers) > 0, "teachers", "every weight is 0")
        # Teacher ranks stream one model's outputs; several teachers run colocated or offline.
        check(self.schedule != "teacher_ranks", "teachers",
              "several teachers need schedule colocated or offline (teacher_ranks serve one "
              "teacher)")
        for i, entry in enumerate(self.teachers):
            if self.schedule == "offline":
                check(bool(entry.offline_dir), f"teachers[{i}].offline_dir",
                      "is required with schedule offline (each teacher's export)")
            else:
                check(bool(entry.checkpoint), f"teachers[{i}].checkpoint", "is required")
        for i, entry in enumerate(self.teachers):
            check(not entry.tokenizer or self.cross_tokenizer.on, f"teachers[{i}].tokenizer",
                  f"{entry.tokenizer!r} needs distill.cross_tokenizer.loss (a teacher with "
                  "another tokenizer); leave it empty for the student's tokenizer")
        check(self.schedule != "offline" or self.teacher_mode == "sum", "teacher_mode",
              "mixture needs every teacher's full distribution: not with top-k exports "
              "(schedule offline)")
        for i, entry in enumerate(self.pair_configs):
            check(len(self.teachers) == 1 or entry.teacher_name is not None,
                  f"activations[{i}].teacher_name", "is required with several teachers")
            check(entry.teacher_name in (None, *names), f"activations[{i}].teacher_name",
                  f"{entry.teacher_name!r} is none of distill.teachers ({', '.join(names)})")

    @property
    def teacher_entries(self) -> tuple[TeacherEntryConfig, ...]:
        """Every teacher, `distill.teacher` spelled as one entry named SINGLE_TEACHER (weight 1);
        () without a teacher checkpoint."""
        if self.teachers:
            return self.teachers
        return (TeacherEntryConfig(checkpoint=self.teacher, name=SINGLE_TEACHER),) \
            if self.teacher else ()

    @property
    def paired_tokenizers(self) -> tuple[str, ...]:
        """The paired teacher tokenizations the run reads (engine/data/paired.py): ("",) the
        unnamed one of distill.teacher, each of distill.teachers' `tokenizer`, () without
        cross_tokenizer."""
        if not self.cross_tokenizer.on:
            return ()
        return tuple(dict.fromkeys(e.tokenizer for e in self.teachers)) or ("",)

    @property
    def several_teachers(self) -> bool:
        return len(self.teachers) > 1

    def _check_on_policy(self) -> None:
        # The teacher must score the student's fresh samples: an offline export cannot (teacher
        # ranks receive them from the students).
        check(self.schedule != "offline", "on_policy.fraction",
              f"needs schedule colocated or teacher_ranks (got {self.schedule})")
        check(self.logit.on or bool(self.activations), "on_policy.fraction",
              "needs a distillation term (logit.weight > 0 or activations): on-policy "
              "micro-batches have no LM loss")

    def _check_offline(self) -> None:
        check(self.offline_top_k >= 0, "offline_top_k", f"must be >= 0 (got {self.offline_top_k})")
        if self.teachers:
            check(not self.offline_dir, "offline_dir",
                  "give each teacher's export as distill.teachers[i].offline_dir")
        else:
            check(bool(self.offline_dir), "offline_dir", "is required with schedule offline")
        check(not self.activations, "activations",
              "the offline schedule stores teacher logits only; activation terms need a live "
              "teacher")
        check(not self.fused_lm_head, "fused_lm_head",
              "is not supported with schedule offline (top-k distillation needs student logits)")
        check(not self.logit.varying_temperature, "logit.temperature",
              "must be a constant with schedule offline: the export holds the teacher's "
              "log-normalizer at one temperature (a schedule or logit.adaptive needs a live "
              "teacher)")

    @property
    def pair_configs(self) -> tuple[ActivationPairConfig, ...]:
        """`activations` with bare shortcut names spelled out as pairs (loss mse, weight 1)."""
        return tuple(ActivationPairConfig(student=e) if isinstance(e, str) else e
                     for e in self.activations)

    @property
    def lm_on(self) -> bool:
        """Whether the LM term is on at some step of the run."""
        return ever_positive(self.lm_weight)

    @property
    def needs_teacher(self) -> bool:
        """Whether a teacher *model* must run (logit or activation terms, not offline)."""
        return self.schedule != "offline" and (self.logit.on or bool(self.activations))


@dataclass(frozen=True)
class ResolvedPair:
    """One activation term after shortcuts are expanded: concrete buffer names."""

    student: str  # student buffer name
    teacher: str  # teacher buffer name
    loss: str  # mse | l2 | cosine | router
    weight: float  # weight of this pair inside the activation mean
    source: str = SINGLE_TEACHER  # the name of the teacher the buffer belongs to


def teacher_layer(i: int, student_layers: int, teacher_layers: int) -> int:
    """The teacher layer paired with student layer `i`: floor((i + 1) * Lt / Ls) - 1."""
    return (i + 1) * teacher_layers // student_layers - 1


def _check_buffer(name: str, model: ModelConfig, key: str, side: str) -> None:
    moe_layers = [i for i in range(model.layers) if model.is_moe_layer(i)]
    if name in buffer_names(model.layers, model.mtp_heads, moe_layers):
        return
    parsed = parse_block_buffer(name)
    if parsed and parsed[2] == ROUTER_LOGITS:
        raise ConfigError(key, f"{side} buffer {name!r}: block {parsed[1]} of the {side} is not a "
                               "mixture of experts (model.moe, model.moe_layers)")
    parsed = parse_block_buffer(name)
    if parsed and parsed[2] in BLOCK_BUFFERS:
        trunk, index, _ = parsed
        if trunk == "decoder":
            where = f"layer {index}, but the {side} has {model.layers} layers " \
                    f"(0..{model.layers - 1})"
        else:
            where = f"MTP head {index}, but the {side} has {model.mtp_heads} (1..)"
        raise ConfigError(key, f"{side} buffer {name!r} names {where}")
    raise ConfigError(key, f"unknown {side} buffer {name!r} (buffers are embedding, "
                           f"decoder.{{i}}.{{{'|'.join(BLOCK_BUFFERS)}}}, final_hidden and "
                           "mtp.{j}.*)")


def _expand_shortcut(entry: ActivationPairConfig, student_layers: int, teacher_layers: int,
                     key: str, source: str) -> list[ResolvedPair]:
    check(teacher_layers >= student_layers, key,
          f"shortcut {entry.student!r} needs a teacher at least as deep as the student "
          f"(student {student_layers} layers, teacher {teacher_layers})")
    kind = SHORTCUTS[entry.student]
    return [ResolvedPair(block_buffer(block_name(i), kind),
                         block_buffer(block_name(teacher_layer(i, student_layers, teacher_layers)),
                                      kind),
                         entry.loss, entry.weight, source) for i in range(student_layers)]


def resolve_pairs(cfg: DistillConfig, student: ModelConfig,
                  teacher: ModelConfig | Mapping[str, ModelConfig]) -> list[ResolvedPair]:
    """The concrete (student buffer, teacher buffer) pairs, in config order; names are checked.
    `teacher`: the teacher's config, or each teacher's by name (one teacher: a pair needs no
    name)."""
    teachers = named_teachers(cfg, teacher)
    pairs: list[ResolvedPair] = []
    for i, entry in enumerate(cfg.pair_configs):
        key = f"distill.activations[{i}]"
        source = entry.teacher_name or next(iter(teachers))
        teacher = teachers[source]
        if entry.student in SHORTCUTS:
            pairs += _expand_shortcut(entry, student.layers, teacher.layers, key, source)
            continue
        _check_buffer(entry.student, student, f"{key}.student", "student")
        _check_buffer(entry.teacher, teacher, f"{key}.teacher", "teacher")
        if entry.loss == ROUTER:
            _check_router_pair(entry, student, teacher, key)
        pairs.append(ResolvedPair(entry.student, entry.teacher, entry.loss, entry.weight, source))
    return pairs


def _check_router_pair(entry: ActivationPairConfig, student: ModelConfig, teacher: ModelConfig,
                       key: str) -> None:
    """A `router` pair compares two router distributions over the same experts."""
    for name, side in ((entry.student, "student"), (entry.teacher, "teacher")):
        parsed = parse_block_buffer(name)
        check(parsed is not None and parsed[2] == ROUTER_LOGITS, f"{key}.loss",
              f"router compares router distributions: the {side} buffer must be a "
              f"decoder.{{i}}.router_logits (got {name!r})")
    check(student.moe.experts == teacher.moe.experts, f"{key}.loss",
          f"router needs the same expert count (student {student.moe.experts}, teacher "
          f"{teacher.moe.experts})")


def aligned_teacher_config(student: ModelConfig, teacher: ModelConfig) -> ModelConfig:
    """The teacher's config padded like the student, so both logits shards cover the same columns.

    Padding is a layout choice, not part of a checkpoint (full state dicts are unpadded), so a
    teacher built from this config loads the same weights and computes the same function.
    """
    if teacher.vocab_pad_multiple == student.vocab_pad_multiple:
        return teacher
    return dataclasses.replace(teacher, vocab_pad_multiple=student.vocab_pad_multiple)


def teacher_key(cfg: DistillConfig, name: str) -> str:
    """The config key of teacher `name`'s checkpoint, for error messages."""
    names = [t.name for t in cfg.teachers]
    return f"distill.teachers[{names.index(name)}].checkpoint" if name in names \
        else "distill.teacher"


def named_teachers(cfg: DistillConfig, teacher: ModelConfig | Mapping[str, ModelConfig] | None,
                   ) -> dict[str, ModelConfig]:
    """Teacher configs by name: a bare ModelConfig is the one teacher (named by its entry, else
    SINGLE_TEACHER); None gives {}."""
    if teacher is None:
        return {}
    if isinstance(teacher, ModelConfig):
        entries = cfg.teacher_entries
        return {entries[0].name if len(entries) == 1 else SINGLE_TEACHER: teacher}
    return dict(teacher)


def check_compatibility(cfg: DistillConfig, student: ModelConfig,
                        teacher: ModelConfig | Mapping[str, ModelConfig] | None,
                        tp: int) -> list[ResolvedPair]:
    """Every start-up check between the distill section and the models; returns the pairs.

    `teacher` is the teacher's config, or with several teachers a mapping of name to config.
    Raises `ConfigError` for: MTP weights that do not match the student's heads, a missing teacher,
    a teacher that does not split over `tp` (the TP degree the teacher runs at), a different real
    vocabulary, unknown buffer names, and different widths without a projection.
    """
    check(not cfg.mtp_weights or len(cfg.mtp_weights) == student.mtp_heads, "distill.mtp_weights",
          f"has {len(cfg.mtp_weights)} entries for model.mtp_heads={student.mtp_heads}")
    teachers = named_teachers(cfg, teacher)
    if not teachers:
        check(not cfg.needs_teacher, "distill.teacher",
              "logit or activation distillation needs a teacher model")
        return []
    for name, model in teachers.items():
        _check_teacher_model(teacher_key(cfg, name), model, student, tp, cfg)
    pairs = resolve_pairs(cfg, student, teachers)
    for pair in pairs:
        if pair.loss == ROUTER:
            continue  # [.., experts] on both sides
        width = teachers[pair.source].hidden
        check(cfg.projection != "none" or student.hidden == width,
              "distill.projection", f"the student is {student.hidden} wide and the teacher "
                                    f"{width}: activation pairs need per_pair or shared")
    return pairs


def _check_teacher_model(key: str, teacher: ModelConfig, student: ModelConfig, tp: int,
                         cfg: DistillConfig) -> None:
    try:
        check_model_layout(teacher, tp)
    except ConfigError as err:
        raise ConfigError(f"{key}({err.key})", err.message) from None
    if cfg.cross_tokenizer.on:
        return  # another tokenizer: the paired data, not the vocabularies, must agree
    check(teacher.vocab_size == student.vocab_size, key,
          f"the teacher's vocabulary has {teacher.vocab_size} tokens and the student's "
          f"{student.vocab_size}: distillation needs the same tokenizer (only padding may differ)")
