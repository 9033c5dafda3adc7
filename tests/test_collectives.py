"""The collective module on gloo (native reduce_scatter and all_to_all_single) and the counters."""

import pytest
import torch
import torch.distributed as dist

from engine import collectives as C
from engine.spawn import run_ranks


def _full(world, shape=(4, 8, 6)):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(world)]


def _check_collectives():
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    per_rank = _full(world)  # every rank knows every rank's input, so it can build references
    mine = per_rank[rank]
    total = sum(per_rank)

    torch.testing.assert_close(C.all_reduce(mine.clone(), group), total, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(C.all_reduce(mine.clone(), group, op="max"),
                               torch.stack(per_rank).amax(0))
    for dim in (0, 1, -1):
        torch.testing.assert_close(C.all_gather(mine, group, dim=dim), torch.cat(per_rank, dim=dim))
    for dim in (0, 1):
        chunk = 8 // world if dim == 1 else 4 // world
        expected = total.narrow(dim, rank * chunk, chunk)
        torch.testing.assert_close(C.reduce_scatter(mine, group, dim=dim), expected,
                                   rtol=1e-12, atol=1e-12)
    b = mine.clone()
    torch.testing.assert_close(C.broadcast(b, group, src=world - 1), per_rank[-1])

    with C.count_collectives() as counts:
        C.all_reduce(mine.clone(), group)
        C.all_gather(mine, group, dim=0)
        C.all_gather(mine, group, dim=1)
        C.reduce_scatter(mine, group, dim=1)
    if world > 1:  # one native reduce_scatter of the whole input, no all_reduce underneath
        assert counts.calls == {"all_reduce": 1, "all_gather": 2, "reduce_scatter": 1}
        assert counts.bytes["all_gather"] == 2 * mine.numel() * 8
        assert counts.bytes["reduce_scatter"] == mine.numel() * 8
        assert counts.total_calls == 4
    else:
        assert counts.total_calls == 0  # size-1 groups never communicate

    if world > 1:  # ring of point-to-point messages
        out = torch.empty_like(mine)
        if rank % 2 == 0:
            C.send(mine, dst=(rank + 1) % world)
            C.recv(out, src=(rank - 1) % world)
        else:
            C.recv(out, src=(rank - 1) % world)
            C.send(mine, dst=(rank + 1) % world)
        torch.testing.assert_close(out, per_rank[(rank - 1) % world])
        works = [C.isend(mine, dst=(rank + 1) % world), C.irecv(out, src=(rank - 1) % world)]
        for w in works:
            w.wait()
        torch.testing.assert_close(out, per_rank[(rank - 1) % world])
    return rank


@pytest.mark.parametrize("world", [1, 2, 4])
def test_collectives_match_definitions(world):
    assert run_ranks(_check_collectives, world) == list(range(world))


def _splits(src: int, world: int) -> list[int]:
    """Rows rank `src` sends to each rank: uneven, some zero."""
    return [(src + 2 * dst) % 3 for dst in range(world)]


def _check_all_to_all_single():
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    g = torch.Generator().manual_seed(11)
    per_rank = [torch.randn(sum(_splits(src, world)), 5, generator=g) for src in range(world)]
    pieces = [list(x.split(_splits(src, world))) for src, x in enumerate(per_rank)]
    expected = torch.cat([pieces[src][rank] for src in range(world)])
    recv_splits = [_splits(src, world)[rank] for src in range(world)]
    with C.count_collectives() as counts:
        got = C.all_to_all_single(per_rank[rank], group, send_splits=_splits(rank, world),
                                  recv_splits=recv_splits)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert counts.calls == {"all_to_all": 1}
    assert counts.bytes["all_to_all"] == per_rank[rank].numel() * 4

    even = torch.arange(world * 6, dtype=torch.int64).view(world * 2, 3) + 100 * rank
    got = C.all_to_all_single(even, group)  # 2 rows to each rank
    expected = torch.cat([(torch.arange(world * 6).view(world * 2, 3) + 100 * src)[2 * rank:2 * rank + 2]
                          for src in range(world)])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    return rank


@pytest.mark.parametrize("world", [2, 4])
def test_all_to_all_single_matches_reference(world):
    assert run_ranks(_check_all_to_all_single, world) == list(range(world))


def test_local_group_is_identity():
    x = torch.randn(3, 4)
    assert C.all_reduce(x, None) is x
    assert C.all_gather(x, None, dim=1) is x
    assert C.reduce_scatter(x, None, dim=0) is x
    assert C.all_to_all_single(x, None) is x
    assert C.group_size(None) == 1 and C.group_rank(None) == 0


def test_counters_nest():
    with C.count_collectives() as outer:
        with C.count_collectives() as inner:
            C.record("all_reduce", torch.zeros(10), None)
        C.record("all_gather", torch.zeros(2, dtype=torch.float64), None)
    assert inner.calls == {"all_reduce": 1} and inner.bytes["all_reduce"] == 40
    assert outer.calls == {"all_reduce": 1, "all_gather": 1} and outer.total_bytes == 56


def test_counters_name_groups_and_channels():
    tp, dp = object(), object()  # stand-ins: groups are named by identity
    with C.count_collectives({"tp": tp, "dp": dp, "unused": None}) as counts:
        C.record("all_reduce", torch.zeros(4), tp)
        C.record("all_reduce", torch.zeros(2), tp)
        C.record("reduce_scatter", torch.zeros(8), dp)
        C.record("send", torch.zeros(3), "pp")
        C.record("all_reduce", torch.zeros(1), object())
    assert counts.group_bytes == {("tp", "all_reduce"): 24, ("dp", "reduce_scatter"): 32,
                                  ("pp", "send"): 12, ("other", "all_reduce"): 4}
    assert counts.group_calls[("tp", "all_reduce")] == 2
    assert counts.bytes_per_group() == {"tp": 24, "dp": 32, "pp": 12, "other": 4}


def _uneven_reduce_scatter():
    C.reduce_scatter(torch.zeros(3, 2), dist.group.WORLD, dim=0)


def test_reduce_scatter_rejects_uneven_split():
    from engine.spawn import RankFailure
    with pytest.raises(RankFailure, match="does not split over 2 ranks"):
        run_ranks(_uneven_reduce_scatter, 2)
