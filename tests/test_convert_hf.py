"""tools/convert_hf.py: tiny random transformers models (built from configs, saved locally) import
at TP 1 and 2 with --verify (float64 logits within 1e-6 + 4 x transformers' own fp32 rounding of
them), export back to the very same tensors (torch.equal, same dtype) that transformers loads; a
deep (30-layer) model whose fp32 noise exceeds any fixed useful bound verifies, and a perturbed one
does not; bad inputs fail with one `ConfigError:` (or other `...Error:`) line, exit 2 and leave
nothing behind."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoint import open_checkpoint, resolve_checkpoint
from engine.config import to_dict
from layers.hf import hf_config_to_model_config

ROOT = Path(__file__).resolve().parents[1]
from tests.hf_models import HF_MODELS, TOKENIZER, save_hf_model  # noqa: E402
from tools import convert_hf  # noqa: E402

ERROR_LINE = re.compile(r"\w+Error: ")  # one failure line: `Kind: message`


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {arch: save_hf_model(arch, root / arch, tokenizer=arch == "llama") for arch in HF_MODELS}


def convert(*args: object) -> int:
    return convert_hf.main([str(a) for a in args])


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("arch", sorted(HF_MODELS))
def test_import_verify_export_round_trip(hf_dirs, tmp_path, arch, tp):
    hf_dir = hf_dirs[arch]
    ckpt, exported = tmp_path / "ckpt", tmp_path / "exported"
    assert convert("import", "--hf", hf_dir, "--out", ckpt, "--tp", tp, "--verify") == 0
    checkpoint = open_checkpoint(ckpt, key="test")
    step_dir = checkpoint.path
    hf_config = json.loads((hf_dir / "config.json").read_text())
    cfg = hf_config_to_model_config(hf_config)
    assert checkpoint.run_config["model"] == to_dict(cfg)
    assert json.loads((step_dir / "metadata.json").read_text())["layout"]["tp"] == tp

    assert convert("export", "--ckpt", ckpt, "--out", exported) == 0
    original, back = load_file(hf_dir / "model.safetensors"), load_file(exported / "model.safetensors")
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert hf_config_to_model_config(json.loads((exported / "config.json").read_text())) == cfg
    for name, text in TOKENIZER.items() if arch == "llama" else ():
        assert (step_dir / "tokenizer" / name).read_text() == text
        assert (exported / name).read_text() == text
    assert leftovers(tmp_path) == []
    if tp == 2:  # transformers loads the export and computes exactly what the original computes
        ids = convert_hf.sample_ids(cfg)
        with torch.no_grad():
            expected = convert_hf.load_reference(hf_dir)(ids).logits
            got = convert_hf.load_reference(exported)(ids).logits
        assert torch.equal(got, expected)


def test_verify_fails_above_tolerance_and_writes_nothing(hf_dirs, tmp_path, monkeypatch, capsys):
    load = convert_hf.load_reference

    def perturbed(hf_dir):
        model = load(hf_dir)
        with torch.no_grad():
            model.model.norm.weight.mul_(1.001)  # a change of ~1e-3 in the logits
        return model

    monkeypatch.setattr(convert_hf, "load_reference", perturbed)
    out = tmp_path / "ckpt"
    assert convert("import", "--hf", hf_dirs["qwen2"], "--out", out, "--verify") == 1
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("VerifyError:")]
    assert len(error) == 1 and "--verify" in error[0] and "bound" in error[0]
    assert "both compared in float64" in error[0]
    assert not out.exists() and leftovers(tmp_path) == []


def test_verify_passes_a_deep_model_and_catches_a_small_error(tmp_path, monkeypatch, capsys):
    """30 layers with weights large enough (logits ~10) that transformers' own fp32 logits differ
    from its float64 ones by more than 1e-4, the old fixed bound: --verify passes; scaling one
    mid-depth RMSNorm weight by 1.001 (what a wrong epsilon or a rounded tensor does) fails it."""
    hf_dir = save_hf_model("deep", tmp_path / "deep", scale=0.4)
    cfg = hf_config_to_model_config(json.loads((hf_dir / "config.json").read_text()))
    assert cfg.layers == 30
    ckpt = tmp_path / "ckpt"
    assert convert("import", "--hf", hf_dir, "--out", ckpt, "--verify") == 0
    check = convert_hf.verify_logits(hf_dir, resolve_checkpoint(str(ckpt), key="test"), cfg)
    assert check.noise > 1e-4 and check.passed, check.describe()

    load = convert_hf.load_reference

    def perturbed(directory):
        model = load(directory)
        with torch.no_grad():
            model.model.layers[15].post_attention_layernorm.weight.mul_(1.001)
        return model

    monkeypatch.setattr(convert_hf, "load_reference", perturbed)
    capsys.readouterr()
    assert convert("import", "--hf", hf_dir, "--out", tmp_path / "bad", "--verify") == 1
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("VerifyError:")]
    assert len(error) == 1 and "bound" in error[0], error
    assert not (tmp_path / "bad").exists()


def test_export_takes_tokenizer_file_and_dtype(hf_dirs, tmp_path):
    ckpt, exported = tmp_path / "ckpt", tmp_path / "exported"
    assert convert("import", "--hf", hf_dirs["gpt2"], "--out", ckpt) == 0
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(TOKENIZER["tokenizer.json"])
    assert convert("export", "--ckpt", ckpt, "--out", exported, "--tokenizer", tokenizer,
                   "--dtype", "bfloat16") == 0
    assert (exported / "tokenizer.json").read_text() == TOKENIZER["tokenizer.json"]
    original = load_file(hf_dirs["gpt2"] / "model.safetensors")
    back = load_file(exported / "model.safetensors")
    assert all(torch.equal(back[k], t.bfloat16()) for k, t in original.items())
    assert json.loads((exported / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_existing_output_is_kept_unless_forced(hf_dirs, tmp_path, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert convert("import", "--hf", hf_dirs["gpt2"], "--out", out) == 2
    assert "already exists (pass --force" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"
    assert convert("import", "--hf", hf_dirs["gpt2"], "--out", out, "--force") == 0
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step_00000000"]
    assert leftovers(tmp_path) == []


def _broken(kind: str, tmp_path: Path, hf_dirs: dict) -> Path:
    """An HF directory with one defect."""
    bad = tmp_path / kind
    if kind == "missing_dir":
        return bad
    bad.mkdir()
    if kind == "bert":
        config = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 32}
    else:
        config = json.loads((hf_dirs["llama"] / "config.json").read_text())
    if kind == "missing_key":
        config.pop("hidden_size")
    if kind != "no_config":
        (bad / "config.json").write_text(json.dumps(config))
    if kind == "missing_shard":
        index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
        (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    if kind == "outside_shard":  # a readable file, but not the model directory's
        (tmp_path / "elsewhere").mkdir()
        weights = (hf_dirs["llama"] / "model.safetensors").read_bytes()
        (tmp_path / "elsewhere" / "model.safetensors").write_bytes(weights)
        index = {"weight_map": {"model.norm.weight": "../elsewhere/model.safetensors"}}
        (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    if kind == "wrong_shapes":  # config.json of the llama, weights of the (smaller) mistral kv
        (bad / "model.safetensors").write_bytes((hf_dirs["mistral"] / "model.safetensors").read_bytes())
        config.update(attention_bias=False, mlp_bias=False, intermediate_size=32)
        (bad / "config.json").write_text(json.dumps(config))
    return bad


@pytest.mark.parametrize("kind, tp, message", [
    ("missing_dir", 1, "--hf: no such directory"),
    ("no_config", 1, "has no config.json"),
    ("bert", 1, "unsupported Hugging Face architecture 'bert'"),
    ("missing_key", 1, "config.json lacks 'hidden_size'"),
    ("weightless", 1, "has no weights (model.safetensors"),
    ("missing_shard", 1, "names model-00002-of-00002.safetensors, which is not in"),
    ("outside_shard", 1, "names '../elsewhere/model.safetensors', a file outside the model "
                         "directory"),
    ("wrong_shapes", 2, "weights do not fit config.json"),
    ("good", 3, "--tp: model.heads: 4 query heads do not split over parallel.tp=3"),
])
def test_bad_imports_fail_with_one_line_and_no_output(hf_dirs, tmp_path, capsys, kind, tp, message):
    hf_dir = hf_dirs["llama"] if kind == "good" else _broken(kind, tmp_path, hf_dirs)
    out = tmp_path / "out" / "ckpt"
    assert convert("import", "--hf", hf_dir, "--out", out, "--tp", tp) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if ERROR_LINE.match(line)]
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists()
    assert not out.parent.exists() or leftovers(out.parent) == []


def test_bad_exports(hf_dirs, tmp_path, capsys):
    assert convert("export", "--ckpt", tmp_path / "nothing", "--out", tmp_path / "x") == 2
    assert "--ckpt: no complete checkpoint at" in capsys.readouterr().err
    ckpt = tmp_path / "ckpt"
    assert convert("import", "--hf", hf_dirs["gpt2"], "--out", ckpt) == 0
    assert convert("export", "--ckpt", ckpt, "--out", tmp_path / "x",
                   "--tokenizer", tmp_path / "none") == 2
    assert "--tokenizer:" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_command_line_reports_one_line_and_exit_2(tmp_path):
    bad = _broken("bert", tmp_path, {})
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_hf.py"), "import",
                             "--hf", str(bad), "--out", str(tmp_path / "ckpt"), "--tp", "2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ConfigError: --hf: unsupported Hugging Face architecture 'bert' (supported: llama, mistral, "
        "qwen2, qwen3, smollm3, gemma2, gemma3_text, phi3, mixtral, qwen2_moe, qwen3_moe, gpt2)"]
    assert not (tmp_path / "ckpt").exists()
