"""`ModelConfig`: the architecture of one transformer LM (Llama or GPT-2 family), validated.

The family decides the building blocks: `llama` is RMSNorm, rotary positions, grouped-query
attention and a gated MLP; `gpt2` is LayerNorm (with bias), learned absolute positions, multi-head
attention and a GELU (tanh) MLP. Everything else is a field: the options that make the llama block
into Qwen3 (`qk_norm`, `head_dim`), Gemma 2/3 (`norm_unit_offset`, `post_norms`, `scale_embeddings`,
`query_pre_attn_scalar`, soft-caps, `layer_types` with `rope_local_theta`), Phi-3
(`partial_rotary_factor`) or SmolLM3 (`no_rope_layers`) are each written once and used by training,
scoring and decoding alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from engine.checkpoint import ResolvedCheckpoint
from engine.config import ConfigError, check, from_dict
from layers.quant import QUANT_KINDS, LinearQuant

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")  # Hugging Face's names
ROPE_SCALINGS = ("llama3", "linear")


@dataclass(frozen=True)
class RopeScaling:
    """Frequency scaling of RoPE: `llama3` (Llama 3.x) or `linear` (every frequency / factor, Gemma 3's
    global layers), Hugging Face's `rope_type`."""

    type: str = "llama3"  # llama3 | linear
    factor: float = 8.0  # long wavelengths (llama3) or all of them (linear) are divided by this
    low_freq_factor: float = 1.0  # wavelengths above original_max_position / this are fully scaled
    high_freq_factor: float = 4.0  # wavelengths below original_max_position / this are kept
    original_max_position: int = 8192  # context length the model was pretrained with

    def __post_init__(self) -> None:
        check(self.type in ROPE_SCALINGS, "model.rope_scaling.type",
              f"must be one of {', '.join(ROPE_SCALINGS)} (got {self.type!r})")
        check(self.factor >= 1.0, "model.rope_scaling.factor", f"must be >= 1 (got {self.factor})")
        check(0 < self.low_freq_factor < self.high_freq_factor, "model.rope_scaling",
              f"needs 0 < low_freq_factor < high_freq_factor "
              f"(got {self.low_freq_factor}, {self.high_freq_factor})")
        check(self.original_max_position > 0, "model.rope_scaling.original_max_position",
              f"must be > 0 (got {self.original_max_position})")


ROUTERS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class MoEConfig:
    """A mixture-of-experts MLP (layers/moe.py): dropless top-k routing over `experts` gated MLPs."""

    experts: int = 8  # routed experts per MoE block
    top_k: int = 2  # experts each token is sent to
    expert_ffn_hidden: int = 256  # inner width of each routed expert
    shared_experts: int = 0  # experts every token goes through, as one MLP of their summed width
    shared_expert_ffn_hidden: int | None = None  # inner width of one shared expert; None: expert_ffn_hidden
    shared_expert_gate: bool = False  # the shared experts' output times sigmoid(x . w) (Qwen2-MoE)
    router: str = "softmax"  # softmax | sigmoid: how router logits become expert scores
    norm_topk_prob: bool = True  # renormalize the chosen experts' scores to sum to one (Mixtral, Qwen3-MoE)
    aux_loss_coef: float = 0.0  # weight of the load-balancing loss E * sum_e f_e * P_e (Switch, per block)
    z_loss_coef: float = 0.0  # weight of the router z-loss, mean logsumexp(logits)^2 (ST-MoE)

    def __post_init__(self) -> None:
        for key in ("experts", "top_k", "expert_ffn_hidden"):
            value = getattr(self, key)
            check(isinstance(value, int) and value > 0, f"model.moe.{key}",
                  f"must be a positive integer (got {value!r})")
        check(self.top_k <= self.experts, "model.moe.top_k",
              f"must be <= model.moe.experts={self.experts} (got {self.top_k})")
        check(self.shared_experts >= 0, "model.moe.shared_experts",
              f"must be >= 0 (got {self.shared_experts})")
        width = self.shared_expert_ffn_hidden
        check(width is None or width > 0, "model.moe.shared_expert_ffn_hidden", f"must be > 0 (got {width})")
        check(not self.shared_expert_gate or self.shared_experts > 0, "model.moe.shared_expert_gate",
              "needs model.moe.shared_experts > 0")
        check(self.router in ROUTERS, "model.moe.router",
              f"must be one of {', '.join(ROUTERS)} (got {self.router!r})")
        for key in ("aux_loss_coef", "z_loss_coef"):
            check(getattr(self, key) >= 0, f"model.moe.{key}", f"must be >= 0 (got {getattr(self, key)})")

    @property
    def shared_ffn_hidden(self) -> int:
        """Inner width of the MLP that stands for all shared experts (0: none)."""
        return self.shared_experts * (self.shared_expert_ffn_hidden or self.expert_ffn_hidden)


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
    rope_scaling: RopeScaling | None = None  # RoPE frequency scaling (global layers); None: plain RoPE
    rope_local_theta: float | None = None  # RoPE base of sliding-window layers (Gemma 3); None: rope_theta
    partial_rotary_factor: float = 1.0  # RoPE on this leading fraction of each head's width (Phi-3/4)
    no_rope_layers: tuple[int, ...] = ()  # indices of blocks without RoPE (SmolLM3: every fourth)
    qkv_bias: bool = False  # bias on the q/k/v projections only (Qwen2)
    bias: bool = False  # bias on every linear layer, q/k/v included (GPT-2)
    activation: str | None = None  # silu|gelu|gelu_tanh; None: silu (llama), gelu_tanh (gpt2)
    sliding_window: int | None = None  # attend to at most this many past tokens (Mistral); None: all
    # per block: full_attention or sliding_attention (Gemma 2/3: local and global layers); None:
    # every block slides when sliding_window is set (Mistral, Phi-3), none otherwise
    layer_types: tuple[str, ...] | None = None
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3, Gemma 3)
    norm_unit_offset: bool = False  # RMSNorm scales by (1 + weight), weights stored as offsets (Gemma)
    post_norms: bool = False  # RMSNorm on the attention and MLP outputs before the residual add (Gemma)
    scale_embeddings: bool = False  # embeddings times sqrt(hidden), rounded to fp32 then their dtype (Gemma)
    query_pre_attn_scalar: float | None = None  # attention scores scaled by this^-1/2 (Gemma); None: head_dim
    attn_logit_softcap: float | None = None  # attention scores become c * tanh(s / c) (Gemma 2); None: off
    tie_embeddings: bool = False  # the output layer reuses the input embedding's weight
    final_logit_softcap: float | None = None  # logits become c * tanh(logits / c) (Gemma 2); None: off
    mtp_heads: int = 0  # extra multi-token-prediction heads; head j predicts token t+1+j
    moe: MoEConfig | None = None  # mixture-of-experts MLPs (layers/moe.py); None: dense
    moe_layers: tuple[int, ...] | None = None  # blocks whose MLP is the MoE; None: every block
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
        self._check_block_options()
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

    def _check_block_options(self) -> None:
        types = self.layer_types
        check(types is None or len(types) == self.layers, "model.layer_types",
              f"needs one entry per block ({self.layers}, got {0 if types is None else len(types)})")
        bad = [t for t in types or () if t not in LAYER_TYPES]
        check(not bad, "model.layer_types", f"entries must be {' or '.join(LAYER_TYPES)} (got {bad[:1]})")
        check("sliding_attention" not in (types or ()) or self.sliding_window is not None,
              "model.layer_types", "sliding_attention blocks need model.sliding_window")
        cap = self.final_logit_softcap
        check(cap is None or 0 < cap < math.inf, "model.final_logit_softcap",
              f"must be > 0 and finite, or null (got {cap!r})")
        for key in ("rope_local_theta", "query_pre_attn_scalar", "attn_logit_softcap"):
            value = getattr(self, key)
            check(value is None or value > 0, f"model.{key}", f"must be > 0 (got {value})")
        check(0.0 < self.partial_rotary_factor <= 1.0, "model.partial_rotary_factor",
              f"must be in (0, 1] (got {self.partial_rotary_factor})")
        check(self.family == "gpt2" or self.rotary_dim % 2 == 0, "model.partial_rotary_factor",
              f"the rotary width head_dim x factor must be even (got {self.rotary_dim})")
        bad = [i for i in self.no_rope_layers if not 0 <= i < self.layers]
        check(not bad, "model.no_rope_layers", f"must be block indices below {self.layers} (got {bad[:1]})")
        bad = [i for i in self.moe_layers or () if not 0 <= i < self.layers]
        check(not bad, "model.moe_layers", f"must be block indices below {self.layers} (got {bad[:1]})")
        check(self.moe_layers is None or self.moe is not None, "model.moe_layers", "needs model.moe")
        check(self.moe is None or self.quant == "none", "model.moe",
              "ternary experts are not supported (model.quant must be none)")
        llama_only = ("qk_norm", "norm_unit_offset", "rope_local_theta", "no_rope_layers")
        used = [key for key in llama_only if getattr(self, key)]
        check(self.family == "llama" or not used, f"model.{used[0] if used else ''}",
              "is an option of the llama family only")

    def is_moe_layer(self, layer: int | None) -> bool:
        """Whether block `layer`'s MLP is the mixture of experts (MTP heads, `None`, are dense)."""
        if self.moe is None or layer is None:
            return False
        return self.moe_layers is None or layer in self.moe_layers

    def layer_type(self, layer: int | None) -> str:
        """`layer`'s attention type; MTP heads (`None`) attend globally."""
        if layer is None:
            return "full_attention"
        if self.layer_types is None:
            return "full_attention" if self.sliding_window is None else "sliding_attention"
        return self.layer_types[layer]

    def layer_window(self, layer: int | None) -> int | None:
        """The sliding window of block `layer` (None: it attends to every earlier token)."""
        return self.sliding_window if self.layer_type(layer) == "sliding_attention" else None

    def rope_kind(self, layer: int | None) -> str | None:
        """Which rotary table block `layer` uses: `global`, `local` (its own base), or None (no RoPE)."""
        if self.family != "llama" or layer in self.no_rope_layers:
            return None
        local = self.rope_local_theta is not None and self.layer_type(layer) == "sliding_attention"
        return "local" if local else "global"

    @property
    def rotary_dim(self) -> int:
        """The leading width of each head that RoPE rotates."""
        return int(self.dim_per_head * self.partial_rotary_factor)

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
            "tie_embeddings", "mtp_heads", "qk_norm", "post_norms", "moe", "moe_layers"]
    if "gpt2" in (saved.family, wanted.family):
        keys.append("max_seq_len")  # rows of the learned position table
    moe: list[str] = []
    if saved.moe is not None and wanted.moe is not None:  # the coefficients may change between runs
        keys.remove("moe")
        moe = [f"model.moe.{key}={getattr(saved.moe, key)} vs {getattr(wanted.moe, key)}"
               for key in ("experts", "expert_ffn_hidden", "shared_ffn_hidden", "shared_expert_gate")
               if getattr(saved.moe, key) != getattr(wanted.moe, key)]
    # Defaulted kv_heads / head_dim follow heads / hidden, whose difference is named already.
    derived = {"kv_heads": "num_kv_heads", "head_dim": "dim_per_head"}
    keys += [key for key in derived if getattr(saved, key) is not None
             or getattr(wanted, key) is not None]
    return moe + [f"model.{key}={getattr(saved, derived.get(key, key))} vs "
                  f"{getattr(wanted, derived.get(key, key))}" for key in keys
                  if getattr(saved, derived.get(key, key)) != getattr(wanted, derived.get(key, key))]


def check_model_layout(config: ModelConfig, tp: int, ep: int = 1, etp: int = 1) -> None:
    """Raise a `ConfigError` naming the key when `config` cannot be split over `tp` ranks (and its
    experts over `ep`, each expert over `etp`)."""
    if config.moe is not None and config.moe.experts % ep:
        raise ConfigError("model.moe.experts", f"{config.moe.experts} experts do not split over "
                                               f"parallel.ep={ep} ranks")
    if config.moe is not None and config.moe.expert_ffn_hidden % etp:
        raise ConfigError("model.moe.expert_ffn_hidden",
                          f"{config.moe.expert_ffn_hidden} does not split over parallel.etp={etp} "
                          "ranks")
    if config.moe is not None and config.moe.shared_ffn_hidden % tp:
        raise ConfigError("model.moe.shared_expert_ffn_hidden",
                          f"the shared experts' width {config.moe.shared_ffn_hidden} does not split "
                          f"over parallel.tp={tp} ranks")
    if config.heads % tp:
        raise ConfigError("model.heads", f"{config.heads} query heads do not split over "
                                         f"parallel.tp={tp} ranks")
    if config.num_kv_heads % tp:
        raise ConfigError("model.kv_heads", f"{config.num_kv_heads} key/value heads do not split "
                                            f"over parallel.tp={tp} ranks")
    if config.ffn_hidden % tp:
        raise ConfigError("model.ffn_hidden", f"{config.ffn_hidden} does not split over "
                                              f"parallel.tp={tp} ranks")
