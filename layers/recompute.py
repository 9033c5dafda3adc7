"""Activation recomputation (`train.recompute`): keep a region's inputs, recompute the rest in the
backward.

Modes: `none`; `selective` recomputes the attention core (RoPE, scores, softmax, dropout,
probabilities times values) and keeps the q/k/v projections' outputs; `full` recomputes each decoder
block (trunk and MTP heads) and keeps only its input. Recomputation only happens when autograd
records (a teacher forward or an evaluation under `no_grad` keeps nothing and recomputes nothing).

Why `torch.utils.checkpoint(use_reentrant=False)` rather than an `autograd.Function` of our own:
the region's forward builds the ordinary autograd graph and only the tensors its ops save for the
backward are replaced by handles, re-created by re-running the region when the backward first needs
one of them. So every output of a region (a block's residual output *and* the named activation
buffers it returns, layers/buffers.py) is a real node of that graph: a distillation loss on
`decoder.{i}.mixer_output` reaches the block's weights through the same graph as without
recomputation, and the gradient sums happen in the same order, which keeps `selective` and `full`
bitwise equal to `none` on CPU. A reentrant Function would run a second, private backward inside
its own, re-ordering those sums, and would have to route every buffer's gradient through it by hand.

Tensor-parallel collectives inside a region (the all-gather entering TP under SP, the all-reduce or
reduce-scatter leaving it) run again in the recomputation, during the backward. Every rank of a TP
group has the same graph and walks it in the same order, so all of them recompute the same region at
the same point of their backward and the recomputed collectives pair up as the forward's did; the
recomputation stops after the last saved tensor it needs, at the same op on every rank. The
backward collectives are those of the graph built in the forward, untouched.

Randomness: the model draws dropout masks only from `DropoutRNG`'s streams (layers/rng.py). The
streams' state is snapshotted when a region starts; the recomputation runs with the streams rewound
to that snapshot (the same masks), and afterwards they continue where the forward left them.
torch's own stashing of the default generators (`preserve_rng_state`) is off: nothing inside a
region draws from them outside `DropoutRNG.fork`, which swaps the stream's state in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Literal, TypeVar

import torch
from torch.utils.checkpoint import checkpoint

from layers.rng import DropoutRNG

Recompute = Literal["none", "selective", "full"]
RECOMPUTE_MODES: tuple[str, ...] = ("none", "selective", "full")

T = TypeVar("T")


def recomputed(fn: Callable[..., T], *args, rng: DropoutRNG) -> T:
    """`fn(*args)`, keeping only `args` for the backward and re-running `fn` there (see above)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    snapshot = rng.snapshot()
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False,
                      context_fn=lambda: (contextlib.nullcontext(), rng.replay(snapshot)))
