"""A small torchrun worker for the network-namespace tests: steps of checked collectives.

    torchrun ... tests/multinode_worker.py --run-dir DIR --steps N [--step-s S] [--timeout-s T]

Each step all-reduces and all-gathers values whose result is known in closed form (a wrong or
partial world is an error) and writes DIR/progress-rank{R}.json with the results and the address
this machine's hostname resolves to (each namespace "node" maps it to its own). A collective that
fails (a peer cut off, the collective timeout `--timeout-s` passed) ends the rank with exit code 1
after ONE line on stderr naming the rank, the step and the cause, instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from engine import collectives  # noqa: E402
from engine.parallel import ParallelConfig, destroy_parallel, init_parallel  # noqa: E402

EXIT_COLLECTIVE_FAILED = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--step-s", type=float, default=0.0, help="sleep after each step")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="collective timeout")
    return parser.parse_args(argv)


def checked_step(step: int, *, rank: int, world: int, group) -> dict:
    """One step of collectives whose results are known: raise if any value is wrong."""
    contribution = torch.tensor([rank + 1.0, float(step)], dtype=torch.float64)
    summed = collectives.all_reduce(contribution, group)  # [sum of rank+1, world*step]
    ranks = collectives.all_gather(torch.tensor([float(rank)]), group, dim=0)  # [world]
    expected = torch.tensor([world * (world + 1) / 2, float(world * step)], dtype=torch.float64)
    if not torch.equal(summed, expected) or ranks.tolist() != [float(r) for r in range(world)]:
        raise RuntimeError(f"all_reduce gave {summed.tolist()} (expected {expected.tolist()}), "
                           f"all_gather gave {ranks.tolist()}")
    return {"step": step, "world_size": world, "sum_rank_plus_1": summed[0].item(),
            "sum_step": summed[1].item(), "gathered_ranks": ranks.tolist(),
            "address": socket.gethostbyname(socket.gethostname())}


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def train(args: argparse.Namespace, *, rank: int, world: int, group) -> int:
    for step in range(1, args.steps + 1):
        try:
            record = checked_step(step, rank=rank, world=world, group=group)
        except (RuntimeError, dist.DistError) as err:
            cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(f"multinode_worker rank {rank}: collective failed at step {step}: {cause}",
                  file=sys.stderr, flush=True)
            return EXIT_COLLECTIVE_FAILED
        write_json(args.run_dir / f"progress-rank{rank}.json", record)
        time.sleep(args.step_s)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    layout = init_parallel(ParallelConfig(timeout_s=args.timeout_s), backend="gloo")
    try:
        return train(args, rank=layout.rank, world=layout.world_size, group=dist.group.WORLD)
    finally:
        destroy_parallel()


if __name__ == "__main__":
    sys.exit(main())
