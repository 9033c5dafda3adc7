"""Checkpoint files on disk: safetensors and JSON writers, size+digest records, safe reading.

Nothing here unpickles: tensors go through safetensors, everything else through JSON, and the one
`torch.load` (`safe_torch_load`, for foreign `.bin`/`.pt` files) runs with `weights_only=True`.
Names that come from a checkpoint's metadata are checked to stay inside the checkpoint directory
before any file is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the one-line message names the culprit."""


def fsync_dir(path: Path) -> None:
    """Make renames and new entries in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """The size and digest that metadata keeps for one written file."""
    return {"size": path.stat().st_size, "sha256": sha256_of(path)}


def _owning(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or a copy when it is a view into a larger storage (safetensors refuses those)."""
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def write_tensors(path: Path, tensors: dict[str, torch.Tensor],
                  header: dict[str, str] | None = None) -> dict[str, Any]:
    """Write CPU copies of `tensors` as one safetensors file, fsync it, return its record."""
    cpu = {name: _owning(t.detach().to("cpu").contiguous()) for name, t in tensors.items()}
    save_file(cpu, str(path), metadata=header)
    _fsync_file(path)
    return file_record(path)


def write_json(path: Path, data: Any) -> dict[str, Any]:
    """Write `data` as JSON through a temporary name and an atomic rename; return its record."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        json.dump(data, f, indent=1)  # insertion order: tensors in model order
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    return file_record(path)


def to_json_text(data: Any, what: str) -> str:
    """`data` as JSON text, or a CheckpointError naming `what` when it is not plain data."""
    try:
        return json.dumps(data, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{what} must be JSON-serializable plain data ({err})") from None


def read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None


def safe_child(directory: Path, name: Any) -> Path:
    """`directory / name` for a plain file name from metadata; refuse anything that could escape."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise CheckpointError(
            f"{directory}: metadata names file {name!r} outside the checkpoint directory")
    path = directory / name
    if path.is_symlink() or not path.resolve().is_relative_to(directory.resolve()):
        raise CheckpointError(f"{directory}: file {name!r} leads outside the checkpoint directory")
    return path


def check_size(path: Path, record: Any) -> None:
    """Check that `path` exists with the size its metadata record says (one stat, no read)."""
    if not (isinstance(record, dict) and isinstance(record.get("size"), int)
            and isinstance(record.get("sha256"), str)):
        raise CheckpointError(f"{path}: metadata has no valid size/digest record for this file")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    size = path.stat().st_size
    if size != record["size"]:
        raise CheckpointError(
            f"{path} is truncated or altered: {size} bytes, metadata says {record['size']}")


def verify_file(path: Path, record: Any) -> None:
    """Check `path` against its metadata record (size, then sha256) before anything reads it."""
    check_size(path, record)
    if sha256_of(path) != record["sha256"]:
        raise CheckpointError(f"{path} is corrupted or altered: its sha256 does not match metadata")


class TensorFile:
    """Read access to one verified safetensors file: its tensors (CPU) and its string header."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path} is not a valid safetensors file ({err})") from None

    def keys(self) -> list[str]:
        return list(self._file.keys())

    def header(self) -> dict[str, str]:
        return self._file.metadata() or {}

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._file.get_tensor(name)
        except (SafetensorError, KeyError) as err:
            raise CheckpointError(f"{self.path} has no readable tensor {name!r} ({err})") from None


def safe_torch_load(path: Path | str) -> Any:
    """`torch.load` restricted to tensors and plain containers; a pickle that runs code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as err:
        lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        # torch's first line advises weights_only=False; the useful line names the blocked global
        reason = next((line for line in lines if "GLOBAL" in line), lines[0])
        raise CheckpointError(f"{path}: refused to unpickle ({reason.strip()})") from None
