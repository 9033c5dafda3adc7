"""A small torchrun worker for the multi-node and SLURM tests (a stand-in for the trainer's plumbing).

    torchrun ... tests/multinode_worker.py --run-dir DIR --steps N [--step-s S] [--timeout-s T]

Each step all-reduces and all-gathers values whose result is known in closed form (so a wrong or
partial world shows up as a mismatch), rank 0 appends one line to DIR/metrics.jsonl and every rank
writes DIR/progress-rank{R}.json. It behaves like the trainer towards its launchers:
- resumes after the step recorded in DIR/checkpoint.json (the SLURM requeue path);
- on SIGUSR1 the ranks agree on a step to stop at, rank 0 writes the checkpoint, and every rank
  exits with 124, the trainer's "preempted after a checkpoint" code (distill/run.py);
- a collective that fails (a peer cut off, the collective timeout `--timeout-s` passed) ends the
  rank with exit code 1 after one line on stderr naming the rank, the step and the cause.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from engine import collectives  # noqa: E402
from engine.parallel import destroy_parallel, init_parallel  # noqa: E402

EXIT_PREEMPTED = 124  # distill/run.py's code for "checkpointed on SIGUSR1, requeue me"
EXIT_COLLECTIVE_FAILED = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--step-s", type=float, default=0.0, help="sleep after each step")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="collective timeout")
    return parser.parse_args(argv)


class Preemption:
    """Set by SIGUSR1; ranks agree on it with an all_reduce(max) so they all stop at one step."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, group) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0])
        return bool(collectives.all_reduce(flag, group, op="max").item())


def checked_step(step: int, *, rank: int, world: int, group) -> dict:
    """One step of collectives whose results are known: raise if any value is wrong."""
    contribution = torch.tensor([rank + 1.0, float(step)], dtype=torch.float64)
    summed = collectives.all_reduce(contribution.clone(), group)  # [sum of rank+1, world*step]
    ranks = collectives.all_gather(torch.tensor([float(rank)]), group, dim=0)  # [world]
    expected = torch.tensor([world * (world + 1) / 2, float(world * step)], dtype=torch.float64)
    if not torch.equal(summed, expected) or ranks.tolist() != [float(r) for r in range(world)]:
        raise RuntimeError(f"step {step}: all_reduce gave {summed.tolist()} (expected "
                           f"{expected.tolist()}), all_gather gave {ranks.tolist()}")
    return {"step": step, "world_size": world, "sum_rank_plus_1": summed[0].item(),
            "sum_step": summed[1].item(), "gathered_ranks": ranks.tolist()}


def start_step(run_dir: Path) -> int:
    ckpt = run_dir / "checkpoint.json"
    return json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def train(args: argparse.Namespace, *, rank: int, world: int, group) -> int:
    preemption = Preemption()
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    for step in range(start_step(args.run_dir) + 1, args.steps + 1):
        try:
            record = checked_step(step, rank=rank, world=world, group=group) | {"restart": restart}
            write_json(args.run_dir / f"progress-rank{rank}.json", record)
            if rank == 0:
                with open(args.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            time.sleep(args.step_s)
            stop = preemption.agreed(group) and step < args.steps
        except (RuntimeError, dist.DistError) as err:
            cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(f"multinode_worker rank {rank}: collective failed at step {step}: {cause}",
                  file=sys.stderr, flush=True)
            return EXIT_COLLECTIVE_FAILED
        if stop:
            return checkpoint_and_exit(args.run_dir, step, rank=rank, group=group)
    return 0


def checkpoint_and_exit(run_dir: Path, step: int, *, rank: int, group) -> int:
    if rank == 0:
        write_json(run_dir / "checkpoint.json", {"step": step})
    collectives.barrier(group)
    print(f"multinode_worker rank {rank}: SIGUSR1, checkpoint at step {step}, exiting "
          f"{EXIT_PREEMPTED}", file=sys.stderr, flush=True)
    return EXIT_PREEMPTED


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    layout = init_parallel(backend="gloo", timeout_s=args.timeout_s)
    try:
        return train(args, rank=layout.rank, world=layout.world_size, group=dist.group.WORLD)
    finally:
        destroy_parallel()


if __name__ == "__main__":
    sys.exit(main())
