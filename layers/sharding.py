"""Full (unsharded) state dicts of a TP-sharded model, and loading them back at any TP degree.

A *full* state dict maps each parameter name of `TransformerLM` to its whole tensor: split
parameters gathered over the TP group in rank order along `param.tp_split_dim`, vocabulary-parallel
ones with the padding rows stripped (`[config.vocab_size, hidden]`). It is the same for every TP
degree, which makes it the exchange format of checkpoints and Hugging Face conversion. Tied output
weights appear once, as `embedding.weight`.
"""

from __future__ import annotations

import torch
from torch import nn

from engine import collectives as C
from engine.parallel import ParallelLayout
from engine.param_tags import param_tags


def full_shape(param: nn.Parameter, *, tp: int, vocab_size: int) -> tuple[int, ...]:
    """Shape of `param`'s full tensor (vocabulary rows unpadded)."""
    shape, tags = list(param.shape), param_tags(param)
    if tags.tp_split_dim is not None:
        shape[tags.tp_split_dim] *= tp
    if tags.vocab_parallel:
        shape[0] = vocab_size
    return tuple(shape)


def shard_of(param: nn.Parameter, full: torch.Tensor, *, layout: ParallelLayout,
             padded_vocab: int) -> torch.Tensor:
    """This rank's slice of `full` for `param` (vocabulary rows zero-padded to `padded_vocab` first)."""
    tags = param_tags(param)
    if tags.vocab_parallel:
        full = torch.cat([full, full.new_zeros(padded_vocab - full.shape[0], *full.shape[1:])])
    if tags.tp_split_dim is None:
        return full
    return C.split_along(full, layout.tp_group, dim=tags.tp_split_dim)


def gather_full(param: nn.Parameter, *, layout: ParallelLayout, vocab_size: int,
                tensor: torch.Tensor | None = None) -> torch.Tensor:
    """The full tensor of `param` (or of `tensor`, sharded like it: its gradient, an optimizer
    state), gathered over TP. A collective: every TP rank must call it."""
    full, tags = (param if tensor is None else tensor).detach(), param_tags(param)
    if tags.tp_split_dim is not None:
        full = C.all_gather(full, layout.tp_group, dim=tags.tp_split_dim)
    if tags.vocab_parallel:
        full = full[:vocab_size]
    return full.clone()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of `model` as its full tensor; call on every rank of the TP group."""
    return {name: gather_full(param, layout=model.layout, vocab_size=model.config.vocab_size)
            for name, param in model.named_parameters()}


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor], *,
                         strict: bool = True) -> list[str]:
    """Copy this rank's slice of each full tensor into `model`; return the names not in `full`.

    Unknown names and wrong shapes raise `ValueError`; so do missing names when `strict`.
    """
    params = dict(model.named_parameters())
    unexpected = sorted(set(full) - set(params))
    if unexpected:
        raise ValueError(f"state dict has {len(unexpected)} unknown parameter(s), first: "
                         f"{unexpected[0]!r}")
    missing = [name for name in params if name not in full]
    if strict and missing:
        raise ValueError(f"state dict lacks {len(missing)} parameter(s), first: {missing[0]!r}")
    config, layout = model.config, model.layout
    for name, tensor in full.items():
        param = params[name]
        expected = full_shape(param, tp=layout.tp, vocab_size=config.vocab_size)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name}: expected shape {expected}, got {tuple(tensor.shape)}")
        param.copy_(shard_of(param, tensor, layout=layout,
                             padded_vocab=config.padded_vocab(layout.tp)))
    return missing
