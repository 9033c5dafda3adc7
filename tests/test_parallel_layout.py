"""Layout construction: Megatron rank order for TP/DP groups, teacher ranks, and layout errors."""

import os

import pytest
import torch
import torch.distributed as dist

from engine import collectives as C
from engine.config import ConfigError
from engine.entry import peer_lost
from engine.parallel import (
    STUDENT,
    LaunchEnv,
    LayoutError,
    ParallelConfig,
    ParallelLayout,
    RankLists,
    RankOrder,
    init_parallel,
    make_layout,
    validate_layout,
)
from engine.spawn import RankFailure, run_ranks


def _members(group):
    me = torch.tensor([dist.get_rank()], dtype=torch.int64)
    return C.all_gather(me, group).tolist()


def _describe(tp, teacher_ranks=0, sp=False, teacher_tp=None):
    layout = make_layout(ParallelConfig(tp=tp, sp=sp, teacher_ranks=teacher_ranks,
                                        teacher_tp=teacher_tp))
    return dict(role=layout.role, tp_rank=layout.tp_rank, dp_rank=layout.dp_rank, dp=layout.dp,
                tp=layout.tp, sp=layout.sp,
                tp_members=_members(layout.tp_group), dp_members=_members(layout.dp_group),
                role_members=_members(layout.role_group),
                self_rank=layout.global_rank(tp=layout.tp_rank, dp=layout.dp_rank))


def test_tp_groups_contiguous_dp_groups_strided():
    info = run_ranks(_describe, 4, 2, sp=True)
    assert [i["tp_members"] for i in info] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [i["dp_members"] for i in info] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [(i["tp_rank"], i["dp_rank"]) for i in info] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert all(i["dp"] == 2 and i["role"] == "student" for i in info)
    assert [i["self_rank"] for i in info] == [0, 1, 2, 3]


def test_teacher_ranks_get_their_own_groups():
    info = run_ranks(_describe, 4, 1, teacher_ranks=1)
    assert [i["role"] for i in info] == ["student"] * 3 + ["teacher"]
    assert info[0]["dp_members"] == [0, 1, 2] and info[3]["dp_members"] == [3]
    assert info[0]["role_members"] == [0, 1, 2] and info[3]["role_members"] == [3]
    assert [i["self_rank"] for i in info] == [0, 1, 2, 3]


def test_rank_lists_tp_fastest_then_pp_then_dp():
    lists = RankLists.of(RankOrder(size=8, tp=2, pp=2))  # rank = (dp * 2 + pp) * 2 + tp
    assert lists.tp == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lists.pp == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert lists.dp == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lists.embedding == [[0, 2], [1, 3], [4, 6], [5, 7]]
    four = RankLists.of(RankOrder(size=4, pp=4, offset=2))  # offset: teacher ranks come first here
    assert four.pp == [[2, 3, 4, 5]] and four.embedding == [[2, 5]] and four.dp == [[2], [3], [4], [5]]
    assert RankLists.of(RankOrder(size=4, tp=2)).embedding == []


def test_rank_order_coordinates_round_trip():
    order = RankOrder(size=8, tp=2, pp=2, offset=3)
    assert order.dp == 2
    assert [order.coords(order.rank(tp=t, pp=p, dp=d)) for d in range(2) for p in range(2)
            for t in range(2)] == [(t, p, d) for d in range(2) for p in range(2) for t in range(2)]
    teachers = ParallelConfig(tp=2, teacher_ranks=2, teacher_tp=1).rank_order("teacher", 6)
    assert (teachers.offset, teachers.tp, teachers.dp) == (4, 1, 2)
    assert ParallelConfig(tp=2, pp=2, teacher_ranks=2).rank_order(STUDENT, 10).dp == 2


def _describe_pp(tp, pp, teacher_ranks=0):
    layout = make_layout(ParallelConfig(tp=tp, pp=pp, virtual_stages=2,
                                        teacher_ranks=teacher_ranks))
    embedding = _members(layout.embedding_group) if layout.embedding_group is not None else None
    return dict(tp_rank=layout.tp_rank, pp_rank=layout.pp_rank, dp_rank=layout.dp_rank,
                dp=layout.dp, pp=layout.pp, role=layout.role, pp_ranks=list(layout.pp_ranks),
                first=layout.is_first_stage, last=layout.is_last_stage,
                virtual=layout.virtual_stages, tp_members=_members(layout.tp_group),
                dp_members=_members(layout.dp_group),
                pp_members=_members(layout.pp_group) if layout.pp_group is not None else None,
                embedding=embedding,
                virtual_stages=[layout.virtual_stage(c) for c in range(layout.virtual_stages)],
                self_rank=layout.global_rank(tp=layout.tp_rank, pp=layout.pp_rank,
                                             dp=layout.dp_rank))


def test_pipeline_groups_megatron_order():
    """TP=2 x PP=2 x DP=1 (4 ranks) plus 2 teacher ranks (no pipeline): every group's members
    (the DP order with PP is RankLists' test above)."""
    info = run_ranks(_describe_pp, 6, 2, 2, teacher_ranks=2)
    students = info[:4]
    assert [(i["dp_rank"], i["pp_rank"], i["tp_rank"]) for i in students] == \
        [(0, p, t) for p in range(2) for t in range(2)]
    assert [i["pp_members"] for i in students] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [i["embedding"] for i in students] == [i["pp_members"] for i in students]
    assert [i["pp_ranks"] for i in students] == [i["pp_members"] for i in students]
    assert [i["dp_members"] for i in students] == [[0], [1], [2], [3]]
    assert [i["tp_members"] for i in students] == [[0, 1]] * 2 + [[2, 3]] * 2
    assert [i["first"] for i in students] == [True, True, False, False]
    assert [i["last"] for i in students] == [False, False, True, True]
    assert all(i["dp"] == 1 and i["pp"] == 2 and i["virtual"] == 2 for i in students)
    assert [i["self_rank"] for i in info] == list(range(6))
    assert [i["virtual_stages"] for i in students] == [[0, 2], [0, 2], [1, 3], [1, 3]]
    teachers = info[4:]
    assert all(i["role"] == "teacher" and i["pp"] == 1 and i["virtual"] == 1 for i in teachers)
    assert [i["tp_members"] for i in teachers] == [[4, 5]] * 2
    assert all(i["pp_members"] is None and i["embedding"] is None for i in teachers)


def test_teacher_ranks_at_their_own_tp():
    # Students at TP 2 with SP, the teacher rank at TP 1 (so without SP).
    info = run_ranks(_describe, 3, 2, teacher_ranks=1, sp=True, teacher_tp=1)
    assert [(i["role"], i["tp"], i["sp"]) for i in info] == \
        [("student", 2, True)] * 2 + [("teacher", 1, False)]
    assert info[2]["tp_members"] == [2] and info[0]["tp_members"] == [0, 1]
    # Students at TP 1 (DP 2), one teacher replica at TP 2 serving both.
    info = run_ranks(_describe, 4, 1, teacher_ranks=2, teacher_tp=2)
    assert [(i["role"], i["tp"], i["dp"]) for i in info] == \
        [("student", 1, 2)] * 2 + [("teacher", 2, 1)] * 2
    assert info[2]["tp_members"] == [2, 3] and info[3]["dp_members"] == [3]
    assert [(i["tp_rank"], i["dp_rank"]) for i in info] == [(0, 0), (0, 1), (0, 0), (1, 0)]
    assert [i["self_rank"] for i in info] == [0, 1, 2, 3]


@pytest.mark.parametrize("world,tp,sp,teacher,message", [
    (3, 2, False, 0, "does not divide the 3 student ranks"),
    (2, 4, False, 0, "larger than the 2 student ranks"),
    (2, 1, False, 2, "leaves no student rank"),
    (4, 2, False, 1, "does not divide the 3 student ranks"),
    (7, 2, False, 3, "does not divide parallel.teacher_ranks=3"),
    (5, 1, False, 2, "data-parallel degree 2 .* does not divide the students' 3"),
])
def test_layout_errors(world, tp, sp, teacher, message):
    with pytest.raises(LayoutError, match=message):
        validate_layout(ParallelConfig(tp=tp, sp=sp, teacher_ranks=teacher), world)


@pytest.mark.parametrize("degrees,message", [
    (dict(tp=1, sp=True), "sequence parallelism needs parallel.tp > 1"),
    (dict(tp=0), "must be >= 1"),
    (dict(pp=0), "must be >= 1"),
    (dict(tp=2, teacher_ranks=2, teacher_tp=0), "must be >= 1"),
])
def test_degree_errors_are_the_configs(degrees, message):
    """The degrees are checked once, by ParallelConfig; validate_layout fits them to the world."""
    with pytest.raises(ConfigError, match=message):
        ParallelConfig(**degrees)


def test_pipeline_layout_errors():
    with pytest.raises(LayoutError, match=r"parallel.tp=2 x parallel.pp=2 does not divide the 6") \
            as err:
        validate_layout(ParallelConfig(tp=2, pp=2), 6)
    assert err.value.key == "parallel.pp"


@pytest.mark.parametrize("world,tp,teacher,teacher_tp,key,message", [
    (3, 1, 1, 2, "parallel.teacher_tp", "parallel.teacher_tp=2 does not divide"),
    (7, 1, 4, 2, "parallel.teacher_ranks", r"data-parallel degree 2 \(parallel.teacher_ranks=4 / "
                                           r"parallel.teacher_tp=2\) does not divide the students' 3"),
    (8, 2, 2, 1, "parallel.teacher_ranks", "degree 2 .* does not divide the students' 3"),
])
def test_teacher_tp_errors_carry_their_key(world, tp, teacher, teacher_tp, key, message):
    with pytest.raises(LayoutError, match=message) as err:
        validate_layout(ParallelConfig(tp=tp, teacher_ranks=teacher, teacher_tp=teacher_tp), world)
    assert err.value.key == key


def test_layout_errors_carry_their_key():
    with pytest.raises(LayoutError) as err:
        validate_layout(ParallelConfig(tp=2, teacher_ranks=1), 4)
    assert err.value.key == "parallel.tp"
    with pytest.raises(LayoutError) as err:
        validate_layout(ParallelConfig(tp=1, teacher_ranks=2), 2)
    assert err.value.key == "parallel.teacher_ranks"


RENDEZVOUS = {"MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("env,message", [
    ({"WORLD_SIZE": "2", **RENDEZVOUS}, "RANK is not set"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
    ({"WORLD_SIZE": "2", "RANK": "5", **RENDEZVOUS}, "RANK=5 is outside WORLD_SIZE=2 (0..1)"),
    ({"WORLD_SIZE": "2", "RANK": "-1", **RENDEZVOUS}, "RANK=-1 is outside WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "x", **RENDEZVOUS},
     "LOCAL_RANK='x' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, "WORLD_SIZE=2 but MASTER_ADDR is not set"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "h"}, "WORLD_SIZE=2 but MASTER_PORT is not set"),
])
def test_broken_launcher_environment(env, message):
    with pytest.raises(ConfigError) as err:
        LaunchEnv.from_env(env)
    assert err.value.key == "environment" and message in err.value.message


def test_launch_env_of_one_process_and_of_torchrun():
    assert LaunchEnv.from_env({}) == LaunchEnv(rank=0, world_size=1, local_rank=0)
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", **RENDEZVOUS}
    assert LaunchEnv.from_env(env) == LaunchEnv(rank=3, world_size=4, local_rank=1)


def test_single_process_layout_has_no_groups():
    layout = init_parallel(ParallelConfig(), launch=LaunchEnv.from_env({}))
    assert layout == ParallelLayout.single()
    assert layout.tp_group is None and layout.dp_group is None and not dist.is_initialized()


def _boom():
    if dist.get_rank() == 1:
        raise ValueError("rank one exploded")
    dist.barrier()


def _hang():
    if dist.get_rank() == 0:
        import time
        time.sleep(600)


def test_harness_reports_failing_rank():
    with pytest.raises(RankFailure, match="rank 1 failed(.|\n)*rank one exploded"):
        run_ranks(_boom, 2, timeout_s=120)  # generous: spawning is slow on a loaded machine


def test_harness_times_out_hung_ranks():
    # Whichever comes first on a loaded machine: the harness's deadline, or rank 1's collective
    # timeout (the same 10 s, started when its process group came up) ending it with an error.
    with pytest.raises((TimeoutError, RankFailure), match=r"ranks \[0(, 1)?\] did not finish|rank 1"):
        run_ranks(_hang, 2, timeout_s=10)


def test_named_backend_makes_a_group_of_one(monkeypatch, tmp_path):
    """parallel.backend=gloo builds a process group even for one process (as nccl does on a GPU:
    the GPU check's way to run NCCL through the real entry point); auto makes none."""
    from engine.parallel import destroy_parallel

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29500 + os.getpid() % 1000))
    env = LaunchEnv.from_env({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"})
    assert not init_parallel(ParallelConfig(), launch=env).tp_group and not dist.is_initialized()
    layout = init_parallel(ParallelConfig(backend="gloo"), launch=env)
    try:
        assert dist.is_initialized() and dist.get_backend() == "gloo" and layout.world_size == 1
    finally:
        destroy_parallel()


def test_bad_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="parallel.backend"):
        ParallelConfig(backend="mpi")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="parallel.backend.*CUDA"):
            init_parallel(ParallelConfig(backend="nccl"),
                          launch=LaunchEnv.from_env({"WORLD_SIZE": "1", "RANK": "0"}))


# ------------------------------------------------------------------------------ a lost peer

@pytest.mark.parametrize(("world", "rank", "prefix"), [
    (2, 0, "lost a peer (rank 1): "),  # the only other rank: certain
    (2, 1, "lost a peer (rank 0): "),
    (4, 2, "lost a peer of rank 2: "),  # gloo and NCCL do not say which
])
def test_a_lost_peer_is_named_when_certain(capsys, world, rank, prefix):
    layout = ParallelLayout(world_size=world, rank=rank, tp=1, dp=world, sp=False, tp_rank=0,
                            dp_rank=rank)
    err = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:40211")
    assert peer_lost(err, layout) == 1
    assert capsys.readouterr().err == f"{prefix}{' '.join(str(err).split())}\n"
