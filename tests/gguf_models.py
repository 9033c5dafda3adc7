"""Tiny random Llama models written to GGUF the way llama.cpp's convert_hf_to_gguf.py writes them
(its tensor names, its q/k row permutation, its metadata keys) with a byte-level BPE tokenizer in the
metadata: what tests/test_convert_gguf.py imports. The source model and tokenizer are saved next to
the file as an ordinary Hugging Face directory, the reference the import is checked against."""

import json
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "def main():\n    return 42  # numbers 0123456789, punctuation !?;: and spaces   ok\n")
EOS = "<|endoftext|>"
LAYOUT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=48, rms_norm_eps=1e-5,
              rope_theta=10000.0)
# llama.cpp's tensor names of one block (`blk.{i}.` + name) and of the rest
BLOCK_TENSORS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                 "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def train_tokenizer(vocab_size: int = 300) -> Tokenizer:
    """A GPT-2-style byte-level BPE (GPT-2's split regex, no prefix space) learned on TEXT."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TEXT] * 4, trainer)
    return tokenizer


def llama_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of q/k rows (rotate-half pairs -> interleaved pairs), per head."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def llama_unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `llama_permute`, written independently of transformers' reader."""
    return (weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name of a Llama tensor."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    by_hf = {hf: ours for ours, hf in BLOCK_TENSORS.items()}
    return f"blk.{layer}.{by_hf[rest.removesuffix('.weight')]}.weight"


def write_llama_gguf(directory: Path, *, tied: bool = True, quantize: tuple[str, ...] = (),
                     scale: float = 0.15) -> Path:
    """A random tiny Llama as `directory/model.gguf` (fp32 tensors; those whose llama.cpp name
    contains one of `quantize` as Q8_0) and as a Hugging Face directory `directory/hf`
    (model.safetensors in fp32, config.json, tokenizer.json). Returns the GGUF file."""
    tokenizer = train_tokenizer()
    vocab = tokenizer.get_vocab_size()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, tie_word_embeddings=tied,
                                      bos_token_id=0, eos_token_id=0, **LAYOUT)
    model = transformers.LlamaForCausalLM(config)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=noise), alpha=scale)
    hf_dir = directory / "hf"
    model.save_pretrained(hf_dir)
    tokenizer.save(str(hf_dir / "tokenizer.json"))
    path = directory / "model.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    _write_metadata(writer, config, tokenizer)
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        _add_tensor(writer, gguf_name(name), tensor.numpy(), config, quantize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tensor(writer, name: str, array: np.ndarray, config, quantize: tuple[str, ...]) -> None:
    if ".attn_q." in name:
        array = llama_permute(array, config.num_attention_heads)
    if ".attn_k." in name:
        array = llama_permute(array, config.num_key_value_heads)
    array = np.ascontiguousarray(array, dtype=np.float32)
    if any(part in name for part in quantize):
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    else:
        writer.add_tensor(name, array)


def _write_metadata(writer, config, tokenizer: Tokenizer) -> None:
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
    merges = [" ".join(pair) for pair in _merges(tokenizer)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t == EOS else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.token_to_id(EOS))
    writer.add_eos_token_id(tokenizer.token_to_id(EOS))


def _merges(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
