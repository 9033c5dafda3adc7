"""Learned maps from the student's width to the teacher's, for activation pairs of different widths.

`ActivationProjection` holds one [teacher_width, student_width] weight per pair (`per_pair`) or one
for all pairs (`shared`), no bias. The weights are replicated over TP (`tp_split_dim = None`, like
norm weights) and initialized from (seed, name) alone, so every TP degree starts from the same
values. They live in the objective, not in the student: checkpoints of the trained module hold
them, a Hugging Face export of the student leaves them out.

Gradients under sequence parallelism: each rank projects only the tokens of its sequence shard, so
its gradient covers only those tokens. Like the model's replicated norm weights, each weight goes
through `sp_shared` (`copy_to_tp`: forward identity, backward all-reduce over TP) once per forward,
so right after `backward()` every rank holds the full TP=1 gradient; there is no step to finalize.
This relies on the model's contract that buffers are sequence-sharded exactly under SP.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.parallel import ParallelLayout
from layers.params import full_init, new_param
from layers.tensor_parallel import sp_shared


class ActivationProjection(nn.Module):
    """`forward([x_0, x_1, ...])`: pair i's x_i [..., student_width] -> [..., teacher_width]."""

    def __init__(self, *, pairs: int, shared: bool, student_width: int, teacher_width: int,
                 layout: ParallelLayout, seed: int = 0):
        super().__init__()
        self.layout, self.shared = layout, shared
        # Scale-preserving init: unit-variance inputs give unit-variance outputs.
        std = student_width ** -0.5
        self.weights = nn.ParameterList()
        for i in range(1 if shared else pairs):
            weight = new_param(teacher_width, student_width, tp_split_dim=None, init=std,
                               device=layout.device)
            with torch.no_grad():
                weight.copy_(full_init(std, tuple(weight.shape), seed=seed, name=f"projection.{i}"))
            self.weights.append(weight)

    def forward(self, hidden: list[torch.Tensor],
                pairs: list[int] | None = None) -> list[torch.Tensor]:
        """Project every pair's activation (`pairs`: the run's pair index of each, when they are
        some of them, e.g. one pipeline stage's); one TP all-reduce per weight in backward under
        SP."""
        pairs = list(range(len(hidden))) if pairs is None else pairs
        used = sorted({0 if self.shared else i for i in pairs})
        weights = {i: sp_shared(self.weights[i], self.layout) for i in used}
        out = []
        for i, x in zip(pairs, hidden):
            weight = weights[0 if self.shared else i]  # [teacher_width, student_width]
            out.append(x.to(weight.dtype) @ weight.t())
        return out
