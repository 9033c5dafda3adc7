"""Hugging Face <-> engine checkpoints for Llama, Qwen2, Mistral and GPT-2, at any TP degree.

    python tools/convert_hf.py import --hf HF_DIR --out CKPT_DIR --tp N [--verify] [--force]
                                      [--tokenizer-out DIR]
    python tools/convert_hf.py import --gguf FILE.gguf --out CKPT_DIR --tp N [--dtype float32|bfloat16]
                                      [--tokenizer-out DIR] [--verify] [--force]
    python tools/convert_hf.py export --ckpt CKPT_DIR --out HF_DIR [--tokenizer PATH] [--dtype D] [--force]
                                      [--verify] [--packed FILE]
    python tools/convert_hf.py unpack --packed FILE --out HF_DIR [--tokenizer PATH] [--force]

Import reads `config.json` and the safetensors weights (one file or a sharded index) and writes an
ordinary training checkpoint: `CKPT_DIR/step_00000000/` and `CKPT_DIR/latest`, the model under
`student.*`, the metadata config `{"model": <ModelConfig>, "hf_import": {...}}`. So
`distill.teacher=CKPT_DIR`, `train.init=CKPT_DIR` and tools/score.py take it as it is, at any TP
degree (loading reshards). For TP N the tool spawns N gloo ranks on this machine
(engine/spawn.py); each reads the full Hugging Face weights, keeps its shard, and `save_checkpoint`
writes the shards, so peak memory is about N times the model. Tensors keep their source dtype (a
source mixing float dtypes is stored in fp32). The tokenizer files of HF_DIR are copied into
`step_00000000/tokenizer/`: loading verifies only the files metadata.json lists, so they ride along
untouched, and export copies them back.

`--gguf FILE.gguf` imports a llama.cpp file instead (tools/gguf_import.py: transformers' GGUF
reader and the `gguf` package, `pip install -e '.[gguf]'`): its architecture is one of the above
that transformers' GGUF reader knows, its tensors are dequantized to `--dtype` (float32 by default,
which holds every GGML type's dequantized values exactly; bfloat16 rounds them), and the tokenizer
that transformers rebuilds from the GGUF metadata is written as `tokenizer.json` and
`tokenizer_config.json` into `step_00000000/tokenizer/`. `--tokenizer-out DIR` (both sources) also
writes the tokenizer files into DIR (for tools/preprocess_data.py). `--verify` of a GGUF import
compares against transformers' model on the file's dequantized weights, rounded to `--dtype`.

`--verify` then loads HF_DIR with transformers (eager attention) and the new checkpoint at TP 1 in
this process, runs both in float64 on sample tokens, and fails when a logit differs by more than
1e-6 + 4 x transformers' own rounding noise on those tokens (the largest difference between its
fp32 and its float64 logits). No fixed bound can do: transformers keeps fp32 islands even in
float64 (RMSNorm and the eager softmax compute in fp32), so its logits carry fp32 rounding that
grows with the logits' magnitude and the depth: ~2e-4 for a 30-layer Llama, more than a bound
that would still catch a bad conversion. Measuring that noise scales the bound to the model; a
conversion error (a wrong or bf16-rounded tensor, a wrong epsilon) shows far above it.
(The float64 copies take 2x the fp32 memory of the model.)

Export loads the checkpoint at TP 1 in this process (whatever TP it was saved at) and writes
`model.safetensors` (in the imported dtype, fp32 for trained checkpoints, or `--dtype`),
`config.json` and the tokenizer files (the checkpoint's, or `--tokenizer`). Import then export
gives back the same tensors bit for bit. A ternary checkpoint (`model.quant: ternary`) exports the
values its forward multiplies, `s * {-1, 0, 1}` (exact in bf16), so any Llama runtime runs it; its
training also quantized each linear's input to 8 bits per token, which config.json records under
`megadistill_quant` and runtimes ignore. `--verify` runs transformers on the written directory
against our model on exactly the written tensors (quantization off: the ternary values are in the
weights already), in float64, with the bound of import's `--verify`. Importing such a directory
reads `megadistill_quant` back into `model.quant` and `model.quant_activation_bits`, and stores
each ternary weight as fp32 master weights that quantize to exactly the exported `s * {-1, 0, 1}`
(layers/quant.py `ternary_master`), so the imported model computes what the exported one did and
exports, `--packed` too, the same values again.
`--packed FILE` also writes the ternary weights at 2 bits each plus a scale (tools/ternary_pack.py)
and reports its size; `unpack` turns that file back into the same Hugging Face directory.

All commands build their output in a temporary directory next to `--out` and rename it into
place at the end, so a failure leaves nothing behind; an existing non-empty `--out` is refused
unless `--force`. Exit codes: 0 done, 1 `--verify` found a larger difference, 2 bad input or a
failed conversion (one `ConfigError: ...` line, or the error's own kind, on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402
from safetensors import SafetensorError, safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from distill.weights import save_weights  # noqa: E402
from engine.config import ConfigError, from_dict, to_dict  # noqa: E402
from engine.entry import EXIT_CONFIG, EXIT_RUNTIME, USER_ERRORS, ensure_new_output, report  # noqa: E402
from engine.log import get_logger, setup_logging  # noqa: E402
from engine.parallel import ParallelConfig, ParallelLayout, make_layout  # noqa: E402
from engine.spawn import RankFailure, run_ranks  # noqa: E402
from layers.config import ModelConfig, check_model_layout  # noqa: E402
from layers.hf import (  # noqa: E402
    engine_to_hf_state_dict,
    hf_config_to_model_config,
    hf_to_engine_state_dict,
    model_config_to_hf_config,
)
from layers.model import TransformerLM  # noqa: E402
from layers.quant import load_quantized_full_state_dict, quantized_full_state_dict  # noqa: E402
from layers.sharding import load_full_state_dict  # noqa: E402
from tools import gguf_import  # noqa: E402
from tools.gguf_import import GGUFWeights  # noqa: E402
from tools.score import checkpoint_model_config, load_model  # noqa: E402
from tools.ternary_pack import read_packed, write_packed  # noqa: E402

log = get_logger("convert_hf")

# --verify: max |logit difference| to transformers, both in float64, is
# VERIFY_TOL + VERIFY_NOISE_FACTOR x transformers' own fp32-vs-float64 difference
VERIFY_TOL, VERIFY_NOISE_FACTOR = 1e-6, 4.0
TOKENIZER_DIR = "tokenizer"  # inside the checkpoint's step directory
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model",
                   "chat_template.jinja")
SPECIAL_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16,
                       "F16": torch.float16, "I64": torch.int64, "I32": torch.int32,
                       "U8": torch.uint8, "BOOL": torch.bool}


class VerifyError(RuntimeError):
    """`--verify` found the checkpoint's logits too far from transformers'."""


class ConversionError(RuntimeError):
    """A TP rank failed while writing the checkpoint."""


# ------------------------------------------------------------------------------ Hugging Face side

def read_hf_config(hf_dir: Path) -> dict:
    """The `config.json` of a Hugging Face model directory."""
    if not hf_dir.is_dir():
        raise ConfigError("--hf", f"no such directory: {hf_dir}")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConfigError("--hf", f"{hf_dir} has no config.json")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError("--hf", f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ConfigError("--hf", f"{path} does not hold a JSON object")
    return config


def hf_model_config(hf_config: dict, *, key: str = "--hf") -> ModelConfig:
    """The engine architecture of a Hugging Face config (unsupported ones named)."""
    try:
        return hf_config_to_model_config(hf_config)
    except KeyError as err:
        raise ConfigError(key, f"config.json lacks {err}") from None
    except ValueError as err:
        raise ConfigError(key, str(err)) from None


def _check_inside(name: object, index: Path) -> None:
    """A file named by a sharded index must lie in the model directory (as checkpoint loading
    requires of its metadata). Checked on the name itself, not the resolved path: Hugging Face's
    cache makes every file a symlink into a blob store outside the directory."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise ConfigError("--hf", f"{index} names {name!r}, a file outside the model directory")


def hf_weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of a model directory: one file, or the shards an index names."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise ConfigError("--hf", f"{index} has no valid weight_map") from None
        for name in names:
            _check_inside(name, index)
        missing = [name for name in names if not (hf_dir / name).is_file()]
        if missing or not names:
            raise ConfigError("--hf", f"{index} names {missing[0] if missing else 'no file'}, "
                                      f"which is not in {hf_dir}")
        return [hf_dir / name for name in names]
    if (hf_dir / "model.safetensors").is_file():
        return [hf_dir / "model.safetensors"]
    raise ConfigError("--hf", f"{hf_dir} has no weights (model.safetensors or "
                              "model.safetensors.index.json; .bin files are not read)")


def read_hf_tensors(files: list[Path], *, meta: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of `files`; with `meta`, empty tensors of the right shape and dtype (no I/O)."""
    tensors = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as handle:
                for name in handle.keys():
                    tensors[name] = _meta_tensor(handle, name) if meta else handle.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise ConfigError("--hf", f"cannot read {path} ({err})") from None
    return tensors


def _meta_tensor(handle, name: str) -> torch.Tensor:
    info = handle.get_slice(name)
    dtype = _SAFETENSORS_DTYPES.get(info.get_dtype())
    if dtype is None:
        raise ConfigError("--hf", f"tensor {name!r} has unsupported dtype {info.get_dtype()}")
    return torch.empty(info.get_shape(), dtype=dtype, device="meta")


def storage_dtype(files: list[Path], cfg: ModelConfig) -> torch.dtype:
    """Check the weights' names against `cfg` (no tensor is read) and return their float dtype."""
    try:
        full = hf_to_engine_state_dict(read_hf_tensors(files, meta=True), cfg)
    except ValueError as err:
        raise ConfigError("--hf", str(err)) from None
    dtypes = {tensor.dtype for tensor in full.values()}
    if len(dtypes) == 1 and next(iter(dtypes)) in DTYPES.values():
        return dtypes.pop()
    log.warning("weights mix dtypes %s: storing float32", sorted(map(str, dtypes)))
    return torch.float32


def tokenizer_files(directory: Path) -> list[Path]:
    return [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]


def copy_files(files: list[Path], destination: Path) -> None:
    if files:
        destination.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copy2(path, destination / path.name)


# ------------------------------------------------------------------------------ output directories

@contextlib.contextmanager
def staged_output(out: Path, *, force: bool) -> Iterator[Path]:
    """A fresh directory next to `out` that replaces `out` when the block succeeds and is removed
    when it fails, so nobody ever sees a half-written `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    stage.mkdir()
    try:
        yield stage
        ensure_new_output(out, force=force)  # again: it may have appeared meanwhile
        old = stage.with_name(stage.name + ".old")
        if out.exists():  # an empty directory, or anything under --force
            if force:
                log.warning("replacing %s (--force)", out)
            out.rename(old)
        stage.rename(out)
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------ import

@dataclass(frozen=True)
class HFWeights:
    """The safetensors files of a Hugging Face directory (picklable: each TP rank reads them)."""

    files: tuple[str, ...]
    key: str = "--hf"
    described_by: str = "config.json"

    def full_state_dict(self, cfg: ModelConfig) -> dict[str, torch.Tensor]:
        return hf_to_engine_state_dict(read_hf_tensors([Path(f) for f in self.files]), cfg)


Weights = HFWeights | GGUFWeights


def _write_shard(weights: Weights, cfg: ModelConfig, root: str, *, tp: int, dtype: torch.dtype,
                 run_config: dict) -> str:
    """One TP rank (or the only process at TP 1): load its shard of the weights and save it."""
    layout = make_layout(ParallelConfig(tp=tp))
    model = TransformerLM(cfg, layout).to(dtype)
    full = weights.full_state_dict(cfg)
    try:
        load_quantized_full_state_dict(model, full)
    except ValueError as err:
        raise ConfigError(weights.key, f"weights do not fit {weights.described_by} ({err})") from None
    return str(save_weights(root, model, layout, config=run_config))


def write_checkpoint(weights: Weights, cfg: ModelConfig, root: Path, *, tp: int,
                     dtype: torch.dtype, run_config: dict, timeout_s: float) -> Path:
    """Write the engine checkpoint `root/step_00000000` at TP `tp`; return its directory."""
    args = (weights, cfg, str(root))
    kwargs = dict(tp=tp, dtype=dtype, run_config=run_config)
    if tp == 1:
        return Path(_write_shard(*args, **kwargs))
    threads = max(1, (os.cpu_count() or 1) // tp)
    try:
        return Path(run_ranks(_write_shard, tp, *args, timeout_s=timeout_s, threads=threads,
                              **kwargs)[0])
    except (RankFailure, TimeoutError) as err:
        lines = [line for line in str(err).splitlines() if line.strip()]
        log.debug("%s", err)
        raise ConversionError(f"{lines[0].rstrip(':')}: {lines[-1]}" if len(lines) > 1
                              else str(err)) from None


def sample_ids(cfg: ModelConfig) -> torch.Tensor:
    """Fixed pseudo-random token ids `[2, min(32, max_seq_len)]` for `--verify`."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab_size, (2, min(32, cfg.max_seq_len)), generator=generator)


def load_reference(hf_dir: Path) -> torch.nn.Module:
    """The Hugging Face model as transformers runs it for --verify: float64, eager attention,
    eval mode. Loaded in fp32 first (the weights exactly, at most fp32): buffers that the model
    derives at load time, such as Gemma's embedding scale, are then rounded to fp32 as in the
    engine, not to a bf16 checkpoint's dtype. Mixtures of experts run their experts one by one
    (transformers' grouped matrix products have no float64 kernel)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager",
                                                              dtype=torch.float32,
                                                              experts_implementation="eager")
    return model.double().eval()


@dataclass(frozen=True)
class LogitCheck:
    """What --verify measured on the sample tokens (max absolute logit differences)."""

    diff: float  # the checkpoint against transformers, both in float64
    noise: float  # transformers' fp32 logits against its float64 ones

    @property
    def bound(self) -> float:
        return VERIFY_TOL + VERIFY_NOISE_FACTOR * self.noise

    @property
    def passed(self) -> bool:
        return self.diff <= self.bound  # NaN fails

    def describe(self) -> str:
        return (f"max abs logit difference to transformers {self.diff:.3g} (bound {self.bound:.3g}"
                f" = {VERIFY_TOL:g} + {VERIFY_NOISE_FACTOR:g} x {self.noise:.3g}, transformers' "
                "own fp32-vs-float64 difference on these tokens; both compared in float64)")


def verify_logits(hf_dir: Path, step_dir: Path, cfg: ModelConfig) -> LogitCheck:
    """The checkpoint at TP 1 against transformers on `hf_dir`, on `sample_ids`."""
    return verify_checkpoint(lambda: load_reference(hf_dir), step_dir, cfg)


@torch.no_grad()
def verify_checkpoint(load_theirs: Callable[[], torch.nn.Module], step_dir: Path,
                      cfg: ModelConfig) -> LogitCheck:
    """The checkpoint at TP 1 against the float64 transformers model `load_theirs()` returns; a
    ternary one without its 8-bit inputs, which runtimes do not quantize (its weights are the
    exported ones)."""
    ours = dataclasses.replace(cfg, quant_activation_bits=None)
    return compare_logits(load_theirs, cfg, lambda: load_model(step_dir, ours, ParallelLayout.single(),
                                                               dtype=torch.float64))


@torch.no_grad()
def compare_logits(load_theirs: Callable[[], torch.nn.Module], cfg: ModelConfig,
                   build_ours: Callable[[], TransformerLM]) -> LogitCheck:
    """Our float64 TP-1 model of `cfg` (built once transformers' is dropped, so that the two are
    never in memory together) against transformers' float64 model `load_theirs()`, on
    `sample_ids`."""
    reference = load_theirs()
    ids = sample_ids(cfg)
    expected = reference(ids).logits  # [batch, seq, vocab], float64
    # The weights are at most fp32, so float64 -> fp32 gives them back exactly.
    noise = (reference.float()(ids).logits.double() - expected).abs().max().item()
    del reference
    ours = build_ours()
    got = ours(ids).logits[..., :ours.config.vocab_size]  # TP 1: the whole (padded) vocabulary
    return LogitCheck(diff=(got - expected).abs().max().item(), noise=noise)


def check_tp(cfg: ModelConfig, tp: int) -> None:
    if tp < 1:
        raise ConfigError("--tp", f"must be >= 1 (got {tp})")
    try:
        check_model_layout(cfg, tp)
    except ConfigError as err:
        raise ConfigError("--tp", str(err)) from None


@dataclass(frozen=True)
class ImportSource:
    """What an import reads, whatever the file format."""

    path: Path  # the Hugging Face directory or the GGUF file
    hf_config: dict  # its Hugging Face config dict
    cfg: ModelConfig
    weights: Weights
    dtype: torch.dtype  # the checkpoint's
    write_tokenizer: Callable[[Path], list[Path]]  # into a directory; returns the files written
    load_reference: Callable[[], torch.nn.Module]  # transformers' float64 model, for --verify


def check_import_outputs(args: argparse.Namespace) -> None:
    ensure_new_output(args.out, force=args.force)
    if args.tokenizer_out is not None:
        ensure_new_output(args.tokenizer_out, force=args.force, key="--tokenizer-out")


def import_hf(args: argparse.Namespace) -> None:
    if args.dtype is not None:
        raise ConfigError("--dtype", "applies to --gguf only (a Hugging Face import keeps the "
                                     "weights' own dtype)")
    check_import_outputs(args)
    hf_config = read_hf_config(args.hf)
    cfg = hf_model_config(hf_config)
    check_tp(cfg, args.tp)
    files = hf_weight_files(args.hf)
    dtype = storage_dtype(files, cfg)
    if cfg.quant != "none":  # master weights that quantize to the exported values need fp32
        dtype = torch.float32

    def copy_tokenizer(directory: Path) -> list[Path]:
        files = tokenizer_files(args.hf)
        copy_files(files, directory)
        return [directory / file.name for file in files]

    write_import(args, ImportSource(
        path=args.hf, hf_config=hf_config, cfg=cfg, weights=HFWeights(tuple(map(str, files))),
        dtype=dtype, write_tokenizer=copy_tokenizer, load_reference=lambda: load_reference(args.hf)))


def import_gguf(args: argparse.Namespace) -> None:
    check_import_outputs(args)
    hf_config = gguf_import.read_gguf_config(args.gguf)
    cfg = hf_model_config(hf_config, key="--gguf")
    check_tp(cfg, args.tp)
    dtype = DTYPES[args.dtype or "float32"]
    weights = GGUFWeights(str(args.gguf), hf_config, dtype)
    write_import(args, ImportSource(
        path=args.gguf, hf_config=hf_config, cfg=cfg, weights=weights, dtype=dtype,
        write_tokenizer=lambda directory: gguf_import.write_tokenizer(args.gguf, directory),
        load_reference=lambda: gguf_import.load_reference(weights)))


def write_import(args: argparse.Namespace, source: ImportSource) -> None:
    """The checkpoint of `source` at `--out` (tokenizer in `step_00000000/tokenizer/`, a copy in
    `--tokenizer-out` if given), checked with `--verify`; nothing is left behind on failure."""
    hf_config, dtype = source.hf_config, str(source.dtype).removeprefix("torch.")
    run_config = {"model": to_dict(source.cfg), "hf_import": {
        "source": str(source.path.resolve()), "dtype": dtype,
        **{key: hf_config[key] for key in SPECIAL_TOKEN_KEYS if hf_config.get(key) is not None}}}
    with contextlib.ExitStack() as stack:
        stage = stack.enter_context(staged_output(args.out, force=args.force))
        step_dir = write_checkpoint(source.weights, source.cfg, stage, tp=args.tp,
                                    dtype=source.dtype, run_config=run_config,
                                    timeout_s=args.timeout)
        tokenizer = source.write_tokenizer(step_dir / TOKENIZER_DIR)
        if args.verify:
            _verify(verify_checkpoint(source.load_reference, step_dir, source.cfg))
        if args.tokenizer_out is not None:  # entered last: renamed into place first
            copy_files(tokenizer, stack.enter_context(staged_output(args.tokenizer_out,
                                                                    force=args.force)))
    log.info("imported %s (%s, %s) into %s at TP %d", source.path, hf_config.get("model_type"),
             dtype, args.out, args.tp)


def _verify(check: LogitCheck) -> None:
    if not check.passed:
        raise VerifyError(f"--verify: {check.describe()}: too large; nothing was written")
    log.info("verify: %s", check.describe())


# ------------------------------------------------------------------------------ export

def export_config(cfg: ModelConfig, run_config: dict, dtype: torch.dtype) -> dict:
    """The Hugging Face `config.json`, with the special token ids recorded at import."""
    try:
        config = model_config_to_hf_config(cfg)
    except ValueError as err:
        raise ConfigError("--ckpt", str(err)) from None
    imported = run_config.get("hf_import") or {}
    config.update({key: imported[key] for key in SPECIAL_TOKEN_KEYS if key in imported})
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return config


def export_tokenizer_files(source: Path | None, step_dir: Path) -> list[Path]:
    """Tokenizer files to ship: `--tokenizer` (a file or a directory), else the checkpoint's."""
    if source is None:
        found = tokenizer_files(step_dir / TOKENIZER_DIR)
        if not found:
            log.warning("%s records no tokenizer: exporting weights and config only "
                        "(pass --tokenizer to add one)", step_dir)
        return found
    if source.is_file():
        return [source]
    found = tokenizer_files(source) if source.is_dir() else []
    if not found:
        raise ConfigError("--tokenizer", f"{source} is neither a file nor a directory holding "
                                         f"any of {', '.join(TOKENIZER_FILES)}")
    return found


def export_hf(args: argparse.Namespace) -> None:
    ensure_new_output(args.out, force=args.force)
    if args.packed is not None:
        ensure_new_output(args.packed, force=args.force, key="--packed")
    step_dir, run_config, cfg = checkpoint_model_config(args.ckpt)
    saved_dtype = DTYPES[(run_config.get("hf_import") or {}).get("dtype", "float32")]
    dtype = DTYPES[args.dtype] if args.dtype else saved_dtype
    config = export_config(cfg, run_config, dtype)
    config_text = json.dumps(config, indent=2) + "\n"
    tokenizer = export_tokenizer_files(args.tokenizer, step_dir)
    # Load in the stored dtype so that the exported tensors are exactly the stored ones.
    model = load_model(step_dir, cfg, ParallelLayout.single(), dtype=saved_dtype)
    full, ternary = quantized_full_state_dict(model)
    full = {name: tensor.to(dtype) for name, tensor in full.items()}
    if args.packed is not None and not ternary:
        raise ConfigError("--packed", f"{step_dir} is not a ternary checkpoint (model.quant=none)")
    with staged_output(args.out, force=args.force) as stage:
        write_hf_dir(stage, full, cfg, config_text, tokenizer)
        if args.verify:  # on the written directory, as a runtime would load it
            _verify(compare_logits(lambda: load_reference(stage), cfg,
                                   lambda: exported_model(full, cfg)))
        if args.packed is not None:
            _write_packed_file(args.packed, full, ternary, cfg, config_text)
    log.info("exported %s as Hugging Face %s (%s) to %s", step_dir, config["model_type"],
             config["torch_dtype"], args.out)


def exported_model(full: dict[str, torch.Tensor], cfg: ModelConfig) -> TransformerLM:
    """Ours on exactly the exported tensors, in float64: quantization off (the ternary weights are
    already `s * {-1, 0, 1}`, and a Llama runtime does not quantize activations)."""
    model = TransformerLM(dataclasses.replace(cfg, quant="none"), ParallelLayout.single())
    load_full_state_dict(model.double(), full)
    return model.eval()


def write_hf_dir(out: Path, full: dict[str, torch.Tensor], cfg: ModelConfig, config_text: str,
                 tokenizer: list[Path]) -> None:
    """`model.safetensors`, `config.json` and the tokenizer files of a full engine state dict."""
    weights = {name: tensor.contiguous()
               for name, tensor in engine_to_hf_state_dict(full, cfg).items()}
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(config_text)
    copy_files(tokenizer, out)


def _write_packed_file(path: Path, full: dict[str, torch.Tensor], ternary: list[str],
                       cfg: ModelConfig, config_text: str) -> None:
    """The packed form, written next to `path` and renamed into place (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        size = write_packed(partial, full, ternary, model_config=to_dict(cfg),
                            hf_config_text=config_text)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    log.info("packed %s: %s", path, size.describe())


def unpack_hf(args: argparse.Namespace) -> None:
    ensure_new_output(args.out, force=args.force)
    model_config, config_text, full = read_packed(args.packed)
    cfg = from_dict(ModelConfig, model_config, prefix="--packed(model)")
    tokenizer = export_tokenizer_files(args.tokenizer, args.packed) if args.tokenizer else []
    with staged_output(args.out, force=args.force) as stage:
        write_hf_dir(stage, full, cfg, config_text, tokenizer)
    log.info("unpacked %s into the Hugging Face directory %s", args.packed, args.out)


# ------------------------------------------------------------------------------ command line

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="Hugging Face directory or GGUF file -> engine checkpoint")
    source = imp.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", type=Path, help="directory with config.json + safetensors")
    source.add_argument("--gguf", type=Path, help="GGUF file (needs the gguf package)")
    imp.add_argument("--out", type=Path, required=True, help="checkpoint directory to create")
    imp.add_argument("--dtype", choices=("float32", "bfloat16"),
                     help="--gguf: dtype of the dequantized weights (default float32)")
    imp.add_argument("--tokenizer-out", type=Path,
                     help="also write the tokenizer files here (they always go into the "
                          "checkpoint's tokenizer/ directory)")
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel degree to save at")
    imp.add_argument("--verify", action="store_true", help="compare logits with transformers")
    imp.add_argument("--timeout", type=float, default=3600.0, help="seconds the TP ranks may take")
    exp = commands.add_parser("export", help="engine checkpoint -> Hugging Face model directory")
    exp.add_argument("--ckpt", required=True, help="checkpoint directory (or a root with `latest`)")
    exp.add_argument("--out", type=Path, required=True, help="Hugging Face directory to create")
    exp.add_argument("--tokenizer", type=Path, help="tokenizer file or directory to ship")
    exp.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the exported weights "
                                                             "(default: the imported one, else float32)")
    exp.add_argument("--verify", action="store_true", help="compare logits with transformers")
    exp.add_argument("--packed", type=Path, help="ternary checkpoints: also write 2-bit weights here")
    unp = commands.add_parser("unpack", help="packed ternary file -> Hugging Face model directory")
    unp.add_argument("--packed", type=Path, required=True, help="file written by export --packed")
    unp.add_argument("--out", type=Path, required=True, help="Hugging Face directory to create")
    unp.add_argument("--tokenizer", type=Path, help="tokenizer file or directory to ship")
    for sub in (imp, exp, unp):
        sub.add_argument("--force", action="store_true", help="replace an existing --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    try:
        if args.command == "import" and args.gguf is not None:
            import_gguf(args)
        else:
            {"import": import_hf, "export": export_hf, "unpack": unpack_hf}[args.command](args)
    except VerifyError as err:
        return report(err, EXIT_RUNTIME)
    except (*USER_ERRORS, ConversionError) as err:
        return report(err, EXIT_CONFIG)
    return 0


if __name__ == "__main__":
    sys.exit(main())
