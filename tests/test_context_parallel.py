"""Context parallelism and packed documents (layers/context.py) against single-process float64.

- The whole model at CP 2/4 (x TP 2, with and without SP) on spawned gloo ranks, each rank holding
  chunks r and 2cp-1-r of every sequence: its logits equal the single-process model's at those
  positions, and every gradient (summed over the CP group, as the trainer sums over DP x CP)
  equals the single-process gradient (1e-12). Rows cover grouped-query attention with a causal
  mask (the mask-free chunk-by-chunk path, which the rows check they took), sliding windows
  shorter and longer than a chunk, documents whose boundaries fall inside and across chunks, and
  every block option of the newer families (local/global layers, soft-caps).
- Documents at CP=1: with positions restarting per document, a packed row computes for each
  document exactly what that document computes alone.
- Through the entry point, 3 steps of logit + activation distillation from a colocated teacher on
  packed documents: CP=2, CP=2 x TP=2 + SP, CP=2 x DP=2 (DDP and the distributed optimizer),
  CP=4, CP=2 x PP=2 and PP=2 (packed documents through the pipeline stages), and with two MTP heads
  CP=2, CP=4 and CP=2 x PP=2, equal the CP=1 single-process run.
- tools/bench/context_parallel.py counts the analytic attention bytes; a 16,384-token sequence
  trains at CP=4 as at CP=1 (slow).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from engine import collectives as C
from engine.mappings import gather_from_tp
from engine.parallel import ParallelConfig, ParallelLayout, make_layout
from engine.spawn import run_ranks
from layers import context
from layers.config import ModelConfig
from layers.context import cp_positions, split_for_cp
from layers.model import TransformerLM
from layers.sharding import gather_full
from tests.helpers import assert_same_run
from tests.hf_models import BLOCK_OPTIONS
from tests.trainer_utils import base_config, make_teacher, read_metrics, run_in, teacher_config, write_config

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
    out = model(ids, positions=positions, documents=docs, cp_chunks=positions is not None)
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
    chunked_calls = []  # which rows took the mask-free path (layers/context.py attend_chunks)
    counted = context.causal_chunk_attention

    def counting(*args, **kwargs):
        chunked_calls.append(1)
        return counted(*args, **kwargs)

    context.causal_chunk_attention = counting
    for name, tp, sp, cp, documents in rows:
        layout = make_layout(ParallelConfig(tp=tp, sp=sp, cp=cp))
        model = TransformerLM(CONFIGS[name], layout, seed=4).double()
        positions = cp_positions(SEQ, cp, layout.cp_rank)
        chunked_calls.clear()
        result = _run(model, positions, documents, layout.tp_group)
        result["chunked"] = bool(chunked_calls)
        grads = {}
        for pname, param in model.named_parameters():  # the trainer's sum over DP x CP
            grad = C.all_reduce(param.grad.clone(), layout.cp_group)
            grads[pname] = gather_full(param, layout=layout, vocab_size=VOCAB, tensor=grad)
        results.append({"logits": result["logits"], "grads": grads, "positions": positions,
                        "chunked": result["chunked"]})
    return results


ROWS = {
    4: [("causal_gqa", 1, False, 4, False), ("window_inside_chunk", 1, False, 2, False),
        ("window_across_chunks", 2, True, 2, True), ("causal_gqa", 2, False, 2, True),
        ("families", 2, True, 2, True), ("families", 1, False, 4, False),
        ("causal_gqa", 2, True, 2, False)],
}


@pytest.mark.parametrize("world", sorted(ROWS))
def test_context_parallel_model_equals_the_single_process_model(world):
    per_rank = run_ranks(_cp_rank, world, ROWS[world], timeout_s=300)
    for i, (name, *_, documents) in enumerate(ROWS[world]):
        ref = _reference(name, documents)
        for rank, results in enumerate(per_rank):
            got, row = results[i], f"{ROWS[world][i]} rank {rank}"
            # whole causal sequences attend chunk by chunk without a mask; the rest use the mask
            assert got["chunked"] == (name == "causal_gqa" and not documents), row
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


# ------------------------------------------------------------------- through the entry point

def _cp_run_config(tmp: Path) -> Path:
    """Logit and activation distillation from a colocated teacher, packed documents attending
    within themselves with positions per document, sequences of 32 tokens."""
    cfg = base_config(tmp, cache=tmp / "cache")
    cfg["data"].update(seq_len=32, attention_within_documents=True, positions_per_document=True)
    cfg["model"]["max_seq_len"] = 32
    teacher = teacher_config(cfg)
    cfg["distill"] = {"teacher": str(make_teacher(tmp / "teacher", teacher)), "lm_weight": 0.5,
                      "logit": {"weight": 1.0, "temperature": 2.0},
                      "activations": [{"student": "decoder.1.output", "teacher": "decoder.2.output",
                                       "loss": "mse", "weight": 0.5}],
                      "projection": "shared"}
    return write_config(tmp / "run.yaml", cfg)


def _assert_runs_equal_cp1(tmp: Path, layouts: dict[str, tuple[int, list[str]]],
                           common: list[str] | None = None) -> None:
    """Each (world, overrides) run of `_cp_run_config` has the CP=1 single-process run's step terms
    (`assert_same_run`'s float32 tolerance); `common`: overrides of every run, the reference's
    included."""
    path, common = _cp_run_config(tmp), common or []
    assert run_in(path, tmp / "cp1", common) == 0
    want = read_metrics(tmp / "cp1")
    assert want[0]["kd_loss"] > 0 and want[0]["act_loss"] > 0
    for name, (world, overrides) in layouts.items():
        assert run_ranks(run_in, world, path, tmp / name, [*common, *overrides], timeout_s=300) == \
            [0] * world, name
        # (not val_loss: after the last update, where Adam's first steps turn the float32
        # rounding of near-zero gradients into +-lr moves; the step's own terms are compared)
        assert_same_run(read_metrics(tmp / name), want,
                        keys=("loss", "lm_loss", "kd_loss", "act_loss", "grad_norm"))


@pytest.mark.slow  # multi-rank end-to-end runs
def test_context_parallel_training_equals_the_single_process_run(tmp_path):
    _assert_runs_equal_cp1(tmp_path, {
        "cp2": (2, ["parallel.cp=2"]),
        "cp2_tp2_sp": (4, ["parallel.cp=2", "parallel.tp=2", "parallel.sp=true"]),
        "cp2_dp2": (4, ["parallel.cp=2"]),
        "cp2_dp2_distributed_optimizer": (4, ["parallel.cp=2", "train.distributed_optimizer=true"]),
        "cp4": (4, ["parallel.cp=4"])})


@pytest.mark.slow  # multi-rank end-to-end runs
def test_context_parallel_pipelines_equal_the_single_process_run(tmp_path):
    """Each stage runs its CP rank's chunks (the residual stream between stages is the CP-local
    sequence; the colocated teacher runs in the same stages); packed documents under PP alone."""
    _assert_runs_equal_cp1(tmp_path, {
        "pp2": (2, ["parallel.pp=2"]),
        "cp2_pp2": (4, ["parallel.cp=2", "parallel.pp=2"])})


@pytest.mark.slow  # multi-rank end-to-end runs
def test_context_parallel_mtp_heads_equal_the_single_process_run(tmp_path):
    """Two MTP heads: the 1- and 2-ahead targets of a chunk's last tokens lie in another chunk
    (shifted on the whole sequence before the split); the heads' attention sees the whole
    sequence's keys within each document, as the trunk's does."""
    _assert_runs_equal_cp1(tmp_path, {"cp2": (2, ["parallel.cp=2"]), "cp4": (4, ["parallel.cp=4"]),
                                      "cp2_pp2": (4, ["parallel.cp=2", "parallel.pp=2"])},
                           common=["model.mtp_heads=2"])


@pytest.mark.slow  # multi-rank end-to-end runs
def test_teacher_ranks_feed_context_parallel_students(tmp_path):
    """A teacher rank (teacher_cp=1: whole sequences) sends each CP student rank its chunks of the
    teacher's final hidden states and activation buffers (then its SP shard of the buffers); two
    teacher ranks at teacher_cp=2 gather their chunks and feed a CP=1 and a CP=2 student."""
    ranks = ["parallel.teacher_ranks=1", "distill.schedule=teacher_ranks"]
    teacher_cp2 = ["parallel.teacher_ranks=2", "parallel.teacher_cp=2", "distill.schedule=teacher_ranks"]
    _assert_runs_equal_cp1(tmp_path, {
        "cp2_teacher_rank": (3, ["parallel.cp=2", *ranks]),
        "cp2_tp2_sp_teacher_rank": (5, ["parallel.cp=2", "parallel.tp=2", "parallel.sp=true",
                                        "parallel.teacher_tp=1", *ranks]),
        "cp1_teacher_cp2": (3, teacher_cp2),
        "cp2_teacher_cp2": (4, ["parallel.cp=2", *teacher_cp2])},
        common=["data.attention_within_documents=false", "data.positions_per_document=false"])


def test_split_for_cp_shifts_the_mtp_targets_on_the_whole_sequence():
    labels = torch.arange(16).reshape(1, 16)
    mb = {"input_ids": labels.clone(), "labels": labels}
    for rank in range(2):
        got = split_for_cp(mb, 2, rank, mtp_heads=2)
        positions = cp_positions(16, 2, rank)
        for j in (1, 2):  # head j's target at global position p is labels[p + j], or ignored
            want = torch.where(positions + j < 16, positions + j, -100)
            assert got["mtp_labels"][0, :, j - 1].tolist() == want.tolist(), (rank, j)
        assert got["labels"][0].tolist() == positions.tolist()


# ------------------------------------------------------------------------------- long sequences

def test_context_parallel_benchmark_counts_the_analytic_attention_bytes():
    """tools/bench/context_parallel.py at a tiny size: its counted attention bytes per layer are
    the analytic all-gather (forward) and reduce-scatter (backward) payloads, with nothing else
    on the CP group, and each rank keeps fewer activations than the whole sequence does."""
    from tools.bench import context_parallel as bench

    args = bench.parse_args(["--layers", "2", "--hidden", "32", "--heads", "4", "--kv-heads", "2",
                             "--ffn", "48", "--vocab", "64", "--steps", "1"])
    whole = bench.run_row(args, seq=64, cp=1)
    for cp in (2, 4):
        got, want = bench.run_row(args, seq=64, cp=cp), bench.analytic_bytes(args, seq=64, cp=cp)
        assert (got["all_gather"], got["reduce_scatter"], got["other_cp"]) == \
            (want["all_gather"], want["reduce_scatter"], 0), cp
        assert got["activations"] < whole["activations"], cp
    assert (whole["all_gather"], whole["reduce_scatter"]) == (0, 0)


def _long_run_config(tmp: Path) -> Path:
    """Logit distillation from a colocated teacher on one 16,384-token sequence per step (no
    validation split)."""
    cfg = base_config(tmp, cache=tmp / "cache")
    cfg["model"].update(hidden=64, ffn_hidden=128, max_seq_len=16384)
    cfg["data"].update(seq_len=16384, micro_batch=1, global_batch=1, split="100,0",
                       corpus_max_bytes=400000)
    cfg["distill"] = {"teacher": str(make_teacher(tmp / "teacher", teacher_config(cfg))),
                      "lm_weight": 0.5, "logit": {"weight": 1.0}}
    return write_config(tmp / "run.yaml", cfg)


@pytest.mark.slow  # a 16k-token sequence, CP=1 and CP=4 through the entry point
def test_a_16k_token_sequence_trains_at_cp4(tmp_path):
    path = _long_run_config(tmp_path)
    # both in fresh processes, so that their peak resident sets compare
    assert run_ranks(run_in, 1, path, tmp_path / "cp1", [], timeout_s=900) == [0]
    assert run_ranks(run_in, 4, path, tmp_path / "cp4", ["parallel.cp=4"], timeout_s=900) == [0] * 4
    want, got = read_metrics(tmp_path / "cp1"), read_metrics(tmp_path / "cp4")
    assert all(math.isfinite(r["loss"]) for r in got) and got[-1]["loss"] < got[0]["loss"]
    assert_same_run(got, want, keys=("loss", "lm_loss", "kd_loss", "grad_norm"))
    # memory sanity: no CP=4 rank peaks as high as the whole sequence's single process
    assert max(r["peak_mem_bytes_max"] for r in got) < min(r["peak_mem_bytes"] for r in want)
