"""Preemption: remember SIGTERM / SIGUSR1 and stop every rank at the same step.

SLURM signals a job before killing it (SIGTERM on cancel or preemption, SIGUSR1 with
`--signal=USR1@secs`), but it may reach only some ranks, and at different points of a step. The
handler therefore only sets a flag; the training loop asks `should_stop(layout)` once per step,
which agrees over all ranks of the role with one all_reduce(max) of a single integer, so every
rank saves at the same step and exits cleanly.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable
from types import FrameType

import torch

from engine import collectives
from engine.parallel import ParallelLayout

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Installs handlers for `signals` that only record the signal; `close()` restores the old ones.

    Must be created in the main thread (Python delivers signals only there). Use as a context
    manager or call `close()`.
    """

    def __init__(self, signals: Iterable[signal.Signals] = PREEMPTION_SIGNALS):
        self.received: signal.Signals | None = None  # the first signal that arrived
        self._previous = {}
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    @property
    def requested(self) -> bool:
        """True once a signal arrived at THIS process (other ranks may not know yet)."""
        return self.received is not None

    def should_stop(self, layout: ParallelLayout) -> bool:
        """True on every rank of this role when any of them received a signal. Every rank of the
        role (all students, or all teachers) must call it at the same point; it costs one
        all_reduce of one int32. Roles are asked separately: teacher ranks stream ahead of the
        students and never meet them at a step boundary (SLURM signals every task anyway)."""
        flag = torch.tensor([int(self.requested)], dtype=torch.int32, device=layout.device)
        group = layout.role_group if layout.world_size > 1 else None
        return bool(collectives.all_reduce(flag, group, op="max").item())

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> PreemptionFlag:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
