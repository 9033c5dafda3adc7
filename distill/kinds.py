"""The divergence kinds and the ranges of their parameters.

The one place both the `distill.logit` config section and the loss functions (`divergence`,
`lm_and_divergence`, `topk_divergence`, the fused head) check them, so a setting the config accepts
never fails later inside a loss.
"""

from __future__ import annotations

from typing import Literal

KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
# Kinds finished from one round of statistics (the others need the global normalizers first).
ONE_PASS_KINDS = ("forward_kl", "reverse_kl")
Kind = Literal[KINDS]


class DivergenceArgumentError(ValueError):
    """A divergence argument outside its range; `argument` names it (kind, temperature, beta, skew)."""

    def __init__(self, argument: str, message: str):
        self.argument, self.message = argument, message
        super().__init__(f"{argument} {message}")


def check_divergence_args(kind: str, *, temperature: float, beta: float, skew: float) -> None:
    """Raise `DivergenceArgumentError` for a kind or a parameter the kind cannot use.

    beta (jsd's weight of the teacher in the mixture) and skew (the skew kinds' weight of the first
    distribution) must lie strictly inside (0, 1): at either end the mixture equals one of the two
    distributions and the divergence degenerates (0, or a KL with infinite support gaps).
    """
    if kind not in KINDS:
        raise DivergenceArgumentError("kind", f"must be one of {', '.join(KINDS)} (got {kind!r})")
    if not temperature > 0:
        raise DivergenceArgumentError("temperature", f"must be > 0 (got {temperature})")
    if kind == "jsd" and not 0 < beta < 1:
        raise DivergenceArgumentError("beta", f"must be in (0, 1) for jsd (got {beta})")
    if kind.startswith("skew_") and not 0 < skew < 1:
        raise DivergenceArgumentError("skew", f"must be in (0, 1) for {kind} (got {skew})")
