"""Ternary (BitNet b1.58) quantization: the quantizers, the quantized linear layers and their TP cost.

Reference values are written out from the definitions (absmean ternary weights, per-token absmax
integer activations, straight-through gradients). TP equivalence of whole ternary models, outputs
and gradients against the float64 TP=1 model, is a row of tests/test_layers_parallel.py.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from engine import collectives as C
from engine.config import ConfigError, from_dict
from engine.parallel import ParallelConfig, ParallelLayout, make_layout
from engine.spawn import run_ranks
from layers.config import ModelConfig
from layers.model import TransformerLM
from layers.quant import (
    LinearQuant,
    absmax_scale,
    absmean_scale,
    pack_ternary,
    quantize_activations,
    quantized_activations,
    split_ternary,
    ternary_codes,
    ternary_weight,
    unpack_ternary,
)
from layers.tensor_parallel import ColumnParallelLinear, RowParallelLinear, enter_tp_region

QUANT_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_ternary_weights_are_minus_s_zero_plus_s_with_the_absmean_scale():
    w = _randn(48, 40)
    scale = absmean_scale(w, None)
    assert scale.dtype == torch.float32 and scale.dim() == 0
    assert scale.item() == w.abs().mean().to(torch.bfloat16).item()  # bf16-rounded absmean
    q = ternary_weight(w, None)
    values = set(q.unique().tolist())
    assert values == {-scale.item(), 0.0, scale.item()}
    expected = (w / scale).round().clamp(-1, 1) * scale
    assert torch.equal(q, expected)
    assert torch.equal(q.to(torch.bfloat16).float(), q)  # exact in bf16 (and so in fp16, fp32)
    assert torch.equal(ternary_codes(w, scale).to(torch.float32) * scale, q)


def test_all_zero_weight_and_token_row_quantize_to_zero():
    assert torch.equal(ternary_weight(torch.zeros(4, 4), None), torch.zeros(4, 4))
    x = torch.zeros(2, 3, 8)
    assert torch.equal(quantized_activations(x, bits=8, group=None), x)


def test_straight_through_gradients_are_the_identity():
    w = _randn(12, 8, seed=1).requires_grad_(True)
    x = _randn(3, 5, 8, seed=2).requires_grad_(True)
    upstream_w, upstream_x = _randn(12, 8, seed=3), _randn(3, 5, 8, seed=4)
    ternary_weight(w, None).backward(upstream_w)
    quantized_activations(x, bits=8, group=None).backward(upstream_x)
    assert torch.equal(w.grad, upstream_w) and torch.equal(x.grad, upstream_x)


def test_quantized_linear_forward_and_gradients_from_the_definition():
    layout = ParallelLayout.single()
    layer = ColumnParallelLinear(8, 12, layout=layout, bias=True, quant=LinearQuant(8)).double()
    with torch.no_grad():
        layer.weight.copy_(_randn(12, 8, seed=5, dtype=torch.float64))
        layer.bias.copy_(_randn(12, seed=6, dtype=torch.float64))
    x = _randn(3, 5, 8, seed=7, dtype=torch.float64).requires_grad_(True)
    upstream = _randn(3, 5, 12, seed=8, dtype=torch.float64)
    y = layer(x)
    y.backward(upstream)
    # The definition: y = q8(x) q3(W)^T + b; STE: dL/dW = g^T q8(x), dL/dx = g q3(W).
    gamma = x.detach().abs().amax(-1, keepdim=True)
    x_q = (x.detach() * 127 / gamma).round().clamp(-128, 127) * gamma / 127
    w = layer.weight.detach()
    s = w.abs().mean().to(torch.bfloat16).double()
    w_q = (w / s).round().clamp(-1, 1) * s
    tol = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y.detach(), F.linear(x_q, w_q, layer.bias.detach()), **tol)
    torch.testing.assert_close(layer.weight.grad, upstream.flatten(0, 1).T @ x_q.flatten(0, 1),
                               **tol)
    torch.testing.assert_close(x.grad, upstream @ w_q, **tol)


@pytest.mark.parametrize("bits", [8, 4])
def test_activations_round_trip_within_half_a_step_of_their_scale(bits):
    x = _randn(4, 16, 64, seed=9) * torch.logspace(-3, 2, 64)  # rows of very different ranges
    scale = absmax_scale(x, None)  # [4, 16, 1]
    levels = 2 ** (bits - 1) - 1
    x_q = quantize_activations(x, scale, bits=bits)
    step = scale / levels
    assert ((x_q - x).abs() <= step / 2 * (1 + 1e-6)).all()
    codes = x_q / step
    assert torch.allclose(codes, codes.round(), atol=1e-4)  # on the integer grid
    assert codes.round().min() >= -levels - 1 and codes.round().max() <= levels
    torch.testing.assert_close(x_q.abs().amax(-1, keepdim=True), scale)  # the max is kept


def test_pack_unpack_round_trip_and_size():
    codes = torch.randint(-1, 2, (7, 13), generator=torch.Generator().manual_seed(3),
                          dtype=torch.int8)
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-codes.numel() // 4)
    assert torch.equal(unpack_ternary(packed, codes.shape), codes)


def test_split_ternary_is_bit_exact_and_refuses_anything_else():
    w = _randn(10, 6, seed=4)
    q = ternary_weight(w, None).detach()
    codes, scale = split_ternary(q.to(torch.bfloat16))
    assert torch.equal((codes.to(torch.bfloat16) * scale).view(torch.int16),
                       q.to(torch.bfloat16).view(torch.int16))
    with pytest.raises(ValueError, match="not ternary"):
        split_ternary(w)
    with pytest.raises(ValueError, match="not ternary"):
        split_ternary(torch.tensor([0.5, -0.0, -0.5]))  # -0 would come back as +0


@pytest.mark.parametrize("key,value,message", [
    ("quant", "binary", "must be one of 'none', 'ternary'"),
    ("quant_activation_bits", 1, "between 2 and 16"),
    ("quant_activation_bits", 32, "between 2 and 16"),
])
def test_bad_quant_config_names_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message) as err:
        from_dict(ModelConfig, {key: value}, prefix="model")
    assert err.value.key == f"model.{key}"


def test_only_decoder_linears_are_quantized():
    cfg = ModelConfig(quant="ternary", mtp_heads=1)
    model = TransformerLM(cfg, ParallelLayout.single())
    quantized = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                 if getattr(module, "quant", None) is not None}
    assert quantized == set(QUANT_LINEARS)
    plain = TransformerLM(dataclasses.replace(cfg, quant="none"), ParallelLayout.single())
    assert all(getattr(m, "quant", None) is None for m in plain.modules())


# ------------------------------------------------------------------------------ TP cost and layers

def _row_and_column_layers(layout):
    """A ternary column -> row pair at `layout` (weights sliced from one seeded full weight), its
    gathered output and input gradient, and the collectives of one forward."""
    quant = LinearQuant(8)
    column = ColumnParallelLinear(16, 24, layout=layout, quant=quant).double()
    row = RowParallelLinear(24, 16, layout=layout, quant=quant).double()
    with torch.no_grad():
        column.weight.copy_(C.split_along(_randn(24, 16, seed=1, dtype=torch.float64),
                                          layout.tp_group, dim=0))
        row.weight.copy_(C.split_along(_randn(16, 24, seed=2, dtype=torch.float64),
                                       layout.tp_group, dim=1))
    x = _randn(2, 6, 16, seed=3, dtype=torch.float64).requires_grad_(True)
    with C.count_collectives() as counts:
        y = row(F.gelu(column(enter_tp_region(x, layout))))
    y.backward(_randn(2, 6, 16, seed=4, dtype=torch.float64))
    return y.detach(), x.grad, dict(counts.calls), dict(counts.bytes)


def test_tp2_quantized_pair_equals_tp1_with_one_small_all_reduce_per_scale():
    single = _row_and_column_layers(ParallelLayout.single())
    r0, r1 = run_ranks(_tp2_pair, 2, timeout_s=120)
    for got in (r0, r1):
        torch.testing.assert_close(got[0], single[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[1], single[1], rtol=1e-12, atol=1e-12)
    calls, nbytes = r0[2], r0[3]
    # copy_to_tp is free forward; the row layer's output all-reduce is TP's own. Quantization
    # adds two weight scales (2 fp64 each) and the row layer's per-token max (12 tokens): no
    # weight is ever gathered.
    assert calls == {"all_reduce": 4}
    assert nbytes == {"all_reduce": 2 * 16 + 12 * 8 + 2 * 6 * 16 * 8}  # scales, maxima, output


def _tp2_pair():
    return _row_and_column_layers(make_layout(ParallelConfig(tp=2)))


def test_ternary_model_differs_from_full_precision_and_trains_its_master_weights():
    cfg = ModelConfig(vocab_size=64, hidden=32, heads=4, ffn_hidden=64, max_seq_len=16)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = TransformerLM(cfg, ParallelLayout.single(), seed=3)
    ternary = TransformerLM(dataclasses.replace(cfg, quant="ternary"), ParallelLayout.single(),
                            seed=3)
    out = ternary(ids).logits
    assert not torch.allclose(out, plain(ids).logits, atol=1e-3)
    out.sum().backward()
    weight = ternary.decoder["0"].mlp.up_proj.weight
    assert weight.dtype == torch.float32 and len(weight.unique()) > 3  # latent weights stay fp32
    assert weight.grad is not None and weight.grad.abs().sum() > 0
