"""Run a function on N spawned ranks (gloo on CPU) and bring back results or the first failure.

Used by the test suite, the benchmarks and tools that need N ranks without torchrun
(tools/convert_hf.py writes a TP=N checkpoint this way). Rendezvous goes through a FileStore in a
fresh temporary directory, so concurrent pytest-xdist workers never race for a port. A rank that
raises fails the call with that rank's traceback; ranks that do not finish within `timeout_s` are
killed and the call fails, so a deadlock ends a test instead of hanging CI.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_mod
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankFailure(RuntimeError):
    """A spawned rank raised; the message carries its traceback."""


def _worker(rank: int, world_size: int, init_file: str, fn: Callable, args: tuple, kwargs: dict,
            results, timeout_s: float, threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        value = fn(*args, **kwargs)
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0,
              threads: int | None = None, **kwargs: Any) -> list[Any]:
    """Call `fn(*args, **kwargs)` on `world_size` gloo ranks; return the results in rank order.
    Each rank runs `threads` intra-op threads (None: torch's default in a new process, which
    follows the OMP_NUM_THREADS the ranks inherit).

    `fn` must be importable (a module-level function). Inside it, `torch.distributed` is
    initialized, so `engine.parallel.make_layout(...)` builds the layout.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="md-ranks-") as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(r, world_size, init_file, fn, args, kwargs, results,
                                   timeout_s, threads)) for r in range(world_size)]
        for p in procs:
            p.start()
        try:
            return _collect(procs, results, world_size, timeout_s)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(5)


def _collect(procs, results, world_size: int, timeout_s: float) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    values: dict[int, Any] = {}
    while len(values) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(world_size)) - set(values))
            raise TimeoutError(f"ranks {missing} did not finish within {timeout_s:.0f}s")
        try:
            rank, ok, payload = results.get(timeout=min(remaining, 1.0))
        except queue_mod.Empty:
            dead = [r for r, p in enumerate(procs)
                    if not p.is_alive() and p.exitcode not in (0, None) and r not in values]
            if dead:
                raise RankFailure(
                    f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}") from None
            continue
        if not ok:
            raise RankFailure(f"rank {rank} failed:\n{payload}")
        values[rank] = pickle.loads(payload)
    return [values[r] for r in range(world_size)]
