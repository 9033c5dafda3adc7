"""Dropout randomness that matches the sharding: same masks where tensors are replicated over TP,
different masks where they are sharded.

`DropoutRNG` keeps two generator states and swaps one of them into the device's default generator
for the duration of a `fork(...)` block (so ops without a `generator=` argument, such as
`scaled_dot_product_attention`'s dropout, draw from it):

- `REPLICATED`, seeded by (seed, dp_rank): identical on every rank of a TP group, for tensors every
  TP rank holds in full (the residual stream without SP);
- `SHARDED`, seeded by (seed, dp_rank, tp_rank): different on every TP rank, for tensors split over
  TP (attention heads; the residual stream under SP, which is split along the sequence).

Data-parallel ranks see different data and draw different masks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from engine.parallel import ParallelLayout
from layers.params import name_seed

REPLICATED = "replicated"
SHARDED = "sharded"


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return torch.default_generator


class DropoutRNG:
    """The two dropout streams of one rank (see the module docstring)."""

    def __init__(self, seed: int, layout: ParallelLayout):
        self.device = layout.device
        seeds = {REPLICATED: name_seed(seed, f"dropout/dp{layout.dp_rank}"),
                 SHARDED: name_seed(seed, f"dropout/dp{layout.dp_rank}/tp{layout.tp_rank}")}
        # a model built on the meta device (shapes only, tools/plan.py) never draws: CPU streams
        device = "cpu" if self.device.type == "meta" else self.device
        self._states = {stream: torch.Generator(device=device).manual_seed(s).get_state()
                        for stream, s in seeds.items()}

    @contextlib.contextmanager
    def fork(self, stream: str) -> Iterator[None]:
        """Inside the block the device's default generator draws from `stream`; it advances."""
        generator = _default_generator(self.device)
        outer = generator.get_state()
        generator.set_state(self._states[stream])
        try:
            yield
        finally:
            self._states[stream] = generator.get_state()
            generator.set_state(outer)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Where both streams are now, for `replay` (the states are never modified in place)."""
        return dict(self._states)

    @contextlib.contextmanager
    def replay(self, snapshot: dict[str, torch.Tensor]) -> Iterator[None]:
        """Inside the block the streams restart from `snapshot` (a recomputation draws the same
        masks as the forward did); after it they continue from where they were before the block."""
        current = self._states
        self._states = dict(snapshot)
        try:
            yield
        finally:
            self._states = current

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Both streams' generator states (per rank), for an exactly resumable checkpoint."""
        return {stream: state.clone() for stream, state in self._states.items()}

    def load_state_dict(self, states: dict[str, torch.Tensor]) -> None:
        if set(states) != set(self._states):
            raise ValueError(f"dropout RNG state needs streams {sorted(self._states)}, "
                             f"got {sorted(states)}")
        self._states = {stream: state.clone() for stream, state in states.items()}

    def dropout(self, x: torch.Tensor, p: float, *, sharded: bool, training: bool) -> torch.Tensor:
        if not training or p == 0.0:
            return x
        with self.fork(SHARDED if sharded else REPLICATED):
            return F.dropout(x, p, training=True)
