"""The pipeline bubble, measured: idle fraction per stage of 1F1B and interleaved 1F1B.

    python tools/bench/pipeline.py [--pp 2 4] [--micro-batches 4 8 16] [--chunks 1 2]
                                   [--work sleep|matmul] [--forward-ms 20]

Each pipeline rank is a spawned process running `engine.pipeline.PipelineExecutor` on a synthetic
stage whose backward costs twice its forward. `--work sleep` makes the stage cost exactly
`--forward-ms` (3x for forward + backward), so what is measured is the schedule and its
communication, independent of how many cores the machine has; `--work matmul` does real
[rows, H] x [H, H] products of about that cost instead (then pp ranks need pp free cores). The
step spans from a barrier before the schedule to a barrier after it (when the last stage is
done: a stage that finishes early idles until then); a stage's idle fraction is 1 - its compute
time / the step. The table compares each stage's and their mean with the analytic bubble
(pp - 1) / (chunks * m + pp - 1) of the schedule, in one run, and gives the most micro-batches'
activations the first stage held at once (in whole-stage units: an interleaved chunk holds
1 / chunks of a stage's layers), the schedule's memory cost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from engine import pipeline as P  # noqa: E402
from engine.spawn import run_ranks  # noqa: E402

ROWS, WIDTH = 64, 256


class _Stage:
    """One rank's chunks: `layers` products per forward (or a sleep of the same cost)."""

    def __init__(self, *, chunks: int, work: str, forward_s: float, layers: int):
        self.work, self.forward_s, self.layers = work, forward_s, layers
        g = torch.Generator().manual_seed(dist.get_rank())
        self.weights = [torch.randn(WIDTH, WIDTH, generator=g).div_(WIDTH ** 0.5)
                        .requires_grad_(True) for _ in range(chunks)]
        self.first = torch.randn(ROWS, WIDTH, generator=g)

    def input_specs(self, chunk: int) -> list[P.TensorSpec]:
        return [P.TensorSpec((ROWS, WIDTH), torch.float32)]

    def forward(self, chunk: int, micro_batch: int, inputs: list[torch.Tensor]) -> P.StageOutput:
        x = inputs[0] if inputs else self.first
        if self.work == "sleep":
            time.sleep(self.forward_s)
            y = _SleepyBackward.apply(x * self.weights[chunk].sum(), self.forward_s)
        else:
            y = x
            for _ in range(self.layers):
                y = torch.tanh(y @ self.weights[chunk])
        return P.StageOutput(outputs=[y], loss=y.square().mean())


class _SleepyBackward(torch.autograd.Function):
    """Identity forward; a backward that costs twice the forward's sleep."""

    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(2 * ctx.seconds)
        return grad, None


def _measure(*, pp: int, chunks: int, micro_batches: int, work: str, forward_s: float,
             layers: int, repeats: int) -> tuple[float, int]:
    """On every rank: (the idle fraction of its best-of-`repeats` step, the most micro-batch
    chunks whose activations it held at once)."""
    rank = dist.get_rank()
    stage = _Stage(chunks=chunks, work=work, forward_s=forward_s, layers=layers)
    executor = P.PipelineExecutor(ranks=list(range(pp)), rank=rank, chunks=chunks,
                                  device=torch.device("cpu"))
    actions = P.interleaved_one_f_one_b(pp=pp, rank=rank, micro_batches=micro_batches,
                                        chunks=chunks)
    best = None
    for _ in range(repeats):
        dist.barrier()
        began = time.perf_counter()
        stats = executor.run(actions, stage)
        dist.barrier()  # the step ends for every stage when the last one is done
        step = time.perf_counter() - began
        if best is None or step < best[0]:
            best = (step, 1.0 - stats.compute_s / step, stats.max_in_flight)
    return best[1:]


def _layers_for(forward_s: float) -> int:
    """How many [ROWS, WIDTH] x [WIDTH, WIDTH] products take about `forward_s` here."""
    w, x = torch.randn(WIDTH, WIDTH), torch.randn(ROWS, WIDTH)
    began, count = time.perf_counter(), 0
    while time.perf_counter() - began < 0.2:
        x = torch.tanh(x @ w)
        count += 1
    return max(1, round(forward_s / ((time.perf_counter() - began) / count)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--work", choices=("sleep", "matmul"), default="sleep")
    parser.add_argument("--forward-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    layers = _layers_for(args.forward_ms / 1000) if args.work == "matmul" else 0
    print(f"work: {args.work}, forward {args.forward_ms:.0f} ms per chunk-stage, backward 2x"
          + (f" ({layers} products of [{ROWS}, {WIDTH}] x [{WIDTH}, {WIDTH}])" if layers else ""))
    print("\n| pp | chunks | m | idle per stage | mean idle | analytic | mean / analytic "
          "| held on the first stage |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    for pp in args.pp:
        for chunks in args.chunks:
            for m in args.micro_batches:
                if chunks > 1 and m % pp:
                    continue  # interleaving needs whole groups of pp micro-batches
                measured = run_ranks(_measure, pp, pp=pp, chunks=chunks, micro_batches=m,
                                     work=args.work, forward_s=args.forward_ms / 1000 / chunks,
                                     layers=max(1, layers // chunks), repeats=args.repeats,
                                     timeout_s=600)
                idle = [x for x, _ in measured]
                # activations held, in units of one stage's (a chunk holds 1 / chunks of them)
                held = measured[0][1] / chunks
                analytic = P.bubble_fraction(pp=pp, micro_batches=m, chunks=chunks)
                mean = statistics.mean(idle)
                per_stage = " ".join(f"{x:.3f}" for x in idle)
                print(f"| {pp} | {chunks} | {m} | {per_stage} | {mean:.3f} | {analytic:.3f} | "
                      f"{mean / analytic:.2f} | {held:g} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
