"""Hugging Face adapters: tiny random transformers models (built from configs, no downloads) loaded
through the adapters at TP=1 and TP=2 give the same logits (fp32, within 1e-4); state dicts and
configs round-trip exactly; bad inputs fail with one clear line."""

import functools

import pytest
import torch
import transformers

from engine.mappings import gather_from_tp
from engine.parallel import ParallelConfig, ParallelLayout, make_layout
from engine.spawn import run_ranks
from layers.config import ModelConfig
from layers.hf import (
    engine_to_hf_state_dict,
    hf_config_to_model_config,
    hf_to_engine_state_dict,
    model_config_to_hf_config,
)
from layers.model import TransformerLM
from layers.sharding import full_state_dict, load_full_state_dict
from tests.hf_models import FAMILIES

VOCAB = 120
TOL = dict(rtol=1e-4, atol=1e-4)
_LLAMA_SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
HF_MODELS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        **_LLAMA_SIZES, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8))),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        **_LLAMA_SIZES, tie_word_embeddings=True)),
    # head_dim differs from hidden/heads, and the window is shorter than the sequence.
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        **_LLAMA_SIZES, head_dim=16, sliding_window=5)),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, dict(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
        eos_token_id=0)),
    **{family: (config_cls, transformers.AutoModelForCausalLM.from_config,
                {**FAMILIES[family], "vocab_size": VOCAB})
       for family, config_cls in [("qwen3", transformers.Qwen3Config),
                                  ("gemma2", transformers.Gemma2Config),
                                  ("gemma3_text", transformers.Gemma3TextConfig),
                                  ("phi3", transformers.Phi3Config),
                                  ("smollm3", transformers.SmolLM3Config)]},
}


def _ids():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@functools.cache
def _hf_model(arch: str):
    """(config dict, state dict, logits of the ids) of a random tiny transformers model."""
    config_cls, model_cls, kwargs = HF_MODELS[arch]
    config = config_cls(**kwargs)
    config._attn_implementation = "eager" if config.model_type == "gemma2" else "sdpa"
    torch.manual_seed(0)
    model = model_cls(config).eval()
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger weights than HF's init: O(1) logits, so differences show
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=noise), alpha=0.15)
        logits = model(_ids()).logits
    return config.to_dict(), {k: v.clone() for k, v in model.state_dict().items()}, logits


def _engine_logits(hf_config: dict, hf_sd: dict, layout: ParallelLayout) -> torch.Tensor:
    cfg = hf_config_to_model_config(hf_config)
    model = TransformerLM(cfg, layout).eval()
    load_full_state_dict(model, hf_to_engine_state_dict(hf_sd, cfg))
    with torch.no_grad():
        logits_shard = model(_ids()).logits
        return gather_from_tp(logits_shard, layout.tp_group)[..., :cfg.vocab_size]


@pytest.mark.parametrize("arch", sorted(HF_MODELS))
def test_logits_match_transformers_at_tp1(arch):
    hf_config, hf_sd, expected = _hf_model(arch)
    got = _engine_logits(hf_config, hf_sd, ParallelLayout.single())
    assert expected.abs().max() > 0.5  # the comparison is not between near-zero logits
    torch.testing.assert_close(got, expected, **TOL)


def _tp2_logits(models):
    layout = make_layout(ParallelConfig(tp=2))
    return {arch: _engine_logits(cfg, sd, layout) for arch, (cfg, sd) in models.items()}


def test_logits_match_transformers_at_tp2():
    models = {arch: _hf_model(arch)[:2] for arch in HF_MODELS}
    for rank_logits in run_ranks(_tp2_logits, 2, models, timeout_s=300):
        for arch, got in rank_logits.items():
            torch.testing.assert_close(got, _hf_model(arch)[2], **TOL, msg=lambda m: f"{arch}: {m}")


@pytest.mark.parametrize("arch", sorted(HF_MODELS))
def test_state_dict_and_config_round_trip(arch):
    hf_config, hf_sd, _ = _hf_model(arch)
    cfg = hf_config_to_model_config(hf_config)
    model = TransformerLM(cfg, ParallelLayout.single())
    load_full_state_dict(model, hf_to_engine_state_dict(hf_sd, cfg))
    back = engine_to_hf_state_dict(full_state_dict(model), cfg)
    tied_head = {"lm_head.weight"} if cfg.tie_embeddings else set()
    assert set(back) == set(hf_sd) - tied_head
    for name, tensor in back.items():
        assert torch.equal(tensor, hf_sd[name]), name
    exported = model_config_to_hf_config(cfg)
    assert exported["model_type"] == arch
    assert hf_config_to_model_config(exported) == cfg
    # transformers itself accepts the exported config and the exported weights.
    config_cls, model_cls, _ = HF_MODELS[arch]
    reloaded = model_cls(config_cls(**exported))
    reloaded.load_state_dict(back, strict=not cfg.tie_embeddings)
    assert hf_config_to_model_config(reloaded.config.to_dict()) == cfg


def test_gpt2_base_model_keys_without_prefix_load():
    hf_config, hf_sd, _ = _hf_model("gpt2")
    cfg = hf_config_to_model_config(hf_config)
    bare = {k.removeprefix("transformer."): v for k, v in hf_sd.items() if k != "lm_head.weight"}
    bare["h.0.attn.bias"] = torch.ones(1)  # old checkpoints carry the causal mask as a buffer
    full = hf_to_engine_state_dict(bare, cfg)
    assert full.keys() == hf_to_engine_state_dict(hf_sd, cfg).keys()


def test_bad_inputs_name_the_culprit():
    with pytest.raises(ValueError, match="unsupported Hugging Face architecture 'bert'"):
        hf_config_to_model_config({"model_type": "bert"})
    with pytest.raises(ValueError, match="unsupported Hugging Face rope_type 'yarn'"):
        hf_config_to_model_config({**_hf_model("llama")[0], "rope_parameters": {"rope_type": "yarn"}})
    hf_config, hf_sd, _ = _hf_model("llama")
    cfg = hf_config_to_model_config(hf_config)
    missing = {k: v for k, v in hf_sd.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match="lacks 'model.norm.weight'"):
        hf_to_engine_state_dict(missing, cfg)
    with pytest.raises(ValueError, match="unexpected key.*'model.layers.9.extra'"):
        hf_to_engine_state_dict({**hf_sd, "model.layers.9.extra": torch.ones(1)}, cfg)
    with pytest.raises(ValueError, match="cannot export as Hugging Face mistral"):
        model_config_to_hf_config(ModelConfig(family="llama", bias=True, hf_model_type="mistral"))
