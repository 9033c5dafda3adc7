"""Memory of a training step per rank: activation recomputation and the distributed optimizer.

    python tools/bench/memory.py [--layers 4 --hidden 256 --vocab 8192 --seq 256 --batch 4
                                  --steps 3 --dp 1 2 4]

Rows: `train.recompute` none / selective / full with the replicated AdamW at DP 1, then
`train.distributed_optimizer` at each DP degree (recompute none). Each row runs in fresh spawned
processes (one per DP rank, gloo, one thread each): a Llama student (TP 1, fp32, CPU, attention
dropout 0.1, so that attention runs the unfused kernel a GPU without flash attention runs) trains
with the LM loss through the engine's optimizer step (`engine.optim.OptimizerStep`, which
reduce-scatters the gradients itself when sharded). Per rank:

- activations: bytes the forward leaves allocated for the backward (`kept_bytes`, exact, from the
  profiler's allocator records);
- optimizer state: bytes of the AdamW moments and step counters this rank holds after a step, and
  their ratio to the replicated optimizer's (it must be 1/DP plus padding);
- step peak: the resident-set high-water mark over the timed steps minus the resident set before
  them (parameters and optimizer state are resident already): what a step adds at its peak
  (activations, gradients, logits, the reduce-scatter's buffers, temporaries), measured by Linux
  (`/proc/self/clear_refs` resets the mark after the untimed first step, freed heap memory
  trimmed; tensors of 64 KiB and more are mapped and unmapped one by one); it includes allocator
  slack;
- optimizer-step peak: what the optimizer step alone adds at its peak above the resident set
  after the backward (gradients resident; the mark is reset there): the flat gradients, the
  reduce-scatter's and all-gather's buffers, temporaries;
- per rank in all: parameters + optimizer state + step peak;
- step time: the median of the timed steps (2 shared cores: for orders of magnitude only).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

MB = 2**20


def kept_bytes(fn: Callable[[], object]) -> int:
    """CPU bytes that `fn()` allocates and that are still allocated when it returns (its result
    and whatever the result's autograd graph saved), counted exactly by the profiler's allocator
    records, independent of how malloc returns memory to the system."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    kept = sum(event.self_cpu_memory_usage for event in prof.events())
    del result
    return kept


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state this rank holds (a sharded optimizer counts its flat slices)."""
    if hasattr(optimizer, "state_bytes"):
        return optimizer.state_bytes()
    return sum(t.nbytes for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))


def _status_bytes(field: str) -> int:
    """A memory line of /proc/self/status (VmRSS: resident now, VmHWM: its high-water mark)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak() -> int:
    """Give freed heap memory back to the system, reset the high-water mark to the resident set
    and return that resident set."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    return _status_bytes("VmRSS")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=704, help="MLP inner width")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="micro-batch per DP rank")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one untimed)")
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4])
    return parser.parse_args(argv)


def measure_rank(args: argparse.Namespace, recompute: str, sharded: bool) -> dict:
    """One row on this rank (inside `run_ranks`): see the module docstring."""
    from distill import cross_entropy
    from engine.optim import OptimizerStep
    from engine.parallel import ParallelConfig, make_layout
    from engine.train_config import TrainConfig
    from layers.config import ModelConfig
    from layers.model import TransformerLM

    layout = make_layout(ParallelConfig())
    config = ModelConfig(family="llama", vocab_size=args.vocab, hidden=args.hidden,
                         layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                         ffn_hidden=args.ffn, max_seq_len=args.seq, dropout=0.1)
    model = TransformerLM(config, layout, seed=0, recompute=recompute).train()
    opt = OptimizerStep(TrainConfig(steps=args.steps + 1, warmup_steps=0, distributed_optimizer=sharded),
                        layout, list(model.parameters()))
    ids = torch.randint(0, args.vocab, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(layout.dp_rank))
    labels = ids.roll(-1, dims=1)

    def loss() -> torch.Tensor:
        return cross_entropy(model(ids).logits, labels).mean()

    def train_step(step: int) -> tuple[float, int, int]:
        """(seconds, the step's resident high-water mark, what the optimizer step adds at its
        peak above the resident set after the backward)."""
        began = time.perf_counter()
        value = loss()
        value.backward()
        backward_peak = _status_bytes("VmHWM")
        with_grads = _reset_peak()  # the gradients are resident now
        opt(step, loss=value.item())
        optimizer_peak = _status_bytes("VmHWM")
        return time.perf_counter() - began, max(backward_peak, optimizer_peak), optimizer_peak - with_grads

    activations = kept_bytes(loss)
    train_step(0)  # allocates the optimizer state
    resident = _reset_peak()
    times, peaks, optimizer_peaks = zip(*[train_step(step) for step in range(1, args.steps + 1)],
                                        strict=True)
    return {"activations": activations, "state": optimizer_state_bytes(opt.optimizer),
            "peak": max(peaks) - resident, "optimizer_peak": max(optimizer_peaks),
            "step_s": statistics.median(times),
            "params": sum(p.numel() for p in model.parameters()),
            "param_bytes": sum(p.nbytes for p in model.parameters())}


def run_row(args: argparse.Namespace, *, dp: int, recompute: str, sharded: bool) -> dict:
    """The row's numbers: per-rank maxima over the DP ranks (they hold equal shares)."""
    from engine.spawn import run_ranks

    # Tensors of 64 KiB and more get their own mappings, unmapped when freed, so the resident set
    # follows the live tensors instead of what glibc's heap keeps (inherited by the spawned ranks).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    per_rank = run_ranks(measure_rank, dp, args, recompute, sharded, timeout_s=600)
    return {key: max(r[key] for r in per_rank) for key in per_rank[0]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = [(f"recompute={mode}", 1, mode, False) for mode in ("none", "selective", "full")]
    rows += [("distributed_optimizer", dp, "none", True) for dp in args.dp]
    results = [(name, dp, run_row(args, dp=dp, recompute=mode, sharded=sharded))
               for name, dp, mode, sharded in rows]
    replicated = results[0][2]["state"]
    print(f"model: llama, {args.layers} layers, hidden {args.hidden}, heads {args.heads}/"
          f"{args.kv_heads} kv, ffn {args.ffn}, vocab {args.vocab}, "
          f"{results[0][2]['params'] / 1e6:.2f}M params; micro-batch {args.batch} x seq "
          f"{args.seq} per rank; fp32, CPU, gloo, 1 thread per rank; dropout 0.1; "
          f"step time = median of {args.steps}\n")
    print("| configuration | DP | activations MB | optimizer state MB / rank | state / replicated "
          "| 1/DP | step peak MB / rank | optimizer-step peak MB / rank | in all MB / rank | step s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, dp, r in results:
        print(f"| {name} | {dp} | {r['activations'] / MB:.1f} | {r['state'] / MB:.2f} | "
              f"{r['state'] / replicated:.4f} | {1 / dp:.4f} | {r['peak'] / MB:.0f} | "
              f"{r['optimizer_peak'] / MB:.0f} | "
              f"{(r['param_bytes'] + r['state'] + r['peak']) / MB:.0f} | {r['step_s']:.2f} |")


if __name__ == "__main__":
    main()
