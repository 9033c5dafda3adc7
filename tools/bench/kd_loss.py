"""Peak memory and time of forward KL, forward + backward, from hidden states and LM-head weights.

Methods, on the same inputs (T tokens, vocabulary V split over --tp ranks, width H, fp32, CPU):
  naive         logits = hidden @ W.T for both models (gathered over TP), log_softmax both,
                F.kl_div, backward
  liger         Liger-Kernel's LigerFusedLinearJSDLoss with beta=0 (forward KL), no hard loss;
                it has no tensor parallelism, so it runs at TP=1 only
  ours_unfused  logits as in naive but left vocab-sharded, then distill.divergence
  ours_fused    distill.fused.fused_head_loss with the per-token weights (all 1) of the summed
                KL: no [T, V] logits at all, the gradient computed in the forward (4 products)
  ours_fused_recompute
                distill.fused_lm_and_divergence, whose backward recomputes the tiles (6 products)
  essential     the four [T, H] x [H, V/tp] matrix products alone (both models' logits, the
                gradients of hidden states and weight): the floor of any exact method

`--softcap C` caps both models' logits at C (c * tanh(logits / c), Gemma 2's final-logit
soft-cap) in every method (the fused ones inside their tiles); Liger has no such option.

Every (method, V, TP) runs in fresh spawned processes (one per rank, gloo), so each starts from
the same resident memory. Peak = high-water mark of the process's resident set (getrusage, and a
1 ms sampling thread for peaks below an earlier one) minus the resident set once the inputs
exist; it includes the returned gradients. Time = best of --repeats forward+backward runs. TP=2
numbers are per rank (the larger of the ranks). Prints one markdown table per (V, TP) and the
targets: fused peak <= 10% of naive (and below Liger), fused time <= 0.8x naive and <= 1.5x the
essential products (and below Liger).

On a GPU (`--device cuda`, TP=1 in this process, `--dtype bf16` for bf16 inputs and weights): peak
= `torch.cuda.max_memory_allocated` above the inputs, time = best of --repeats, synchronized.

    python tools/bench/kd_loss.py [--tokens 2048] [--vocab 65536 131072] [--hidden 256]
                                  [--tp 1 2] [--threads 2] [--repeats 2] [--methods ...]
                                  [--device cpu|cuda] [--dtype fp32|bf16] [--softcap C]
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from distill import divergence, fused_lm_and_divergence
from distill.fused import fused_head_loss
from engine import collectives as C
from engine.mappings import copy_to_tp, gather_from_tp
from engine.spawn import run_ranks
from layers.softcap import softcap
from tools.bench.llama import DTYPES

METHODS = ("naive", "liger", "ours_unfused", "ours_fused", "ours_fused_recompute", "essential")
MB = 2**20


def _inputs(tokens: int, vocab: int, hidden: int, group, *, device: str = "cpu",
            dtype: torch.dtype = torch.float32, cap: float | None = None) -> dict:
    """Student and teacher hidden states [T, H], this rank's weight shards [V/tp, H], and the
    final-logit soft-cap of both models (`softcap`, None: off)."""
    replicated = torch.Generator().manual_seed(0)
    sharded = torch.Generator().manual_seed(1 + C.group_rank(group))
    shard = vocab // C.group_size(group)
    x = dict(hidden=torch.randn(tokens, hidden, generator=replicated),
             teacher_hidden=torch.randn(tokens, hidden, generator=replicated),
             weight=torch.randn(shard, hidden, generator=sharded) * hidden**-0.5,
             teacher_weight=torch.randn(shard, hidden, generator=sharded) * hidden**-0.5)
    x = {name: t.to(device, dtype) for name, t in x.items()}
    x["hidden"].requires_grad_()
    x["weight"].requires_grad_()
    x["softcap"] = cap
    return x


def _naive(x: dict, group) -> torch.Tensor:
    student = gather_from_tp(copy_to_tp(x["hidden"], group) @ x["weight"].T, group)  # [T, V]
    student = softcap(student, x["softcap"])
    with torch.no_grad():
        teacher = C.all_gather(x["teacher_hidden"] @ x["teacher_weight"].T, group, dim=-1)
        teacher = softcap(teacher, x["softcap"], inplace=True)
    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True,
                    reduction="none").sum(-1).sum()


def _liger(x: dict, _group) -> torch.Tensor:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0,
                                   compiled=False)
    labels = torch.zeros(x["hidden"].shape[0], dtype=torch.long, device=x["hidden"].device)
    # Liger averages over tokens; scale back to the sum the others return.
    return loss(x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"], labels) \
        * x["hidden"].shape[0]


def _ours_unfused(x: dict, group) -> torch.Tensor:
    student = softcap(copy_to_tp(x["hidden"], group) @ x["weight"].T, x["softcap"])  # [T, V/tp]
    with torch.no_grad():
        teacher = softcap(x["teacher_hidden"] @ x["teacher_weight"].T, x["softcap"], inplace=True)
    return divergence(student, teacher, group=group).sum()


def _ours_fused(x: dict, group) -> torch.Tensor:
    out = fused_head_loss(copy_to_tp(x["hidden"], group), x["weight"],
                          teacher_hidden=x["teacher_hidden"],
                          teacher_weight_shard=x["teacher_weight"], group=group,
                          div_weight=torch.ones(x["hidden"].shape[0], device=x["hidden"].device),
                          softcap=x["softcap"], teacher_softcap=x["softcap"])
    assert out.path == "grad_in_forward"
    return out.loss


def _ours_fused_recompute(x: dict, group) -> torch.Tensor:
    _, kl = fused_lm_and_divergence(copy_to_tp(x["hidden"], group), x["weight"],
                                    teacher_hidden=x["teacher_hidden"],
                                    teacher_weight_shard=x["teacher_weight"], group=group,
                                    softcap=x["softcap"], teacher_softcap=x["softcap"])
    return kl.sum()


class _Essential:
    """The four matrix products alone, run when `backward()` is called (so `_measure` times them
    like the losses): student and teacher logits [T, V/tp], then the gradients of the hidden
    states ([T, V/tp] x [V/tp, H]) and of the weight shard ([V/tp, T] x [T, H])."""

    def __init__(self, x: dict):
        self.x = x

    def backward(self) -> None:
        x = self.x
        with torch.no_grad():
            student = x["hidden"] @ x["weight"].T
            teacher = x["teacher_hidden"] @ x["teacher_weight"].T
            student.sub_(teacher)  # stands for d loss / d logits (one pass, as small as a copy)
            x["hidden"].grad = student @ x["weight"]
            x["weight"].grad = student.T @ x["hidden"]


_RUN = {"naive": _naive, "liger": _liger, "ours_unfused": _ours_unfused, "ours_fused": _ours_fused,
        "ours_fused_recompute": _ours_fused_recompute, "essential": lambda x, _: _Essential(x)}


class _PeakRSS:
    """Highest resident set seen while active: getrusage's high-water mark, and a sampler for
    peaks that stay below a high-water mark set before the measurement began."""

    def __init__(self) -> None:
        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def __enter__(self) -> _PeakRSS:
        self.hwm_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if hwm > self.hwm_before:
            self.peak = max(self.peak, hwm)


def _measure(method: str, tokens: int, vocab: int, hidden: int, repeats: int,
             dtype: torch.dtype = torch.float32, cap: float | None = None) -> tuple[float, float]:
    """(peak MB above the inputs, best seconds) of forward+backward on this rank."""
    group = dist.group.WORLD if dist.get_world_size() > 1 else None
    x = _inputs(tokens, vocab, hidden, group, dtype=dtype, cap=cap)
    gc.collect()
    base = psutil.Process().memory_info().rss
    best = float("inf")
    with _PeakRSS() as rss:
        for _ in range(repeats):
            C.barrier(group)
            start = time.perf_counter()
            _RUN[method](x, group).backward()
            best = min(best, time.perf_counter() - start)
            x["hidden"].grad = x["weight"].grad = None
    return (rss.peak - base) / MB, best


def _measure_cuda(method: str, tokens: int, vocab: int, hidden: int, repeats: int,
                  dtype: torch.dtype, cap: float | None = None) -> tuple[float, float]:
    """`_measure` on the GPU, in this process at TP=1: the allocator's peak above the inputs."""
    x = _inputs(tokens, vocab, hidden, None, device="cuda", dtype=dtype, cap=cap)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        _RUN[method](x, None).backward()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
        x["hidden"].grad = x["weight"].grad = None
    return (torch.cuda.max_memory_allocated() - base) / MB, best


def _liger_missing() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return True
    return False


def _table(args: argparse.Namespace, vocab: int, tp: int,
           rows: dict[str, tuple[float, float] | None]) -> list[str]:
    naive_mb, naive_s = rows["naive"]
    essential_s = rows["essential"][1] if rows.get("essential") else None
    cap = "" if args.softcap is None else f", logits soft-capped at {args.softcap:g}"
    out = [f"\nT={args.tokens} V={vocab} H={args.hidden} TP={tp}"
           f"{' (per rank)' if tp > 1 else ''}{cap}, {args.dtype}, "
           f"{'GPU' if args.device == 'cuda' else f'CPU, {args.threads} thread(s) in all'}\n",
           "| method | peak MB above inputs | time s | memory / naive | time / naive "
           "| time / essential |", "|---|---:|---:|---:|---:|---:|"]
    for method, value in rows.items():
        if value is None:
            why = "no tensor parallelism" if tp > 1 else "no soft-capping" \
                if args.softcap is not None else "liger-kernel not installed"
            out.append(f"| {method} | n/a ({why}) | | | | |")
            continue
        mb, sec = value
        vs_essential = "" if essential_s is None else f"{sec / essential_s:.2f}"
        out.append(f"| {method} | {mb:.0f} | {sec:.2f} | {mb / naive_mb:.3f} "
                   f"| {sec / naive_s:.2f} | {vs_essential} |")
    fused_mb, fused_s = rows["ours_fused"]
    checks = [("fused peak <= 10% of naive", fused_mb <= 0.10 * naive_mb),
              ("fused time <= 0.8x naive", fused_s <= 0.8 * naive_s)]
    if essential_s is not None:
        checks.append(("fused time <= 1.5x essential", fused_s <= 1.5 * essential_s))
    if rows.get("liger"):
        liger_mb, liger_s = rows["liger"]
        checks += [("fused peak < Liger", fused_mb < liger_mb),
                   ("fused time < Liger", fused_s < liger_s)]
    out.append("\n" + "; ".join(f"{name}: {'PASS' if ok else 'FAIL'}" for name, ok in checks))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, nargs="+", default=[65536, 131072])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=2, help="threads in all, split over ranks")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per method (best kept)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--softcap", type=float, default=None,
                        help="final-logit soft-cap of both models (Gemma 2: 30); default off")
    args = parser.parse_args(argv)
    if args.device == "cuda" and args.tp != [1]:
        parser.error("--device cuda measures TP=1 only (one GPU): pass --tp 1")
    return args


def _row(args: argparse.Namespace, method: str, vocab: int, tp: int) -> tuple[float, float] | None:
    if method == "liger" and (tp > 1 or _liger_missing() or args.softcap is not None):
        return None
    if args.device == "cuda":
        return _measure_cuda(method, args.tokens, vocab, args.hidden, args.repeats,
                             DTYPES[args.dtype], args.softcap)
    per_rank = run_ranks(_measure, tp, method, args.tokens, vocab, args.hidden, args.repeats,
                         DTYPES[args.dtype], args.softcap, threads=max(1, args.threads // tp),
                         timeout_s=1800)
    return max(r[0] for r in per_rank), max(r[1] for r in per_rank)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    for tp in args.tp:
        for vocab in args.vocab:
            rows: dict[str, tuple[float, float] | None] = {}
            for method in args.methods:
                rows[method] = _row(args, method, vocab, tp)
                if rows[method] is None:
                    continue
                print(f"  {method} V={vocab} TP={tp}: {rows[method][0]:.0f} MB, "
                      f"{rows[method][1]:.2f} s", flush=True)
            print("\n".join(_table(args, vocab, tp, rows)), flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
