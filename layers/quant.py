"""Quantization-aware training of ternary linears (BitNet b1.58), exact under tensor parallelism.

A quantized linear keeps its full-precision (fp32 master) weight as the parameter the optimizer
updates, and in every forward multiplies quantized values instead:

- weights: `s = mean(|W|)` over the *whole* weight, `W_q = s * clamp(round(W / s), -1, 1)`, so every
  value is -s, 0 or +s. Under TP each rank holds a shard of W, so the scale costs one all-reduce of
  two numbers (sum of |W| and element count) per layer; the weights themselves never move.
- activations: each token's input row `x` becomes `x_q = round(x * L / max|x|) * max|x| / L` with
  L = 2**(bits-1) - 1 (127 for 8 bits), clamped to [-L-1, L]. The max runs over the full row: a
  row-parallel layer's input is split along the hidden dim over TP, so its max is all-reduced.
- gradients: the straight-through estimator: the forward uses exactly q(x), the backward is the
  identity, as if the quantizer were not there. Scales are computed on detached tensors, which is
  why their collectives are plain ones (no autograd.Function is needed where no gradient flows).

The scale is rounded to bfloat16 before use, so that `s * {-1, 0, 1}` is exactly representable in
bf16, fp16 and fp32: an exported checkpoint in any of them holds exactly the values training used.

Packing: ternary codes {-1, 0, 1} are stored as 2-bit fields (code + 1), four per byte, first
element in the low bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine import collectives as C
from engine.collectives import Group
from layers.sharding import full_state_dict, gather_full, load_full_state_dict

QUANT_KINDS = ("none", "ternary")
SCALE_EPS = 1e-5  # floor of both scales: an all-zero weight or token row stays zero, not NaN
CODES_PER_BYTE = 4


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Forward: exactly `quantized`. Backward: the identity to `x` (straight-through estimator)."""
    # Not `x + (quantized - x).detach()`, which rounds: `x - x` is exactly 0 for finite x.
    return quantized.detach() + (x - x.detach())


# ---------------------------------------------------------------------------------------- weights

@torch.no_grad()
def absmean_scale(weight_shard: torch.Tensor, group: Group) -> torch.Tensor:
    """`mean(|W|)` of the whole weight whose shard this rank holds, rounded to bf16; a 0-d tensor
    in the weight's dtype. One all-reduce of (sum, count) over `group` (fp64: exact counts)."""
    count = torch.full((), weight_shard.numel(), dtype=torch.float64, device=weight_shard.device)
    stats = torch.stack([weight_shard.abs().sum(dtype=torch.float64), count])
    C.all_reduce(stats, group)
    mean = (stats[0] / stats[1]).clamp(min=SCALE_EPS)
    return mean.to(torch.bfloat16).to(weight_shard.dtype)


@torch.no_grad()
def ternary_codes(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`clamp(round(W / s), -1, 1)` as int8 (integers carry no -0, so `codes * s` is canonical)."""
    return (weight / scale).round().clamp(-1, 1).to(torch.int8)


def ternary_weight(weight_shard: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward: `s * {-1, 0, 1}` with the whole weight's absmean scale. Backward: identity (STE)."""
    scale = absmean_scale(weight_shard, group)
    quantized = ternary_codes(weight_shard, scale).to(weight_shard.dtype) * scale
    return straight_through(weight_shard, quantized)


# ------------------------------------------------------------------------------------ activations

def activation_levels(bits: int) -> int:
    """L = 2**(bits-1) - 1: the largest code of a symmetric signed `bits`-bit integer."""
    return 2 ** (bits - 1) - 1


@torch.no_grad()
def absmax_scale(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Per-token `max |x|` over the last dim `[..., 1]`, of the whole row when the last dim of `x`
    is split over `group` (one all-reduce of one number per token)."""
    scale = x.abs().amax(dim=-1, keepdim=True)
    return C.all_reduce(scale.contiguous(), group, op="max").clamp(min=SCALE_EPS)


@torch.no_grad()
def quantize_activations(x: torch.Tensor, scale: torch.Tensor, *, bits: int) -> torch.Tensor:
    """`x` rounded to the signed `bits`-bit grid of step `scale / L` (returned dequantized)."""
    levels = activation_levels(bits)
    codes = (x * (levels / scale)).round().clamp(-levels - 1, levels)
    return codes * (scale / levels)


def quantized_activations(x: torch.Tensor, *, bits: int, group: Group) -> torch.Tensor:
    """Forward: per-token absmax `bits`-bit fake quantization of `x` (last dim split over
    `group`, or whole when `group` is None). Backward: identity (STE)."""
    return straight_through(x, quantize_activations(x, absmax_scale(x, group), bits=bits))


@dataclass(frozen=True)
class LinearQuant:
    """How a parallel linear layer quantizes its forward: ternary weights and, unless
    `activation_bits` is None, per-token absmax integer activations at its input."""

    activation_bits: int | None = 8

    def weight(self, weight_shard: torch.Tensor, group: Group) -> torch.Tensor:
        """The weight the forward multiplies; `group`: the TP group the weight is split over."""
        return ternary_weight(weight_shard, group)

    def input(self, x: torch.Tensor, group: Group) -> torch.Tensor:
        """The input the forward multiplies; `group`: the group its last dim is split over."""
        if self.activation_bits is None:
            return x
        return quantized_activations(x, bits=self.activation_bits, group=group)


@torch.no_grad()
def quantized_full_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The full state dict (layers/sharding.py) with each quantized linear's weight replaced by the
    values its forward multiplies, `s * {-1, 0, 1}`, and the names so replaced. Call on every rank
    of the TP group (a collective); a model without quantization returns its full state dict."""
    full = full_state_dict(model)
    names = []
    for name, module in _quantized_linears(model):
        shard = module.quant.weight(module.weight, model.layout.tp_group)
        full[f"{name}.weight"] = gather_full(module.weight, layout=model.layout,
                                             vocab_size=model.config.vocab_size, tensor=shard)
        names.append(f"{name}.weight")
    return full, names


def load_quantized_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """The way back from `quantized_full_state_dict`: load `full`, whose quantized linears hold
    `s * {-1, 0, 1}`, so that the model's forward multiplies exactly those values (their master
    weights become `ternary_master`s). ValueError names a weight that is not ternary."""
    full = dict(full)
    for name, _ in _quantized_linears(model):
        try:
            full[f"{name}.weight"] = ternary_master(full[f"{name}.weight"])
        except ValueError as err:
            raise ValueError(f"{name}.weight: {err}") from None
    load_full_state_dict(model, full)


def _quantized_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules()
            if isinstance(getattr(module, "quant", None), LinearQuant)]


@torch.no_grad()
def ternary_master(values: torch.Tensor) -> torch.Tensor:
    """fp32 master weights whose ternary quantization (`ternary_weight`) is exactly `values`,
    the `s * {-1, 0, 1}` of an export, s a bf16 number.

    `values` themselves would not do: their absmean is s times the share of non-zero codes, a
    smaller scale. Dividing the non-zeros by that share gives absmean s to fp32 round-off (far
    inside half a bf16 step, so the bf16-rounded scale is s again) and codes / share, which round
    and clamp back to the same codes. ValueError for values that are not ternary with a bf16 s."""
    codes, scale = split_ternary(values)
    nonzero = int(codes.count_nonzero())
    if not nonzero:
        return torch.zeros(values.shape, dtype=torch.float32)
    if not torch.equal(scale.to(torch.bfloat16).to(scale.dtype), scale):
        raise ValueError(f"scale {scale.item()} is not a bfloat16 number (not a ternary export)")
    magnitude = scale.double() * codes.numel() / nonzero
    return codes.to(torch.float32) * magnitude.to(torch.float32)


# ---------------------------------------------------------------------------------------- packing

def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """int codes in {-1, 0, 1} (any shape) -> uint8 `[ceil(numel / 4)]`, 2 bits per code."""
    flat = (codes.reshape(-1).to(torch.int16) + 1).to(torch.uint8)  # 0, 1, 2
    flat = torch.cat([flat, flat.new_ones(-flat.numel() % CODES_PER_BYTE)])  # pad with zeros
    fields = flat.view(-1, CODES_PER_BYTE)
    packed = fields[:, 0] | fields[:, 1] << 2 | fields[:, 2] << 4 | fields[:, 3] << 6
    return packed.contiguous()


def unpack_ternary(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of `pack_ternary`: int8 codes in {-1, 0, 1} of `shape`. ValueError when
    `packed` is not uint8 `[ceil(numel / 4)]` or holds the field 3, which no ternary value packs to
    (it would unpack to +2: a corrupt file)."""
    numel = 1
    for size in shape:
        numel *= size
    expected = -(-numel // CODES_PER_BYTE)
    if packed.dtype != torch.uint8 or packed.numel() != expected:
        raise ValueError(f"expected {expected} uint8 code bytes for shape {list(shape)}, found "
                         f"{packed.numel()} {str(packed.dtype).removeprefix('torch.')}")
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=packed.device)
    fields = ((packed.reshape(-1, 1) >> shifts) & 3).reshape(-1)[:numel]  # [numel]
    bad = (fields == 3).nonzero()
    if bad.numel():
        raise ValueError(f"code 3 (not a ternary value) at weight {bad[0].item()} of {numel}, "
                         f"{bad.numel()} in all")
    return (fields.to(torch.int8) - 1).reshape(shape)


def split_ternary(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantized weights `s * {-1, 0, 1}` -> (int8 codes, 0-d scale s in `values`' dtype), such
    that `codes * s` gives `values` back bit for bit.

    Raises ValueError when it would not (other values, a -0), so nothing lossy is ever packed."""
    scale = values.abs().amax() if values.numel() else values.new_zeros(())
    if not bool(scale > 0):
        scale = values.new_ones(())
    codes = torch.sign(values).to(torch.int8)
    if not torch.equal(_bits(codes.to(values.dtype) * scale), _bits(values)):
        raise ValueError("tensor is not ternary (values other than -s, +0, +s)")
    return codes, scale


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor as integers (tells -0 from +0, compares NaNs)."""
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])
