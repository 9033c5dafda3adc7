"""What the benchmarks that race transformers share: a model shape on the command line and the same
weights in both implementations (ours loaded from the Hugging Face model through layers/hf.py), for
Llama and the newer families (Qwen3: QK-norm; Gemma 3: four norms, local and global layers)."""

from __future__ import annotations

import argparse

import torch

from engine.parallel import ParallelLayout
from layers.hf import hf_config_to_model_config, hf_to_engine_state_dict
from layers.model import TransformerLM
from layers.sharding import load_full_state_dict

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_shape_args(parser: argparse.ArgumentParser, *, layers: int, hidden: int, heads: int,
                   kv_heads: int, ffn: int, vocab: int) -> None:
    """`--layers --hidden --heads --kv-heads --ffn --vocab` with these defaults, and where the
    models run: `--device` (cpu, cuda) and `--dtype` (fp32, bf16: the weights' own dtype)."""
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--kv-heads", type=int, default=kv_heads)
    parser.add_argument("--ffn", type=int, default=ffn, help="MLP inner width")
    parser.add_argument("--vocab", type=int, default=vocab)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))


FAMILIES = ("llama", "qwen3", "gemma3")


def _family_config(family: str, head_dim: int, seq: int) -> tuple[str, dict]:
    """(transformers config class name, its family-specific options) of a benchmark family."""
    if family == "qwen3":
        return "Qwen3Config", dict(head_dim=head_dim)
    if family == "gemma3":  # the released pattern: 5 local layers per global one, window seq/4
        return "Gemma3TextConfig", dict(head_dim=head_dim, query_pre_attn_scalar=head_dim,
                                        sliding_window=max(seq // 4, 1))
    return "LlamaConfig", {}


def llama_pair(args: argparse.Namespace, *, max_positions: int = 2048, family: str = "llama",
               **hf_options) -> tuple[torch.nn.Module, TransformerLM]:
    """(transformers' model, our TransformerLM) of `args`' shape and `family` (llama, qwen3,
    gemma3) with the same random weights (seed 0), TP=1, on `args.device` in `args.dtype`, in eval
    mode. `hf_options`: more config fields."""
    import transformers

    class_name, options = _family_config(family, args.hidden // args.heads,
                                         getattr(args, "seq", max_positions))
    hf_config = getattr(transformers, class_name)(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=max_positions,
        attn_implementation="sdpa", **options, **hf_options)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    cfg = hf_config_to_model_config(hf_config.to_dict())
    ours = TransformerLM(cfg, ParallelLayout.single()).eval()
    load_full_state_dict(ours, hf_to_engine_state_dict(hf.state_dict(), cfg))
    dtype = DTYPES[args.dtype]
    if args.device != "cpu":  # our model's layout names its device (buffers made in forward)
        gpu = TransformerLM(cfg, ParallelLayout.single(args.device)).eval()
        gpu.load_state_dict(ours.state_dict())
        ours = gpu
    return hf.to(args.device, dtype), ours.to(dtype)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work, so that a wall-clock time covers it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
