"""Model, optimizer and RNG state as flat named tensors plus JSON, and back, at any TP degree.

A tensor is described by a `TensorSpec`: this shard's shape and dtype, the dimension it is split
along over TP ranks (`None`: replicated) and whether it is vocab-parallel (split and padded to a
TP-dependent size; rows at or past the real vocabulary are padding). The split comes from the
parameter tags `tp_split_dim` / `vocab_parallel` that the model layers set (engine/param_tags.py).

Loading at another TP degree happens here, per tensor: this rank's slice of the full tensor is cut
from the saved shards that overlap it (so only those are read), vocabulary padding is dropped and
re-added as zeros for the new padded size. Optimizer moments shaped like their parameter follow the
parameter's split; every other optimizer tensor (the step counter) is replicated.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.checkpoint_files import CheckpointError, TensorFile, to_json_text
from engine.param_tags import param_tags

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}


@dataclass(frozen=True)
class TensorSpec:
    """How one saved tensor is laid out over the saving run's TP ranks."""

    shape: tuple[int, ...]  # this TP shard's shape (every shard has the same shape)
    dtype: str  # torch dtype name without the "torch." prefix
    split_dim: int | None  # dimension split over TP ranks; None = replicated
    vocab_parallel: bool  # split dimension is the vocabulary, padded to a TP-dependent size

    @classmethod
    def of(cls, tensor: torch.Tensor, *, like: torch.Tensor | None = None) -> TensorSpec:
        """The spec of `tensor`, taking split attributes from `like` (default: the tensor itself)."""
        tags = param_tags(tensor if like is None else like)
        split = tags.tp_split_dim
        return cls(shape=tuple(tensor.shape), dtype=str(tensor.dtype).removeprefix("torch."),
                   split_dim=None if split is None else split % tensor.dim(),
                   vocab_parallel=tags.vocab_parallel)

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "split_dim": self.split_dim,
                "vocab_parallel": self.vocab_parallel}

    @classmethod
    def from_json(cls, name: str, data: Any) -> TensorSpec:
        try:
            spec = cls(shape=tuple(int(s) for s in data["shape"]), dtype=str(data["dtype"]),
                       split_dim=data["split_dim"], vocab_parallel=bool(data["vocab_parallel"]))
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"metadata entry for tensor {name!r} is malformed") from None
        if spec.dtype not in _DTYPES or not (
                spec.split_dim is None or (isinstance(spec.split_dim, int)
                                           and 0 <= spec.split_dim < len(spec.shape))):
            raise CheckpointError(f"metadata entry for tensor {name!r} is malformed")
        return spec


@dataclass(frozen=True)
class Target:
    """Where a loaded tensor goes: the shape and split of this rank's shard in the live model."""

    shape: tuple[int, ...]
    split_dim: int | None
    vocab_parallel: bool

    @classmethod
    def of(cls, tensor: torch.Tensor, *, like: torch.Tensor | None = None) -> Target:
        spec = TensorSpec.of(tensor, like=like)
        return cls(spec.shape, spec.split_dim, spec.vocab_parallel)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DistributedDataParallel wrapper (names then carry no `module.`)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


# ----------------------------------------------------------------------------- full-shape checks

def _logical_shape(name: str, shape: tuple[int, ...], split_dim: int | None, vocab_parallel: bool,
                   tp: int, vocab: int | None) -> tuple[int, ...]:
    """The tensor's shape over all TP ranks, with vocabulary padding removed when `vocab` is known."""
    full = list(shape)
    if split_dim is not None:
        full[split_dim] *= tp
        if vocab_parallel and vocab is not None:
            if vocab > full[split_dim]:
                raise CheckpointError(f"parameter {name!r}: vocab_size {vocab} exceeds its padded "
                                      f"vocabulary dimension {full[split_dim]} at tp={tp}")
            full[split_dim] = vocab
    return tuple(full)


def check_fits(name: str, spec: TensorSpec, target: Target, *, saved_tp: int, tp: int,
               vocab: int | None) -> None:
    """Raise naming `name` unless the saved tensor can fill `target` (same full shape and split,
    or split in one layout and whole in the other: a routed expert with and without `etp`)."""
    resplit = None in (spec.split_dim, target.split_dim) and not spec.vocab_parallel
    if (spec.split_dim != target.split_dim and not resplit) \
            or spec.vocab_parallel != target.vocab_parallel:
        raise CheckpointError(
            f"parameter {name!r} is split along dim {spec.split_dim} in the checkpoint but along "
            f"dim {target.split_dim} in the model")
    saved = _logical_shape(name, spec.shape, spec.split_dim, spec.vocab_parallel, saved_tp, vocab)
    live = _logical_shape(name, target.shape, target.split_dim, target.vocab_parallel, tp, vocab)
    if saved != live:
        raise CheckpointError(
            f"parameter {name!r} has shape {list(saved)} in the checkpoint but {list(live)} in "
            f"the model (full shapes over TP; shard {list(spec.shape)} at tp={saved_tp} vs "
            f"{list(target.shape)} at tp={tp})")


# ----------------------------------------------------------------------------- resharding reader

class ShardReader:
    """Cuts this rank's shard of a saved tensor out of the saved TP shards that overlap it."""

    def __init__(self, open_file: Callable[[str], TensorFile], section: dict[str, Any], *,
                 tp: int, tp_rank: int, vocab: int | None):
        """`section`: the metadata's model or optimizer entry: `files` per saved TP rank (a name,
        or with PP one name per stage) and, with PP, the stage of each tensor (`stages`)."""
        self._open, self._files = open_file, section["files"]
        self._stages = section.get("stages", {})
        self.saved_tp, self.tp, self.tp_rank, self.vocab = len(self._files), tp, tp_rank, vocab

    def _file(self, saved_rank: int, name: str) -> str:
        entry = self._files[saved_rank]
        if isinstance(entry, str):
            return entry
        if name not in self._stages:
            raise CheckpointError(f"the checkpoint's metadata places {name!r} on no stage")
        return entry[self._stages[name]]

    def _saved_shard(self, saved_rank: int, name: str, spec: TensorSpec) -> torch.Tensor:
        file = self._open(self._file(saved_rank, name))
        tensor = file.get(name)
        if tuple(tensor.shape) != spec.shape or tensor.dtype != _DTYPES[spec.dtype]:
            raise CheckpointError(
                f"{file.path}: tensor {name!r} does not match its metadata ({list(tensor.shape)} "
                f"{tensor.dtype} vs {list(spec.shape)} {spec.dtype})")
        return tensor

    def read(self, name: str, spec: TensorSpec, target: Target) -> torch.Tensor:
        """This rank's shard of `name`, shaped like `target` (call `check_fits` first)."""
        if spec.split_dim != target.split_dim:
            return self._resplit(name, spec, target)
        same_split = self.saved_tp == self.tp and spec.shape == target.shape
        if spec.split_dim is None or same_split:
            return self._saved_shard(self.tp_rank if same_split else 0, name, spec)
        dim, size, saved_size = spec.split_dim, target.shape[spec.split_dim], spec.shape[spec.split_dim]
        start = self.tp_rank * size
        real_end = saved_size * self.saved_tp
        if spec.vocab_parallel and self.vocab is not None:
            real_end = self.vocab  # rows past the real vocabulary are padding: dropped here
        stop = min(start + size, real_end)
        pieces = []
        for saved_rank in range(start // saved_size, -(-stop // saved_size) if stop > start else 0):
            lo = max(start, saved_rank * saved_size) - saved_rank * saved_size
            hi = min(stop, (saved_rank + 1) * saved_size) - saved_rank * saved_size
            pieces.append(self._saved_shard(saved_rank, name, spec).narrow(dim, lo, hi - lo))
        pad = size - sum(piece.shape[dim] for piece in pieces)
        if pad:  # the new layout's vocabulary padding: zeros
            pad_shape = list(target.shape)
            pad_shape[dim] = pad
            pieces.append(torch.zeros(pad_shape, dtype=_DTYPES[spec.dtype]))
        return torch.cat(pieces, dim)


    def _resplit(self, name: str, spec: TensorSpec, target: Target) -> torch.Tensor:
        """A tensor split over TP in one layout and whole in the other: this rank's slice of
        the saved whole tensor, or the saved slices joined."""
        if spec.split_dim is None:
            dim = target.split_dim
            size = target.shape[dim]
            return self._saved_shard(0, name, spec).narrow(dim, self.tp_rank * size, size).clone()
        return torch.cat([self._saved_shard(r, name, spec) for r in range(self.saved_tp)],
                         spec.split_dim)


# ----------------------------------------------------------------------------- model

@dataclass
class FlatState:
    """Named tensors to write plus the JSON description that goes into metadata."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def model_state(model: nn.Module) -> FlatState:
    """This rank's model shard: one tensor per storage, tied names recorded as aliases."""
    tensors: dict[str, torch.Tensor] = {}
    specs: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    owner_of: dict[tuple, str] = {}
    for name, tensor in unwrap(model).state_dict(keep_vars=True).items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"model state {name!r} is not a tensor ({type(tensor).__name__})")
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tensor.stride(), tensor.dtype)
        if tensor.numel() and key in owner_of:
            aliases[name] = owner_of[key]
            continue
        owner_of[key] = name
        tensors[name] = tensor.detach()
        specs[name] = TensorSpec.of(tensor).to_json()
    return FlatState(tensors, {"tensors": specs, "aliases": aliases})


def merge_stage_meta(stages: list[dict[str, Any]]) -> dict[str, Any]:
    """One model or optimizer metadata entry from the pipeline stages' (stage order): the union of
    their tensors with the first stage that holds each (`stages`), their aliases and scalars, and
    each optimizer param group's names in stage order (a name twice, the tied embedding, once)."""
    merged: dict[str, Any] = {"tensors": {}, "stages": {}}
    for p, stage in enumerate(stages):
        for name, spec in stage["tensors"].items():
            if name not in merged["stages"]:
                merged["tensors"][name], merged["stages"][name] = spec, p
        for key in ("aliases", "scalars"):
            if key in stage:
                merged[key] = {**stage[key], **merged.get(key, {})}
    if "param_groups" in stages[0]:
        merged["param_groups"] = [
            dict(group, params=list(dict.fromkeys(
                name for stage in stages for name in stage["param_groups"][g]["params"])))
            for g, group in enumerate(stages[0]["param_groups"])]
    return merged


def _specs(meta: dict[str, Any]) -> dict[str, TensorSpec]:
    return {name: TensorSpec.from_json(name, data) for name, data in meta["tensors"].items()}


def load_model_state(model: nn.Module, meta: dict[str, Any], reader: ShardReader, *,
                     only_prefix: str = "", partial: bool = False) -> None:
    """Check every parameter against the checkpoint first, then copy this rank's shards in.

    With `only_prefix`, checkpoint entries outside that prefix are ignored (e.g. load the
    `student.` weights of a training checkpoint without its objective's projections). `partial`:
    the model is one pipeline stage, which holds some of the checkpoint's entries."""
    live = unwrap(model).state_dict(keep_vars=True)
    specs = {k: v for k, v in _specs(meta).items() if k.startswith(only_prefix)}
    aliases = {k: v for k, v in meta["aliases"].items() if k.startswith(only_prefix)}
    for name, tensor in live.items():
        source = aliases.get(name, name)
        if source not in specs:
            raise CheckpointError(f"parameter {name!r} of the model is missing from the checkpoint")
        check_fits(name, specs[source], Target.of(tensor), saved_tp=reader.saved_tp, tp=reader.tp,
                   vocab=reader.vocab)
    extra = [name for name in [*specs, *aliases] if name not in live]
    if extra and not partial:
        raise CheckpointError(f"checkpoint parameter {extra[0]!r} does not exist in the model")
    with torch.no_grad():
        for name, tensor in live.items():
            source = aliases.get(name, name)
            tensor.copy_(reader.read(source, specs[source], Target.of(tensor)))


# ----------------------------------------------------------------------------- optimizer

def _param_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """Names of the optimizer's parameters in its flat (state_dict index) order."""
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    missing = [i for i, p in enumerate(ordered) if id(p) not in names]
    if missing:
        raise CheckpointError(f"optimizer parameter #{missing[0]} is not a parameter of the model")
    return [names[id(p)] for p in ordered]


def _json_value(value: Any, where: str) -> Any:
    to_json_text(value, where)  # raises naming `where` unless plain data
    return value


def optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, *,
                    saved: dict | None = None) -> FlatState:
    """Optimizer state keyed by parameter NAME: tensors `name/key`, other values and groups in JSON.
    `saved`: the optimizer's state dict when the caller has it (None: `optimizer.state_dict()`)."""
    names = _param_names(optimizer, model)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = optimizer.state_dict() if saved is None else saved
    tensors, specs, scalars = {}, {}, {}
    for index, entry in saved["state"].items():
        for key, value in entry.items():
            flat = f"{names[index]}/{key}"
            if isinstance(value, torch.Tensor):
                # moments shaped like the parameter share its split; anything else is replicated
                like = params[index] if value.shape == params[index].shape else None
                tensors[flat] = value.detach()
                specs[flat] = TensorSpec.of(value.detach(), like=like).to_json()
            else:
                scalars[flat] = _json_value(value, f"optimizer state {flat!r}")
    groups = [{key: (([names[i] for i in value]) if key == "params"
                     else _json_value(value, f"optimizer param_groups[{g}].{key}"))
               for key, value in group.items()} for g, group in enumerate(saved["param_groups"])]
    return FlatState(tensors, {"tensors": specs, "scalars": scalars, "param_groups": groups})


def _live_groups(names: list[str], optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The optimizer's parameter names, per param group."""
    groups, offset = [], 0
    for group in optimizer.param_groups:
        groups.append(names[offset:offset + len(group["params"])])
        offset += len(group["params"])
    return groups


def _check_groups(saved_groups: list[dict], names: list[str], optimizer: torch.optim.Optimizer,
                  *, partial: bool = False) -> None:
    live = _live_groups(names, optimizer)
    if len(saved_groups) != len(live):
        raise CheckpointError(f"optimizer has {len(live)} param groups but the checkpoint has "
                              f"{len(saved_groups)}")
    for g, (group, expected) in enumerate(zip(saved_groups, live)):
        # by name: a pipeline checkpoint lists each group stage by stage
        saved = set(group["params"])
        missing = [name for name in expected if name not in saved]
        if missing:
            raise CheckpointError(f"optimizer param group {g}: {missing[0]!r} is not in the "
                                  "checkpoint's")
        if not partial and len(saved) != len(expected):
            raise CheckpointError(f"optimizer param group {g} has {len(expected)} parameters but "
                                  f"the checkpoint has {len(saved)}")


def _owner(flat: str, index_of: dict[str, int]) -> tuple[int, str]:
    """(optimizer index, state key) of a `param_name/key` entry."""
    name, _, key = flat.rpartition("/")
    if name not in index_of:
        raise CheckpointError(f"optimizer state {flat!r} belongs to no optimizer parameter")
    return index_of[name], key


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module,
                         meta: dict[str, Any], reader: ShardReader, *,
                         partial: bool = False) -> None:
    """Rebuild the optimizer's index-keyed state dict from name-keyed tensors, resharding moments.
    `partial`: the optimizer is one pipeline stage's, which holds some of the saved entries."""
    names = _param_names(optimizer, model)
    _check_groups(meta["param_groups"], names, optimizer, partial=partial)
    index_of = {name: i for i, name in enumerate(names)}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}

    def here(flat: str) -> bool:
        return not partial or flat.rpartition("/")[0] in index_of

    for flat, spec in _specs(meta).items():
        if not here(flat):
            continue
        index, key = _owner(flat, index_of)
        live = Target.of(params[index])
        # moments shaped like the parameter follow its split (saved whole: that of the parameter)
        like_param = spec.split_dim is not None or spec.shape == _logical_shape(
            flat, live.shape, live.split_dim, live.vocab_parallel, reader.tp, None)
        target = live if like_param else Target(spec.shape, None, False)
        check_fits(flat, spec, target, saved_tp=reader.saved_tp, tp=reader.tp, vocab=reader.vocab)
        state.setdefault(index, {})[key] = reader.read(flat, spec, target)
    for flat, value in meta["scalars"].items():
        if not here(flat):
            continue
        index, key = _owner(flat, index_of)
        state.setdefault(index, {})[key] = value
    groups = [dict(group, params=[index_of[n] for n in live])
              for group, live in zip(meta["param_groups"], _live_groups(names, optimizer))]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ----------------------------------------------------------------------------- RNG

def rng_state() -> FlatState:
    """Every generator a training step may draw from: torch CPU and CUDA, Python, NumPy."""
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(internal), gauss_next],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return FlatState(tensors, meta)


def set_rng_state(file: TensorFile, meta: dict[str, Any]) -> list[str]:
    """Restore the generators saved by `rng_state`; return the ones that could not be restored."""
    skipped = []
    torch.set_rng_state(file.get("rng.torch_cpu"))
    cuda = sorted((k for k in file.keys() if k.startswith("rng.cuda.")),
                  key=lambda k: int(k.rpartition(".")[2]))
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all([file.get(k) for k in cuda])
    elif cuda or torch.cuda.is_available():
        skipped.append("cuda")
    try:
        version, internal, gauss_next = meta["python"]
        random.setstate((version, tuple(internal), gauss_next))
        kind, keys, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{file.path}: the saved Python/NumPy RNG state is malformed") from None
    return skipped


def parse_header(file: TensorFile, key: str) -> Any:
    text = file.header().get(key)
    try:
        return json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        raise CheckpointError(f"{file.path}: header entry {key!r} is not valid JSON") from None
