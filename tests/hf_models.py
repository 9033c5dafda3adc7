"""Tiny random transformers models of every family the converter maps, saved locally with
save_pretrained: what tests/test_convert_hf.py imports and tests/test_generate.py compares with."""

from pathlib import Path

import torch
import transformers

VOCAB = 96
_LLAMA_LAYOUT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48)
# (config class, config kwargs, dtype the weights are saved in): every family and its options.
HF_MODELS = {
    "llama": (transformers.LlamaConfig, dict(**_LLAMA_LAYOUT, attention_bias=True, mlp_bias=True),
              torch.bfloat16),
    "qwen2": (transformers.Qwen2Config, dict(**_LLAMA_LAYOUT, tie_word_embeddings=False),
              torch.float32),
    "mistral": (transformers.MistralConfig, dict(**_LLAMA_LAYOUT, sliding_window=6), torch.float32),
    "gpt2": (transformers.GPT2Config, dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                           n_positions=40), torch.float32),
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
