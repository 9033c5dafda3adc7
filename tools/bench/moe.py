"""One mixture-of-experts block, forward + backward: ours against transformers' on the same weights.

    python tools/bench/moe.py [--hidden 512 --experts 8 --top-k 2 --expert-ffn 1024 --tokens 2048]
                              [--steps 5 --threads 2] [--skip-ep]

In one process, alternating steps (drift of the machine hits all of them), on the same tokens:
- ours: `layers/moe.py` at EP=1 (sorted dispatch, one matrix product per expert and weight);
- transformers' `Qwen3MoeSparseMoeBlock` with its default expert kernel (`grouped_mm`: all experts
  in one grouped matrix product) and with `experts_implementation="eager"` (its loop over experts
  with one-hot index masks);
- a dense gated MLP with the same active parameters per token (inner width top_k x expert ffn): the
  matrix products no MoE can avoid, as the essential-work row.
The block's weights are copied from transformers' into ours (outputs are checked to agree first).

Then, unless `--skip-ep`, two gloo ranks at EP=2 run the block once under the collective counters:
all_to_all bytes per token (forward and backward, the per-expert counts included) against the
analytic `2 x top_k x hidden x bytes` per direction (the counters record each send buffer whole,
its local share included; the share that crosses ranks is `(ep - 1) / ep` of it for uniform
routing), and the expert parameter bytes per rank at EP 1/2/4.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine import collectives as C  # noqa: E402
from engine.parallel import ParallelConfig, ParallelLayout, make_layout  # noqa: E402
from engine.param_tags import param_tags  # noqa: E402
from engine.spawn import run_ranks  # noqa: E402
from layers.config import ModelConfig, MoEConfig  # noqa: E402
from layers.mlp import MLP  # noqa: E402
from layers.moe import MoE  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-ffn", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per implementation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-ep", action="store_true", help="no EP=2 communication measurement")
    return parser.parse_args(argv)


def model_config(args: argparse.Namespace) -> ModelConfig:
    moe = MoEConfig(experts=args.experts, top_k=args.top_k, expert_ffn_hidden=args.expert_ffn,
                    norm_topk_prob=True)
    return ModelConfig(vocab_size=64, hidden=args.hidden, layers=1, heads=8, ffn_hidden=args.expert_ffn,
                       max_seq_len=args.tokens, moe=moe)


def hf_block(args: argparse.Namespace, implementation: str | None):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    kwargs = {"experts_implementation": implementation} if implementation else {}
    config = Qwen3MoeConfig(hidden_size=args.hidden, num_experts=args.experts,
                            num_experts_per_tok=args.top_k, moe_intermediate_size=args.expert_ffn,
                            norm_topk_prob=True, **kwargs)
    torch.manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.02)
    return block


def ours_from(hf, args: argparse.Namespace) -> MoE:
    ours = MoE(model_config(args), ParallelLayout.single())
    ffn = args.expert_ffn
    with torch.no_grad():
        ours.router.weight.copy_(hf.gate.weight)
        for e, expert in ours.experts.items():
            gate_up, down = hf.experts.gate_up_proj[int(e)], hf.experts.down_proj[int(e)]
            expert.gate_proj.weight.copy_(gate_up[:ffn])
            expert.up_proj.weight.copy_(gate_up[ffn:])
            expert.down_proj.weight.copy_(down)
    return ours


def timed(fn, x: torch.Tensor, module: torch.nn.Module) -> float:
    start = time.perf_counter()
    out = fn(x)
    out.float().pow(2).mean().backward()
    module.zero_grad(set_to_none=True)
    x.grad = None
    return time.perf_counter() - start


def race(args: argparse.Namespace) -> tuple[dict[str, list[float]], float]:
    hf_grouped, hf_eager = hf_block(args, None), hf_block(args, "eager")
    hf_eager.load_state_dict(hf_grouped.state_dict())
    ours = ours_from(hf_grouped, args)
    dense = MLP(model_config(args), ParallelLayout.single(), ffn_hidden=args.top_k * args.expert_ffn)
    x = torch.randn(1, args.tokens, args.hidden, generator=torch.Generator().manual_seed(1),
                    requires_grad=True)
    with torch.no_grad():
        diff = (ours(x)[0] - hf_grouped(x)).abs().max().item()
    runners = {
        "megadistill MoE (EP=1)": (lambda t: ours(t)[0], ours),
        "transformers Qwen3-MoE block, grouped_mm": (hf_grouped, hf_grouped),
        "transformers Qwen3-MoE block, eager loop": (hf_eager, hf_eager),
        f"dense gated MLP, ffn {args.top_k * args.expert_ffn} (same active parameters)": (dense, dense),
    }
    times: dict[str, list[float]] = {name: [] for name in runners}
    for step in range(1 + args.steps):  # one untimed warm-up step each
        for name, (fn, module) in runners.items():
            elapsed = timed(fn, x, module)
            if step:
                times[name].append(elapsed)
    return times, diff


def _ep_bytes(args: argparse.Namespace) -> dict[str, float]:
    layout = make_layout(ParallelConfig(ep=2))
    moe = MoE(model_config(args), layout)
    for param in moe.parameters():
        torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, args.tokens, args.hidden, generator=torch.Generator().manual_seed(layout.rank),
                    requires_grad=True)
    with C.count_collectives() as forward:
        out, _ = moe(x)
    with C.count_collectives() as backward:
        out.pow(2).mean().backward()
    expert_bytes = sum(p.numel() * p.element_size() for p in moe.parameters() if param_tags(p).expert)
    return {"forward": forward.bytes["all_to_all"], "backward": backward.bytes["all_to_all"],
            "expert_bytes": expert_bytes}


def report(args: argparse.Namespace, times: dict[str, list[float]], diff: float) -> None:
    print(f"MoE block: hidden {args.hidden}, {args.experts} experts, top {args.top_k}, expert ffn "
          f"{args.expert_ffn}, {args.tokens} tokens, fp32, CPU, {args.threads} threads, forward + "
          f"backward, {args.steps} timed steps each, alternating; max |output diff| {diff:.1e}\n")
    print("| implementation | median step (ms) | best step (ms) | tokens/s (median) "
          "| its median / ours |")
    print("|---|---:|---:|---:|---:|")
    ours = statistics.median(next(iter(times.values())))
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {1000 * median:.0f} | {1000 * min(samples):.0f} | "
              f"{args.tokens / median:.0f} | {median / ours:.2f}x |")


def report_ep(args: argparse.Namespace, per_rank: list[dict[str, float]]) -> None:
    tokens, width = args.tokens, 4  # fp32
    analytic = 2 * args.top_k * args.hidden * width  # per token, per direction (dispatch + combine)
    forward = statistics.mean(r["forward"] for r in per_rank) / tokens
    backward = statistics.mean(r["backward"] for r in per_rank) / tokens
    print(f"\nEP=2 (2 gloo ranks, {tokens} tokens each): all_to_all bytes per token per MoE block")
    print("| direction | counted | analytic 2 x top_k x hidden x 4 B "
          "| of which crosses ranks (uniform routing) |")
    print("|---|---:|---:|---:|")
    for name, value in (("forward", forward), ("backward", backward)):
        print(f"| {name} | {value:.0f} | {analytic} | {analytic / 2:.0f} |")
    whole = per_rank[0]["expert_bytes"] * 2
    print("\nexpert parameter bytes per rank: " + ", ".join(
        f"EP={ep}: {whole / ep / 2**20:.1f} MiB" for ep in (1, 2, 4)))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    times, diff = race(args)
    report(args, times, diff)
    if not args.skip_ep:
        report_ep(args, run_ranks(_ep_bytes, 2, args, timeout_s=600, threads=1))


if __name__ == "__main__":
    main()
