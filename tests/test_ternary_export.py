"""Export of ternary checkpoints (tools/convert_hf.py export / --packed / unpack).

- The exported decoder weights are exactly what the ternary forward multiplies (`s * {-1, 0, 1}`,
  the same in fp32 and bf16), so transformers runs the model: its logits equal ours with
  activation quantization off on both sides (fp32, 1e-4, what `--verify` checks), and equal ours
  with it on when transformers' decoder linears get our 8-bit input quantizer (float64, 1e-10;
  GPT-2 only: transformers' Llama computes RMSNorm and RoPE in fp32 even in a float64 model, and
  fp32 round-off flips some roundings of the quantizer).
- The packed file (2 bits per ternary weight) unpacks into the very same files, byte for byte.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from distill.weights import save_weights
from engine.config import to_dict
from engine.parallel import ParallelLayout
from layers.config import ModelConfig
from layers.hf import engine_to_hf_state_dict
from layers.model import TransformerLM
from layers.quant import absmax_scale, quantize_activations, quantized_full_state_dict

ROOT = Path(__file__).resolve().parents[1]
from tools import convert_hf  # noqa: E402
from tools.score import checkpoint_model_config, load_model  # noqa: E402
from tools.ternary_pack import read_packed  # noqa: E402

CONFIGS = {
    "llama": ModelConfig(family="llama", vocab_size=96, hidden=32, layers=2, heads=4, kv_heads=2,
                         ffn_hidden=64, max_seq_len=48, init_std=0.1, quant="ternary"),
    "gpt2": ModelConfig(family="gpt2", vocab_size=96, hidden=32, layers=2, heads=4, ffn_hidden=64,
                        max_seq_len=48, bias=True, init_std=0.1, quant="ternary"),
}
FP32_TOL, FP64_TOL = 1e-4, 1e-10


def convert(*args: object) -> int:
    return convert_hf.main([str(a) for a in args])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ternary")
    out = {}
    for arch, cfg in CONFIGS.items():
        model = TransformerLM(cfg, ParallelLayout.single(), seed=3)
        with torch.no_grad():  # biases and norms away from their zero/one init
            for name, param in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(
                        len(name))), alpha=0.1)
        out[arch] = save_weights(root / arch, model, ParallelLayout.single(),
                                 config={"model": to_dict(cfg)})
    return out


def _ours(step_dir: Path, cfg: ModelConfig, dtype: torch.dtype) -> TransformerLM:
    return load_model(step_dir, cfg, ParallelLayout.single(), dtype=dtype)


def _ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))


def _quantize_inputs_of_decoder_linears(hf_model, bits: int) -> int:
    """Give every linear inside transformers' decoder layers our per-token input quantizer."""
    hooked = 0
    for name, module in hf_model.named_modules():
        is_linear = isinstance(module, (torch.nn.Linear, transformers.pytorch_utils.Conv1D))
        if is_linear and (".layers." in name or ".h." in name):
            module.register_forward_pre_hook(
                lambda _, args: (quantize_activations(args[0], absmax_scale(args[0], None),
                                                      bits=bits),))
            hooked += 1
    return hooked


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_export_holds_the_ternary_values_and_transformers_matches(checkpoints, tmp_path, arch):
    cfg, step_dir, out = CONFIGS[arch], checkpoints[arch], tmp_path / "hf"
    assert convert("export", "--ckpt", step_dir, "--out", out, "--verify") == 0
    exported = load_file(out / "model.safetensors")
    quantized, names = quantized_full_state_dict(_ours(step_dir, cfg, torch.float32))
    per_block = 7 if arch == "llama" else 6  # q, k, v, o, (gate,) up, down
    assert len(names) == per_block * cfg.layers
    expected = engine_to_hf_state_dict(quantized, cfg)
    assert exported.keys() == expected.keys()
    for name, tensor in exported.items():
        assert torch.equal(tensor, expected[name]), name
    for name in names:
        assert len(quantized[name].unique()) == 3, name  # -s, 0, +s
    config = json.loads((out / "config.json").read_text())
    assert config["megadistill_quant"] == {"weights": "ternary", "activation_bits": 8}

    ids = _ids()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    no_act_quant = dataclasses.replace(cfg, quant_activation_bits=None)
    with torch.no_grad():
        theirs = hf(ids).logits
        ours = _ours(step_dir, no_act_quant, torch.float32)(ids).logits[..., :cfg.vocab_size]
        assert (theirs - ours).abs().max() <= FP32_TOL


def test_transformers_with_our_activation_quantizer_equals_ours_in_float64(checkpoints, tmp_path):
    cfg, step_dir, out = CONFIGS["gpt2"], checkpoints["gpt2"], tmp_path / "hf"
    assert convert("export", "--ckpt", step_dir, "--out", out) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    hf = hf.double().eval()
    # c_attn (q, k, v fused: one input), attn.c_proj, mlp.c_fc, mlp.c_proj in each block.
    assert _quantize_inputs_of_decoder_linears(hf, 8) == 4 * cfg.layers
    ids = _ids()
    with torch.no_grad():
        theirs = hf(ids).logits
        ours = _ours(step_dir, cfg, torch.float64)(ids).logits[..., :cfg.vocab_size]
        torch.testing.assert_close(theirs, ours, rtol=FP64_TOL, atol=FP64_TOL)
        no_act_quant = dataclasses.replace(cfg, quant_activation_bits=None)
        unquantized_inputs = _ours(step_dir, no_act_quant, torch.float64)(ids).logits
        assert (unquantized_inputs[..., :cfg.vocab_size] - ours).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_packed_round_trip_is_byte_exact(checkpoints, tmp_path, arch, dtype):
    out, packed, back = tmp_path / "hf", tmp_path / "model.ternary.safetensors", tmp_path / "back"
    assert convert("export", "--ckpt", checkpoints[arch], "--out", out, "--dtype", dtype,
                   "--packed", packed, "--verify") == 0
    assert convert("unpack", "--packed", packed, "--out", back) == 0
    for name in ("model.safetensors", "config.json"):
        assert (back / name).read_bytes() == (out / name).read_bytes(), name
    assert packed.stat().st_size < (out / "model.safetensors").stat().st_size
    model_config, _, full = read_packed(packed)
    assert model_config == to_dict(CONFIGS[arch])
    assert all(t.dtype == getattr(torch, dtype) for t in full.values())


def test_bf16_export_equals_fp32_export(checkpoints, tmp_path):
    for dtype in ("float32", "bfloat16"):
        assert convert("export", "--ckpt", checkpoints["llama"], "--out", tmp_path / dtype,
                       "--dtype", dtype) == 0
    fp32 = load_file(tmp_path / "float32" / "model.safetensors")
    bf16 = load_file(tmp_path / "bfloat16" / "model.safetensors")
    for name in fp32:
        if "_proj" in name:  # ternary: exact in bf16; the rest is rounded
            assert torch.equal(bf16[name].float(), fp32[name]), name


def test_packed_needs_a_ternary_checkpoint_and_unpack_a_packed_file(checkpoints, tmp_path,
                                                                     capsys):
    cfg = dataclasses.replace(CONFIGS["llama"], quant="none")
    plain = save_weights(tmp_path / "plain", TransformerLM(cfg, ParallelLayout.single()),
                         ParallelLayout.single(), config={"model": to_dict(cfg)})
    assert convert("export", "--ckpt", plain, "--out", tmp_path / "hf",
                   "--packed", tmp_path / "p.safetensors") == 2
    assert "is not a ternary checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "p.safetensors").exists()
    assert convert("export", "--ckpt", plain, "--out", tmp_path / "hf") == 0
    assert convert("unpack", "--packed", tmp_path / "hf" / "model.safetensors",
                   "--out", tmp_path / "back") == 2
    assert "is not a megadistill-ternary-2bit-v1 file" in capsys.readouterr().err


def _corrupt(packed: Path, out: Path, alter) -> None:
    """A copy of `packed` with `alter(tensors)` applied, its metadata kept."""
    with safe_open(packed, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    alter(tensors)
    save_file(tensors, out, metadata=metadata)


def _set_first_code_byte(tensors: dict) -> None:
    name = min(n for n in tensors if n.endswith(".ternary_codes"))
    tensors[name][0] = 0xFF  # four fields of 3: +2 each when unpacked


def _set_a_scale_to_nan(tensors: dict) -> None:
    name = min(n for n in tensors if n.endswith(".ternary_scale"))
    tensors[name] = torch.tensor(float("nan"), dtype=tensors[name].dtype)


@pytest.mark.parametrize("alter, message", [
    (_set_first_code_byte, "code 3 (not a ternary value) at weight 0 of"),
    (_set_a_scale_to_nan, "scale must be one finite float > 0 (got nan)"),
])
def test_unpack_refuses_corrupt_codes_and_scales(checkpoints, tmp_path, capsys, alter, message):
    """Both used to exit 0 and write weights of 2s, or NaN."""
    packed, bad = tmp_path / "model.ternary.safetensors", tmp_path / "bad.safetensors"
    assert convert("export", "--ckpt", checkpoints["llama"], "--out", tmp_path / "hf",
                   "--packed", packed) == 0
    _corrupt(packed, bad, alter)
    capsys.readouterr()
    assert convert("unpack", "--packed", bad, "--out", tmp_path / "back") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ConfigError: --packed: {bad}: ternary weight "
                                               "'decoder.0."), err
    assert message in err[0], err
    assert not (tmp_path / "back").exists()
    assert not list(tmp_path.glob(".back*"))  # no staging directory left either


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_import_of_an_export_keeps_the_quantization(checkpoints, tmp_path, arch):
    """Import used to drop `megadistill_quant`: a `quant=none` checkpoint without the 8-bit
    inputs, which `export --packed` refused. Now it is ternary again, computes the same logits
    (quantization on) and exports the same files."""
    cfg, step_dir = CONFIGS[arch], checkpoints[arch]
    hf, imported, again = tmp_path / "hf", tmp_path / "imported", tmp_path / "again"
    assert convert("export", "--ckpt", step_dir, "--out", hf) == 0
    assert convert("import", "--hf", hf, "--out", imported, "--tp", 2, "--verify") == 0
    _, _, got_cfg = checkpoint_model_config(str(imported))
    assert (got_cfg.quant, got_cfg.quant_activation_bits) == ("ternary", 8)
    with torch.no_grad():
        want = _ours(step_dir, cfg, torch.float32)(_ids()).logits
        got = _ours(imported / "step_00000000", got_cfg, torch.float32)(_ids()).logits
    assert torch.equal(got, want)
    packed = tmp_path / "model.ternary.safetensors"
    assert convert("export", "--ckpt", imported, "--out", again, "--packed", packed) == 0
    for name in ("model.safetensors", "config.json"):
        assert (again / name).read_bytes() == (hf / name).read_bytes(), name
