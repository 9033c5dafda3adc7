"""tools/convert_hf.py import --gguf: a tiny random Llama written to GGUF as llama.cpp writes it
(tests/gguf_models.py) imports at TP 1 and 2 into the very tensors of the source model (fp32 GGUF
tensors, exact), with logits within --verify's bound of the source transformers model in float64
(1e-6 + 4 x transformers' own fp32 rounding); Q8_0 tensors come back as gguf's own dequantization;
the tokenizer rebuilt from the GGUF metadata encodes like the source tokenizer; bad inputs are one
line, exit 2, nothing written."""

import json
import re
import sys

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from engine.parallel import ParallelLayout
from layers.hf import hf_to_engine_state_dict
from layers.sharding import full_state_dict
from tests.gguf_models import TEXT, llama_unpermute, write_llama_gguf
from tests.hf_models import TOKENIZER, save_hf_model
from tools import convert_hf, gguf_import
from tools.score import checkpoint_model_config, load_model

ERROR_LINE = re.compile(r"\w+Error: ")
SAMPLE = "The lazy dog returns 12345!  def fox(): <|endoftext|> brown\n  jugs?"


@pytest.fixture(scope="module")
def tied_gguf(tmp_path_factory):
    return write_llama_gguf(tmp_path_factory.mktemp("tied"), tied=True)


def convert(*args: object) -> int:
    return convert_hf.main([str(a) for a in args])


def imported(ckpt, dtype=torch.float64):
    """The checkpoint's model at TP 1 and its full state dict."""
    step_dir, _, cfg = checkpoint_model_config(str(ckpt))
    model = load_model(step_dir, cfg, ParallelLayout.single(), dtype=dtype)
    return step_dir, model, full_state_dict(model)


def source_state(gguf_file, cfg):
    """The source transformers model's tensors under engine names."""
    return hf_to_engine_state_dict(load_file(gguf_file.parent / "hf" / "model.safetensors"), cfg)


def test_import_equals_source_model_and_tokenizer(tied_gguf, tmp_path):
    ckpt, tok_out = tmp_path / "ckpt", tmp_path / "tok"
    assert convert("import", "--gguf", tied_gguf, "--out", ckpt, "--verify",
                   "--tokenizer-out", tok_out) == 0
    step_dir, model, full = imported(ckpt, torch.float32)
    cfg = model.config
    assert (cfg.hidden, cfg.layers, cfg.heads, cfg.num_kv_heads, cfg.ffn_hidden, cfg.vocab_size) \
        == (32, 2, 4, 2, 64, 300)
    assert cfg.tie_embeddings and cfg.norm_eps == 1e-5 and cfg.rope_theta == 10000.0
    want = source_state(tied_gguf, cfg)
    assert set(full) == set(want)
    for name, tensor in want.items():  # fp32 GGUF tensors: the very values, q/k un-permuted
        assert full[name].dtype == torch.float32 and torch.equal(full[name], tensor), name

    # the logits against the source transformers model (not the GGUF reader's), float64
    check = convert_hf.verify_logits(tied_gguf.parent / "hf", step_dir, cfg)
    assert check.passed and check.diff < 1e-4, check.describe()

    source = Tokenizer.from_file(str(tied_gguf.parent / "hf" / "tokenizer.json"))
    for directory in (step_dir / "tokenizer", tok_out):
        written = Tokenizer.from_file(str(directory / "tokenizer.json"))
        for text in (SAMPLE, TEXT):
            assert written.encode(text).ids == source.encode(text).ids
        assert written.decode(written.encode(SAMPLE).ids, skip_special_tokens=False) == SAMPLE
    hf_import = json.loads((step_dir / "metadata.json").read_text())["config"]["hf_import"]
    assert hf_import["bos_token_id"] == hf_import["eos_token_id"] == 0
    assert hf_import["dtype"] == "float32" and hf_import["source"] == str(tied_gguf.resolve())


def test_tp2_import_equals_tp1_and_exports(tied_gguf, tmp_path):
    assert convert("import", "--gguf", tied_gguf, "--out", tmp_path / "tp1") == 0
    assert convert("import", "--gguf", tied_gguf, "--out", tmp_path / "tp2", "--tp", 2) == 0
    step_dir, _, one = imported(tmp_path / "tp1")
    assert json.loads((tmp_path / "tp2" / "step_00000000" / "metadata.json").read_text()
                      )["layout"]["tp"] == 2
    _, _, two = imported(tmp_path / "tp2")
    assert set(one) == set(two) and all(torch.equal(one[k], two[k]) for k in one)
    # the export is an ordinary Hugging Face directory that transformers runs like the source
    assert convert("export", "--ckpt", tmp_path / "tp2", "--out", tmp_path / "hf", "--verify") == 0
    source = load_file(tied_gguf.parent / "hf" / "model.safetensors")
    back = load_file(tmp_path / "hf" / "model.safetensors")
    assert all(torch.equal(back[k], source[k]) for k in back)
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == \
        (step_dir / "tokenizer" / "tokenizer.json").read_bytes()


def test_q8_0_tensors_are_gguf_dequantized(tmp_path):
    """Untied, with the q, k, gate and output tensors stored as Q8_0: each imported tensor is
    gguf's own dequantization of the stored blocks (q/k un-permuted), the rest stay exact."""
    quantized = ("attn_q", "attn_k", "ffn_gate", "output.weight")
    path = write_llama_gguf(tmp_path / "src", tied=False, quantize=quantized)
    assert convert("import", "--gguf", path, "--out", tmp_path / "ckpt", "--verify") == 0
    _, model, full = imported(tmp_path / "ckpt", torch.float32)
    cfg = model.config
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert stored["output.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    engine_names = {"token_embd.weight": "embedding.weight", "output.weight": "lm_head.weight",
                    "blk.1.attn_q.weight": "decoder.1.attention.q_proj.weight",
                    "blk.0.attn_k.weight": "decoder.0.attention.k_proj.weight",
                    "blk.0.ffn_gate.weight": "decoder.0.mlp.gate_proj.weight"}
    heads = {"attn_q": cfg.heads, "attn_k": cfg.num_kv_heads}
    source = source_state(path, cfg)
    for name, ours in engine_names.items():
        tensor = stored[name]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        for kind, count in heads.items():
            values = llama_unpermute(values, count) if f".{kind}." in name else values
        assert torch.equal(full[ours], torch.from_numpy(np.array(values))), name
        quant_error = (full[ours] - source[ours]).abs().max().item()
        assert (quant_error > 0) == any(q in name for q in quantized), name
        assert quant_error < 0.02, name  # Q8_0: half a step of absmax/127 per block


def test_bfloat16_import_and_its_verify(tied_gguf, tmp_path):
    assert convert("import", "--gguf", tied_gguf, "--out", tmp_path / "ckpt", "--dtype", "bfloat16",
                   "--verify") == 0
    _, model, full = imported(tmp_path / "ckpt", torch.bfloat16)
    want = source_state(tied_gguf, model.config)
    assert all(full[k].dtype == torch.bfloat16 and torch.equal(full[k], want[k].bfloat16())
               for k in want)


def _non_llama_gguf(path, arch):
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("kind, message", [
    ("missing", "ConfigError: --gguf: no such file:"),
    ("not_gguf", "is not a readable GGUF file"),
    ("mamba", "--gguf: unsupported GGUF architecture 'mamba' (supported: llama, mistral, qwen2, qwen3, "
              "gemma2, phi3, qwen2_moe, qwen3_moe, gpt2)"),
    ("unknown_arch", "unsupported GGUF architecture 'nonesuch'"),
    ("no_gguf_package", "reading GGUF files needs the gguf package: pip install 'gguf>=0.10.0'"),
    ("tp3", "--tp: model.heads: 4 query heads do not split over parallel.tp=3"),
    ("dtype_with_hf", "--dtype: applies to --gguf only"),
])
def test_bad_gguf_imports_fail_with_one_line(tied_gguf, tmp_path, capsys, monkeypatch, kind, message):
    path, extra = tied_gguf, []
    if kind == "missing":
        path = tmp_path / "nothing.gguf"
    if kind == "not_gguf":
        path = tmp_path / "bad.gguf"
        path.write_bytes(b"GGML" + bytes(60))
    if kind in ("mamba", "unknown_arch"):
        path = _non_llama_gguf(tmp_path / "other.gguf", "mamba" if kind == "mamba" else "nonesuch")
    if kind == "no_gguf_package":
        monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    if kind == "tp3":
        extra = ["--tp", 3]
    source = ["--hf", tied_gguf.parent / "hf", "--dtype", "float32"] if kind == "dtype_with_hf" \
        else ["--gguf", path]
    out, tok = tmp_path / "out" / "ckpt", tmp_path / "tok"
    capsys.readouterr()
    assert convert("import", *source, "--out", out, "--tokenizer-out", tok, *extra) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if ERROR_LINE.match(line)]
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists() and not tok.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_hf_import_writes_tokenizer_out(tmp_path):
    hf_dir = save_hf_model("qwen2", tmp_path / "hf", tokenizer=True)
    tok = tmp_path / "tok"
    assert convert("import", "--hf", hf_dir, "--out", tmp_path / "ckpt", "--tokenizer-out", tok) == 0
    assert sorted(p.name for p in tok.iterdir()) == sorted(TOKENIZER)
    assert all((tok / name).read_text() == text for name, text in TOKENIZER.items())


def test_supported_architectures_follow_the_hf_adapters():
    assert gguf_import.supported_architectures() == ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3",
                                                     "qwen2_moe", "qwen3_moe", "gpt2"]
