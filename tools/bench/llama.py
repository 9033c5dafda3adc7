"""What the benchmarks that race transformers share: a Llama shape on the command line and the same
weights in both implementations (ours loaded from the Hugging Face model through layers/hf.py)."""

from __future__ import annotations

import argparse

import torch

from engine.parallel import ParallelLayout
from layers.hf import hf_config_to_model_config, hf_to_engine_state_dict
from layers.model import TransformerLM
from layers.sharding import load_full_state_dict


def add_shape_args(parser: argparse.ArgumentParser, *, layers: int, hidden: int, heads: int,
                   kv_heads: int, ffn: int, vocab: int) -> None:
    """`--layers --hidden --heads --kv-heads --ffn --vocab` with these defaults."""
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--kv-heads", type=int, default=kv_heads)
    parser.add_argument("--ffn", type=int, default=ffn, help="MLP inner width")
    parser.add_argument("--vocab", type=int, default=vocab)


def llama_pair(args: argparse.Namespace, *, max_positions: int = 2048,
               **hf_options) -> tuple[torch.nn.Module, TransformerLM]:
    """(transformers' LlamaForCausalLM, our TransformerLM) of `args`' shape with the same random
    weights (seed 0), TP=1, fp32, in eval mode. `hf_options`: more LlamaConfig fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=max_positions,
        attn_implementation="sdpa", **hf_options)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_config).eval()
    cfg = hf_config_to_model_config(hf_config.to_dict())
    ours = TransformerLM(cfg, ParallelLayout.single()).eval()
    load_full_state_dict(ours, hf_to_engine_state_dict(hf.state_dict(), cfg))
    return hf, ours
