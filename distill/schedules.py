"""Values that change over training: the temperature and the weights of the loss terms.

`distill.logit.temperature`, `distill.logit.weight`, `distill.lm_weight` and
`distill.activation_coef` each take a number (constant) or a `ScheduleConfig`
`{start, end, schedule: linear|cosine|step, steps}`: at step s (0-based, the optimizer step being
trained) with progress x = min(s / steps, 1),

    linear   start + (end - start) * x
    cosine   end + (start - end) * (1 + cos(pi * x)) / 2
    step     start before step `steps`, end from it on

so every value a schedule produces lies between `start` and `end`, and a range check of both ends
(done in the config, before any process starts) covers the whole run.

The adaptive temperature rule (`distill.logit.adaptive`, off unless `patience` > 0) multiplies the
scheduled temperature by a factor that starts at 1: after each step, when the step's mean
divergence (nats/token, before the term's weight and T^2) has stayed below `threshold` for
`patience` consecutive steps, the factor is multiplied by `factor`, unless that would take the
temperature in force below `min_temperature`; the count then restarts. The factor and the count are
run state (`Schedules.state_dict`, checkpointed with the trainer's `RunState`), so a resumed run
continues with the same temperature. The values in force are logged every step
(`StepValues.metrics`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from engine.config import check
from engine.log import get_logger

if TYPE_CHECKING:
    from distill.config import DistillConfig

log = get_logger(__name__)


@dataclass(frozen=True)
class ScheduleConfig:
    """A value that moves from `start` to `end` over the first `steps` optimizer steps."""

    start: float = 1.0  # value at step 0
    end: float = 1.0  # value from step `steps` on
    schedule: Literal["linear", "cosine", "step"] = "linear"  # shape of the change
    steps: int = 1  # linear/cosine: length of the ramp; step: the step from which `end` holds

    def __post_init__(self) -> None:  # start and end are finite: engine/config.py checks every float
        check(self.steps >= 1, "steps", f"must be >= 1 (got {self.steps})")

    def at(self, step: int) -> float:
        if self.schedule == "step":
            return self.start if step < self.steps else self.end
        x = min(step / self.steps, 1.0)
        if self.schedule == "linear":
            return self.start + (self.end - self.start) * x
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * x))


Scheduled = float | ScheduleConfig  # a config field that is a constant or a schedule


def value_at(value: Scheduled, step: int) -> float:
    return value.at(step) if isinstance(value, ScheduleConfig) else value


def value_range(value: Scheduled) -> tuple[float, float]:
    """(lowest, highest) value a constant or a schedule takes during a run."""
    if isinstance(value, ScheduleConfig):
        return min(value.start, value.end), max(value.start, value.end)
    return value, value


def ever_positive(value: Scheduled) -> bool:
    """Whether the term weighted by `value` is on at some step (its graph is built every step)."""
    return value_range(value)[1] > 0


def scheduled_ends(value: Scheduled, key: str) -> list[tuple[str, float]]:
    """(config key, value) of each end of a schedule, or of the constant: every value of a run
    lies between them."""
    if isinstance(value, ScheduleConfig):
        return [(f"{key}.start", value.start), (f"{key}.end", value.end)]
    return [(key, value)]


def check_scheduled(value: Scheduled, key: str, ok, requirement: str) -> None:
    """ConfigError unless `ok(x)` holds for every value of the run (both ends of a schedule)."""
    for end_key, x in scheduled_ends(value, key):
        check(ok(x), end_key, f"{requirement} (got {x})")


@dataclass(frozen=True)
class AdaptiveTemperatureConfig:
    """Lower the temperature when the divergence stays small (see distill/schedules.py)."""

    patience: int = 0  # steps the mean divergence must stay below threshold (0: rule off)
    threshold: float = 0.05  # mean divergence (nats/token, before weight and T^2) counted as small
    factor: float = 0.5  # the temperature's multiplier each time the rule fires, in (0, 1)
    min_temperature: float = 1.0  # the rule never takes the temperature below this (> 0)

    def __post_init__(self) -> None:
        check(self.patience >= 0, "patience", f"must be >= 0 (got {self.patience})")
        check(self.threshold > 0, "threshold", f"must be > 0 (got {self.threshold})")
        check(0 < self.factor < 1, "factor", f"must be in (0, 1) (got {self.factor})")
        check(self.min_temperature > 0, "min_temperature",
              f"must be > 0 (got {self.min_temperature})")

    @property
    def enabled(self) -> bool:
        return self.patience > 0


@dataclass(frozen=True)
class StepValues:
    """The scheduled values in force during one optimizer step."""

    temperature: float = 1.0
    logit_weight: float = 1.0
    lm_weight: float = 1.0
    activation_coef: float = 1.0
    temperature_squared: bool = True  # the logit term is scaled by T^2 (distill.logit)

    @property
    def kd_scale(self) -> float:
        """The factor in front of the mean divergence: weight, times T^2 when configured."""
        return self.logit_weight * (self.temperature ** 2 if self.temperature_squared else 1.0)

    def metrics(self) -> dict[str, float]:
        return {"temperature": self.temperature, "logit_weight": self.logit_weight,
                "lm_weight": self.lm_weight, "activation_coef": self.activation_coef}


class Schedules:
    """The values of each step for a run's `distill` section, and the adaptive rule's state."""

    def __init__(self, cfg: DistillConfig):
        self.cfg = cfg
        self.adaptive = cfg.logit.adaptive
        self.factor = 1.0  # the adaptive rule's multiplier of the scheduled temperature
        self.below = 0  # consecutive steps with the divergence under the threshold

    def at(self, step: int) -> StepValues:
        cfg = self.cfg
        return StepValues(temperature=value_at(cfg.logit.temperature, step) * self.factor,
                          logit_weight=value_at(cfg.logit.weight, step),
                          lm_weight=value_at(cfg.lm_weight, step),
                          activation_coef=value_at(cfg.activation_coef, step),
                          temperature_squared=cfg.logit.temperature_squared)

    def observe(self, step: int, divergence: float) -> bool:
        """After step `step`: feed its mean divergence to the adaptive rule; True if it fired
        (the next step runs at the lowered temperature)."""
        rule = self.adaptive
        if not rule.enabled:
            return False
        self.below = self.below + 1 if divergence < rule.threshold else 0
        if self.below < rule.patience:
            return False
        self.below = 0
        lowered = value_at(self.cfg.logit.temperature, step + 1) * self.factor * rule.factor
        if lowered < rule.min_temperature:
            return False
        self.factor *= rule.factor
        log.info("adaptive temperature: mean divergence below %g for %d steps; temperature "
                 "%g from step %d", rule.threshold, rule.patience, lowered, step + 2)
        return True

    def state_dict(self) -> dict:
        return {"temperature_factor": self.factor, "steps_below_threshold": self.below}

    def load_state_dict(self, state: dict) -> None:
        self.factor = float(state.get("temperature_factor", 1.0))
        self.below = int(state.get("steps_below_threshold", 0))
