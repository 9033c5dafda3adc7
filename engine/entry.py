"""The one way into a command: start-up, the parallel groups, and what a failure prints and returns.

Every entry point (`distill/run.py` and the tools) does the same: read and check every input on
every rank alike before any process group exists (`start_up`), then run in the groups. A failure a
user can act on is ONE line on stderr, `Kind: message` (`report`; every `ConfigError`, layout
errors included, reads `ConfigError: <key>: ...`), printed by the rank that speaks for the others,
and ends the command with one of the documented exit codes below. `run_tool` is the whole life of
a tool; the trainer, whose failures differ by role, builds its own second stage from the same
pieces.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from engine.checkpoint import CheckpointError
from engine.config import ConfigError
from engine.data import DataError
from engine.log import error_line
from engine.parallel import (
    LaunchEnv,
    ParallelConfig,
    ParallelLayout,
    destroy_parallel,
    init_parallel,
    is_peer_failure,
)
from engine.signals import EXIT_ABORTED

EXIT_OK = 0
EXIT_RUNTIME = 1  # a failure while running: a write that failed, a lost peer, a broken stream
EXIT_CONFIG = 2  # bad input (config, arguments, data, checkpoint): nothing was written
EXIT_NONFINITE = 3  # training stopped on non-finite losses
EXIT_PREEMPTED = 124  # stopped by a signal after saving a checkpoint
EXIT_INTERRUPTED = EXIT_ABORTED  # 130: Ctrl-C during start-up, or a second Ctrl-C

# How long a rank other than 0 that refused its input waits for rank 0, which meets the same input,
# to print the line: the launcher ends the other ranks as soon as one exits, so a rank that exits
# first can cost rank 0 its line. Spent only on a refused start, and only if rank 0 prints nothing.
SPEAKER_GRACE_S = 10.0

# What bad input raises on its way out: each carries one line that names the culprit.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, CheckpointError, DataError, OSError)

T = TypeVar("T")
ExitCodes = Sequence[tuple[type[BaseException] | tuple[type[BaseException], ...], int]]


def report(err: BaseException, code: int, *, show: bool = True, rank: int | None = None) -> int:
    """Print `err` as one `Kind: message` line on stderr when `show` (`rank R: Kind: message`
    when `rank` is given); return `code`."""
    kind = "ConfigError" if isinstance(err, ConfigError) else type(err).__name__
    error_line(err, show=show, prefix=kind if rank is None else f"rank {rank}: {kind}")
    return code


def ensure_new_output(path: Path, *, force: bool | None, key: str = "--out") -> None:
    """Refuse to replace an existing file or non-empty directory unless `force`; `force=None` is
    a tool without `--force`, whose output must not exist at all."""
    if force or not path.exists():
        return
    if force is None:
        raise ConfigError(key, f"{path} exists; refusing to overwrite it")
    if path.is_dir() and not any(path.iterdir()):
        return
    raise ConfigError(key, f"{path} already exists (pass --force to replace it)")


def start_up(prepare: Callable[[LaunchEnv], T]) -> tuple[LaunchEnv, T] | int:
    """(launch, `prepare(launch)`), run before any process group exists; or, on bad input or
    Ctrl-C, the exit code after rank 0 printed the one line (every rank meets the same input)."""
    launch = None
    try:
        launch = LaunchEnv.from_env()
        return launch, prepare(launch)
    except USER_ERRORS as err:
        return _refuse(err, launch)
    except KeyboardInterrupt:
        error_line(KeyboardInterrupt("during start-up, nothing written"), prefix="interrupted",
                   show=launch is None or launch.rank == 0)
        return EXIT_INTERRUPTED


def _refuse(err: BaseException, launch: LaunchEnv | None) -> int:
    """Rank 0 prints the line at once; another rank waits for it to (see SPEAKER_GRACE_S) and,
    still alive after that, prints it itself, as rank 0 apparently met other input."""
    if launch is None or launch.rank == 0:
        return report(err, EXIT_CONFIG)
    time.sleep(SPEAKER_GRACE_S)
    return report(err, EXIT_CONFIG, rank=launch.rank)


def run_tool(prepare: Callable[[LaunchEnv], tuple[ParallelConfig, Callable[[ParallelLayout], None]]],
             *, failures: ExitCodes = ((USER_ERRORS, EXIT_CONFIG),)) -> int:
    """A tool's life: `prepare(launch)` reads and checks every input (see `start_up`) and returns
    (the `ParallelConfig` to build, work); `work(layout)` runs in the groups. A failure of
    the work that matches `failures` (first match) is one line from rank 0 and that exit code; a
    lost peer is one line from each rank that waited on it, exit 1."""
    started = start_up(prepare)
    if isinstance(started, int):
        return started
    launch, (parallel, work) = started
    layout = init_parallel(parallel, launch=launch)
    try:
        work(layout)
    except BaseException as err:
        return _work_failure(err, failures, layout)
    finally:
        destroy_parallel()
    return EXIT_OK


def _work_failure(err: BaseException, failures: ExitCodes, layout: ParallelLayout) -> int:
    for kinds, code in failures:
        if isinstance(err, kinds):
            return report(err, code, show=layout.is_rank0)
    if is_peer_failure(err):
        return peer_lost(err, layout)
    raise err


def peer_lost(err: BaseException, layout: ParallelLayout) -> int:
    """A collective failed on a dead or hung peer: every rank that waited on it says so (it
    cannot know who else did), naming the lost rank when it is certain; exit 1."""
    lost = lost_peer(layout)
    who = f"a peer (rank {lost})" if lost is not None else f"a peer of rank {layout.rank}"
    error_line(err, prefix=f"lost {who}")
    return EXIT_RUNTIME


def lost_peer(layout: ParallelLayout) -> int | None:
    """The rank this one lost, where that is certain: the only other rank of a job of two.
    Neither gloo nor NCCL names the peer's rank in its errors (gloo gives the peer's address and
    a connection's port, which identify no rank on a node of several), so in a larger job it
    stays unknown."""
    if layout.world_size != 2:
        return None
    return 1 - layout.rank
