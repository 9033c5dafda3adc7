"""A tiny tensor-parallel training loop on the checkpoint API, for the checkpoint tests.

`TinyTP` stands in for the layers' model: a vocab-parallel embedding (padded to a TP-dependent
size), a column/row-parallel MLP with dropout and a replicated scale, each parameter tagged with
`tp_split_dim` / `vocab_parallel` like the real layers. Every TP degree holds slices of the same
full float64 weights, so results at different TP agree to round-off.

Run under torchrun it trains, saves every `--save-interval` steps and on SIGTERM/SIGUSR1, resumes
from the newest checkpoint, and can kill itself at chosen points (mid-step, mid-save) or send
itself SIGTERM. Every rank appends one JSON line per step to `OUT/rank{r}.jsonl`, with the loss as
`float.hex` so that tests compare bits:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ckpt_worker.py \\
        --ckpt DIR --out DIR --steps 20 --save-interval 4 [--resume] [--kill-at STEP] ...
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script by torchrun

from engine import checkpoint
from engine.mappings import copy_to_tp, reduce_from_tp
from engine.parallel import ParallelConfig, ParallelLayout, make_layout
from engine.signals import PreemptionFlag

VOCAB, HIDDEN, FFN = 10, 4, 8
# parameter -> (tp_split_dim, vocab_parallel)
SPLITS = {"embed": (0, True), "up": (0, False), "down": (1, False), "scale": (None, False)}


def padded_vocab(tp: int) -> int:
    """Vocabulary padded to a multiple of 4 * tp (12 at TP=1, 16 at TP=2 and TP=4)."""
    return -(-VOCAB // (4 * tp)) * 4 * tp


def full_weights(seed: int = 0, ffn: int = FFN) -> dict[str, torch.Tensor]:
    """The full, unpadded float64 weights every TP degree slices from."""
    g = torch.Generator().manual_seed(seed)
    return {"embed": torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64),
            "up": torch.randn(ffn, HIDDEN, generator=g, dtype=torch.float64) / 2,
            "down": torch.randn(HIDDEN, ffn, generator=g, dtype=torch.float64) / 2,
            "scale": 1 + torch.rand(HIDDEN, generator=g, dtype=torch.float64)}


def shard_of(full: torch.Tensor, name: str, tp: int, tp_rank: int, *,
             pad_value: float = 0.0) -> torch.Tensor:
    """TP rank `tp_rank`'s shard of a full tensor; vocabulary rows padded with `pad_value`."""
    split, vocab_parallel = SPLITS[name]
    if split is None:
        return full.clone()
    if vocab_parallel:
        pad = full.new_full((padded_vocab(tp) - full.shape[0], *full.shape[1:]), pad_value)
        full = torch.cat([full, pad])
    return full.chunk(tp, split)[tp_rank].clone()


class TinyTP(nn.Module):
    """Embedding (vocab-parallel) -> scale -> column/row-parallel MLP with dropout -> residual."""

    def __init__(self, layout: ParallelLayout, *, seed: int = 0, ffn: int = FFN,
                 dropout: float = 0.0, pad_value: float = 0.0, tie: bool = False):
        super().__init__()
        self.layout, self.dropout = layout, dropout
        for name, full in full_weights(seed, ffn).items():
            param = nn.Parameter(shard_of(full, name, layout.tp, layout.tp_rank, pad_value=pad_value))
            param.tp_split_dim, param.vocab_parallel = SPLITS[name]
            self.register_parameter(name, param)
        if tie:  # one storage under two names, as an LM head tied to the embedding
            self.register_parameter("head", self.embed)
        self.register_buffer("version", torch.tensor(3))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [batch, seq] -> [batch, seq, hidden]
        group = self.layout.tp_group
        rows = self.embed.shape[0]  # this rank's vocabulary rows
        local = tokens.to(self.embed.device) - self.layout.tp_rank * rows
        outside = (local < 0) | (local >= rows)
        hidden = F.embedding(local.clamp(0, rows - 1), self.embed) * ~outside[..., None]
        hidden = reduce_from_tp(hidden, group) * self.scale
        ffn_shard = F.gelu(copy_to_tp(hidden, group) @ self.up.T)  # [batch, seq, ffn/tp]
        ffn_shard = F.dropout(ffn_shard, self.dropout, training=self.dropout > 0)
        return hidden + reduce_from_tp(ffn_shard @ self.down.T, group)


def batch(layout: ParallelLayout, data_pos: int) -> torch.Tensor:
    """Token ids for one step, a function of the data position and the DP rank only."""
    g = torch.Generator().manual_seed(1000 * data_pos + layout.dp_rank)
    return torch.randint(VOCAB, (2, 3), generator=g)


def loss_of(model: nn.Module, layout: ParallelLayout, data_pos: int) -> torch.Tensor:
    """Depends on the torch (dropout), Python and NumPy generators, so resume must restore all."""
    jitter = 1.0 + 0.01 * random.random() + 0.01 * float(np.random.rand())
    return model(batch(layout, data_pos)).square().mean() * jitter


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, layout: ParallelLayout,
               data_pos: int, *, mid_step=None) -> float:
    """One optimizer step (DP gradient averaging is DDP's job: wrap the model when dp > 1)."""
    loss = loss_of(model, layout, data_pos)
    if mid_step is not None:
        mid_step()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def adamw(model: nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)


# ----------------------------------------------------------------------------- torchrun entry

def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint root")
    p.add_argument("--out", required=True, help="directory for the per-rank loss logs")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--save-interval", type=int, default=0)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="start from the latest checkpoint")
    p.add_argument("--victim", type=int, default=1, help="the rank the fault options act on")
    p.add_argument("--kill-at", type=int, default=0,
                   help="SIGKILL the victim mid-way through this step")
    p.add_argument("--kill-in-save", type=int, default=0,
                   help="SIGKILL the victim after its first file of the save at this step")
    p.add_argument("--sigterm-at", type=int, default=0,
                   help="the victim sends itself SIGTERM at this step")
    p.add_argument("--timeout-s", type=float, default=20.0, help="collective timeout")
    return p.parse_args(argv)


class _Log:
    """This rank's JSON-lines record of the run (line-buffered: what is written survives kill -9)."""

    def __init__(self, path: Path):
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - kept open for the whole run

    def __call__(self, **record) -> None:
        self._file.write(json.dumps(record) + "\n")

    def die(self) -> None:
        """SIGKILL this process, noting when (the test bounds how long the other ranks take)."""
        self(event="killed", time=time.time())
        os.kill(os.getpid(), signal.SIGKILL)


def _kill_during_save(step: int, die) -> None:
    """Wrap the checkpoint's file writer so that the save at `step` dies after one file."""
    write = checkpoint.write_tensors
    marker = f"{checkpoint.step_dir_name(step)}.tmp"

    def write_then_die(path, *args, **kwargs):
        record = write(path, *args, **kwargs)
        if Path(path).parent.name == marker:
            die()
        return record

    checkpoint.write_tensors = write_then_die


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout_s))
    layout = make_layout(ParallelConfig(tp=args.tp))
    victim = layout.rank == args.victim
    log = _Log(Path(args.out) / f"rank{layout.rank}.jsonl")
    model = TinyTP(layout, dropout=0.2)
    optimizer = adamw(model)
    seed_all(17 + layout.dp_rank)  # TP ranks of one replica draw the same numbers
    start, data_pos = 0, 0
    found = checkpoint.latest_checkpoint(args.ckpt) if args.resume else None
    if found is not None:
        loaded = checkpoint.load_checkpoint(found, layout=layout, model=model, optimizer=optimizer,
                                            vocab_size=VOCAB)
        start, data_pos = loaded["step"], loaded["state"]["data_pos"]
        log(event="resume", step=start)
    if victim and args.kill_in_save:
        _kill_during_save(args.kill_in_save, log.die)
    with PreemptionFlag() as flag:
        for step in range(start + 1, args.steps + 1):
            mid_step = log.die if victim and step == args.kill_at else None
            loss = train_step(model, optimizer, layout, data_pos, mid_step=mid_step)
            data_pos += 1
            log(step=step, loss=loss.hex())
            if victim and step == args.sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            stop = flag.should_stop(layout)
            if stop or (args.save_interval and step % args.save_interval == 0):
                checkpoint.save_checkpoint(args.ckpt, step, layout=layout, model=model,
                                           optimizer=optimizer, state={"data_pos": data_pos},
                                           config=vars(args), keep=args.keep, vocab_size=VOCAB)
            if stop:
                log(event="preempted", step=step)
                break
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
