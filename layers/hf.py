"""Hugging Face adapters: configs and state dicts of Llama, Qwen2, Mistral and GPT-2, both ways.

The engine side is always a *full* state dict (layers/sharding.py: unsharded, vocabulary unpadded),
so the adapters do not depend on TP: load one with `load_full_state_dict(model, sd)` at any TP
degree, and export what `full_state_dict(model)` returns.

- Llama, Qwen2 and Mistral share one layout (`model.layers.{i}.self_attn.q_proj.weight`, ...);
  q/k are in Hugging Face's rotate-half RoPE order, which is the engine's, so they copy unchanged.
- GPT-2 stores linear weights transposed (`Conv1D`, `[in, out]`) and fuses q/k/v into `c_attn`;
  they are transposed and split here. Keys with or without the `transformer.` prefix are accepted.
- MTP heads have no Hugging Face counterpart: export drops them (with a warning) and import leaves
  them out (load with `strict=False` to keep their fresh initialization).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from engine.log import get_logger
from layers.config import ModelConfig, RopeScaling

log = get_logger(__name__)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}
_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                   "gelu_pytorch_tanh": "gelu_tanh"}
_EXPORT_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
QUANT_KEY = "megadistill_quant"  # config.json: {weights, activation_bits} of a ternary export
# Non-parameter entries some checkpoints carry (attention masks, rotary caches).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def hf_model_type(hf_config: Mapping[str, Any]) -> str:
    """The supported `model_type` of a Hugging Face config dict; anything else is a ValueError."""
    model_type = hf_config.get("model_type")
    if model_type is None:
        archs = hf_config.get("architectures") or ["<none>"]
        by_arch = {arch: kind for kind, arch in ARCHITECTURES.items()}
        model_type = by_arch.get(archs[0], archs[0])
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unsupported Hugging Face architecture {model_type!r} "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    return model_type


# ---------------------------------------------------------------------------------------- configs

def hf_config_to_model_config(hf_config: Mapping[str, Any]) -> ModelConfig:
    """A `ModelConfig` for a Hugging Face `config.json` dict (llama, mistral, qwen2, gpt2)."""
    kind = hf_model_type(hf_config)
    fields = _gpt2_fields(hf_config) if kind == "gpt2" else _llama_fields(hf_config, kind)
    return ModelConfig(**fields, **_quant_fields(hf_config), hf_model_type=kind)


def _quant_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The quantization a ternary export recorded under QUANT_KEY (none without the key)."""
    quant = hf.get(QUANT_KEY)
    if quant is None:
        return {}
    if not isinstance(quant, Mapping) or set(quant) != {"weights", "activation_bits"}:
        raise ValueError(f"{QUANT_KEY} must be {{weights, activation_bits}} (got {quant!r})")
    return dict(quant=quant["weights"], quant_activation_bits=quant["activation_bits"])


def _activation(name: str) -> str:
    if name not in _HF_ACTIVATIONS:
        raise ValueError(f"unsupported Hugging Face activation {name!r} "
                         f"(supported: {', '.join(_HF_ACTIVATIONS)})")
    return _HF_ACTIVATIONS[name]


def _rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"unsupported Hugging Face rope_type {rope_type!r} "
                         "(supported: default, llama3)")
    return theta, RopeScaling(factor=float(rope["factor"]),
                              low_freq_factor=float(rope["low_freq_factor"]),
                              high_freq_factor=float(rope["high_freq_factor"]),
                              original_max_position=int(rope["original_max_position_embeddings"]))


def _llama_biases(hf: Mapping[str, Any], kind: str) -> tuple[bool, bool]:
    """(qkv_bias, bias) of a llama-layout config."""
    if kind == "qwen2":
        return True, False
    attention_bias, mlp_bias = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
    if attention_bias != mlp_bias:
        raise ValueError(f"{kind} with attention_bias={attention_bias} and mlp_bias={mlp_bias} "
                         "is not supported (both or neither)")
    return False, attention_bias


def _sliding_window(hf: Mapping[str, Any], kind: str) -> int | None:
    if kind == "mistral":
        return hf.get("sliding_window")
    if kind == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError("qwen2 with use_sliding_window=true is not supported")
    return None


def _llama_fields(hf: Mapping[str, Any], kind: str) -> dict[str, Any]:
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    theta, scaling = _rope(hf)
    qkv_bias, bias = _llama_biases(hf, kind)
    head_dim = hf.get("head_dim")
    return dict(
        family="llama", vocab_size=hf["vocab_size"], hidden=hidden,
        layers=hf["num_hidden_layers"], heads=heads,
        kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=None if head_dim in (None, hidden // heads) else head_dim,
        ffn_hidden=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        qkv_bias=qkv_bias, bias=bias, activation=_activation(hf.get("hidden_act", "silu")),
        sliding_window=_sliding_window(hf, kind),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def _gpt2_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(key):
            raise ValueError(f"gpt2 with {key}=true is not supported")
    if not hf.get("scale_attn_weights", True):
        raise ValueError("gpt2 with scale_attn_weights=false is not supported")
    hidden = hf["n_embd"]
    return dict(
        family="gpt2", vocab_size=hf["vocab_size"], hidden=hidden, layers=hf["n_layer"],
        heads=hf["n_head"], ffn_hidden=hf.get("n_inner") or 4 * hidden,
        max_seq_len=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5), bias=True,
        activation=_activation(hf.get("activation_function", "gelu_new")),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


def export_model_type(cfg: ModelConfig) -> str:
    """The Hugging Face model_type `cfg` exports as (its origin, or the closest match)."""
    if cfg.family == "gpt2":
        kind = "gpt2"
    elif cfg.hf_model_type is not None:
        kind = cfg.hf_model_type
    elif cfg.qkv_bias and not cfg.bias:
        kind = "qwen2"
    else:
        kind = "mistral" if cfg.sliding_window is not None else "llama"
    problem = _export_problem(cfg, kind)
    if problem:
        raise ValueError(f"cannot export as Hugging Face {kind}: {problem}")
    return kind


def _export_problem(cfg: ModelConfig, kind: str) -> str | None:
    if kind not in ARCHITECTURES:
        return "unsupported architecture"
    if (kind == "gpt2") != (cfg.family == "gpt2"):
        return f"model.family={cfg.family}"
    if kind == "gpt2":
        if not cfg.bias or cfg.num_kv_heads != cfg.heads or cfg.head_dim is not None:
            return "GPT-2 needs model.bias=true, kv_heads == heads and no head_dim"
        return None if cfg.mlp_activation != "silu" else "GPT-2 has no silu activation"
    if kind == "qwen2" and (not cfg.qkv_bias or cfg.bias or cfg.sliding_window):
        return "Qwen2 has q/k/v biases only and no sliding window"
    if kind != "qwen2" and cfg.qkv_bias and not cfg.bias:
        return "q/k/v-only biases exist only in qwen2"
    if kind == "llama" and cfg.sliding_window is not None:
        return "Llama has no sliding window"
    if kind == "mistral" and cfg.bias:
        return "Mistral has no biases"
    return None


def model_config_to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """A Hugging Face `config.json` dict for `cfg` (architectures and model_type set); a quantized
    model's settings go under QUANT_KEY, which runtimes ignore and import reads back."""
    kind = export_model_type(cfg)
    hf = _gpt2_config(cfg) if kind == "gpt2" else _llama_config(cfg, kind)
    if cfg.quant != "none":
        hf[QUANT_KEY] = {"weights": cfg.quant, "activation_bits": cfg.quant_activation_bits}
    return hf


def _gpt2_config(cfg: ModelConfig) -> dict[str, Any]:
    return dict(architectures=[ARCHITECTURES["gpt2"]], model_type="gpt2",
                vocab_size=cfg.vocab_size, n_embd=cfg.hidden, n_layer=cfg.layers,
                n_head=cfg.heads, n_inner=cfg.ffn_hidden, n_positions=cfg.max_seq_len,
                layer_norm_epsilon=cfg.norm_eps,
                activation_function="gelu_new" if cfg.mlp_activation == "gelu_tanh" else "gelu",
                tie_word_embeddings=cfg.tie_embeddings)


def _llama_config(cfg: ModelConfig, kind: str) -> dict[str, Any]:
    hf = dict(architectures=[ARCHITECTURES[kind]], model_type=kind, vocab_size=cfg.vocab_size,
              hidden_size=cfg.hidden, intermediate_size=cfg.ffn_hidden,
              num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
              num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.dim_per_head,
              hidden_act=_EXPORT_ACTIVATIONS[cfg.mlp_activation],
              max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
              rope_theta=cfg.rope_theta, rope_scaling=_rope_scaling_dict(cfg.rope_scaling),
              tie_word_embeddings=cfg.tie_embeddings)
    if kind == "llama":
        hf.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    if kind == "mistral":
        hf.update(sliding_window=cfg.sliding_window)
    if kind == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None)
    return hf


def _rope_scaling_dict(scaling: RopeScaling | None) -> dict[str, Any] | None:
    if scaling is None:
        return None
    return dict(rope_type="llama3", factor=scaling.factor,
                low_freq_factor=scaling.low_freq_factor,
                high_freq_factor=scaling.high_freq_factor,
                original_max_position_embeddings=scaling.original_max_position)


# ----------------------------------------------------------------------------------- state dicts

class _Keys:
    """Reads tensors out of a Hugging Face state dict and reports what is missing or left over."""

    def __init__(self, hf_sd: Mapping[str, torch.Tensor], *, trunk_prefix: str):
        # Base-model checkpoints (LlamaModel, GPT2Model) drop the trunk prefix; put it back.
        self.sd = {k if k.startswith((trunk_prefix, "lm_head.")) else trunk_prefix + k: v
                   for k, v in hf_sd.items()}
        self.used: set[str] = set()

    def take(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise ValueError(f"Hugging Face state dict lacks {key!r}")
        self.used.add(key)
        return self.sd[key]

    def check_all_used(self, *, ignore: tuple[str, ...] = ()) -> None:
        left = sorted(k for k in self.sd if k not in self.used
                      and not k.endswith(_IGNORED_SUFFIXES) and k not in ignore)
        if left:
            raise ValueError(f"Hugging Face state dict has {len(left)} unexpected key(s), "
                             f"first: {left[0]!r}")


def _llama_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(engine name, Hugging Face name) of every llama-layout parameter."""
    pairs = [("embedding.weight", "model.embed_tokens.weight"),
             ("final_norm.weight", "model.norm.weight")]
    if not cfg.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    for i in range(cfg.layers):
        ours, theirs = f"decoder.{i}.", f"model.layers.{i}."
        pairs += [(ours + "attn_norm.weight", theirs + "input_layernorm.weight"),
                  (ours + "mlp_norm.weight", theirs + "post_attention_layernorm.weight")]
        for proj in ("q", "k", "v", "o"):
            biased = cfg.bias or (cfg.qkv_bias and proj != "o")
            for kind in ("weight", "bias") if biased else ("weight",):
                pairs.append((f"{ours}attention.{proj}_proj.{kind}",
                              f"{theirs}self_attn.{proj}_proj.{kind}"))
        for proj in ("gate", "up", "down"):
            for kind in ("weight", "bias") if cfg.bias else ("weight",):
                pairs.append((f"{ours}mlp.{proj}_proj.{kind}", f"{theirs}mlp.{proj}_proj.{kind}"))
    return pairs


def _gpt2_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(engine name, Hugging Face name) of GPT-2 parameters that copy unchanged (no transpose)."""
    pairs = [("embedding.weight", "transformer.wte.weight"),
             ("position_embedding.weight", "transformer.wpe.weight"),
             ("final_norm.weight", "transformer.ln_f.weight"),
             ("final_norm.bias", "transformer.ln_f.bias")]
    if not cfg.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    for i in range(cfg.layers):
        ours, theirs = f"decoder.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            pairs += [(f"{ours}attn_norm.{kind}", f"{theirs}ln_1.{kind}"),
                      (f"{ours}mlp_norm.{kind}", f"{theirs}ln_2.{kind}")]
        pairs += [(ours + "attention.o_proj.bias", theirs + "attn.c_proj.bias"),
                  (ours + "mlp.up_proj.bias", theirs + "mlp.c_fc.bias"),
                  (ours + "mlp.down_proj.bias", theirs + "mlp.c_proj.bias")]
    return pairs


def _gpt2_transposed(i: int) -> list[tuple[str, str]]:
    """(engine, Hugging Face) names of block i's Conv1D weights, stored `[in, out]` by GPT-2."""
    ours, theirs = f"decoder.{i}.", f"transformer.h.{i}."
    return [(ours + "attention.o_proj.weight", theirs + "attn.c_proj.weight"),
            (ours + "mlp.up_proj.weight", theirs + "mlp.c_fc.weight"),
            (ours + "mlp.down_proj.weight", theirs + "mlp.c_proj.weight")]


def hf_to_engine_state_dict(hf_sd: Mapping[str, torch.Tensor],
                            cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The full engine state dict (no MTP heads) of a Hugging Face state dict for `cfg`."""
    gpt2 = cfg.family == "gpt2"
    keys = _Keys(hf_sd, trunk_prefix="transformer." if gpt2 else "model.")
    pairs = _gpt2_pairs(cfg) if gpt2 else _llama_pairs(cfg)
    full = {ours: keys.take(theirs) for ours, theirs in pairs}
    for i in range(cfg.layers if gpt2 else 0):
        for ours, theirs in _gpt2_transposed(i):
            full[ours] = keys.take(theirs).t().contiguous()
        attn = f"transformer.h.{i}.attn.c_attn."
        fused = {"weight": keys.take(attn + "weight").t(), "bias": keys.take(attn + "bias")}
        for kind, tensor in fused.items():  # [3 * hidden, ...]: q, k, v stacked
            for proj, part in zip("qkv", tensor.chunk(3, dim=0)):
                full[f"decoder.{i}.attention.{proj}_proj.{kind}"] = part.contiguous().clone()
    # A tied checkpoint may still list lm_head.weight (it is the embedding).
    keys.check_all_used(ignore=("lm_head.weight",) if cfg.tie_embeddings else ())
    return full


def engine_to_hf_state_dict(full_sd: Mapping[str, torch.Tensor],
                            cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict of a full engine state dict (MTP heads are dropped)."""
    export_model_type(cfg)
    if cfg.mtp_heads:
        log.warning("dropping %d MTP head(s): Hugging Face %s has none", cfg.mtp_heads, cfg.family)
    gpt2 = cfg.family == "gpt2"
    hf = {theirs: full_sd[ours] for ours, theirs in (_gpt2_pairs(cfg) if gpt2 else _llama_pairs(cfg))}
    for i in range(cfg.layers if gpt2 else 0):
        for ours, theirs in _gpt2_transposed(i):
            hf[theirs] = full_sd[ours].t().contiguous()
        attn, ours = f"transformer.h.{i}.attn.c_attn.", f"decoder.{i}.attention."
        qkv_weight = torch.cat([full_sd[f"{ours}{p}_proj.weight"] for p in "qkv"])
        hf[attn + "weight"] = qkv_weight.t().contiguous()
        hf[attn + "bias"] = torch.cat([full_sd[f"{ours}{p}_proj.bias"] for p in "qkv"])
    return hf
