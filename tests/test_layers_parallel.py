"""The TP/SP model against its TP=1 reference: a table of layouts, outputs and every gradient.

Rows are (model, tp, sp, world): each runs on spawned gloo ranks in float64 and is compared with
the single-process TP=1 model built from the same seed (so TP-independent init is tested too):
gathered logits of every head, gathered gradients of every parameter, gathered named buffers, and
equality of replicated parameters' gradients across the TP ranks. Tolerance: 1e-10 (float64).
"""

import dataclasses
import functools

import pytest
import torch
import torch.distributed as dist

from engine import collectives as C
from engine.mappings import gather_from_tp
from engine.parallel import ParallelConfig, ParallelLayout, make_layout
from engine.spawn import run_ranks
from layers.config import ModelConfig, RopeScaling
from layers.model import TransformerLM
from layers.rng import REPLICATED, SHARDED
from layers.sharding import full_state_dict, gather_full, load_full_state_dict
from layers.tensor_parallel import ColumnParallelLinear, enter_tp_region
from tests.hf_models import BLOCK_OPTIONS

TOL = dict(rtol=1e-10, atol=1e-10)
SEED = 11
BATCH, SEQ = 2, 8
CONFIGS = {
    # GQA, q/k/v bias, Llama-3 RoPE scaling, a sliding window shorter than the sequence, MTP.
    "llama": ModelConfig(family="llama", vocab_size=150, hidden=32, layers=2, heads=8, kv_heads=4,
                         ffn_hidden=64, max_seq_len=32, qkv_bias=True, sliding_window=6,
                         rope_scaling=RopeScaling(factor=4.0, original_max_position=8),
                         mtp_heads=1),
    # Biases everywhere, learned positions, tied embeddings, MTP.
    "gpt2": ModelConfig(family="gpt2", vocab_size=150, hidden=32, layers=2, heads=4,
                        ffn_hidden=64, max_seq_len=16, bias=True, tie_embeddings=True,
                        mtp_heads=1),
}
# Every block option of the Qwen3 / Gemma 2/3 / Phi-3 / SmolLM3 families at once (QK-norm on head
# shards, soft-capped scores, local and global layers with their own RoPE, partial and no RoPE).
CONFIGS["families"] = dataclasses.replace(CONFIGS["llama"], qkv_bias=False, **BLOCK_OPTIONS)
# Ternary (BitNet b1.58) students: weight scales of the whole weight and per-token activation
# scales of whole rows make TP exact; gradients are the straight-through estimator's.
CONFIGS["llama_ternary"] = dataclasses.replace(CONFIGS["llama"], quant="ternary")
CONFIGS["gpt2_ternary"] = dataclasses.replace(CONFIGS["gpt2"], quant="ternary",
                                              quant_activation_bits=4)
CONFIGS["families_ternary"] = dataclasses.replace(CONFIGS["families"], quant="ternary")
# (model, tp, sp) per world size; tp < world means several TP groups side by side (DP > 1).
ROWS = {
    2: [("llama", 2, False), ("llama", 2, True), ("gpt2", 2, False), ("gpt2", 2, True),
        ("llama_ternary", 2, False), ("llama_ternary", 2, True), ("gpt2_ternary", 2, True),
        ("families", 2, False), ("families", 2, True), ("families_ternary", 2, True)],
    4: [("llama", 4, False), ("llama", 4, True), ("gpt2", 4, False), ("gpt2", 4, True),
        ("llama", 2, True), ("llama_ternary", 4, True), ("families", 4, True)],
}


def _batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 150, (BATCH, SEQ), generator=g)
    head_weights = [torch.randn(BATCH, SEQ, 150, generator=g, dtype=torch.float64) for _ in range(2)]
    return ids, head_weights


def _forward_backward(model: TransformerLM, group) -> dict:
    """One forward/backward; everything gathered to full tensors (CPU)."""
    ids, head_weights = _batch()
    vocab = model.config.vocab_size
    out = model(ids, buffers=model.buffer_names())
    heads = [gather_from_tp(logits, group)[..., :vocab] for logits in [out.logits, *out.mtp_logits]]
    loss = sum((logits * w).sum() for logits, w in zip(heads, head_weights))
    loss.backward()
    layout = model.layout
    return {
        "logits": [h.detach() for h in heads],
        "grads": {name: gather_full(p, layout=layout, vocab_size=vocab, tensor=p.grad)
                  for name, p in model.named_parameters()},
        "buffers": {name: C.all_gather(b.tensor.detach(), group, dim=b.seq_dim) if b.seq_sharded
                    else b.tensor.detach() for name, b in out.buffers.items()},
        "replicated_grads": {name: p.grad.clone() for name, p in model.named_parameters()
                             if p.tp_split_dim is None},
        "params": full_state_dict(model),
    }


def _model(name: str, layout) -> TransformerLM:
    """The row's model in float64 with random biases (the same at every TP). Zero biases at init
    make a ternary model's first position exact integer arithmetic (a one-key softmax returns its
    value row, quantized weights and activations have integer codes), which puts activations exactly
    on the quantizer's rounding ties, where the last-bit differences of another TP split decide."""
    model = TransformerLM(CONFIGS[name], layout, seed=SEED).double()
    full = full_state_dict(model)
    g = torch.Generator().manual_seed(SEED)
    for key in sorted(full):
        if key.endswith("bias"):
            full[key] = 0.1 * torch.randn(full[key].shape, generator=g, dtype=torch.float64)
    load_full_state_dict(model, full)
    return model


@functools.cache
def _reference(name: str) -> dict:
    return _forward_backward(_model(name, ParallelLayout.single()), None)


def _run_rows(rows):
    results = []
    for name, tp, sp in rows:
        layout = make_layout(ParallelConfig(tp=tp, sp=sp))
        results.append(_forward_backward(_model(name, layout), layout.tp_group))
    return results


def _assert_matches_reference(row, result, ref):
    # Exact: every TP degree initializes its shard by slicing the same full tensor.
    torch.testing.assert_close(result["params"], ref["params"], rtol=0, atol=0,
                               msg=lambda m: f"{row}: init depends on TP: {m}")
    for got, want in zip(result["logits"], ref["logits"], strict=True):
        torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{row} logits: {m}")
    assert result["grads"].keys() == ref["grads"].keys()
    for name, grad in result["grads"].items():
        torch.testing.assert_close(grad, ref["grads"][name], **TOL,
                                   msg=lambda m: f"{row} grad of {name}: {m}")
    assert result["buffers"].keys() == ref["buffers"].keys()
    for name, buf in result["buffers"].items():
        torch.testing.assert_close(buf, ref["buffers"][name], **TOL,
                                   msg=lambda m: f"{row} buffer {name}: {m}")


@pytest.mark.parametrize("world", sorted(ROWS))
def test_layouts_match_tp1_reference(world):
    per_rank = run_ranks(_run_rows, world, ROWS[world], timeout_s=300)
    for i, row in enumerate(ROWS[world]):
        ref = _reference(row[0])
        for rank, results in enumerate(per_rank):
            _assert_matches_reference((*row, f"rank {rank}"), results[i], ref)
        tp = row[1]
        for rank, results in enumerate(per_rank):
            # exact: every rank of a TP group holds the result of the same all-reduce
            first = per_rank[rank - rank % tp][i]["replicated_grads"]  # rank 0 of this TP group
            for name, grad in results[i]["replicated_grads"].items():
                torch.testing.assert_close(grad, first[name], rtol=0, atol=0,
                                           msg=lambda m: f"{row} rank {rank} {name}: {m}")


def _tp2_checks():
    rank = dist.get_rank()
    out = {}
    for sp in (False, True):
        layout = make_layout(ParallelConfig(tp=2, sp=sp))
        model = TransformerLM(CONFIGS["gpt2"], layout, seed=SEED)
        ids, _ = _batch()
        with C.count_collectives() as counts:
            model(ids)
        out[f"forward_collectives_sp={sp}"] = dict(counts.calls)
        out[f"bad_seq_sp={sp}"] = _error_of(lambda: model(ids[:, :7]))

    # Dropout streams: replicated masks agree over TP, sharded ones differ; the global RNG is untouched.
    layout = make_layout(ParallelConfig(tp=2, sp=False))
    model = TransformerLM(CONFIGS["llama"], layout, seed=SEED)
    torch.manual_seed(123)
    with model.rng.fork(REPLICATED):
        out["replicated_draw"] = torch.rand(6)
    with model.rng.fork(SHARDED):
        out["sharded_draw"] = torch.rand(6)
    saved = model.rng.state_dict()
    with model.rng.fork(REPLICATED):
        out["replicated_draw_2"] = torch.rand(6)
    model.rng.load_state_dict(saved)
    with model.rng.fork(REPLICATED):
        out["replicated_draw_2_again"] = torch.rand(6)  # a restored state replays the stream
    out["global_after_forks"] = torch.rand(6)
    torch.manual_seed(123)
    out["global_expected"] = torch.rand(6)

    # With dropout on and no SP, the replicated residual stream stays identical on both TP ranks.
    config = dataclasses.replace(CONFIGS["llama"], dropout=0.2)
    model = TransformerLM(config, layout, seed=SEED).train()
    result = model(_batch()[0], buffers=["embedding", "decoder.1.output"])
    out["dropout_buffers"] = {k: b.tensor.detach() for k, b in result.buffers.items()}
    eval_out = model.eval()(_batch()[0], buffers=["embedding"])
    out["eval_embedding"] = eval_out.buffers["embedding"].tensor.detach()

    out["column_gathered"] = _column_parallel_gathered(make_layout(ParallelConfig(tp=2)))

    # Loading a full state dict at TP=2 and reading it back is the identity.
    full = {k: v + 0.5 for k, v in full_state_dict(model).items()}
    load_full_state_dict(model, full)
    out["reloaded_equal"] = all(torch.equal(v, full[k]) for k, v in full_state_dict(model).items())
    out["rank"] = rank
    return out


def _column_weights():
    g = torch.Generator().manual_seed(9)
    shapes = {"weight": (12, 8), "bias": (12,), "x": (3, 4, 8), "upstream": (3, 4, 12)}
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}


def _column_parallel_gathered(layout):
    """ColumnParallelLinear(gather_output=True): output, input grad and full weight grad."""
    t = _column_weights()
    layer = ColumnParallelLinear(8, 12, layout=layout, bias=True, gather_output=True).double()
    with torch.no_grad():
        layer.weight.copy_(C.split_along(t["weight"], layout.tp_group, dim=0))
        layer.bias.copy_(C.split_along(t["bias"], layout.tp_group, dim=0))
    x = t["x"].requires_grad_(True)
    y = layer(enter_tp_region(x, layout))
    y.backward(t["upstream"])
    weight_grad = gather_full(layer.weight, layout=layout, vocab_size=0, tensor=layer.weight.grad)
    return y.detach(), x.grad, weight_grad


def _error_of(fn) -> str:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return ""


def test_tp2_collectives_dropout_column_gather_and_reload():
    r0, r1 = run_ranks(_tp2_checks, 2, timeout_s=300)
    # Without SP the boundaries are all-reduces; under SP all-gathers and reduce-scatters only.
    assert set(r0["forward_collectives_sp=False"]) == {"all_reduce"}
    assert set(r0["forward_collectives_sp=True"]) == {"all_gather", "reduce_scatter"}
    assert r0["bad_seq_sp=True"].startswith("sequence length 7 does not split over parallel.tp=2")
    assert r0["bad_seq_sp=False"] == ""
    torch.testing.assert_close(r0["replicated_draw"], r1["replicated_draw"], rtol=0, atol=0)
    assert not torch.equal(r0["sharded_draw"], r1["sharded_draw"])
    assert not torch.equal(r0["replicated_draw"], r0["replicated_draw_2"])  # the stream advances
    assert torch.equal(r0["replicated_draw_2"], r0["replicated_draw_2_again"])
    torch.testing.assert_close(r0["global_after_forks"], r0["global_expected"], rtol=0, atol=0)
    for name in ("embedding", "decoder.1.output"):
        torch.testing.assert_close(r0["dropout_buffers"][name], r1["dropout_buffers"][name],
                                   rtol=0, atol=0)
    dropped = r0["dropout_buffers"]["embedding"] == 0
    assert dropped.any() and not r0["eval_embedding"].eq(0).any()
    assert r0["reloaded_equal"] and r1["reloaded_equal"]
    t = _column_weights()
    x = t["x"].requires_grad_(True)
    y = torch.nn.functional.linear(x, t["weight"], t["bias"])  # the unsharded layer
    y.backward(t["upstream"])
    weight_grad = t["upstream"].flatten(0, 1).T @ x.detach().flatten(0, 1)
    expected = (y.detach(), x.grad, weight_grad)
    for r in (r0, r1):
        for got, want in zip(r["column_gathered"], expected, strict=True):
            torch.testing.assert_close(got, want, **TOL)
