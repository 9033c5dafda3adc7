"""GGUF files (llama.cpp's format) as Hugging Face configs, state dicts and tokenizers, read through
transformers' GGUF loader and the `gguf` package: what `tools/convert_hf.py import --gguf` imports.

Everything goes through transformers, which already maps llama.cpp's metadata keys to a config,
llama.cpp's tensor names to its own (undoing the q/k row permutation llama.cpp's converter applies
to Llama-layout models), dequantizes every GGML type the `gguf` package knows (F16, Q8_0, Q4_0,
Q4_1, the K-quants, ...) to fp32 with `gguf.quants.dequantize`, and rebuilds the tokenizer from the
vocabulary and merges in the metadata. From there the engine's own Hugging Face adapters
(layers/hf.py) take over, so every family those map imports from GGUF as well, once transformers'
GGUF reader knows its architecture.

GGUF stores float metadata as fp32 (an RMSNorm epsilon of 1e-5 reads back as 9.99999974e-06); each
float of the config is read back as the shortest decimal with the same fp32 value, which is the
value the source config.json held.

Module name: not `gguf.py`, which would shadow the `gguf` package for `python tools/...` scripts.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.config import ConfigError
from engine.log import get_logger
from layers.config import ModelConfig
from layers.hf import ARCHITECTURES, hf_to_engine_state_dict

log = get_logger("gguf_import")

KEY = "--gguf"
MIN_GGUF = "0.10.0"  # transformers' own minimum (transformers.utils.import_utils.GGUF_MIN_VERSION)
MIN_TRANSFORMERS = "4.48"  # load_gguf_checkpoint(model_to_load=): names from the model's own map
INSTALL = f"pip install 'gguf>={MIN_GGUF}' (or this project's extra: pip install -e '.[gguf]')"


def require_gguf() -> None:
    """Raise a one-line `ConfigError` when the `gguf` package is missing or too old."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConfigError(KEY, f"reading GGUF files needs the gguf package: {INSTALL}") from None
    import transformers
    from packaging.version import Version
    from transformers.utils.import_utils import is_gguf_available

    if not is_gguf_available(MIN_GGUF):
        raise ConfigError(KEY, f"the installed gguf package is older than {MIN_GGUF}: {INSTALL}")
    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise ConfigError(KEY, f"reading GGUF files needs transformers >= {MIN_TRANSFORMERS} "
                               f"(installed: {transformers.__version__})")


def supported_architectures() -> list[str]:
    """GGUF architectures this engine imports: those of layers/hf.py that transformers reads."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [arch for arch in ARCHITECTURES if arch in GGUF_SUPPORTED_ARCHITECTURES]


def file_architecture(path: Path) -> str:
    """`general.architecture` of the GGUF file at `path` (a one-line error if it is none)."""
    from gguf import GGUFReader

    if not path.is_file():
        raise ConfigError(KEY, f"no such file: {path}")
    try:
        field = GGUFReader(path).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (ValueError, KeyError, IndexError, OSError, UnicodeDecodeError) as err:
        raise ConfigError(KEY, f"{path} is not a readable GGUF file ({err})") from None


def read_gguf_config(path: Path) -> dict[str, Any]:
    """The Hugging Face config dict (as `config.json` would hold it) that transformers builds from
    the metadata of the GGUF file at `path`."""
    require_gguf()
    arch = file_architecture(path)
    supported = supported_architectures()
    if arch not in supported:
        raise ConfigError(KEY, f"unsupported GGUF architecture {arch!r} "
                               f"(supported: {', '.join(supported)})")
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    parsed = dict(load_gguf_checkpoint(str(path), return_tensors=False)["config"])
    parsed = {key: _fp32_decimal(value) for key, value in parsed.items()}
    model_type = parsed.pop("model_type")
    return transformers.AutoConfig.for_model(model_type, **parsed).to_dict()


def _fp32_decimal(value: Any) -> Any:
    """A float read from fp32 metadata -> the shortest decimal with that fp32 value."""
    return float(str(np.float32(value))) if isinstance(value, float) else value


@dataclass(frozen=True)
class GGUFWeights:
    """The weights of a GGUF file, dequantized to `dtype`; picklable, so that each TP rank of
    tools/convert_hf.py reads them itself."""

    path: str
    hf_config: dict[str, Any]
    dtype: torch.dtype
    key: str = KEY
    described_by: str = "the GGUF metadata"

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Transformers' names and layout (q/k un-permuted), dequantized."""
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        model = _hf_model(self.hf_config, device="meta")  # names only, no memory
        tensors = load_gguf_checkpoint(self.path, return_tensors=True, model_to_load=model)["tensors"]
        return {name: tensor.to(self.dtype) for name, tensor in tensors.items()}

    def full_state_dict(self, cfg: ModelConfig) -> dict[str, torch.Tensor]:
        try:
            return hf_to_engine_state_dict(self.hf_state_dict(), cfg)
        except ValueError as err:
            raise ConfigError(KEY, f"tensors do not fit the GGUF metadata ({err})") from None


def _hf_model(hf_config: dict[str, Any], *, device: str = "cpu") -> torch.nn.Module:
    import transformers

    config = transformers.AutoConfig.for_model(**hf_config)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")


@torch.no_grad()
def load_reference(weights: GGUFWeights) -> torch.nn.Module:
    """transformers' model of the GGUF file, on exactly the imported (dequantized, `dtype`-rounded)
    weights, in float64, eager attention, eval mode: the reference of `--verify`."""
    model = _hf_model(weights.hf_config)
    state = weights.hf_state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if weights.hf_config.get("tie_word_embeddings") else set()
    if set(missing) - tied or unexpected:
        raise ConfigError(KEY, f"transformers' model does not fit the file's tensors (missing "
                               f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return model.double().eval()


def write_tokenizer(path: Path, directory: Path) -> list[Path]:
    """The tokenizer transformers builds from the GGUF metadata, saved into `directory`
    (tokenizer.json, tokenizer_config.json, chat template); the files written. None when the
    file has no tokenizer (a warning)."""
    from gguf import GGUFReader

    if "tokenizer.ggml.model" not in GGUFReader(path).fields:
        log.warning("%s holds no tokenizer: importing the weights only", path)
        return []
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError) as err:
        raise ConfigError(KEY, f"cannot build the tokenizer of {path} ({err})") from None
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for file in sorted(Path(tmp).iterdir()):
            written.append(Path(shutil.copy2(file, directory / file.name)))
    return written
