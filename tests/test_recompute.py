"""`train.recompute`: selective and full recomputation change memory, never results.

Each row builds the same model (same seed, dropout on, an MTP head) with recompute none, selective
and full and runs one forward/backward whose loss reads the logits of both heads and every named
buffer (the activation pairs of distillation read buffers of recomputed blocks). Losses, buffers and
every gradient must be bitwise equal to `none` (fp32, CPU): rows at TP 1 (two DP ranks, different
dropout masks) and TP 2 with and without SP. An end-to-end row trains through the real entry point
(TP 2 + SP, dropout, teacher, activation pairs) and requires identical metrics.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.parallel import ParallelConfig, ParallelLayout, make_layout
from engine.spawn import run_ranks
from layers.config import ModelConfig
from layers.model import TransformerLM
from tests.trainer_utils import dropout_tp2_sp_distill_config, read_metrics, run_main, write_config
from tools.bench.memory import kept_bytes

MODES = ("none", "selective", "full")
CONFIGS = {
    "llama": ModelConfig(family="llama", vocab_size=150, hidden=32, layers=2, heads=4, kv_heads=2,
                         ffn_hidden=64, max_seq_len=32, dropout=0.1, mtp_heads=1,
                         sliding_window=6),
    "gpt2": ModelConfig(family="gpt2", vocab_size=150, hidden=32, layers=2, heads=4,
                        ffn_hidden=64, max_seq_len=32, dropout=0.1, mtp_heads=1, bias=True,
                        tie_embeddings=True),
}
CONFIGS["llama_ternary"] = dataclasses.replace(CONFIGS["llama"], quant="ternary")  # replays scales
ROWS = [("llama", 1, False), ("gpt2", 1, False), ("llama", 2, False), ("llama", 2, True),
        ("gpt2", 2, True), ("llama_ternary", 2, True)]


def _loss_inputs(dp_rank: int):
    g = torch.Generator().manual_seed(100 + dp_rank)
    return torch.randint(0, 150, (2, 8), generator=g), g


def _forward_backward(model: TransformerLM) -> dict:
    """Two micro-batches (the dropout streams advance between them), gradients accumulated."""
    ids, g = _loss_inputs(model.layout.dp_rank)
    losses = []
    for _ in range(2):
        out = model(ids, buffers=model.buffer_names())
        heads = [h.clamp(min=-1e4) for h in [out.logits, *out.mtp_logits]]  # padding columns: -1e4
        loss = sum((h * torch.randn(h.shape, generator=g)).sum() for h in heads)
        loss = loss + sum((b.tensor * torch.randn(b.tensor.shape, generator=g)).sum()
                          for b in out.buffers.values())
        loss.backward()
        losses.append(loss.detach())
    return {"losses": losses, "buffers": {k: b.tensor.detach() for k, b in out.buffers.items()},
            "grads": {n: p.grad for n, p in model.named_parameters()}}


def _rows():
    results = []
    for family, tp, sp in ROWS:
        layout = make_layout(ParallelConfig(tp=tp, sp=sp))
        row = {}
        for mode in MODES:
            model = TransformerLM(CONFIGS[family], layout, seed=3, recompute=mode).train()
            row[mode] = _forward_backward(model)
        results.append(row)
    return results


def _assert_equal(got: dict, want: dict, where: str) -> None:
    # Bit for bit: recomputation reruns the forward's own operations, in the same order and from
    # the same RNG state (dropout), so nothing may differ at all.
    for key in ("losses", "buffers", "grads"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0,
                                   msg=lambda m: f"{where} {key}: {m}")


def test_recompute_is_bitwise_none():
    per_rank = run_ranks(_rows, 2, timeout_s=300)
    for rank, rows in enumerate(per_rank):
        for row, result in zip(ROWS, rows):
            for mode in ("selective", "full"):
                _assert_equal(result[mode], result["none"], f"{row} rank {rank} {mode}")
    # the two DP ranks of the TP-1 rows drew different dropout masks: the test sees dropout
    assert not torch.equal(per_rank[0][0]["none"]["losses"][0], per_rank[1][0]["none"]["losses"][0])


def test_recompute_keeps_less_and_nothing_without_grad():
    """Bytes a forward leaves allocated for the backward: `full` keeps the blocks' inputs, `selective`
    drops the attention probabilities (saved here, with dropout, by the non-fused kernel)."""
    config = dataclasses.replace(CONFIGS["llama"], hidden=64, layers=4, max_seq_len=256,
                                 sliding_window=None, mtp_heads=0)
    ids = torch.randint(0, 150, (2, 256), generator=torch.Generator().manual_seed(0))
    kept = {}
    for mode in MODES:
        model = TransformerLM(config, ParallelLayout.single(), seed=3, recompute=mode).train()
        kept[mode] = kept_bytes(lambda: model(ids).logits)
        with torch.no_grad():
            kept[f"{mode}, no_grad"] = kept_bytes(lambda: model(ids).logits)
    logits = 2 * 256 * 192 * 4
    assert kept["none"] > 2 * kept["selective"] > 4 * kept["full"], kept
    block_inputs = 4 * 2 * 256 * 64 * 4
    assert kept["full"] < 3 * block_inputs + 2 * logits, kept
    for mode in MODES:
        assert kept[f"{mode}, no_grad"] == logits, kept


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recompute")
    cfg = dropout_tp2_sp_distill_config(tmp, activations=["all_mixers", "all_mlps"])
    return tmp, write_config(tmp / "run.yaml", cfg)


def _train(cfg, run_dir, mode):
    assert run_main(str(cfg), [f"train.run_dir={run_dir}", f"train.recompute={mode}"]) == 0


@pytest.mark.slow  # a multi-rank end-to-end run
def test_training_with_recompute_equals_none(run_config):
    tmp, cfg = run_config
    metrics = {}
    for mode in MODES:
        run_ranks(_train, 2, cfg, tmp / mode, mode, timeout_s=180)
        # what the run costs (time, memory, full recomputation's repeated collectives) differs
        metrics[mode] = [{k: v for k, v in r.items()
                          if k != "tokens_per_s" and not k.startswith(("comm_bytes/", "peak_mem"))}
                         for r in read_metrics(tmp / mode)]
    assert metrics["none"][0]["act_loss"] > 0
    assert metrics["selective"] == metrics["none"]  # bit for bit, as _assert_equal says why
    assert metrics["full"] == metrics["none"]
