"""Packed ternary checkpoints: 2 bits per quantized weight plus one scale each, one safetensors file.

    python tools/convert_hf.py export --ckpt CKPT_DIR --out HF_DIR --packed FILE   # writes both
    python tools/convert_hf.py unpack --packed FILE --out HF_DIR [--tokenizer PATH]  # the way back

The file holds the model's *full* state dict (layers/sharding.py names) as exported:

- each ternary weight NAME (a decoder linear of a `model.quant: ternary` model) as
  `NAME.ternary_codes`, uint8 `[ceil(numel / 4)]` (layers/quant.py `pack_ternary`), and
  `NAME.ternary_scale`, a 0-d tensor in the export dtype;
- every other tensor (embeddings, norms, LM head, biases) unchanged, in the export dtype;
- metadata: `format`, `model` (the engine ModelConfig), `hf_config` (the exported config.json
  text) and `shapes` (of the packed weights), all JSON.

`codes * scale` gives each weight back bit for bit (`split_ternary` refuses anything else), so
unpacking writes the same `model.safetensors` and `config.json` as the export did. Reading refuses
(one `ConfigError: --packed: ...` line, nothing written) a 2-bit field of 3, which no ternary value
packs to, and a scale that is not one finite number > 0: either would unpack to wrong weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.config import ConfigError
from layers.quant import pack_ternary, split_ternary, unpack_ternary

FORMAT = "megadistill-ternary-2bit-v1"
CODES, SCALE = ".ternary_codes", ".ternary_scale"


@dataclass(frozen=True)
class PackedSize:
    """What a packed file holds, for the size report."""

    file_bytes: int
    ternary_params: int  # weights stored as 2-bit codes
    ternary_bytes: int  # their codes and scales
    other_params: int  # full-precision values (embeddings, norms, LM head, biases)
    other_bytes: int

    def describe(self) -> str:
        mb = 1e6
        return (f"{self.file_bytes / mb:.2f} MB: {self.ternary_params / 1e6:.2f} M ternary weights "
                f"in {self.ternary_bytes / mb:.2f} MB (2 bits each + one scale per tensor), "
                f"{self.other_params / 1e6:.2f} M full-precision values in "
                f"{self.other_bytes / mb:.2f} MB")


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def write_packed(path: Path, full: dict[str, torch.Tensor], ternary_names: list[str], *,
                 model_config: dict, hf_config_text: str) -> PackedSize:
    """Write `full` to `path` with `ternary_names` packed; ValueError if one is not ternary."""
    tensors, shapes = {}, {}
    ternary_params = ternary_bytes = other_params = other_bytes = 0
    for name, tensor in full.items():
        if name not in ternary_names:
            tensors[name] = tensor.contiguous()
            other_params, other_bytes = other_params + tensor.numel(), other_bytes + _nbytes(tensor)
            continue
        try:
            codes, scale = split_ternary(tensor)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        tensors[name + CODES], tensors[name + SCALE] = pack_ternary(codes), scale
        shapes[name] = list(tensor.shape)
        ternary_params += tensor.numel()
        ternary_bytes += _nbytes(tensors[name + CODES]) + _nbytes(scale)
    metadata = {"format": FORMAT, "model": json.dumps(model_config), "hf_config": hf_config_text,
                "shapes": json.dumps(shapes)}
    save_file(tensors, path, metadata=metadata)
    return PackedSize(path.stat().st_size, ternary_params, ternary_bytes, other_params,
                      other_bytes)


def read_packed(path: Path) -> tuple[dict, str, dict[str, torch.Tensor]]:
    """(engine model config, config.json text, full state dict with ternary weights unpacked)."""
    if not path.is_file():
        raise ConfigError("--packed", f"no such file: {path}")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ConfigError("--packed", f"{path} is not a {FORMAT} file")
            raw = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise ConfigError("--packed", f"cannot read {path} ({err})") from None
    full = {}
    for name, shape in json.loads(metadata["shapes"]).items():
        if name + CODES not in raw or name + SCALE not in raw:
            raise ConfigError("--packed", f"{path}: ternary weight {name!r} has no codes or scale")
        try:
            full[name] = _unpacked(raw.pop(name + CODES), raw.pop(name + SCALE), tuple(shape))
        except ValueError as err:
            raise ConfigError("--packed", f"{path}: ternary weight {name!r}: {err}") from None
    full.update(raw)
    return json.loads(metadata["model"]), metadata["hf_config"], full


def _unpacked(codes: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`codes * scale` of one weight; ValueError for a corrupt code or scale, which would write
    weights of 2s or NaN without a word."""
    if scale.numel() != 1 or not scale.is_floating_point() or \
            not (torch.isfinite(scale).all() and scale > 0):
        raise ValueError(f"scale must be one finite float > 0 (got {scale.tolist()})")
    return unpack_ternary(codes, shape).to(scale.dtype) * scale
