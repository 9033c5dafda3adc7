"""layers/decode.py: cached decoding equals the full forward (float64, 1e-10), every step.

Each row of the table decodes a left-padded batch (rows of different prompt lengths) through the KV
cache: a prefill of the prompts, then one given token at a time; the logits of every real column
must equal those of the TP=1 full forward of that row's tokens alone. Llama with GQA, q/k/v bias,
Llama-3 RoPE scaling and a sliding window shorter than the sequence; GPT-2 with learned positions,
biases and tied embeddings. TP=2 models built with SP decode without it, from the same weights;
PP=2 models (and interleaved ones) decode stage by stage. A model with a final-logit soft-cap
decodes, samples and scores from its capped logits, at TP 1 and 2.
"""

import dataclasses

import pytest
import torch

from distill.evaluate import output_loss
from engine.mappings import gather_from_tp
from engine.parallel import ParallelConfig, ParallelLayout, make_layout
from engine.spawn import run_ranks
from layers.config import ModelConfig, RopeScaling
from layers.decode import KVCache, Sampling, choose_tokens, decoding, forward_step, generate, left_pad
from layers.model import TransformerLM
from tests.helpers import FP32_ATOL, FP32_RTOL
from tools.score import token_log_probs

TOL = dict(rtol=1e-10, atol=1e-10)
SEED = 3
CONFIGS = {
    "llama": ModelConfig(family="llama", vocab_size=90, hidden=32, layers=2, heads=4, kv_heads=2,
                         ffn_hidden=64, max_seq_len=32, qkv_bias=True, sliding_window=4,
                         rope_scaling=RopeScaling(factor=4.0, original_max_position=8),
                         init_std=0.2),
    "gpt2": ModelConfig(family="gpt2", vocab_size=90, hidden=32, layers=2, heads=4, ffn_hidden=64,
                        max_seq_len=16, bias=True, tie_embeddings=True, init_std=0.2),
}
LENGTHS = [5, 2, 4]  # prompt length per row
TOTAL = 9  # prompt + continuation columns of the longest row


def _tokens() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 90, (TOTAL - (max(LENGTHS) - n),), generator=g) for n in LENGTHS]


def _config(name: str, layers: int | None) -> ModelConfig:
    cfg = CONFIGS[name]
    return cfg if layers is None else dataclasses.replace(cfg, layers=layers)


def _cached_logits(name: str, tp: int, sp: bool, pp: int = 1, chunks: int = 1,
                   layers: int | None = None) -> list[torch.Tensor] | None:
    """Per row, the full-vocabulary logits of its real columns, decoded through the cache (None
    on a pipeline stage before the last)."""
    layout = make_layout(ParallelConfig(tp=tp, sp=sp, pp=pp, virtual_stages=chunks))
    model = TransformerLM(_config(name, layers), layout, seed=SEED).double().train()
    rows = _tokens()
    width = max(LENGTHS)
    prompts, lengths = left_pad([r[:n] for r, n in zip(rows, LENGTHS)], pad_id=7)
    with decoding(model):
        cache = KVCache(model, batch=len(rows), capacity=TOTAL, pad=width - lengths,
                        dtype=torch.float64)
        steps = [forward_step(model, prompts, cache)]
        for column in range(width, TOTAL):
            step_ids = torch.stack([r[column - (width - n)] for r, n in zip(rows, LENGTHS)])
            steps.append(forward_step(model, step_ids[:, None], cache))
    assert model.training and model.layout.sp == sp  # restored
    if not layout.is_last_stage:
        assert all(step is None for step in steps)
        return None
    logits = gather_from_tp(torch.cat(steps, dim=1), layout.tp_group)[..., :90]
    return [logits[b, width - n:] for b, n in enumerate(LENGTHS)]


def _reference(name: str, layers: int | None = None) -> list[torch.Tensor]:
    model = TransformerLM(_config(name, layers), ParallelLayout.single(), seed=SEED).double().eval()
    with torch.no_grad():
        return [model(r[None]).logits[0, :, :90] for r in _tokens()]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decoding_equals_full_forward_tp1(name):
    for got, expected in zip(_cached_logits(name, 1, False), _reference(name)):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, **TOL)


def _both_families(tp: int, sp: bool, **pipeline) -> dict:
    return {name: _cached_logits(name, tp, sp, **pipeline) for name in CONFIGS}


def _generate_both(tp: int, sp: bool, pp: int = 1, chunks: int = 1,
                   layers: int | None = None) -> dict:
    """Greedy and sampled continuations of both families at this layout."""
    out = {}
    for name in CONFIGS:
        layout = make_layout(ParallelConfig(tp=tp, sp=sp, pp=pp, virtual_stages=chunks))
        model = TransformerLM(_config(name, layers), layout, seed=SEED).double()
        prompts, lengths = left_pad([r[:n] for r, n in zip(_tokens(), LENGTHS)])
        for mode, sampling in (("greedy", Sampling(greedy=True)),
                               ("sample", Sampling(temperature=0.8, top_k=20, top_p=0.9))):
            g = torch.Generator().manual_seed(5)
            out[name, mode] = generate(model, prompts, prompt_lengths=lengths, max_new_tokens=6,
                                       sampling=sampling, generator=g).tokens
    return out


@pytest.mark.parametrize("sp", [False, True])
def test_cached_decoding_tp2_equals_tp1_full_forward(sp):
    expected = {name: _reference(name) for name in CONFIGS}
    for rank, results in enumerate(run_ranks(_both_families, 2, 2, sp, timeout_s=120)):
        for name, rows in results.items():
            for got, want in zip(rows, expected[name]):
                torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"rank {rank} {name}: {m}")


def test_generation_tp2_equals_tp1():
    expected = _generate_both(1, False)
    for results in run_ranks(_generate_both, 2, 2, True, timeout_s=120):
        for key, tokens in results.items():
            assert torch.equal(tokens, expected[key]), key


def _pipeline_case(chunks: int) -> tuple[dict, dict]:
    pipeline = dict(pp=2, chunks=chunks, layers=4)
    return _both_families(1, False, **pipeline), _generate_both(1, False, **pipeline)


@pytest.mark.parametrize("chunks", [1, 2])
def test_pipeline_decoding_equals_the_whole_model(chunks):
    """A 4-layer model over PP=2 (chunks=2: interleaved, blocks 0 and 2 on rank 0): the last
    stage's cached logits equal the whole model's full forward in float64, and every stage gets
    the tokens a single process generates (greedy and sampled: only the last stage draws, then
    broadcasts)."""
    expected = {name: _reference(name, layers=4) for name in CONFIGS}
    tokens = _generate_both(1, False, layers=4)
    for rank, (logits, generated) in enumerate(run_ranks(_pipeline_case, 2, chunks,
                                                         timeout_s=120)):
        for name, rows in logits.items():
            if rank == 0:
                assert rows is None
                continue
            for got, want in zip(rows, expected[name]):
                torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{name}: {m}")
        for key, got in generated.items():
            assert torch.equal(got, tokens[key]), (rank, key)


def test_generate_equals_argmax_of_full_forward_and_stops_at_eos():
    cfg = CONFIGS["llama"]
    model = TransformerLM(cfg, ParallelLayout.single(), seed=SEED).double().eval()
    prompt = _tokens()[0][:4][None]
    out = generate(model, prompt, max_new_tokens=5)
    ids = prompt
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, model(ids).logits[:, -1, :90].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.tokens, ids[:, 4:]) and out.lengths.tolist() == [5]
    eos = int(out.tokens[0, 2])
    first = int((out.tokens[0] == eos).nonzero()[0])
    stopped = generate(model, prompt, max_new_tokens=5, eos_id=eos, fill_id=0)
    assert stopped.lengths.tolist() == [first + 1]
    assert torch.equal(stopped.tokens[0, :first + 1], out.tokens[0, :first + 1])
    assert (stopped.tokens[0, first + 1:] == 0).all()


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    top2 = choose_tokens(logits, Sampling(top_k=2), g)
    assert set(top2.tolist()) == {0, 1}
    # softmax mass: 0.636, 0.234, 0.086, ...: the nucleus of 0.8 is {0, 1}, of 0.6 is {0}
    assert set(choose_tokens(logits, Sampling(top_p=0.8), g).tolist()) == {0, 1}
    assert set(choose_tokens(logits, Sampling(top_p=0.6), g).tolist()) == {0}
    freq = (choose_tokens(logits, Sampling(temperature=1.0), g) == 0).float().mean()
    assert abs(freq - logits[0].softmax(0)[0]) < 0.03
    assert torch.equal(choose_tokens(logits[:2], Sampling(greedy=True), None), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model = TransformerLM(CONFIGS["gpt2"], ParallelLayout.single())
        generate(model, torch.zeros(1, 10, dtype=torch.int64), max_new_tokens=7)


# ---- final-logit soft-capping: every use of the model's logits sees the capped ones -------------

CAP = 2.0  # the uncapped logits here reach about 3.9: the cap bends the largest


def _with_cap(cap: float | None) -> ModelConfig:
    return dataclasses.replace(CONFIGS["llama"], final_logit_softcap=cap)


def _softcap_case(tp: int) -> dict:
    """At TP=`tp`: the full logits of a capped model and of the same weights uncapped, the
    capped model's cached decoding, sampled continuation, scores and fused / unfused validation
    losses."""
    layout = make_layout(ParallelConfig(tp=tp))
    plain, capped = (TransformerLM(_with_cap(cap), layout, seed=SEED).double().eval()
                     for cap in (None, CAP))
    ids = _tokens()[0][None]  # [1, 9]
    out = {}
    with torch.no_grad():
        for name, model in (("plain", plain), ("capped", capped)):
            out[name] = gather_from_tp(model(ids).logits, layout.tp_group)
        with decoding(capped):
            cache = KVCache(capped, batch=1, capacity=ids.shape[1], pad=torch.zeros(1, dtype=torch.long),
                            dtype=torch.float64)
            steps = [forward_step(capped, ids[:, :4], cache)]
            steps += [forward_step(capped, ids[:, i:i + 1], cache) for i in range(4, ids.shape[1])]
        out["cached"] = gather_from_tp(torch.cat(steps, dim=1), layout.tp_group)
        out["scores"] = token_log_probs(capped, ids)
        labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
        out["loss"] = {fused: output_loss(capped, capped(ids, compute_logits=not fused), labels,
                                          fused=fused) for fused in (False, True)}
    out["sampled"] = generate(capped, ids[:, :4], max_new_tokens=5, sampling=Sampling(),
                              generator=torch.Generator().manual_seed(5)).tokens
    return out


def _check_softcap(out: dict) -> None:
    uncapped, capped = out["plain"][..., :90], out["capped"][..., :90]
    torch.testing.assert_close(capped, CAP * torch.tanh(uncapped / CAP), **TOL)
    assert not torch.allclose(capped, uncapped, **TOL)  # the cap bites
    assert (out["capped"][..., 90:] == torch.finfo(torch.float64).min).all()  # padding: no mass
    torch.testing.assert_close(out["cached"][..., :90], capped, **TOL)
    ids = _tokens()[0][None]
    want = torch.log_softmax(capped[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(out["scores"].double(), want, rtol=FP32_RTOL, atol=FP32_ATOL)
    torch.testing.assert_close(out["loss"][False][:, :-1], -want, **TOL)
    torch.testing.assert_close(out["loss"][True], out["loss"][False], **TOL)


def test_softcapped_logits_scores_and_sampling_tp1():
    """A capped model's logits are c * tanh(uncapped / c); cached decoding, scoring (tools/score.py
    and the validation loss, fused or not) and sampling all use them. Sampling draws from the
    capped softmax: the same generator over the full forward's capped logits picks the same
    tokens (greedy picks cannot tell, tanh keeps the order)."""
    out = _softcap_case(1)
    _check_softcap(out)
    model = TransformerLM(_with_cap(CAP), ParallelLayout.single(), seed=SEED).double().eval()
    ids, g = _tokens()[0][None][:, :4], torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _ in range(5):
            logits = model(ids).logits[:, -1, :90]
            ids = torch.cat([ids, choose_tokens(logits, Sampling(), g)[:, None]], dim=1)
    assert torch.equal(out["sampled"], ids[:, 4:])
    plain = TransformerLM(_with_cap(None), ParallelLayout.single(), seed=SEED).double().eval()
    uncapped = generate(plain, ids[:, :4], max_new_tokens=5, sampling=Sampling(),
                        generator=torch.Generator().manual_seed(5)).tokens
    assert not torch.equal(uncapped, out["sampled"])  # the draws see the cap


def test_softcapped_logits_tp2():
    expected = _softcap_case(1)
    for out in run_ranks(_softcap_case, 2, 2, timeout_s=120):
        _check_softcap(out)
        torch.testing.assert_close(out["capped"], expected["capped"], **TOL)
        assert torch.equal(out["sampled"], expected["sampled"])
