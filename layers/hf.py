"""Hugging Face adapters: configs and state dicts of the supported families, both ways.

The engine side is always a *full* state dict (layers/sharding.py: unsharded, vocabulary unpadded),
so the adapters do not depend on TP: load one with `load_full_state_dict(model, sd)` at any TP
degree, and export what `full_state_dict(model)` returns.

- Llama, Mistral, Qwen2/3, SmolLM3, Gemma 2/3 (text) and Phi-3 share one layout
  (`model.layers.{i}.self_attn.q_proj.weight`, ...); q/k are in Hugging Face's rotate-half RoPE
  order, which is the engine's, so they copy unchanged. Gemma names its four norms
  input/post_attention/pre_feedforward/post_feedforward (Llama's `post_attention_layernorm` is the
  norm before the MLP). Phi-3 fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`: they are
  split on import and fused on export, so every TP degree slices them like the other families.
- GPT-2 stores linear weights transposed (`Conv1D`, `[in, out]`) and fuses q/k/v into `c_attn`;
  they are transposed and split here. Keys with or without the `transformer.` prefix are accepted.
- MTP heads have no Hugging Face counterpart: export drops them (with a warning) and import leaves
  them out (load with `strict=False` to keep their fresh initialization).

Export picks the model's origin (`model.hf_model_type`) or the closest family, and refuses a config
that the family's `config.json` cannot express: the exported config must import back to the same
architecture (one check for every family, not a list of special cases).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from engine.log import get_logger
from layers.config import ModelConfig, MoEConfig, RopeScaling

log = get_logger(__name__)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "smollm3": "SmolLM3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "gpt2": "GPT2LMHeadModel"}
GEMMA = ("gemma2", "gemma3_text")
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
# Families whose config says per block which layers slide (`layer_types`).
_LAYER_TYPED = ("qwen3", "smollm3", *GEMMA)
_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                   "gelu_pytorch_tanh": "gelu_tanh"}
_EXPORT_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
QUANT_KEY = "megadistill_quant"  # config.json: {weights, activation_bits} of a ternary export
# Non-parameter entries some checkpoints carry (attention masks, rotary caches).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
# Settings of how a model trains, not of its architecture: export does not carry them.
_TRAINING_ONLY = dict(dropout=0.0, init_std=0.02, vocab_pad_multiple=64, mtp_heads=0, hf_model_type=None)
_MOE_TRAINING_ONLY = dict(z_loss_coef=0.0)  # Hugging Face's MoE configs have no router z-loss


def hf_model_type(hf_config: Mapping[str, Any]) -> str:
    """The supported `model_type` of a Hugging Face config dict; anything else is a ValueError."""
    model_type = hf_config.get("model_type")
    if model_type is None:
        archs = hf_config.get("architectures") or ["<none>"]
        by_arch = {arch: kind for kind, arch in ARCHITECTURES.items()}
        model_type = by_arch.get(archs[0], archs[0])
    if model_type not in ARCHITECTURES:
        hint = " (the text model of Gemma 3 is gemma3_text)" if model_type == "gemma3" else ""
        raise ValueError(f"unsupported Hugging Face architecture {model_type!r}{hint} "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    return model_type


# ---------------------------------------------------------------------------------------- configs

def hf_config_to_model_config(hf_config: Mapping[str, Any]) -> ModelConfig:
    """A `ModelConfig` for a Hugging Face `config.json` dict of a supported family."""
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


def _rope_params(params: Mapping[str, Any], default_theta: float) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) of one Hugging Face RoPE parameter dict."""
    theta = float(params.get("rope_theta", default_theta))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, RopeScaling(type="linear", factor=float(params["factor"]))
    if rope_type != "llama3":
        raise ValueError(f"unsupported Hugging Face rope_type {rope_type!r} "
                         "(supported: default, linear, llama3)")
    return theta, RopeScaling(factor=float(params["factor"]),
                              low_freq_factor=float(params["low_freq_factor"]),
                              high_freq_factor=float(params["high_freq_factor"]),
                              original_max_position=int(params["original_max_position_embeddings"]))


def _rope_fields(hf: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """rope_theta, rope_scaling, rope_local_theta and partial_rotary_factor of a config: Hugging
    Face 5's `rope_parameters` (per layer type for Gemma 3) or the older top-level keys."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    default_theta = float(hf.get("rope_theta", 1e6 if kind == "gemma3_text" else 10000.0))
    local_theta = None
    if kind == "gemma3_text":
        if "full_attention" in params:
            local = params.get("sliding_attention") or {}
            params = dict(params["full_attention"] or {})
        else:  # transformers 4: rope_theta, rope_local_base_freq, rope_scaling of the global layers
            local = {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
        if _rope_params(local, 10000.0)[1] is not None:
            raise ValueError("gemma3_text with scaled RoPE on its sliding layers is not supported")
        local_theta = float(local.get("rope_theta", 10000.0))
    theta, scaling = _rope_params(params, default_theta)
    if local_theta == theta and scaling is None:
        local_theta = None  # one table serves both layer types
    partial = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    return dict(rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta,
                partial_rotary_factor=partial)


def _llama_biases(hf: Mapping[str, Any], kind: str) -> tuple[bool, bool]:
    """(qkv_bias, bias) of a llama-layout config."""
    if kind == "qwen2":
        return True, False
    if kind == "qwen2_moe":
        return bool(hf.get("qkv_bias", True)), False
    attention_bias, mlp_bias = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
    if kind in ("llama", "smollm3") and attention_bias == mlp_bias:
        return False, attention_bias
    if attention_bias or mlp_bias:
        raise ValueError(f"{kind} with attention_bias={attention_bias} and mlp_bias={mlp_bias} "
                         "is not supported")
    return False, False


def _layer_types(hf: Mapping[str, Any], kind: str) -> list[str]:
    """Per block, full_attention or sliding_attention, as the family's config class derives them
    when `layer_types` is absent (transformers 4 configs)."""
    layers, window = hf["num_hidden_layers"], hf.get("sliding_window")
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    if kind in GEMMA:
        period = 2 if kind == "gemma2" else hf.get("sliding_window_pattern", 6)
        return ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(layers)]
    slides = window is not None and hf.get("use_sliding_window", False)
    first = hf.get("max_window_layers", 0) if kind == "qwen3" else 0
    return ["sliding_attention" if slides and i >= first else "full_attention" for i in range(layers)]


def _attention_layout(hf: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """sliding_window and layer_types; a window on every block is `layer_types: None`."""
    if kind in ("mistral", "phi3", "mixtral"):
        return dict(sliding_window=hf.get("sliding_window"))
    if kind in ("qwen2", "qwen2_moe", "qwen3_moe") and hf.get("use_sliding_window"):
        raise ValueError(f"{kind} with use_sliding_window=true is not supported")
    if kind not in _LAYER_TYPED:
        return {}
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"{kind} with use_bidirectional_attention=true is not supported")
    types = _layer_types(hf, kind)
    if "sliding_attention" not in types:
        return {}
    uniform = "full_attention" not in types
    return dict(sliding_window=hf["sliding_window"], layer_types=None if uniform else tuple(types))


def _family_fields(hf: Mapping[str, Any], kind: str, head_dim: int) -> dict[str, Any]:
    """The options that set Qwen3, SmolLM3 and Gemma apart from Llama."""
    fields: dict[str, Any] = dict(qk_norm=kind in ("qwen3", "gemma3_text", "qwen3_moe"))
    if kind in MOE:
        fields.update(_moe_fields(hf, kind))
    if kind == "smollm3":
        uses_rope = hf.get("no_rope_layers") or [
            int((i + 1) % hf.get("no_rope_layer_interval", 4) != 0)
            for i in range(hf["num_hidden_layers"])]
        fields["no_rope_layers"] = tuple(i for i, rope in enumerate(uses_rope) if not rope)
    if kind in GEMMA:
        scalar = hf.get("query_pre_attn_scalar", 256)
        fields.update(norm_unit_offset=True, post_norms=True, scale_embeddings=True,
                      query_pre_attn_scalar=None if scalar == head_dim else float(scalar),
                      attn_logit_softcap=hf.get("attn_logit_softcapping"),
                      final_logit_softcap=hf.get("final_logit_softcapping"))
    return fields


def _moe_fields(hf: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """model.moe and model.moe_layers of Mixtral, Qwen2-MoE and Qwen3-MoE configs."""
    aux = float(hf.get("router_aux_loss_coef", 0.0))
    if kind == "mixtral":
        if hf.get("router_jitter_noise"):
            raise ValueError("mixtral with router_jitter_noise > 0 is not supported")
        return dict(moe=MoEConfig(experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
                                  expert_ffn_hidden=hf["intermediate_size"], norm_topk_prob=True,
                                  aux_loss_coef=aux))
    width, shared = hf["moe_intermediate_size"], hf.get("shared_expert_intermediate_size") or 0
    if kind != "qwen2_moe":
        shared = 0
    experts = hf.get("num_experts") or hf["num_local_experts"]  # transformers 5 renames Qwen3-MoE's
    moe = MoEConfig(experts=experts, top_k=hf["num_experts_per_tok"], expert_ffn_hidden=width,
                    shared_experts=int(shared > 0), shared_expert_gate=shared > 0,
                    shared_expert_ffn_hidden=None if shared in (0, width) else shared,
                    norm_topk_prob=bool(hf.get("norm_topk_prob", False)), aux_loss_coef=aux)
    dense, step = set(hf.get("mlp_only_layers") or ()), hf.get("decoder_sparse_step") or 1
    layers = [i for i in range(hf["num_hidden_layers"]) if i not in dense and (i + 1) % step == 0]
    return dict(moe=moe, moe_layers=None if len(layers) == hf["num_hidden_layers"] else tuple(layers))


def _llama_fields(hf: Mapping[str, Any], kind: str) -> dict[str, Any]:
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    qkv_bias, bias = _llama_biases(hf, kind)
    head_dim = hf.get("head_dim") or hidden // heads
    activation = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    return dict(
        family="llama", vocab_size=hf["vocab_size"], hidden=hidden,
        layers=hf["num_hidden_layers"], heads=heads,
        kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=None if head_dim == hidden // heads else head_dim,
        ffn_hidden=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
        norm_eps=hf.get("rms_norm_eps", 1e-6), **_rope_fields(hf, kind),
        qkv_bias=qkv_bias, bias=bias, activation=_activation(activation),
        **_attention_layout(hf, kind), **_family_fields(hf, kind, head_dim),
        tie_embeddings=bool(hf.get("tie_word_embeddings", kind in GEMMA)))


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
    """The Hugging Face model_type `cfg` exports as (its origin, or the closest match); a ValueError
    names the first setting that family's config cannot express."""
    kind = cfg.hf_model_type or _closest_family(cfg)
    if kind not in ARCHITECTURES:
        raise ValueError(f"cannot export as Hugging Face {kind}: unsupported architecture")
    back = hf_config_to_model_config(_hf_config(cfg, kind))
    wanted, got = (_canonical(c) for c in (cfg, back))
    for field in dataclasses.fields(ModelConfig):
        if getattr(wanted, field.name) != getattr(got, field.name):
            raise ValueError(f"cannot export as Hugging Face {kind}: its config.json cannot express "
                             f"model.{field.name}={getattr(cfg, field.name)!r}")
    return kind


def _canonical(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with its training-only settings reset and its defaults spelled out (kv_heads,
    head_dim, activation), so that two configs of one architecture compare equal."""
    moe = cfg.moe and dataclasses.replace(cfg.moe, **_MOE_TRAINING_ONLY)
    return dataclasses.replace(cfg, **_TRAINING_ONLY, moe=moe, kv_heads=cfg.num_kv_heads,
                               head_dim=cfg.dim_per_head, activation=cfg.mlp_activation)


def _closest_family(cfg: ModelConfig) -> str:
    if cfg.family == "gpt2":
        return "gpt2"
    if cfg.moe is not None:
        return "qwen2_moe" if cfg.moe.shared_experts else "qwen3_moe" if cfg.qk_norm else "mixtral"
    if cfg.post_norms:
        return "gemma3_text" if cfg.qk_norm or cfg.rope_local_theta is not None else "gemma2"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.partial_rotary_factor != 1.0:
        return "phi3"
    if cfg.no_rope_layers:
        return "smollm3"
    if cfg.qkv_bias and not cfg.bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window is not None else "llama"


def model_config_to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """A Hugging Face `config.json` dict for `cfg` (architectures and model_type set); a quantized
    model's settings go under QUANT_KEY, which runtimes ignore and import reads back."""
    return _hf_config(cfg, export_model_type(cfg))


def _hf_config(cfg: ModelConfig, kind: str) -> dict[str, Any]:
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
              tie_word_embeddings=cfg.tie_embeddings,
              # not the family's defaults (ids of its own vocabulary); tools/convert_hf.py writes
              # the ids recorded at import
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if kind in ("llama", "mistral", "qwen2", "mixtral"):  # read by transformers 4 and 5 alike
        hf.update(rope_theta=cfg.rope_theta, rope_scaling=_rope_dict(cfg.rope_theta, cfg.rope_scaling))
    else:
        hf.update(rope_parameters=_rope_parameters(cfg, kind))
    layer_types = [cfg.layer_type(i) for i in range(cfg.layers)]
    slides = cfg.sliding_window is not None
    if kind in ("llama", "smollm3"):
        hf.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    if kind in ("mistral", "phi3", "mixtral"):
        hf.update(sliding_window=cfg.sliding_window)
    if kind in ("qwen2", "qwen2_moe", "qwen3_moe"):
        hf.update(use_sliding_window=False, sliding_window=None)
    if kind in MOE:
        hf.update(_moe_config(cfg, kind))
    if kind in _LAYER_TYPED:
        hf.update(sliding_window=cfg.sliding_window, layer_types=layer_types)
    if kind in ("qwen3", "smollm3"):
        hf.update(use_sliding_window=slides, max_window_layers=0)
    if kind == "smollm3":
        hf.update(no_rope_layers=[int(i not in cfg.no_rope_layers) for i in range(cfg.layers)])
    if kind == "phi3":
        hf.update(original_max_position_embeddings=cfg.max_seq_len)
    if kind in GEMMA:
        hf.update(_gemma_config(cfg))
    return hf


def _moe_config(cfg: ModelConfig, kind: str) -> dict[str, Any]:
    moe = cfg.moe
    if moe is None:
        return {}
    hf: dict[str, Any] = dict(num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.aux_loss_coef)
    if kind == "mixtral":
        return dict(hf, num_local_experts=moe.experts, intermediate_size=moe.expert_ffn_hidden)
    moe_layers = [i for i in range(cfg.layers) if cfg.is_moe_layer(i)]
    hf.update(num_experts=moe.experts, moe_intermediate_size=moe.expert_ffn_hidden,
              norm_topk_prob=moe.norm_topk_prob, decoder_sparse_step=1,
              mlp_only_layers=[i for i in range(cfg.layers) if i not in moe_layers])
    if kind == "qwen2_moe":
        hf.update(shared_expert_intermediate_size=moe.shared_ffn_hidden, qkv_bias=cfg.qkv_bias)
    if kind == "qwen3_moe":
        hf.update(attention_bias=False)
    return hf


def _gemma_config(cfg: ModelConfig) -> dict[str, Any]:
    scalar = cfg.query_pre_attn_scalar or cfg.dim_per_head
    return dict(hidden_activation=_EXPORT_ACTIVATIONS[cfg.mlp_activation],
                query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
                attn_logit_softcapping=cfg.attn_logit_softcap,
                final_logit_softcapping=cfg.final_logit_softcap)


def _rope_parameters(cfg: ModelConfig, kind: str) -> dict[str, Any]:
    """Hugging Face 5's `rope_parameters` (per layer type for Gemma 3)."""
    params = _rope_dict(cfg.rope_theta, cfg.rope_scaling) or dict(rope_type="default",
                                                                  rope_theta=cfg.rope_theta)
    if kind == "phi3":
        params["partial_rotary_factor"] = cfg.partial_rotary_factor
    if kind != "gemma3_text":
        return params
    local = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
    return dict(full_attention=params,
                sliding_attention=dict(rope_type="default", rope_theta=local))


def _rope_dict(theta: float, scaling: RopeScaling | None) -> dict[str, Any] | None:
    if scaling is None:
        return None
    if scaling.type == "linear":
        return dict(rope_type="linear", rope_theta=theta, factor=scaling.factor)
    return dict(rope_type="llama3", rope_theta=theta, factor=scaling.factor,
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


def _norm_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(engine, Hugging Face) names of a llama-layout block's norms, relative to the block."""
    if cfg.post_norms:  # Gemma: four norms, named after their place around the two branches
        return [("attn_norm", "input_layernorm"), ("post_attn_norm", "post_attention_layernorm"),
                ("mlp_norm", "pre_feedforward_layernorm"),
                ("post_mlp_norm", "post_feedforward_layernorm")]
    return [("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")]


def _llama_pairs(cfg: ModelConfig, *, fused: bool) -> list[tuple[str, str]]:
    """(engine name, Hugging Face name) of every llama-layout parameter that copies unchanged;
    with `fused` (Phi-3) q/k/v and gate/up are left to `_fused_parts`."""
    pairs = [("embedding.weight", "model.embed_tokens.weight"),
             ("final_norm.weight", "model.norm.weight")]
    if not cfg.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    for i in range(cfg.layers):
        ours, theirs = f"decoder.{i}.", f"model.layers.{i}."
        pairs += [(f"{ours}{a}.weight", f"{theirs}{b}.weight") for a, b in _norm_pairs(cfg)]
        if cfg.qk_norm:
            pairs += [(f"{ours}attention.{n}_norm.weight", f"{theirs}self_attn.{n}_norm.weight")
                      for n in "qk"]
        for proj in ("o",) if fused else ("q", "k", "v", "o"):
            biased = cfg.bias or (cfg.qkv_bias and proj != "o")
            for kind in ("weight", "bias") if biased else ("weight",):
                pairs.append((f"{ours}attention.{proj}_proj.{kind}",
                              f"{theirs}self_attn.{proj}_proj.{kind}"))
        if cfg.is_moe_layer(i):
            pairs += _moe_pairs(cfg, ours, theirs)
            continue
        for proj in ("down",) if fused else ("gate", "up", "down"):
            for kind in ("weight", "bias") if cfg.bias else ("weight",):
                pairs.append((f"{ours}mlp.{proj}_proj.{kind}", f"{theirs}mlp.{proj}_proj.{kind}"))
    return pairs


# Mixtral's names of an expert's gate, up and down projections (Qwen-MoE uses ours).
_MIXTRAL_EXPERT = {"gate": "w1", "up": "w3", "down": "w2"}


def _moe_pairs(cfg: ModelConfig, ours: str, theirs: str) -> list[tuple[str, str]]:
    """(engine, Hugging Face) names of one MoE block's router, experts and shared expert, in the
    layout checkpoints store them (one tensor per expert and projection)."""
    mixtral = (cfg.hf_model_type or _closest_family(cfg)) == "mixtral"
    block = f"{theirs}block_sparse_moe." if mixtral else f"{theirs}mlp."
    pairs = [(f"{ours}mlp.router.weight", f"{block}gate.weight")]
    for e in range(cfg.moe.experts):
        for proj, name in _MIXTRAL_EXPERT.items():
            theirs_name = f"{block}experts.{e}.{name if mixtral else proj + '_proj'}.weight"
            pairs.append((f"{ours}mlp.experts.{e}.{proj}_proj.weight", theirs_name))
    if cfg.moe.shared_experts:
        pairs += [(f"{ours}mlp.shared_expert.{p}_proj.weight", f"{block}shared_expert.{p}_proj.weight")
                  for p in ("gate", "up", "down")]
    if cfg.moe.shared_expert_gate:
        pairs.append((f"{ours}mlp.shared_expert_gate.weight", f"{block}shared_expert_gate.weight"))
    return pairs


def _fused_parts(cfg: ModelConfig, i: int) -> list[tuple[str, list[tuple[str, int]]]]:
    """Phi-3's fused weights of block i: (Hugging Face name, [(engine name, rows), ...]) with the
    parts stacked along the output rows in this order."""
    ours, theirs = f"decoder.{i}.", f"model.layers.{i}."
    q_rows, kv_rows = cfg.heads * cfg.dim_per_head, cfg.num_kv_heads * cfg.dim_per_head
    return [(theirs + "self_attn.qkv_proj.weight",
             [(ours + "attention.q_proj.weight", q_rows), (ours + "attention.k_proj.weight", kv_rows),
              (ours + "attention.v_proj.weight", kv_rows)]),
            (theirs + "mlp.gate_up_proj.weight",
             [(ours + "mlp.gate_proj.weight", cfg.ffn_hidden),
              (ours + "mlp.up_proj.weight", cfg.ffn_hidden)])]


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


def _split_stacked_experts(hf_sd: Mapping[str, torch.Tensor],
                           cfg: ModelConfig) -> Mapping[str, torch.Tensor]:
    """transformers 5 holds each MoE block's experts stacked in memory (`mlp.experts.gate_up_proj`
    `[experts, 2 x ffn, hidden]`, `mlp.experts.down_proj` `[experts, hidden, ffn]`, Mixtral's router
    as `mlp.gate`); its checkpoints keep one tensor per expert. The stacked form -> the stored one."""
    if cfg.moe is None or not any(k.endswith("mlp.experts.gate_up_proj") for k in hf_sd):
        return hf_sd
    sd = dict(hf_sd)
    for i in range(cfg.layers):
        if not cfg.is_moe_layer(i) or f"model.layers.{i}.mlp.experts.gate_up_proj" not in sd:
            continue
        theirs = f"model.layers.{i}."
        names = dict(_moe_pairs(cfg, f"decoder.{i}.", theirs))
        gate_up = sd.pop(f"{theirs}mlp.experts.gate_up_proj")
        down = sd.pop(f"{theirs}mlp.experts.down_proj")
        gate, up = gate_up.chunk(2, dim=1)
        for e in range(cfg.moe.experts):
            for proj, tensor in (("gate", gate), ("up", up), ("down", down)):
                sd[names[f"decoder.{i}.mlp.experts.{e}.{proj}_proj.weight"]] = tensor[e]
        sd[names[f"decoder.{i}.mlp.router.weight"]] = sd.pop(f"{theirs}mlp.gate.weight")
    return sd


def hf_to_engine_state_dict(hf_sd: Mapping[str, torch.Tensor],
                            cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The full engine state dict (no MTP heads) of a Hugging Face state dict for `cfg`."""
    gpt2, fused = cfg.family == "gpt2", cfg.hf_model_type == "phi3"
    keys = _Keys(_split_stacked_experts(hf_sd, cfg), trunk_prefix="transformer." if gpt2 else "model.")
    pairs = _gpt2_pairs(cfg) if gpt2 else _llama_pairs(cfg, fused=fused)
    full = {ours: keys.take(theirs) for ours, theirs in pairs}
    for i in range(cfg.layers if fused else 0):
        for theirs, parts in _fused_parts(cfg, i):
            tensor = keys.take(theirs)
            rows = [n for _, n in parts]
            if tensor.shape[0] != sum(rows):
                raise ValueError(f"{theirs} has {tensor.shape[0]} rows, the config needs {sum(rows)}")
            for (ours, _), part in zip(parts, tensor.split(rows)):
                full[ours] = part.clone()
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
    kind = export_model_type(cfg)
    if cfg.mtp_heads:
        log.warning("dropping %d MTP head(s): Hugging Face %s has none", cfg.mtp_heads, kind)
    gpt2, fused = kind == "gpt2", kind == "phi3"
    pairs = _gpt2_pairs(cfg) if gpt2 else _llama_pairs(cfg, fused=fused)
    hf = {theirs: full_sd[ours] for ours, theirs in pairs}
    for i in range(cfg.layers if fused else 0):
        for theirs, parts in _fused_parts(cfg, i):
            hf[theirs] = torch.cat([full_sd[ours] for ours, _ in parts])
    for i in range(cfg.layers if gpt2 else 0):
        for ours, theirs in _gpt2_transposed(i):
            hf[theirs] = full_sd[ours].t().contiguous()
        attn, ours = f"transformer.h.{i}.attn.c_attn.", f"decoder.{i}.attention."
        qkv_weight = torch.cat([full_sd[f"{ours}{p}_proj.weight"] for p in "qkv"])
        hf[attn + "weight"] = qkv_weight.t().contiguous()
        hf[attn + "bias"] = torch.cat([full_sd[f"{ours}{p}_proj.bias"] for p in "qkv"])
    return hf
