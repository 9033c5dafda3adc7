"""Forward+backward throughput of the engine's model against transformers' on the same shapes.

One student-sized config of a family (`--family llama|qwen3|gemma3`), TP=1, CPU and fp32 unless
`--device cuda --dtype bf16`. Both models hold the same weights (ours are loaded from the Hugging
Face model through layers/hf.py, and the logits are checked to agree), run the same loss
(cross-entropy over the full vocabulary) and are timed alternately in the same process, so drift
of the machine hits both. Prints a markdown table and the ratio ours / transformers.

    python tools/bench/model.py [--family qwen3 --layers 8 --hidden 512 --seq 256 --batch 2 --steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from layers.model import TransformerLM  # noqa: E402
from tools.bench.llama import FAMILIES, add_shape_args, llama_pair, synchronize  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(parser, layers=8, hidden=512, heads=8, kv_heads=4, ffn=1408, vocab=32000)
    parser.add_argument("--family", default="llama", choices=FAMILIES)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def build_models(args: argparse.Namespace) -> tuple[torch.nn.Module, TransformerLM]:
    hf, ours = llama_pair(args, max_positions=max(args.seq, 2048), family=args.family)
    return hf.train(), ours.train()


def train_step(logits_fn: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module,
               ids: torch.Tensor, labels: torch.Tensor, vocab: int) -> float:
    """One forward+backward; returns its wall time in seconds."""
    synchronize(ids.device)
    start = time.perf_counter()
    logits = logits_fn(ids)[..., :vocab]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)
    synchronize(ids.device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hf, ours = build_models(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    labels = ids.roll(-1, dims=1)
    with torch.no_grad():
        diff = (hf(ids).logits.float() - ours(ids).logits[..., :args.vocab].float()).abs().max().item()
    runners = {"megadistill TransformerLM": (lambda x: ours(x).logits, ours),
               f"transformers {type(hf).__name__}": (lambda x: hf(x).logits, hf)}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for step in range(args.warmup + args.steps):
        for name, (fn, model) in runners.items():  # alternate, so machine drift hits both
            elapsed = train_step(fn, model, ids, labels, args.vocab)
            if step >= args.warmup:
                times[name].append(elapsed)
    report(args, times, diff, sum(p.numel() for p in ours.parameters()))


def report(args: argparse.Namespace, times: dict[str, list[float]], diff: float,
           params: int) -> None:
    tokens = args.batch * args.seq
    median = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    print(f"model: {args.family}, {args.layers} layers, hidden {args.hidden}, "
          f"heads {args.heads}/{args.kv_heads} kv, "
          f"ffn {args.ffn}, vocab {args.vocab}, {params / 1e6:.1f}M params; batch {args.batch} x "
          f"seq {args.seq}; {args.dtype}, {args.device}, {args.threads} threads, TP=1; "
          f"{args.steps} timed steps each, alternating; max |logit diff| {diff:.1e}\n")
    print("| model | median step (ms) | best step (ms) | tokens/s (median) | tokens/s (best) |")
    print("|---|---:|---:|---:|---:|")
    for name in times:
        print(f"| {name} | {1000 * median[name]:.0f} | {1000 * best[name]:.0f} "
              f"| {tokens / median[name]:.0f} | {tokens / best[name]:.0f} |")
    (ours, theirs), (ours_best, theirs_best) = median.values(), best.values()  # s per step
    # Other load on the machine only ever adds time, so the best step is the least disturbed one.
    print(f"\nratio, tokens/s ours / transformers: {theirs / ours:.3f} (median), "
          f"{theirs_best / ours_best:.3f} (best)")


if __name__ == "__main__":
    main()
