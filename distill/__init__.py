"""Losses and objectives: vocab-parallel divergences, activation losses, teacher plumbing."""

from distill.divergence import (
                                KINDS,
                                KDDiagnostics,
                                cross_entropy,
                                divergence,
                                lm_and_divergence,
                                topk_divergence,
)
from distill.fused import fused_lm_and_divergence

__all__ = ["KDDiagnostics", "KINDS", "cross_entropy", "divergence", "fused_lm_and_divergence",
           "lm_and_divergence", "topk_divergence"]
