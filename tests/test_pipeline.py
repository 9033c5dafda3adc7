"""The pipeline schedules (engine/pipeline.py) against a single-process run of the same chain.

A toy model of pp x chunks virtual stages, float64: stage k maps the student activation x to
tanh(x W_k) and carries a gradient-free side tensor t (as a colocated teacher's hidden states
travel) to 2 t; odd stages own a loss term of their own, the last stage the main loss. Every
(pp, chunks, micro-batches) row must give the single-process losses and the gradient of every W_k
to 1e-12, hold at most pp - rank micro-batches in flight under 1F1B, and follow the published
action counts.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from engine import pipeline as P
from engine.spawn import run_ranks

H, ROWS = 6, 3
TOL = dict(rtol=1e-12, atol=1e-12)


def _weights(virtual_stages: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(H, H, generator=g, dtype=torch.float64) / H ** 0.5
            for _ in range(virtual_stages)]


def _data(micro_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(9)
    return [(torch.randn(ROWS, H, generator=g, dtype=torch.float64),
             torch.randn(ROWS, H, generator=g, dtype=torch.float64)) for _ in range(micro_batches)]


def _stage_step(k: int, last: int, w: torch.Tensor, x: torch.Tensor, t: torch.Tensor):
    """(x', t', own loss or None) of virtual stage k."""
    x, t = torch.tanh(x @ w), 2 * t
    loss = None
    if k % 2 == 1:
        loss = 0.01 * k * (x * t).mean()
    if k == last:
        loss = x.square().sum() if loss is None else loss + x.square().sum()
    return x, t, loss


def _reference(virtual_stages: int, micro_batches: int):
    weights = [w.clone().requires_grad_(True) for w in _weights(virtual_stages)]
    total = torch.zeros((), dtype=torch.float64)
    for x, t in _data(micro_batches):
        for k, w in enumerate(weights):
            x, t, loss = _stage_step(k, virtual_stages - 1, w, x, t)
            if loss is not None:
                total = total + loss
    total.backward()
    return total.item(), [w.grad for w in weights]


class _ToyStage:
    def __init__(self, pp: int, rank: int, chunks: int, micro_batches: int):
        self.pp, self.rank, self.last = pp, rank, pp * chunks - 1
        weights = _weights(pp * chunks)
        self.weights = {c: weights[c * pp + rank].clone().requires_grad_(True)
                        for c in range(chunks)}
        self.data, self.loss_sum = _data(micro_batches), 0.0

    def input_specs(self, chunk: int) -> list[P.TensorSpec]:
        return [P.TensorSpec((ROWS, H), torch.float64),
                P.TensorSpec((ROWS, H), torch.float64, requires_grad=False)]

    def forward(self, chunk: int, micro_batch: int, inputs: list[torch.Tensor]) -> P.StageOutput:
        k = chunk * self.pp + self.rank
        x, t = inputs if inputs else self.data[micro_batch]
        x, t, loss = _stage_step(k, self.last, self.weights[chunk], x, t)
        if loss is not None:
            self.loss_sum += loss.item()
        return P.StageOutput(outputs=[] if k == self.last else [x, t], loss=loss)


def _pipeline(cases: list[tuple[int, int, int]]) -> list[dict]:
    """On each rank of a world of pp ranks: run every (pp, chunks, micro-batches) case."""
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for pp, chunks, micro_batches in cases:
        assert pp == world
        stage = _ToyStage(pp, rank, chunks, micro_batches)
        actions = P.interleaved_one_f_one_b(pp=pp, rank=rank, micro_batches=micro_batches,
                                            chunks=chunks)
        executor = P.PipelineExecutor(ranks=list(range(pp)), rank=rank, chunks=chunks,
                                      device=torch.device("cpu"))
        stats = executor.run(actions, stage)
        results.append({"grads": {c * pp + rank: w.grad for c, w in stage.weights.items()},
                        "loss": stage.loss_sum, "in_flight": stats.max_in_flight,
                        "actions": [(a.kind, a.chunk, a.micro_batch) for a in actions]})
    return results


CASES = {2: [(2, 1, 1), (2, 1, 3), (2, 1, 4), (2, 2, 2), (2, 2, 4), (2, 3, 4)],
         4: [(4, 1, 2), (4, 1, 6), (4, 2, 4), (4, 2, 8)]}


@pytest.mark.parametrize("world", sorted(CASES))
def test_schedules_equal_the_single_process_chain(world):
    per_rank = run_ranks(_pipeline, world, CASES[world], timeout_s=180)
    for i, (pp, chunks, micro_batches) in enumerate(CASES[world]):
        loss, grads = _reference(pp * chunks, micro_batches)
        assert sum(r[i]["loss"] for r in per_rank) == pytest.approx(loss, rel=1e-12)
        got = {k: g for r in per_rank for k, g in r[i]["grads"].items()}
        assert sorted(got) == list(range(pp * chunks))
        for k, want in enumerate(grads):
            torch.testing.assert_close(got[k], want, **TOL)
        for rank, r in enumerate(per_rank):
            kinds = [a[0] for a in r[i]["actions"]]
            assert kinds.count("F") == kinds.count("B") == chunks * micro_batches
            if chunks == 1:  # 1F1B memory bound: at most pp - rank micro-batches held
                assert r[i]["in_flight"] <= min(pp - rank, micro_batches)
            elif micro_batches >= 2 * pp:  # interleaved: (chunks + 1) pp - 1 - 2 rank chunks
                assert r[i]["in_flight"] == (chunks + 1) * pp - 1 - 2 * rank


def test_one_f_one_b_shape():
    """Warm-up pp - rank - 1 forwards, then alternate, then cool down."""
    actions = [a.kind for a in P.one_f_one_b(pp=4, rank=1, micro_batches=6)]
    assert actions == ["F", "F"] + ["F", "B"] * 4 + ["B", "B"]
    last = [a.kind for a in P.one_f_one_b(pp=4, rank=3, micro_batches=3)]
    assert last == ["F", "B"] * 3
    assert [a.kind for a in P.one_f_one_b(pp=4, rank=0, micro_batches=2)] == ["F", "F", "B", "B"]


def test_interleaved_order_visits_groups_of_pp_chunk_by_chunk():
    actions = P.interleaved_one_f_one_b(pp=2, rank=0, micro_batches=4, chunks=2)
    forwards = [(a.chunk, a.micro_batch) for a in actions if a.kind == "F"]
    assert forwards == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    backwards = [(a.chunk, a.micro_batch) for a in actions if a.kind == "B"]
    assert backwards == [(1, 0), (1, 1), (0, 0), (0, 1), (1, 2), (1, 3), (0, 2), (0, 3)]
    assert P.warmup_forwards(pp=2, rank=0, micro_batches=4, chunks=2) == 4


def test_analytic_bubble():
    assert P.bubble_fraction(pp=4, micro_batches=8) == pytest.approx(3 / 11)
    assert P.bubble_fraction(pp=4, micro_batches=8, chunks=2) == pytest.approx(3 / 19)


def _simulated_idle(pp: int, chunks: int, micro_batches: int) -> list[float]:
    """Each rank's idle fraction when every rank runs its action list in order, a forward costs
    1 / chunks and a backward 2 / chunks, and transfers are free."""
    actions = {r: P.interleaved_one_f_one_b(pp=pp, rank=r, micro_batches=micro_batches,
                                            chunks=chunks) for r in range(pp)}
    done, clock, busy, nxt = {}, [0.0] * pp, [0.0] * pp, [0] * pp
    last, moved = pp * chunks - 1, True
    while moved:
        moved = False
        for r in range(pp):
            while nxt[r] < len(actions[r]):
                a = actions[r][nxt[r]]
                k = a.chunk * pp + r
                need = (("F", k - 1) if k > 0 else None) if a.kind == "F" else \
                    (("B", k + 1) if k < last else ("F", k))
                if need is not None and (*need, a.micro_batch) not in done:
                    break
                ready = done[(*need, a.micro_batch)] if need is not None else 0.0
                cost = (1.0 if a.kind == "F" else 2.0) / chunks
                clock[r] = max(clock[r], ready) + cost
                busy[r] += cost
                done[(a.kind, k, a.micro_batch)] = clock[r]
                nxt[r] += 1
                moved = True
    assert nxt == [len(actions[r]) for r in range(pp)], "the schedules deadlock"
    end = max(clock)
    return [1 - b / end for b in busy]


@pytest.mark.parametrize("pp,chunks,micro_batches", [(2, 1, 4), (4, 1, 8), (4, 1, 3), (2, 2, 8),
                                                     (4, 2, 8), (4, 3, 12), (8, 2, 16)])
def test_schedules_reach_the_analytic_bubble(pp, chunks, micro_batches):
    """With free transfers the action lists never wait longer than the schedule must: every
    rank idles exactly (pp - 1) / (chunks * m + pp - 1) of the step."""
    want = P.bubble_fraction(pp=pp, micro_batches=micro_batches, chunks=chunks)
    for idle in _simulated_idle(pp, chunks, micro_batches):
        assert idle == pytest.approx(want, abs=1e-12)


def test_bubble_benchmark_prints_its_table(capsys):
    """tools/bench/pipeline.py runs the real executor over spawned ranks and prints one row per
    layout with the analytic bubble (the measured columns are timings: only their range is
    checked)."""
    from tools.bench import pipeline as bench  # importable by the spawned ranks

    assert bench.main(["--pp", "2", "--micro-batches", "2", "--chunks", "1", "--forward-ms", "2",
                       "--repeats", "1"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 | 1 | 2 |")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    idle = [float(x) for x in cells[3].split()]
    assert len(idle) == 2 and all(0.0 <= x < 1.0 for x in idle)
    assert cells[5] == "0.333"  # (pp - 1) / (m + pp - 1)
    assert cells[7] == "2"  # 1F1B holds pp micro-batches' activations on the first stage
