"""Pipeline stages of the student: stage models chained in one process equal the whole model.

float64, one process: each stage is built from a layout with its pipeline coordinates (no groups
are needed: TP = 1). Outputs, published buffers and every parameter's gradient must match the whole
model to 1e-12 (the same operations in the same order; only the tied embedding's gradient is a sum
of two copies' gradients, first and last stage, as the trainer sums them over the embedding group).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.parallel import ParallelLayout
from layers.config import ModelConfig
from layers.model import TransformerLM
from layers.stages import StagePlan
from tests.hf_models import BLOCK_OPTIONS

TOL = 1e-12


def test_plan_places_virtual_stages_like_megatron():
    plan = StagePlan(layers=8, pp=2, pp_rank=1, chunks=2)  # virtual stages 1 and 3
    assert list(plan.chunk_layers(0)) == [2, 3] and list(plan.chunk_layers(1)) == [6, 7]
    assert plan.layers_here() == [2, 3, 6, 7] and plan.has_head and not plan.has_embedding
    assert [plan.owner(i) for i in range(8)] == [(0, 0), (0, 0), (1, 0), (1, 0),
                                                 (0, 1), (0, 1), (1, 1), (1, 1)]
    assert StagePlan(layers=4).layers_here() == [0, 1, 2, 3]
    assert [plan.buffer_stage(n) for n in ("embedding", "decoder.5.output", "final_hidden",
                                           "mtp.1.output")] == [0, 2, 3, 3]
    deeper = StagePlan(layers=6, pp=2, pp_rank=0, chunks=2)  # a teacher cut at the same fractions
    assert [list(deeper.chunk_layers(c)) for c in range(2)] == [[0], [3]]
    assert [deeper.virtual_of(i) for i in range(6)] == [0, 1, 1, 2, 3, 3]


def _config(family: str) -> ModelConfig:
    """llama, gpt2, or "families": llama with every block option of the newer families."""
    config = ModelConfig(family="gpt2" if family == "gpt2" else "llama", vocab_size=100, hidden=16,
                         layers=4, heads=4, kv_heads=2, ffn_hidden=32, max_seq_len=16,
                         tie_embeddings=True, mtp_heads=1, bias=family == "gpt2")
    return dataclasses.replace(config, **BLOCK_OPTIONS) if family == "families" else config


def _stage_layout(pp: int, rank: int, chunks: int) -> ParallelLayout:
    return dataclasses.replace(ParallelLayout.single(), pp=pp, pp_rank=rank, virtual_stages=chunks)


def _loss(out) -> torch.Tensor:
    return out.logits.pow(2).mean() + 0.5 * out.mtp_logits[0].pow(2).mean() + \
        sum(b.tensor.pow(2).mean() for b in out.buffers.values())


def _run_stages(stages: list[TransformerLM], ids: torch.Tensor, buffers: list[str]):
    """Virtual stage k = chunk * pp + rank, in order, the residual stream handed along."""
    pp, chunks = len(stages), stages[0].plan.chunks
    records = [s.recorder(buffers) for s in stages]
    hidden = stages[0].embed(ids, records[0])
    rope = stages[0].rope(ids, hidden.dtype)
    for virtual in range(pp * chunks):
        rank, chunk = virtual % pp, virtual // pp
        hidden = stages[rank].run_chunk(chunk, hidden, rope, records[rank])
    out = stages[-1].finish(hidden, rope, records[-1])
    for record in records[:-1]:
        out.buffers.update(record.buffers)
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "families"])
@pytest.mark.parametrize("pp,chunks", [(2, 1), (2, 2), (4, 1)])
def test_chained_stages_equal_the_whole_model(family, pp, chunks):
    config = _config(family)
    whole = TransformerLM(config, ParallelLayout.single(), seed=3).double()
    stages = [TransformerLM(config, _stage_layout(pp, r, chunks), seed=3).double()
              for r in range(pp)]
    ids = torch.randint(0, config.vocab_size, (2, 12))
    buffers = ["embedding", "decoder.1.mlp_output", "decoder.3.output", "final_hidden"]
    ref = whole(ids, buffers=buffers)
    out = _run_stages(stages, ids, buffers)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=TOL)
    torch.testing.assert_close(out.mtp_logits[0], ref.mtp_logits[0], rtol=0, atol=TOL)
    assert set(out.buffers) == set(buffers)
    for name in buffers:
        torch.testing.assert_close(out.buffers[name].tensor, ref.buffers[name].tensor,
                                   rtol=0, atol=TOL)
    _loss(ref).backward()
    _loss(out).backward()
    grads: dict[str, torch.Tensor] = {}
    for stage in stages:
        for name, param in stage.named_parameters():
            grads[name] = grads[name] + param.grad if name in grads else param.grad
    ref_grads = {name: p.grad for name, p in whole.named_parameters()}
    assert set(grads) == set(ref_grads)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=TOL, msg=name)


def test_stages_hold_only_their_parts_under_global_names():
    config = _config("gpt2")
    first, last = (TransformerLM(config, _stage_layout(2, r, 2), seed=3) for r in range(2))
    names = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("decoder") else "")
             for n in first.state_dict()}
    assert names == {"embedding", "position_embedding", "decoder.0", "decoder.2"}
    last_names = {n for n in last.state_dict()}
    assert "embedding.weight" in last_names  # the tied output layer's copy
    assert {n.split(".")[1] for n in last_names if n.startswith("decoder.")} == {"1", "3"}
    assert any(n.startswith("mtp.1.") for n in last_names) and "final_norm.weight" in last_names
    whole = TransformerLM(config, ParallelLayout.single(), seed=3)
    for stage in (first, last):  # the same values as the whole model's parameters of that name
        for name, tensor in stage.state_dict().items():
            assert torch.equal(tensor, whole.state_dict()[name]), name
    with pytest.raises(RuntimeError, match="needs the whole model"):
        first(torch.zeros(1, 4, dtype=torch.int64))
