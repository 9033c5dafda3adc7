"""On-policy distillation: micro-batches whose tail the current student writes itself.

    distill.on_policy: {fraction, max_new_tokens, temperature, top_p}

Which micro-batches. Micro-batch i of step s has the global index g = s * per_step + i (per_step:
a step's micro-batches on one DP rank); it is on-policy when floor((g + 1) * fraction) >
floor(g * fraction). That is exactly `fraction` of the micro-batches over any stretch of the run,
spread evenly, the same on every rank, and no random draw. Students and teacher ranks both ask
`on_policy_at`, so they agree on the choice.

What they hold. Of a data micro-batch `[micro_batch, seq_len]`, the first
P = seq_len - max_new_tokens tokens of each row are the prompt; the student continues each row by
`max_new_tokens` tokens sampled at `temperature` within the `top_p` nucleus (layers/decode.py: no
grad, eval mode, its own TP layout without SP, KV-cached), from a generator seeded by
(train.seed, step, i, DP rank), so a run and its resumption draw the same tokens, at any TP. No
end-of-sequence stop: the corpus packs documents across end-of-document tokens, so generating past
one stays in distribution. The micro-batch keeps its shape (SP splits it as before) and becomes

    input_ids  prompt + continuation
    labels     IGNORE_INDEX everywhere: no LM loss on generated tokens, and no loss on the prompt
    kd_mask    True at positions P-1 .. seq_len-2, whose next-token distributions produced the
               generated tokens: the logit (and activation) terms count these positions only

The teacher then scores prompt + continuation like any micro-batch: a colocated teacher directly,
teacher ranks once the students have sent them the samples (distill/teacher_wire.py). The
objective's divergence (any `distill.logit.kind`; reverse KL is the usual on-policy choice) is
taken over `kd_mask` (distill/objective.py). An offline export cannot score fresh samples, so
on-policy distillation needs `distill.schedule` colocated or teacher_ranks.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from distill.config import OnPolicyConfig
from engine.data import IGNORE_INDEX
from engine.parallel import ParallelLayout
from layers.decode import Sampling, generate
from layers.model import TransformerLM


def is_on_policy(index: int, fraction: float) -> bool:
    """Whether global micro-batch `index` is student-generated (see the module docstring)."""
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


def on_policy_at(step: int, micro_batch: int, *, per_step: int, fraction: float) -> bool:
    """Whether micro-batch `micro_batch` of `step` (counted from the step's first; it may run
    past the step) is student-generated, with `per_step` micro-batches a step on each DP rank."""
    return is_on_policy(step * per_step + micro_batch, fraction)


class OnPolicy:
    """Turns a step's chosen micro-batches into student continuations of their prompts."""

    def __init__(self, cfg: OnPolicyConfig, student: TransformerLM, layout: ParallelLayout, *,
                 seed: int):
        self.cfg, self.student, self.layout, self.seed = cfg, student, layout, seed
        self.sampling = Sampling(temperature=cfg.temperature,
                                 top_p=cfg.top_p if cfg.top_p < 1 else None)

    def __call__(self, micro_batches: list[dict[str, torch.Tensor]],
                 step: int) -> list[dict[str, torch.Tensor]]:
        per_step = len(micro_batches)
        return [self.continued(mb, step=step, index=i)
                if on_policy_at(step, i, per_step=per_step, fraction=self.cfg.fraction) else mb
                for i, mb in enumerate(micro_batches)]

    def generator(self, step: int, index: int) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, step, index, self.layout.dp_rank])
        return torch.Generator(device=self.layout.device).manual_seed(
            int(state.generate_state(1)[0]))

    def continued(self, micro_batch: dict[str, torch.Tensor], *, step: int,
                  index: int) -> dict[str, torch.Tensor]:
        """The micro-batch with its rows' tails replaced by the student's samples."""
        input_ids = micro_batch["input_ids"]  # [batch, seq]
        seq, new = input_ids.shape[1], self.cfg.max_new_tokens
        prompt = input_ids[:, :seq - new]
        out = generate(self.student, prompt, max_new_tokens=new, sampling=self.sampling,
                       generator=self.generator(step, index))
        kd_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        kd_mask[:, seq - new - 1:seq - 1] = True
        return {"input_ids": torch.cat([prompt, out.tokens.to(prompt.device)], dim=1),
                "labels": torch.full_like(input_ids, IGNORE_INDEX), "kd_mask": kd_mask}
