"""Tiny random transformers models of every family the converter maps, saved locally with
save_pretrained: what tests/test_convert_hf.py imports and tests/test_generate.py compares with."""

from pathlib import Path

import torch
import transformers

from layers.config import RopeScaling

VOCAB = 96
_LLAMA_LAYOUT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48)
_SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
# The families of issue 28, each with the options that set it apart: head_dim != hidden/heads,
# QK-norm, Gemma's local (window shorter than the sequence) and global layers with their own RoPE
# bases and linear scaling, attention soft-capping, Phi-3's partial rotary, SmolLM3's NoPE layers.
FAMILIES = {
    "qwen3": dict(**_LLAMA_LAYOUT, head_dim=16, tie_word_embeddings=False, **_SPECIAL),
    "gemma2": dict(**_LLAMA_LAYOUT | dict(num_hidden_layers=3), head_dim=16, query_pre_attn_scalar=24,
                   sliding_window=5, attn_logit_softcapping=4.0, final_logit_softcapping=3.0,
                   **_SPECIAL),
    "gemma3_text": dict(**_LLAMA_LAYOUT | dict(num_hidden_layers=4), head_dim=16,
                        query_pre_attn_scalar=16, sliding_window=5,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                     "full_attention"],
                        rope_parameters=dict(
                            full_attention=dict(rope_type="linear", factor=2.0, rope_theta=20000.0),
                            sliding_attention=dict(rope_type="default", rope_theta=500.0)),
                        **_SPECIAL),
    "phi3": dict(**_LLAMA_LAYOUT, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                       partial_rotary_factor=0.5),
                 sliding_window=7, **_SPECIAL),
    "smollm3": dict(**_LLAMA_LAYOUT | dict(num_hidden_layers=4), no_rope_layer_interval=2,
                    tie_word_embeddings=True, **_SPECIAL),
    # Mixtures of experts (issue 29): 4 experts, top 2; Qwen2-MoE with its gated shared expert and
    # un-normalized top-k scores, Qwen3-MoE with QK-norm and a dense first block.
    "mixtral": dict(**_LLAMA_LAYOUT, num_local_experts=4, num_experts_per_tok=2, sliding_window=7,
                    **_SPECIAL),
    "qwen2_moe": dict(**_LLAMA_LAYOUT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                      shared_expert_intermediate_size=40, norm_topk_prob=False, **_SPECIAL),
    "qwen3_moe": dict(**_LLAMA_LAYOUT, head_dim=16, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=24, norm_topk_prob=True, mlp_only_layers=[0], **_SPECIAL),
}
# Every block option of those families at once, as ModelConfig fields (for a llama-family model of 4
# layers, heads 4 / kv 2, head_dim 12, a sequence longer than the window): the layout tables
# (tests/test_layers_parallel.py, tests/test_stages.py) check TP/SP/PP on all of them together.
BLOCK_OPTIONS = dict(
    layers=4, head_dim=12, qk_norm=True, norm_unit_offset=True, post_norms=True, scale_embeddings=True,
    query_pre_attn_scalar=20.0, attn_logit_softcap=3.0, sliding_window=5,
    layer_types=("sliding_attention", "full_attention", "sliding_attention", "full_attention"),
    rope_local_theta=300.0, rope_scaling=RopeScaling(type="linear", factor=2.0),
    partial_rotary_factor=0.5, no_rope_layers=(3,))
# (config class, config kwargs, dtype the weights are saved in): every family and its options.
HF_MODELS = {
    "llama": (transformers.LlamaConfig, dict(**_LLAMA_LAYOUT, attention_bias=True, mlp_bias=True),
              torch.bfloat16),
    "qwen2": (transformers.Qwen2Config, dict(**_LLAMA_LAYOUT, tie_word_embeddings=False),
              torch.float32),
    "mistral": (transformers.MistralConfig, dict(**_LLAMA_LAYOUT, sliding_window=6), torch.float32),
    "gpt2": (transformers.GPT2Config, dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                           n_positions=40), torch.float32),
    **{family: (config_cls, kwargs, dtype) for family, (config_cls, kwargs, dtype) in {
        "qwen3": (transformers.Qwen3Config, FAMILIES["qwen3"], torch.bfloat16),
        "gemma2": (transformers.Gemma2Config, FAMILIES["gemma2"], torch.float32),
        "gemma3_text": (transformers.Gemma3TextConfig, FAMILIES["gemma3_text"], torch.bfloat16),
        "phi3": (transformers.Phi3Config, FAMILIES["phi3"], torch.float32),
        "smollm3": (transformers.SmolLM3Config, FAMILIES["smollm3"], torch.float32),
        "mixtral": (transformers.MixtralConfig, FAMILIES["mixtral"], torch.float32),
        "qwen2_moe": (transformers.Qwen2MoeConfig, FAMILIES["qwen2_moe"], torch.bfloat16),
        "qwen3_moe": (transformers.Qwen3MoeConfig, FAMILIES["qwen3_moe"], torch.float32),
    }.items()},
}
TOKENIZER = {"tokenizer.json": '{"version": "1.0", "model": {"type": "WordLevel"}}\n',
             "tokenizer_config.json": '{"model_max_length": 48}\n'}


# SmolLM's architecture (30 layers, 9 query / 3 key-value heads, tied embeddings), tiny in width.
DEEP_LLAMA = dict(vocab_size=VOCAB, hidden_size=36, intermediate_size=96, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=48,
                  tie_word_embeddings=True)
DEEP = (transformers.LlamaConfig, DEEP_LLAMA, torch.bfloat16)  # saved in bf16, as SmolLM is


def save_hf_model(arch: str, directory: Path, *, tokenizer: bool = False,
                  scale: float = 0.15) -> Path:
    """A random tiny model of `arch` saved with save_pretrained (weights scaled up by `scale` so
    that logits are O(1) and any conversion mistake shows well above the bound)."""
    config_cls, kwargs, dtype = DEEP if arch == "deep" else HF_MODELS[arch]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**kwargs))
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=noise), alpha=scale)
    model.to(dtype).save_pretrained(directory)
    for name, text in TOKENIZER.items() if tokenizer else ():
        (directory / name).write_text(text)
    return directory
