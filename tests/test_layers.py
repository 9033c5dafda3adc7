"""Single-process behaviour of the model: config checks, vocabulary padding, the head contract,
named buffers, multi-token prediction and initialization."""

import dataclasses

import pytest
import torch

from engine.config import ConfigError, from_dict
from engine.data import shift_labels
from engine.parallel import ParallelLayout
from layers.config import ModelConfig, check_model_layout
from layers.model import TransformerLM

CFG = ModelConfig(family="llama", vocab_size=100, hidden=32, layers=2, heads=4, kv_heads=2,
                  ffn_hidden=64, max_seq_len=32, mtp_heads=2)


def _model(config=CFG, seed=0) -> TransformerLM:
    return TransformerLM(config, ParallelLayout.single(), seed=seed)


def _ids(batch=2, seq=10, seed=0):
    return torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_layout_checks_name_model_and_parallel_keys():
    with pytest.raises(ConfigError, match=r"^model.heads: 4 query heads do not split over "
                                          r"parallel.tp=8"):
        check_model_layout(CFG, 8)
    with pytest.raises(ConfigError, match=r"^model.kv_heads: 2 key/value heads .* parallel.tp=4"):
        check_model_layout(CFG, 4)
    check_model_layout(CFG, 2)
    with pytest.raises(ConfigError, match="model.kv_heads"):
        TransformerLM(CFG, dataclasses.replace(ParallelLayout.single(), tp=4))
    with pytest.raises(ConfigError, match=r"^model.kv_heads: must divide model.heads=4"):
        from_dict(ModelConfig, {"heads": 4, "kv_heads": 3}, prefix="model")
    with pytest.raises(ConfigError, match=r"^model.family: must be one of"):
        from_dict(ModelConfig, {"family": "bert"}, prefix="model")
    with pytest.raises(ConfigError, match=r"^model.rope_scaling.factor: must be >= 1"):
        from_dict(ModelConfig, {"rope_scaling": {"factor": 0.5}}, prefix="model")


def test_padded_vocabulary_takes_no_probability_mass():
    assert [CFG.padded_vocab(tp) for tp in (1, 2, 4)] == [128, 128, 256]
    assert dataclasses.replace(CFG, vocab_pad_multiple=4).padded_vocab(4) == 112
    model = _model()
    logits = model(_ids()).logits
    assert logits.shape == (2, 10, 128)
    probs = logits.softmax(-1)
    assert probs[..., 100:].max() == 0 and torch.isfinite(logits).all()
    torch.testing.assert_close(probs[..., :100].sum(-1), torch.ones(2, 10))


def test_head_hidden_times_output_weight_is_the_logits():
    for tied in (False, True):
        model = _model(dataclasses.replace(CFG, tie_embeddings=tied))
        assert (model.output_weight is model.embedding.weight) == tied
        out = model(_ids())
        no_logits = model(_ids(), compute_logits=False)
        assert no_logits.logits is None and no_logits.mtp_logits == []
        for logits, hidden in [(out.logits, no_logits.head_hidden),
                               *zip(out.mtp_logits, no_logits.mtp_hidden, strict=True)]:
            torch.testing.assert_close((hidden @ model.output_weight.T)[..., :100],
                                       logits[..., :100])


def test_buffers_come_back_only_when_asked():
    model = _model()
    assert model(_ids()).buffers == {}
    names = ["decoder.1.mixer_output", "final_hidden", "mtp.2.output"]
    out = model(_ids(), buffers=names)
    assert sorted(out.buffers) == sorted(names)
    for buf in out.buffers.values():
        assert buf.tensor.shape == (2, 10, 32) and not buf.seq_sharded and buf.seq_dim == 1
    with pytest.raises(ValueError, match="unknown activation buffer 'decoder.7.output'"):
        model(_ids(), buffers=["decoder.7.output"])
    # The buffers are the live activations: block 1's output plus nothing is the trunk's end.
    out = model(_ids(), buffers=["decoder.1.output", "final_hidden"])
    torch.testing.assert_close(model.final_norm(out.buffers["decoder.1.output"].tensor),
                               out.buffers["final_hidden"].tensor)
    assert out.buffers["final_hidden"].tensor.requires_grad


def test_mtp_heads_shapes_targets_and_causality():
    model = _model()
    ids = _ids()
    out = model(ids)
    assert len(out.mtp_logits) == 2 and len(out.mtp_hidden) == 2
    assert all(logits.shape == out.logits.shape for logits in out.mtp_logits)
    for head in range(3):  # position t of head j is trained on token t+1+j
        labels = shift_labels(ids, 1 + head)
        torch.testing.assert_close(labels[:, :10 - 1 - head], ids[:, 1 + head:])
        assert (labels[:, 10 - 1 - head:] == -100).all()
    # Every head is causal: changing token 6 changes no output at positions 0..5, but some at 6.
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 100
    out2 = model(changed)
    for before, after in zip([out.logits, *out.mtp_logits], [out2.logits, *out2.mtp_logits]):
        torch.testing.assert_close(before[:, :6], after[:, :6])
        assert not torch.allclose(before[:, 6], after[:, 6])
    # The heads are independent blocks on the trunk: head 2's weights move only head 2's logits.
    with torch.no_grad():
        model.mtp["2"].mlp.down_proj.weight.add_(1.0)
    out3 = model(ids)
    torch.testing.assert_close(out3.logits, out.logits)
    torch.testing.assert_close(out3.mtp_logits[0], out.mtp_logits[0])
    assert not torch.allclose(out3.mtp_logits[1], out.mtp_logits[1])


def test_input_checks():
    model = _model(dataclasses.replace(CFG, family="gpt2", kv_heads=None, max_seq_len=8))
    with pytest.raises(ValueError, match="sequence length 10 exceeds model.max_seq_len=8"):
        model(_ids())
    with pytest.raises(ValueError, match=r"input_ids must be integer \[batch, seq\]"):
        model(torch.zeros(2, 4, 3, dtype=torch.long))


def test_init_depends_on_seed_and_name_only():
    a, b, c = _model(seed=1), _model(seed=1), _model(seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.init not in ("ones", "zeros"):
            assert not torch.equal(pa, pc), name
    q0, q1 = a.decoder["0"].attention.q_proj.weight, a.decoder["1"].attention.q_proj.weight
    assert not torch.equal(q0, q1)  # same shape and seed, different names
    assert q0.std().item() == pytest.approx(0.02, rel=0.1)
    # Residual output projections are scaled down by sqrt(2 * layers) (GPT-2 / Megatron).
    assert a.decoder["0"].mlp.down_proj.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert a.embedding.weight[100:].abs().max() == 0  # padding rows


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_model_benchmark_runs_and_reports_the_ratio(capsys, family):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "bench" / "model.py"
    spec = importlib.util.spec_from_file_location("bench_model", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--layers", "2", "--hidden", "32", "--heads", "4", "--kv-heads", "2", "--ffn", "64",
                "--vocab", "128", "--seq", "16", "--batch", "1", "--steps", "1", "--threads", "1",
                "--family", family])
    printed = capsys.readouterr().out
    assert "| megadistill TransformerLM |" in printed
    assert "ratio, tokens/s ours / transformers: " in printed
    diff = float(printed.split("max |logit diff| ")[1].split()[0])
    assert diff < 1e-4  # both models really hold the same weights
