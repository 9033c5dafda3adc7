"""Preemption: remember SIGTERM / SIGUSR1 / SIGINT and stop every rank at the same step.

SLURM signals a job before killing it (SIGTERM on cancel or preemption, SIGUSR1 with
`--signal=USR1@secs`), but it may reach only some ranks, and at different points of a step. The
handler therefore only sets a flag; the training loop asks `should_stop(layout)` once per step,
which agrees over all ranks of the role with one all_reduce(max) of a single integer, so every
rank saves at the same step and exits cleanly. The entry point installs it as soon as the process
groups exist, so a signal during the loading that precedes the first step is acted on at its end.

Ctrl-C (SIGINT) is the same request from a person: the first one finishes the step, saves and
stops. A second one aborts at once, without a checkpoint (exit 130), even while the main thread is
blocked in a collective: a watcher thread reads the signal from CPython's wakeup fd and ends the
process itself. An interrupt that follows the first within INTERRUPT_ECHO_S does not count: one
Ctrl-C can arrive twice, when the ranks share the terminal's process group and the launcher also
forwards its own copy (torchrun starts its workers in sessions of their own and only forwards).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterable
from types import FrameType

import torch

from engine import collectives
from engine.log import get_logger
from engine.parallel import ParallelLayout

log = get_logger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
INTERRUPT_ECHO_S = 1.0
EXIT_ABORTED = 128 + signal.SIGINT  # what a shell reports for a process ended by Ctrl-C


class _InterruptWatcher:
    """Counts SIGINTs as they arrive (from the wakeup fd, in a thread) and aborts on a second."""

    def __init__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous_fd = signal.set_wakeup_fd(self._write)
        self._first: float | None = None
        self._thread = threading.Thread(target=self._watch, name="interrupt-watcher", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while chunk := os.read(self._read, 64):  # empty once the write end is closed
            for signum in chunk:
                if signum == signal.SIGINT:
                    self._interrupt(time.monotonic())
        os.close(self._read)

    def _interrupt(self, now: float) -> None:
        if self._first is None:
            self._first = now
            log.warning("interrupted: finishing this step, saving a checkpoint and stopping "
                        "(interrupt again to abort at once, without a checkpoint)")
        elif now - self._first >= INTERRUPT_ECHO_S:
            log.error("interrupted again: aborting without a checkpoint",
                      extra={"all_ranks": True})
            os._exit(EXIT_ABORTED)

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._write)
        self._thread.join(timeout=1.0)


class PreemptionFlag:
    """Installs handlers for `signals` that only record the signal (and, for SIGINT, the watcher
    that aborts on a second one); `close()` restores the old ones.

    Must be created in the main thread (Python delivers signals only there). Use as a context
    manager or call `close()`.
    """

    def __init__(self, signals: Iterable[signal.Signals] = PREEMPTION_SIGNALS):
        self.received: signal.Signals | None = None  # the first signal that arrived
        self._previous = {}
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        self._watcher = _InterruptWatcher() if signal.SIGINT in self._previous else None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.record(signum)

    def record(self, signum: int) -> None:
        """Record `signum` (the first one counts): one that arrived here, or one that a rank of the
        other role received and sent along (a teacher rank's, with its stream)."""
        if self.received is None:
            self.received = signal.Signals(signum)

    @property
    def requested(self) -> bool:
        """True once a signal arrived at THIS process, or was relayed to it (other ranks may not
        know yet)."""
        return self.received is not None

    def should_stop(self, layout: ParallelLayout) -> bool:
        """True on every rank of this role when any of them received a signal. Every rank of the
        role (all students, or all teachers) must call it at the same point; it costs one
        all_reduce of one int32. Roles are asked separately: teacher ranks stream ahead of the
        students and never meet them at a step boundary; a teacher rank's signal travels with its
        stream to the students it serves (`record`), and the students' vote decides for both."""
        flag = torch.tensor([int(self.requested)], dtype=torch.int32, device=layout.device)
        group = layout.role_group if layout.world_size > 1 else None
        return bool(collectives.all_reduce(flag, group, op="max").item())

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> PreemptionFlag:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
