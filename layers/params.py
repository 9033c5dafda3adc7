"""Parameters that carry their own sharding and init, and the TP-independent initialization.

Every parameter of the model is made by `new_param` and carries three attributes (the first two
are `engine.param_tags` tags, read with `param_tags(param)`):

- `tp_split_dim`: the dim split over the TP group (this rank holds the `tp_rank`-th equal slice),
  or `None` when the parameter is replicated on every TP rank;
- `vocab_parallel`: True for the embedding / output weights, whose dim 0 is the padded vocabulary;
- `init`: a std (normal init) or "ones" / "zeros".

`full_init` builds a parameter's *full* value from a generator seeded by (seed, parameter name);
the model then slices it for its rank, so TP=1, 2 or 4 hold the same full model for one seed.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
from torch import nn

from engine.param_tags import tag

Init = float | Literal["ones", "zeros"]


def new_param(*shape: int, tp_split_dim: int | None, init: Init, vocab_parallel: bool = False,
              device: torch.device | None = None) -> nn.Parameter:
    """An uninitialized parameter of this rank's `shape`, tagged with how it is split and filled."""
    param = nn.Parameter(torch.empty(shape, device=device))
    tag(param, tp_split_dim=tp_split_dim, vocab_parallel=vocab_parallel)
    param.init = init
    return param


def name_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for (seed, name); Python's hash() changes between processes."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def full_init(init: Init, shape: tuple[int, ...], *, seed: int, name: str) -> torch.Tensor:
    """The full (unsharded, unpadded) float32 CPU value of parameter `name` for `seed`."""
    if init == "ones":
        return torch.ones(shape)
    if init == "zeros":
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed(name_seed(seed, name))
    return torch.empty(shape).normal_(0.0, float(init), generator=generator)
