"""Context parallelism on long sequences: activation memory per rank, step time, attention traffic.

    python tools/bench/context_parallel.py [--seq 8192 16384 32768 --cp 1 2 4 --layers 1
                                            --hidden 128 --heads 8 --kv-heads 1 --ffn 512
                                            --vocab 1024 --steps 1]

Each (sequence length, CP) row runs in fresh spawned processes, one per CP rank (gloo, one thread
each): a tiny Llama student (fp32, CPU, no dropout) takes one sequence, each rank its chunks r and
2cp-1-r (`layers.context.cp_positions`), and runs forward, the LM loss and backward. Per rank:

- activations: bytes the forward leaves allocated for the backward (`kept_bytes`, exact, from the
  profiler's allocator records; tools/bench/memory.py), against 1/cp of the CP=1 figure at the
  same length (the target: within 15%). What CP adds above 1/cp is the sequence's gathered keys
  and values of each layer (`2 x kv_heads x seq x head_dim x 4 B`), which the attention keeps;
- step time: forward + backward, the median of `--steps` timed steps after the measured forward
  (2 shared cores and one process per rank: for orders of magnitude only);
- attention traffic per layer from the collective counters over the CP group, against the
  analytic all-gather: forward, each rank hands its keys and values (`2 x batch x kv_heads x
  seq/cp x head_dim x 4 B`) to the all-gather; backward, the reduce-scatter of their gradients
  takes the gathered `2 x batch x kv_heads x seq x head_dim x 4 B` (the counters record each
  rank's payload). The forward also gathers the tokens' int64 positions once (`seq/cp x 8 B`),
  not per layer: it is taken out before dividing by the layers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.bench.memory import kept_bytes  # noqa: E402

MB = 2**20
FP32 = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--ffn", type=int, default=512, help="MLP inner width")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=1, help="timed steps (after the measured forward)")
    return parser.parse_args(argv)


def analytic_bytes(args: argparse.Namespace, *, seq: int, cp: int) -> dict[str, int]:
    """Per layer and rank: the all-gather's forward payload and the reduce-scatter's backward one
    (keys and values, batch 1, fp32); 0 without CP."""
    if cp == 1:
        return {"all_gather": 0, "reduce_scatter": 0}
    head_dim = args.hidden // args.heads
    return {"all_gather": 2 * args.kv_heads * (seq // cp) * head_dim * FP32,
            "reduce_scatter": 2 * args.kv_heads * seq * head_dim * FP32}


def measure_rank(args: argparse.Namespace, seq: int, cp: int) -> dict:
    """One row on this CP rank (inside `run_ranks`): see the module docstring."""
    from distill import cross_entropy
    from engine import collectives as C
    from engine.parallel import ParallelConfig, make_layout
    from layers.config import ModelConfig
    from layers.context import cp_positions
    from layers.model import TransformerLM

    layout = make_layout(ParallelConfig(cp=cp))
    config = ModelConfig(family="llama", vocab_size=args.vocab, hidden=args.hidden,
                         layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                         ffn_hidden=args.ffn, max_seq_len=seq)
    model = TransformerLM(config, layout, seed=0).train()
    ids = torch.randint(0, args.vocab, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    ids, labels = ids[:, :-1], ids[:, 1:]
    sequence = {}
    if layout.cp > 1:
        positions = cp_positions(seq, layout.cp, layout.cp_rank)
        ids, labels = ids[:, positions], labels[:, positions]
        sequence = {"positions": positions, "cp_chunks": True}

    def loss() -> torch.Tensor:
        return cross_entropy(model(ids, **sequence).logits, labels).sum() / seq

    activations = kept_bytes(loss)
    with C.count_collectives({"cp": layout.cp_group}) as counts:
        loss().backward()
    times = []
    for _ in range(args.steps):
        began = time.perf_counter()
        loss().backward()
        times.append(time.perf_counter() - began)
    positions_bytes = (seq // layout.cp) * 8 if layout.cp > 1 else 0
    return {"activations": activations, "step_s": statistics.median(times),
            "all_gather": (counts.group_bytes[("cp", "all_gather")] - positions_bytes) / args.layers,
            "reduce_scatter": counts.group_bytes[("cp", "reduce_scatter")] / args.layers,
            "other_cp": sum(n for (g, kind), n in counts.group_bytes.items()
                            if g == "cp" and kind not in ("all_gather", "reduce_scatter"))}


def run_row(args: argparse.Namespace, *, seq: int, cp: int) -> dict:
    """The row's numbers: per-rank maxima over the CP ranks (they hold equal shares)."""
    from engine.spawn import run_ranks

    per_rank = run_ranks(measure_rank, cp, args, seq, cp, timeout_s=1800, threads=1)
    return {key: max(r[key] for r in per_rank) for key in per_rank[0]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    head_dim = args.hidden // args.heads
    print(f"model: llama, {args.layers} layer(s), hidden {args.hidden}, heads {args.heads}/"
          f"{args.kv_heads} kv (head_dim {head_dim}), ffn {args.ffn}, vocab {args.vocab}; batch 1; "
          f"fp32, CPU, gloo, 1 thread per rank; forward + backward, median of {args.steps}\n")
    print("| seq | CP | activations MiB / rank | CP=1 / cp | ratio | step s | all-gather KiB / layer "
          "| analytic | reduce-scatter KiB / layer | analytic |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for seq in args.seq:
        base = None
        for cp in args.cp:
            r = run_row(args, seq=seq, cp=cp)
            if cp == 1:
                base = r["activations"]
            want = analytic_bytes(args, seq=seq, cp=cp)
            share = f"{base / cp / MB:.1f}" if base is not None else "-"
            ratio = f"{r['activations'] * cp / base:.3f}" if base is not None else "-"
            print(f"| {seq} | {cp} | {r['activations'] / MB:.1f} | {share} | {ratio} | "
                  f"{r['step_s']:.2f} | {r['all_gather'] / 1024:.0f} | "
                  f"{want['all_gather'] / 1024:.0f} | {r['reduce_scatter'] / 1024:.0f} | "
                  f"{want['reduce_scatter'] / 1024:.0f} |", flush=True)


if __name__ == "__main__":
    main()
