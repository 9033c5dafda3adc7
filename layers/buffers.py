"""Named activation buffers: a caller asks for names for one forward and gets those tensors back.

Names a model publishes (`buffer_names(layers, mtp_heads)`, the one list the model and the distill
config both use):

- `embedding`: the residual stream entering the first block (after positions and dropout);
- `decoder.{i}.mixer_output`: block i's attention output, after its output projection and before
  dropout and the residual add;
- `decoder.{i}.mlp_output`: block i's MLP output, likewise;
- `decoder.{i}.output`: the residual stream leaving block i;
- `decoder.{i}.router_logits`: an MoE block's router logits `[batch, seq(/tp), experts]`
  (layers/moe.py), laid out like the residual stream;
- `final_hidden`: the trunk's residual stream after the final norm (what the output layer reads);
- `mtp.{j}.mixer_output`, `mtp.{j}.mlp_output`, `mtp.{j}.output`: the same for MTP head j's block.

Each comes back in its sharded layout: `[batch, seq/tp, hidden]` split along the sequence over the
TP group under SP (`seq_sharded=True`), `[batch, seq, hidden]` replicated on every TP rank
otherwise. The tensor is the live activation, still in the autograd graph (an activation loss on it
trains the model); detach it to only read it. Nothing is kept when nothing is asked for.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

import torch

from layers.tensor_parallel import SEQ_DIM

BLOCK_BUFFERS = ("mixer_output", "mlp_output", "output")  # what every decoder block publishes
# "{trunk}.{index}.{kind}": the trunk is "decoder" (index from 0) or "mtp" (head index from 1)
_BLOCK_BUFFER = re.compile(r"(decoder|mtp)\.(\d+)\.(\w+)")


def block_name(index: int, *, mtp: bool = False) -> str:
    """The name of decoder block `index` (`decoder.{i}`) or of MTP head `index` (`mtp.{j}`): the
    prefix of its buffers and of its parameters."""
    return f"{'mtp' if mtp else 'decoder'}.{index}"


def block_buffer(block: str, kind: str) -> str:
    """`{block}.{kind}`, e.g. `decoder.3.mlp_output`."""
    return f"{block}.{kind}"


def parse_block_buffer(name: str) -> tuple[str, int, str] | None:
    """`decoder.{i}.{kind}` -> ("decoder", i, kind); `mtp.{j}.{kind}` -> ("mtp", j, kind); any
    other name (`embedding`, `final_hidden`, a malformed one) -> None. The kind is not checked."""
    match = _BLOCK_BUFFER.fullmatch(name)
    return (match.group(1), int(match.group(2)), match.group(3)) if match else None


def block_buffer_names(block: str) -> list[str]:
    """The buffers of one block: `{block}.mixer_output`, `.mlp_output`, `.output`."""
    return [block_buffer(block, kind) for kind in BLOCK_BUFFERS]


ROUTER_LOGITS = "router_logits"  # what an MoE block publishes besides BLOCK_BUFFERS


def buffer_names(layers: int, mtp_heads: int = 0, moe_layers: Collection[int] = ()) -> list[str]:
    """Every buffer name a model of `layers` decoder blocks (`moe_layers` of them mixtures of
    experts) and `mtp_heads` MTP heads publishes, in forward order."""
    trunk = [name for i in range(layers) for name in [
        *block_buffer_names(block_name(i)),
        *([block_buffer(block_name(i), ROUTER_LOGITS)] if i in moe_layers else [])]]
    heads = [name for j in range(1, mtp_heads + 1)
             for name in block_buffer_names(block_name(j, mtp=True))]
    return ["embedding", *trunk, "final_hidden", *heads]


@dataclass
class ActivationBuffer:
    """One published activation and how it is sharded over TP."""

    tensor: torch.Tensor  # [batch, seq/tp, hidden] if seq_sharded else [batch, seq, hidden]
    seq_sharded: bool  # True: split along seq_dim over the TP group; False: replicated over TP
    seq_dim: int = SEQ_DIM  # the sequence dimension of `tensor`


class BufferRecorder:
    """Keeps the activations whose names were asked for during one forward."""

    def __init__(self, wanted: Collection[str], available: Collection[str], *, seq_sharded: bool):
        unknown = sorted(set(wanted) - set(available))
        if unknown:
            raise ValueError(f"unknown activation buffer {unknown[0]!r}; this model publishes "
                             f"{_summary(available)}")
        self.wanted = frozenset(wanted)
        self.seq_sharded = seq_sharded
        self.buffers: dict[str, ActivationBuffer] = {}

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.wanted:
            self.buffers[name] = ActivationBuffer(tensor, self.seq_sharded)


def _summary(names: Collection[str]) -> str:
    names = list(names)
    return ", ".join(names) if len(names) <= 8 else f"{', '.join(names[:6])}, ..., {names[-1]}"
