"""Context parallelism and packed documents (layers/context.py) against single-process float64.

- The whole model at CP 2/4 (x TP 2, with and without SP) on spawned gloo ranks, each rank holding
  chunks r and 2cp-1-r of every sequence: its logits equal the single-process model's at those
  positions, and every gradient (summed over the CP group, as the trainer sums over DP x CP)
  equals the single-process gradient (1e-12). Rows cover grouped-query attention with a causal
  mask, sliding windows shorter and longer than a chunk, documents whose boundaries fall inside and
  across chunks, and every block option of the newer families (local/global layers, soft-caps).
- Documents at CP=1: with positions restarting per document, a packed row computes for each
  document exactly what that document computes alone.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine import collectives as C
from engine.mappings import gather_from_tp
from engine.parallel import ParallelConfig, ParallelLayout, make_layout
from engine.spawn import run_ranks
from layers.config import ModelConfig
from layers.context import cp_positions
from layers.model import TransformerLM
from layers.sharding import gather_full
from tests.hf_models import BLOCK_OPTIONS

TOL = dict(rtol=1e-12, atol=1e-12)
BATCH, SEQ, VOCAB = 2, 16, 80
BASE = ModelConfig(vocab_size=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, ffn_hidden=48,
                   max_seq_len=SEQ)
CONFIGS = {
    "causal_gqa": BASE,
    "window_inside_chunk": dataclasses.replace(BASE, sliding_window=3),  # chunks of 4 (cp 2)
    "window_across_chunks": dataclasses.replace(BASE, sliding_window=6),
    "families": dataclasses.replace(BASE, **BLOCK_OPTIONS),
}


def _inputs(documents: bool):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    weights = torch.randn(BATCH, SEQ, VOCAB, generator=g, dtype=torch.float64)
    # row 0: boundaries at 3 and 9 (inside chunks); row 1: at 8 (a chunk boundary at CP 2)
    docs = torch.tensor([[0] * 3 + [1] * 6 + [2] * 7, [0] * 8 + [1] * 8]) if documents else None
    return ids, weights, docs


def _run(model: TransformerLM, positions: torch.Tensor | None, documents: bool, group) -> dict:
    ids, weights, docs = _inputs(documents)
    if positions is not None:
        ids, weights = ids[:, positions], weights[:, positions]
        docs = None if docs is None else docs[:, positions]
    out = model(ids, positions=positions, documents=docs)
    logits = gather_from_tp(out.logits, group)[..., :VOCAB]
    (logits * weights).sum().backward()
    return {"logits": logits.detach(),
            "grads": {n: gather_full(p, layout=model.layout, vocab_size=VOCAB, tensor=p.grad)
                      for n, p in model.named_parameters()}}


def _reference(name: str, documents: bool) -> dict:
    model = TransformerLM(CONFIGS[name], ParallelLayout.single(), seed=4).double()
    return _run(model, None, documents, None)


def _cp_rank(rows):
    results = []
    for name, tp, sp, cp, documents in rows:
        layout = make_layout(ParallelConfig(tp=tp, sp=sp, cp=cp))
        model = TransformerLM(CONFIGS[name], layout, seed=4).double()
        positions = cp_positions(SEQ, cp, layout.cp_rank)
        result = _run(model, positions, documents, layout.tp_group)
        grads = {}
        for pname, param in model.named_parameters():  # the trainer's sum over DP x CP
            grad = C.all_reduce(param.grad.clone(), layout.cp_group)
            grads[pname] = gather_full(param, layout=layout, vocab_size=VOCAB, tensor=grad)
        results.append({"logits": result["logits"], "grads": grads, "positions": positions})
    return results


ROWS = {
    4: [("causal_gqa", 1, False, 4, False), ("window_inside_chunk", 1, False, 2, False),
        ("window_across_chunks", 2, True, 2, True), ("causal_gqa", 2, False, 2, True),
        ("families", 2, True, 2, True), ("families", 1, False, 4, False)],
}


@pytest.mark.parametrize("world", sorted(ROWS))
def test_context_parallel_model_equals_the_single_process_model(world):
    per_rank = run_ranks(_cp_rank, world, ROWS[world], timeout_s=300)
    for i, (name, *_, documents) in enumerate(ROWS[world]):
        ref = _reference(name, documents)
        for rank, results in enumerate(per_rank):
            got, row = results[i], f"{ROWS[world][i]} rank {rank}"
            torch.testing.assert_close(got["logits"], ref["logits"][:, got["positions"]], **TOL,
                                       msg=lambda m: f"{row} logits: {m}")
            for pname, grad in got["grads"].items():
                torch.testing.assert_close(grad, ref["grads"][pname], **TOL,
                                           msg=lambda m: f"{row} grad of {pname}: {m}")


def test_cp_positions_balance_the_causal_work():
    assert cp_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert cp_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    keys_seen = [sum(p + 1 for p in cp_positions(64, 4, r).tolist()) for r in range(4)]
    assert len(set(keys_seen)) == 1  # every rank's queries see the same number of keys
    with pytest.raises(ValueError, match="does not split into 2 x parallel.cp=4 chunks"):
        cp_positions(12, 4, 0)


def test_packed_documents_compute_what_each_document_computes_alone():
    config = dataclasses.replace(BASE, **BLOCK_OPTIONS)
    model = TransformerLM(config, ParallelLayout.single(), seed=4).double().eval()
    ids, _, docs = _inputs(True)
    starts = torch.cat([torch.ones(BATCH, 1, dtype=torch.bool), docs[:, 1:] != docs[:, :-1]], dim=1)
    index = torch.arange(SEQ).expand(BATCH, SEQ)
    positions = index - torch.cummax(torch.where(starts, index, 0), dim=1).values
    with torch.no_grad():
        packed = model(ids, positions=positions, documents=docs).logits
        for row in range(BATCH):
            for doc in docs[row].unique():
                cols = (docs[row] == doc).nonzero().flatten()
                alone = model(ids[row:row + 1, cols]).logits[0]
                torch.testing.assert_close(packed[row, cols], alone, **TOL)
        # without the document mask the later documents see the earlier ones: not the same
        assert not torch.allclose(model(ids, positions=positions).logits, packed)
