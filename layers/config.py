"""`ModelConfig`: the architecture of one transformer LM (Llama or GPT-2 family), validated.

The family decides the building blocks: `llama` is RMSNorm, rotary positions, grouped-query
attention and a SwiGLU MLP; `gpt2` is LayerNorm (with bias), learned absolute positions, multi-head
attention and a GELU (tanh) MLP. Everything else is a field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from engine.checkpoint import ResolvedCheckpoint
from engine.config import ConfigError, check, from_dict
from layers.quant import QUANT_KINDS, LinearQuant

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling of RoPE (`rope_type: llama3` in Hugging Face configs)."""

    factor: float = 8.0  # long wavelengths are divided by this
    low_freq_factor: float = 1.0  # wavelengths above original_max_position / this are fully scaled
    high_freq_factor: float = 4.0  # wavelengths below original_max_position / this are kept
    original_max_position: int = 8192  # context length the model was pretrained with

    def __post_init__(self) -> None:
        check(self.factor >= 1.0, "model.rope_scaling.factor", f"must be >= 1 (got {self.factor})")
        check(0 < self.low_freq_factor < self.high_freq_factor, "model.rope_scaling",
              f"needs 0 < low_freq_factor < high_freq_factor "
              f"(got {self.low_freq_factor}, {self.high_freq_factor})")
        check(self.original_max_position > 0, "model.rope_scaling.original_max_position",
              f"must be > 0 (got {self.original_max_position})")


@dataclass(frozen=True)
class ModelConfig:
    """One decoder-only transformer LM. `vocab_size` is the real vocabulary (before padding)."""

    family: Literal["llama", "gpt2"] = "llama"  # llama (RMSNorm, RoPE, SwiGLU) or gpt2 (LayerNorm, GELU)
    vocab_size: int = 256  # real vocabulary; the embedding and output layer are padded past it
    hidden: int = 64  # width of the residual stream
    layers: int = 2  # decoder blocks in the trunk
    heads: int = 4  # query heads
    kv_heads: int | None = None  # key/value heads (grouped-query attention); None: = heads
    head_dim: int | None = None  # per-head width; None: hidden // heads
    ffn_hidden: int = 256  # MLP inner width
    max_seq_len: int = 2048  # longest sequence (rows of the learned position table for gpt2)
    norm_eps: float = 1e-5  # epsilon of RMSNorm / LayerNorm
    rope_theta: float = 10000.0  # RoPE base (llama family)
    rope_scaling: RopeScaling | None = None  # Llama-3 RoPE scaling; None: plain RoPE
    qkv_bias: bool = False  # bias on the q/k/v projections only (Qwen2)
    bias: bool = False  # bias on every linear layer, q/k/v included (GPT-2)
    activation: str | None = None  # silu|gelu|gelu_tanh; None: silu (llama), gelu_tanh (gpt2)
    sliding_window: int | None = None  # attend to at most this many past tokens (Mistral); None: all
    tie_embeddings: bool = False  # the output layer reuses the input embedding's weight
    final_logit_softcap: float | None = None  # logits become c * tanh(logits / c) (Gemma 2); None: off
    mtp_heads: int = 0  # extra multi-token-prediction heads; head j predicts token t+1+j
    dropout: float = 0.0  # dropout on embeddings, attention probabilities and residual branches
    init_std: float = 0.02  # std of the normal init (output projections get std / sqrt(2 * layers))
    vocab_pad_multiple: int = 64  # vocabulary padded to a multiple of tp * this
    hf_model_type: str | None = None  # Hugging Face model_type to export as (llama|mistral|qwen2|gpt2)
    # none, or ternary: every decoder linear (q/k/v/o, gate/up/down) trains as BitNet b1.58, weights
    # s * {-1, 0, 1} with s = mean |W| of the whole weight, straight-through gradients, fp32 master
    # weights; embeddings, norms and the LM head stay full precision (layers/quant.py)
    quant: Literal["none", "ternary"] = "none"
    quant_activation_bits: int | None = 8  # ternary: per-token absmax bits of quantized inputs; None: off

    def __post_init__(self) -> None:
        check(self.family in ("llama", "gpt2"), "model.family",
              f"must be 'llama' or 'gpt2' (got {self.family!r})")
        for key in ("vocab_size", "hidden", "layers", "heads", "ffn_hidden", "max_seq_len",
                    "vocab_pad_multiple"):
            value = getattr(self, key)
            check(isinstance(value, int) and value > 0, f"model.{key}",
                  f"must be a positive integer (got {value!r})")
        check(self.kv_heads is None or 0 < self.kv_heads <= self.heads, "model.kv_heads",
              f"must be between 1 and model.heads={self.heads} (got {self.kv_heads})")
        check(self.heads % self.num_kv_heads == 0, "model.kv_heads",
              f"must divide model.heads={self.heads} (got {self.kv_heads})")
        check(self.head_dim is not None or self.hidden % self.heads == 0, "model.heads",
              f"must divide model.hidden={self.hidden} when model.head_dim is unset (got {self.heads})")
        check(self.head_dim is None or (self.head_dim > 0 and self.head_dim % 2 == 0),
              "model.head_dim", f"must be a positive even integer (got {self.head_dim})")
        check(self.family == "gpt2" or self.dim_per_head % 2 == 0, "model.heads",
              f"rotary embeddings need an even head width (hidden/heads = {self.dim_per_head})")
        check(self.norm_eps > 0, "model.norm_eps", f"must be > 0 (got {self.norm_eps})")
        check(self.rope_theta > 0, "model.rope_theta", f"must be > 0 (got {self.rope_theta})")
        check(self.activation is None or self.activation in ACTIVATIONS, "model.activation",
              f"must be one of {', '.join(ACTIVATIONS)} (got {self.activation!r})")
        check(self.sliding_window is None or self.sliding_window > 0, "model.sliding_window",
              f"must be > 0 (got {self.sliding_window})")
        cap = self.final_logit_softcap
        check(cap is None or 0 < cap < math.inf, "model.final_logit_softcap",
              f"must be > 0 and finite, or null (got {cap!r})")
        check(self.mtp_heads >= 0, "model.mtp_heads", f"must be >= 0 (got {self.mtp_heads})")
        check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1) (got {self.dropout})")
        check(self.init_std > 0, "model.init_std", f"must be > 0 (got {self.init_std})")
        check(self.family == "llama" or self.rope_scaling is None, "model.rope_scaling",
              "only the llama family uses rotary embeddings")
        check(self.quant in QUANT_KINDS, "model.quant",
              f"must be one of {', '.join(QUANT_KINDS)} (got {self.quant!r})")
        bits = self.quant_activation_bits
        check(bits is None or (isinstance(bits, int) and 2 <= bits <= 16),
              "model.quant_activation_bits", f"must be between 2 and 16, or null (got {bits!r})")

    @property
    def num_kv_heads(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden // self.heads

    @property
    def mlp_activation(self) -> str:
        if self.activation is not None:
            return self.activation
        return "silu" if self.family == "llama" else "gelu_tanh"

    @property
    def gated_mlp(self) -> bool:
        """SwiGLU-style gate (llama family); gpt2 has a plain two-layer MLP."""
        return self.family == "llama"

    @property
    def linear_quant(self) -> LinearQuant | None:
        """What the decoder's parallel linear layers quantize (None: nothing)."""
        if self.quant == "none":
            return None
        return LinearQuant(activation_bits=self.quant_activation_bits)

    def padded_vocab(self, tp: int) -> int:
        """Rows of the full embedding/output weight: vocab_size rounded up to tp * pad multiple."""
        multiple = tp * self.vocab_pad_multiple
        return -(-self.vocab_size // multiple) * multiple


def saved_model_config(checkpoint: ResolvedCheckpoint) -> ModelConfig:
    """The model config `checkpoint` was saved with: the one place a `ModelConfig` is read from
    a checkpoint (errors name the checkpoint's key)."""
    return from_dict(ModelConfig, checkpoint.run_config["model"], prefix=f"{checkpoint.key}(model)")


def shape_differences(saved: ModelConfig, wanted: ModelConfig) -> list[str]:
    """`model.KEY=saved vs wanted` for each setting that changes the parameters' names or shapes:
    a checkpoint of `saved` loads into a model of `wanted` only when there is none (the others,
    such as dropout or rope_theta, may change between runs)."""
    keys = ["family", "vocab_size", "hidden", "layers", "heads", "ffn_hidden", "qkv_bias", "bias",
            "tie_embeddings", "mtp_heads"]
    if "gpt2" in (saved.family, wanted.family):
        keys.append("max_seq_len")  # rows of the learned position table
    # Defaulted kv_heads / head_dim follow heads / hidden, whose difference is named already.
    derived = {"kv_heads": "num_kv_heads", "head_dim": "dim_per_head"}
    keys += [key for key in derived if getattr(saved, key) is not None
             or getattr(wanted, key) is not None]
    return [f"model.{key}={getattr(saved, derived.get(key, key))} vs "
            f"{getattr(wanted, derived.get(key, key))}" for key in keys
            if getattr(saved, derived.get(key, key)) != getattr(wanted, derived.get(key, key))]


def check_model_layout(config: ModelConfig, tp: int) -> None:
    """Raise a `ConfigError` naming the key when `config` cannot be split over `tp` ranks."""
    if config.heads % tp:
        raise ConfigError("model.heads", f"{config.heads} query heads do not split over "
                                         f"parallel.tp={tp} ranks")
    if config.num_kv_heads % tp:
        raise ConfigError("model.kv_heads", f"{config.num_kv_heads} key/value heads do not split "
                                            f"over parallel.tp={tp} ranks")
    if config.ffn_hidden % tp:
        raise ConfigError("model.ffn_hidden", f"{config.ffn_hidden} does not split over "
                                              f"parallel.tp={tp} ranks")
