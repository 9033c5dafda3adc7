"""Spawned gloo ranks for the test suite: `run_ranks(fn, world_size, ...)` and `RankFailure`.

They live in engine/spawn.py, which tools use as well; tests import them from here.
"""

from engine.spawn import RankFailure, run_ranks

__all__ = ["RankFailure", "run_ranks"]
