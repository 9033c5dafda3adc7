"""What the model tells the engine about each parameter, in one typed place.

The layers tag every parameter they make (`tag(param, tp_split_dim=..., ...)`); the optimizer, the
distributed optimizer, checkpoints and resharding read the tags back with `param_tags(param)`. An
untagged tensor reads as the defaults: replicated over TP, not vocabulary-parallel, not a copy.
The tags live as plain attributes of the parameter, so they travel with it (`nn.Module.to`,
`state_dict` views) without any registry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParamTags:
    tp_split_dim: int | None = None
    """Dimension split over the TP group (rank r holds the r-th equal slice); None = replicated."""
    vocab_parallel: bool = False
    """Dimension 0 is the padded vocabulary (its padding depends on the TP degree)."""
    pp_duplicate: bool = False
    """The last pipeline stage's copy of a tied embedding: its gradient equals the first stage's,
    so norms count it once (on the first stage)."""
    expert: bool = False
    """A routed expert's weight, held by one rank of the EP group: its gradient is summed over the
    expert-DP group (not the whole DP group) and its norm over the EP group."""


_FIELDS = tuple(f.name for f in dataclasses.fields(ParamTags))


def param_tags(tensor: torch.Tensor) -> ParamTags:
    """The tags of `tensor` (defaults for an untagged one)."""
    return ParamTags(**{name: getattr(tensor, name, default)
                        for name, default in zip(_FIELDS, dataclasses.astuple(ParamTags()),
                                                 strict=True)})


def tag(tensor: torch.Tensor, **tags: object) -> ParamTags:
    """Set some of `tensor`'s tags (the others keep their values) and return all of them."""
    merged = dataclasses.replace(param_tags(tensor), **tags)  # rejects unknown names
    for name in _FIELDS:
        setattr(tensor, name, getattr(merged, name))
    return merged
