"""Greedy decoding speed of the engine (`layers.decode.generate`) against transformers' `generate`.

Both hold the same weights (ours loaded from the Hugging Face model through layers/hf.py), decode the
same left-padded prompts greedily for the same number of new tokens (no EOS stop) on the same
threads, and are timed alternately in one process, so drift of the machine hits both. The default
shapes are SmolLM2-135M's (30 layers, hidden 576, 9 query / 3 key-value heads, vocabulary 49,152,
tied embeddings) with random weights: the speed does not depend on the values.

Prefill is the time of a one-token generation (the prompt's forward and the first token); decode
is the time per further token, from the difference of an N-token and a one-token generation. The
run also reports how many generated tokens agree (fp32 round-off may flip a near tie).

    python tools/bench/generate.py [--prompts 4 --prompt-len 48 --new-tokens 32 --threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from layers.decode import generate, left_pad  # noqa: E402
from layers.model import TransformerLM  # noqa: E402
from tools.bench.llama import add_shape_args, llama_pair, synchronize  # noqa: E402

PAD_ID = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(parser, layers=30, hidden=576, heads=9, kv_heads=3, ffn=1536, vocab=49152)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=48, help="longest prompt")
    parser.add_argument("--ragged", action="store_true",
                        help="prompts of different lengths (left padding) instead of equal ones")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model and length")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def make_prompts(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = [args.prompt_len - (3 * i if args.ragged else 0) for i in range(args.prompts)]
    prompts = [torch.randint(1, args.vocab, (n,), generator=g) for n in lengths]
    return left_pad(prompts, pad_id=PAD_ID)


def runners(hf: torch.nn.Module, ours: TransformerLM, ids: torch.Tensor,
            lengths: torch.Tensor) -> dict[str, Callable[[int], torch.Tensor]]:
    """name -> function(new tokens) -> `[batch, new tokens]` generated ids."""
    width = ids.shape[1]
    attention_mask = (torch.arange(width, device=ids.device)[None, :]
                      >= (width - lengths)[:, None]).long()

    def theirs(new: int) -> torch.Tensor:
        out = hf.generate(ids, attention_mask=attention_mask, max_new_tokens=new,
                          min_new_tokens=new, do_sample=False, pad_token_id=PAD_ID,
                          eos_token_id=None)
        return out[:, width:]

    def engine(new: int) -> torch.Tensor:
        return generate(ours, ids, prompt_lengths=lengths, max_new_tokens=new).tokens

    return {"megadistill generate": engine, "transformers generate": theirs}


def timed(fn: Callable[[int], torch.Tensor], new: int) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.no_grad():
        tokens = fn(new)
    synchronize(tokens.device)
    return time.perf_counter() - start, tokens.cpu()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hf, ours = llama_pair(args, rope_theta=100000.0, tie_word_embeddings=True)
    ids, lengths = make_prompts(args)
    fns = runners(hf, ours, ids.to(args.device), lengths.to(args.device))
    times = {(name, new): [] for name in fns for new in (1, args.new_tokens)}
    tokens = {}
    for fn in fns.values():  # warm-up: first calls allocate and pick kernels
        timed(fn, 2)
    for _ in range(args.repeats):
        for new in (1, args.new_tokens):
            for name, fn in fns.items():  # alternate, so machine drift hits both
                elapsed, tokens[name] = timed(fn, new)
                times[name, new].append(elapsed)
    report(args, fns, times, tokens)


def report(args: argparse.Namespace, fns: dict, times: dict, tokens: dict) -> None:
    n = args.new_tokens
    print(f"model: {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads} "
          f"kv, ffn {args.ffn}, vocab {args.vocab}; {args.prompts} prompts of "
          f"{'up to ' if args.ragged else ''}{args.prompt_len} tokens, {n} new tokens each, "
          f"greedy; {args.dtype}, {args.device}, {args.threads} thread(s), TP=1; median of "
          f"{args.repeats} runs, alternating\n")
    print("| implementation | prefill (ms) | decode per step (ms) | whole generation (s) "
          "| generated tokens/s |")
    print("|---|---:|---:|---:|---:|")
    rate = {}
    for name in fns:
        prefill = statistics.median(times[name, 1])
        whole = statistics.median(times[name, n])
        per_step = (whole - prefill) / (n - 1)
        rate[name] = args.prompts * n / whole
        print(f"| {name} | {1000 * prefill:.1f} | {1000 * per_step:.1f} | {whole:.2f} "
              f"| {rate[name]:.1f} |")
    ours, theirs = rate.values()
    (a, b) = tokens.values()
    print(f"\nratio, generated tokens/s ours / transformers: {ours / theirs:.3f}; "
          f"tokens that agree: {int((a == b).sum())} of {a.numel()}")


if __name__ == "__main__":
    main()
