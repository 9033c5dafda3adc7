"""The parallel layout: tensor-, sequence-, pipeline- and data-parallel coordinates and their groups.

One `ParallelLayout` is built per process (by `init_parallel` from torchrun's environment, or by
`make_layout` once the default process group exists) and passed explicitly to every layer, loss and
trainer. There is no module-level parallel state. It answers every rank question: a chunk's
virtual stage (`virtual_stage`), a peer's global rank (`global_rank`), either role's degrees
(`students`, `teachers`: their `RankOrder`s, e.g. `layout.students.dp`). The rank order itself is
`RankOrder`'s, defined once.

Each pipeline also has an embedding group, its first and last stage (same TP rank), which keeps a
tied embedding's two copies in sync. With `teacher_ranks > 0` the last `teacher_ranks` ranks of the
world run only the teacher, at their own TP degree `teacher_tp` (default: the students'), with no
pipeline, their own TP/DP groups and sequence parallelism when `sp` and `teacher_tp > 1`; the first
ranks are the students. With `teacher_cp` > 1 the teacher ranks split each sequence over their
own CP groups (next to their TP ranks, as the students'). An MoE teacher there splits its experts
over `teacher_ep` of its DP ranks, placed as the students' `ep` is below. The teacher's DP degree
(`teacher_ranks / (teacher_tp x teacher_cp)`) must divide the
students' (one teacher replica serves several student replicas).

Expert parallelism (`ep`, Megatron's placement) lives inside data x context parallelism: the DP x CP
ranks of one (TP, PP) position (DP-major, their `dp_cp_index`) are cut into blocks of `ep`
consecutive ranks; the ranks of a block form an EP group (they hold different experts and exchange
tokens), and the ranks at the same place of every block form the expert-DP group (`dp x cp / ep`
ranks holding the same experts, which sum those experts' gradients). Dense parameters keep the
whole DP x CP group. Without CP these are blocks of DP ranks.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from engine.config import ConfigError, check

STUDENT = "student"
TEACHER = "teacher"


@dataclass(frozen=True)
class RankOrder:
    """How the ranks of one role are numbered: TP fastest, then CP, then PP, then DP, from `offset`
    (the students start at 0, the teacher ranks follow them). Megatron's order, for a reason: the
    more often a degree's ranks talk, the closer they sit. TP exchanges activations in every layer,
    so its groups are contiguous ranks (one node, its fastest links); CP exchanges keys and values
    in every attention layer, so it comes next; PP sends once per stage boundary; DP reduces
    gradients once per step and may span nodes. A new degree takes its place in the order here and
    only here (expert parallelism lives inside DP); `RankLists` and the layout follow."""

    size: int  # ranks of the role
    tp: int = 1
    pp: int = 1
    offset: int = 0  # global rank of the role's first process
    cp: int = 1  # context parallelism: each sequence split over this many ranks

    @property
    def dp(self) -> int:
        return self.size // (self.tp * self.pp * self.cp)

    def rank(self, *, tp: int = 0, pp: int = 0, dp: int = 0, cp: int = 0) -> int:
        """Global rank of the process with these coordinates."""
        return self.offset + ((dp * self.pp + pp) * self.cp + cp) * self.tp + tp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp, pp, dp) coordinates of global `rank`, one of this role's (`cp_coord`: its CP one)."""
        local = rank - self.offset
        return (local % self.tp, local // (self.tp * self.cp) % self.pp,
                local // (self.tp * self.cp * self.pp))

    def cp_coord(self, rank: int) -> int:
        """The CP coordinate of global `rank`."""
        return (rank - self.offset) // self.tp % self.cp


def virtual_stage(chunk: int, *, pp: int, pp_rank: int) -> int:
    """Megatron's interleaved placement: chunk c of pipeline rank r runs virtual stage c * pp + r,
    so a micro-batch visits ranks 0, 1, .., pp-1 once per chunk (engine/pipeline.py)."""
    return chunk * pp + pp_rank


def stage_owner(virtual: int, *, pp: int) -> tuple[int, int]:
    """(pipeline rank, chunk) that runs `virtual` stage: the inverse of `virtual_stage`."""
    return virtual % pp, virtual // pp


BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1  # tensor-parallel degree (contiguous ranks)
    pp: int = 1  # pipeline-parallel stages of the student (ranks strided by tp)
    virtual_stages: int = 1  # model chunks per pipeline rank (> 1: interleaved 1F1B)
    sp: bool = False  # sequence parallelism over the TP group (needs tp > 1)
    cp: int = 1  # context parallelism: each sequence split over this many ranks (next to TP)
    ep: int = 1  # expert parallelism: each MoE block's experts split over this many DP x CP ranks
    etp: int = 1  # expert tensor parallelism: 1 (whole experts) or tp (each expert split over TP)
    teacher_ranks: int = 0  # ranks that run only the teacher (schedule teacher_ranks)
    teacher_tp: int | None = None  # TP degree of the teacher ranks (default: parallel.tp)
    teacher_cp: int = 1  # context-parallel degree of the teacher ranks (any student CP degree)
    teacher_ep: int = 1  # expert parallelism of an MoE teacher on teacher ranks (inside its DP)
    timeout_s: float = 600.0  # collective timeout: a dead peer ends the run after this long
    # auto: NCCL with CUDA, else gloo, no group for one process; nccl/gloo: always a group
    backend: str = "auto"

    def __post_init__(self):
        check(self.tp >= 1, "parallel.tp", f"must be >= 1 (got {self.tp})")
        check(self.ep >= 1, "parallel.ep", f"must be >= 1 (got {self.ep})")
        check(self.etp in (1, self.tp), "parallel.etp",
              f"must be 1 or parallel.tp={self.tp} (got {self.etp})")
        check(self.cp >= 1, "parallel.cp", f"must be >= 1 (got {self.cp})")
        check(self.pp >= 1, "parallel.pp", f"must be >= 1 (got {self.pp})")
        check(self.virtual_stages >= 1, "parallel.virtual_stages",
              f"must be >= 1 (got {self.virtual_stages})")
        check(self.virtual_stages == 1 or self.pp > 1, "parallel.virtual_stages",
              f"{self.virtual_stages} virtual stages need parallel.pp > 1")
        check(not self.sp or self.tp > 1, "parallel.sp", "sequence parallelism needs parallel.tp > 1")
        check(self.teacher_ranks >= 0, "parallel.teacher_ranks",
              f"must be >= 0 (got {self.teacher_ranks})")
        check(self.timeout_s > 0, "parallel.timeout_s", f"must be > 0 (got {self.timeout_s})")
        check(self.backend in BACKENDS, "parallel.backend",
              f"must be one of {', '.join(BACKENDS)} (got {self.backend!r})")
        check(self.teacher_tp is None or self.teacher_tp >= 1, "parallel.teacher_tp",
              f"must be >= 1 (got {self.teacher_tp})")
        check(self.teacher_cp >= 1, "parallel.teacher_cp", f"must be >= 1 (got {self.teacher_cp})")
        check(self.teacher_cp == 1 or self.teacher_ranks > 0, "parallel.teacher_cp",
              "only applies with parallel.teacher_ranks > 0")
        check(self.teacher_tp is None or self.teacher_ranks > 0, "parallel.teacher_tp",
              "only applies with parallel.teacher_ranks > 0")
        check(self.teacher_ep >= 1, "parallel.teacher_ep", f"must be >= 1 (got {self.teacher_ep})")
        check(self.teacher_ep == 1 or self.teacher_ranks > 0, "parallel.teacher_ep",
              "only applies with parallel.teacher_ranks > 0")

    @property
    def teacher_tp_degree(self) -> int:
        """The teacher ranks' TP degree: `teacher_tp`, or the students' `tp` when unset."""
        return self.tp if self.teacher_tp is None else self.teacher_tp

    def rank_order(self, role: str, world_size: int) -> RankOrder:
        """How `role`'s ranks are numbered in a world of `world_size` (students first)."""
        students = world_size - self.teacher_ranks
        if role == STUDENT:
            return RankOrder(size=students, tp=self.tp, pp=self.pp, cp=self.cp)
        return RankOrder(size=self.teacher_ranks, tp=self.teacher_tp_degree, cp=self.teacher_cp,
                         offset=students)


class LayoutError(ConfigError):
    """A parallel layout that cannot work (raised before any process group is created); `key` is
    the setting to change."""


@dataclass(frozen=True)
class ParallelLayout:
    """Where this process sits: its role, its TP/PP/DP coordinates and the groups that connect
    them."""

    world_size: int
    rank: int
    tp: int
    dp: int
    sp: bool
    tp_rank: int
    dp_rank: int
    role: str = STUDENT
    pp: int = 1
    pp_rank: int = 0
    virtual_stages: int = 1  # model chunks per pipeline rank
    pp_ranks: tuple[int, ...] = (0,)  # global ranks of this pipeline, stage 0 first
    ep: int = 1  # expert-parallel degree (a divisor of dp x cp)
    ep_rank: int = 0  # this rank's place in its EP group (dp_cp_index % ep)
    etp: int = 1  # expert tensor parallelism: 1, or tp (each routed expert split over TP)
    cp: int = 1  # context-parallel degree: each sequence split over cp ranks
    cp_rank: int = 0
    students: RankOrder | None = None  # the students' numbering (None: the whole world, tp, pp)
    teachers: RankOrder | None = None  # the teacher ranks' numbering (None: none)
    tp_group: dist.ProcessGroup | None = field(default=None, repr=False, compare=False)
    dp_group: dist.ProcessGroup | None = field(default=None, repr=False, compare=False)
    role_group: dist.ProcessGroup | None = field(default=None, repr=False, compare=False)
    pp_group: dist.ProcessGroup | None = field(default=None, repr=False, compare=False)
    ep_group: dist.ProcessGroup | None = field(default=None, repr=False, compare=False)
    cp_group: dist.ProcessGroup | None = field(default=None, repr=False, compare=False)
    # the ranks with the same parameters and other tokens: DP x CP (gradients, token counts)
    dp_cp_group: dist.ProcessGroup | None = field(default=None, repr=False, compare=False)
    # the DP x CP ranks holding the same experts as this one (dp x cp / ep of them)
    expert_dp_group: dist.ProcessGroup | None = field(default=None, repr=False, compare=False)
    # the first and last stage of this pipeline (None without PP, and on the middle stages)
    embedding_group: dist.ProcessGroup | None = field(default=None, repr=False, compare=False)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        if self.students is None:
            object.__setattr__(self, "students",
                               RankOrder(size=self.world_size, tp=self.tp, pp=self.pp))
        if self.teachers is None:
            object.__setattr__(self, "teachers",
                               RankOrder(size=0, tp=self.tp, offset=self.world_size))
        if self.cp == 1:
            object.__setattr__(self, "dp_cp_group", self.dp_group)
        if self.ep == 1:  # every DP x CP rank holds every expert
            object.__setattr__(self, "expert_dp_group", self.dp_cp_group)

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> ParallelLayout:
        """The layout of one process with no communication at all."""
        return cls(world_size=1, rank=0, tp=1, dp=1, sp=False, tp_rank=0, dp_rank=0,
                   device=torch.device(device))

    @property
    def dp_cp_index(self) -> int:
        """This rank's place in its DP x CP group (DP-major): what EP groups are cut from."""
        return self.dp_rank * self.cp + self.cp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def teacher_ranks(self) -> int:
        return self.teachers.size

    @property
    def student_world(self) -> int:
        return self.students.size

    @property
    def teacher_tp(self) -> int:
        return self.teachers.tp

    @property
    def is_teacher(self) -> bool:
        return self.role == TEACHER

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def global_rank(self, *, tp: int = 0, pp: int = 0, dp: int = 0, cp: int = 0,
                    role: str | None = None) -> int:
        """Global rank of the process of `role` (None: this process's) with these coordinates."""
        return (self.teachers if (role or self.role) == TEACHER else self.students).rank(
            tp=tp, pp=pp, dp=dp, cp=cp)

    def virtual_stage(self, chunk: int) -> int:
        """The virtual stage this rank's model `chunk` runs."""
        return virtual_stage(chunk, pp=self.pp, pp_rank=self.pp_rank)


def validate_layout(parallel: ParallelConfig, world_size: int) -> None:
    """Raise `LayoutError` where `parallel` does not fit a world of `world_size` ranks; the
    degrees themselves are ParallelConfig's to check. Cheap, touches no process group: the edge
    that reads the config (or a tool's flags) runs it once, before `init_parallel`, which trusts
    its layout."""
    tp, pp, teacher_ranks = parallel.tp, parallel.pp, parallel.teacher_ranks
    students = parallel.rank_order(STUDENT, world_size).size
    if students < 1:
        raise LayoutError("parallel.teacher_ranks", f"parallel.teacher_ranks={teacher_ranks} "
                                                    f"leaves no student rank in a world of {world_size}")
    if tp > students:
        raise LayoutError("parallel.tp", f"parallel.tp={tp} is larger than the {students} student "
                                         "ranks")
    if students % tp:
        raise LayoutError("parallel.tp", f"parallel.tp={tp} does not divide the {students} "
                                         "student ranks")
    if students % (tp * pp):
        raise LayoutError("parallel.pp", f"parallel.tp={tp} x parallel.pp={pp} does not divide "
                                         f"the {students} student ranks")
    if students % (tp * pp * parallel.cp):
        raise LayoutError("parallel.cp", f"parallel.tp={tp} x parallel.cp={parallel.cp} x parallel.pp="
                                         f"{pp} does not divide the {students} student ranks")
    dp = students // (tp * pp * parallel.cp)
    if dp * parallel.cp % parallel.ep:
        cp = f" x parallel.cp={parallel.cp}" if parallel.cp > 1 else ""
        raise LayoutError("parallel.ep", f"parallel.ep={parallel.ep} does not divide the "
                                         f"data-parallel degree {dp}{cp} (experts are split over "
                                         "DP x CP ranks)")
    if teacher_ranks:
        _validate_teacher_layout(parallel, world_size)


def _validate_teacher_layout(parallel: ParallelConfig, world_size: int) -> None:
    key = "parallel.tp" if parallel.teacher_tp is None else "parallel.teacher_tp"
    teacher_tp, teacher_ranks = parallel.teacher_tp_degree, parallel.teacher_ranks
    if teacher_ranks % teacher_tp:
        raise LayoutError(key, f"{key}={teacher_tp} does not divide "
                               f"parallel.teacher_ranks={teacher_ranks}")
    if teacher_ranks % (teacher_tp * parallel.teacher_cp):
        raise LayoutError("parallel.teacher_cp", f"{key}={teacher_tp} x parallel.teacher_cp="
                                                 f"{parallel.teacher_cp} does not divide "
                                                 f"parallel.teacher_ranks={teacher_ranks}")
    student_dp = parallel.rank_order(STUDENT, world_size).dp
    teacher_dp = parallel.rank_order(TEACHER, world_size).dp
    if student_dp % teacher_dp:
        raise LayoutError("parallel.teacher_ranks",
                          f"the teacher's data-parallel degree {teacher_dp} (parallel.teacher_ranks"
                          f"={teacher_ranks} / {key}={teacher_tp}) does not divide the students' "
                          f"{student_dp}: each teacher replica must serve whole student replicas")
    if teacher_dp % parallel.teacher_ep:
        raise LayoutError("parallel.teacher_ep",
                          f"parallel.teacher_ep={parallel.teacher_ep} does not divide the teacher's "
                          f"data-parallel degree {teacher_dp} (parallel.teacher_ranks={teacher_ranks}"
                          f" / {key}={teacher_tp}; its experts are split over its DP ranks)")


def _new_groups(ranks_lists: list[list[int]], my_rank: int,
                timeout: datetime.timedelta | None) -> dist.ProcessGroup | None:
    """Create every group (all ranks must take part) and return the one containing `my_rank`.
    Each group gets the run's collective timeout: a hung peer must end the run, whichever group
    it hangs in."""
    mine = None
    for ranks in ranks_lists:
        group = dist.new_group(ranks, timeout=timeout)
        if my_rank in ranks:
            mine = group
    return mine


@dataclass(frozen=True)
class RankLists:
    """Every group of one role as lists of global ranks (numbered by `RankOrder`)."""

    tp: list[list[int]]
    pp: list[list[int]]
    dp: list[list[int]]
    embedding: list[list[int]]  # first and last stage of each pipeline ([] without PP)
    ep: list[list[int]]  # blocks of `ep` consecutive DP x CP ranks
    expert_dp: list[list[int]]  # the same place in every block
    cp: list[list[int]]  # the ranks that share one sequence
    dp_cp: list[list[int]]  # the same parameters, other tokens

    @classmethod
    def of(cls, order: RankOrder, ep: int = 1) -> RankLists:
        tps, pps, dps, cps = range(order.tp), range(order.pp), range(order.dp), range(order.cp)

        def rank(t: int, p: int, d: int, c: int) -> int:
            return order.rank(tp=t, pp=p, dp=d, cp=c)

        pipelines = [[rank(t, p, d, c) for p in pps] for d in dps for c in cps for t in tps]
        dp_lists = [[rank(t, p, d, c) for d in dps] for p in pps for c in cps for t in tps]
        dp_cp_lists = [[rank(t, p, d, c) for d in dps for c in cps] for p in pps for t in tps]
        return cls(tp=[[rank(t, p, d, c) for t in tps] for d in dps for p in pps for c in cps],
                   pp=pipelines, dp=dp_lists,
                   embedding=[[ranks[0], ranks[-1]] for ranks in pipelines] if order.pp > 1 else [],
                   ep=[ranks[b:b + ep] for ranks in dp_cp_lists for b in range(0, len(ranks), ep)],
                   expert_dp=[ranks[e::ep] for ranks in dp_cp_lists for e in range(ep)],
                   cp=[[rank(t, p, d, c) for c in cps] for d in dps for p in pps for t in tps],
                   dp_cp=dp_cp_lists)


def _find(lists: list[list[int]], rank: int) -> list[int]:
    return next((ranks for ranks in lists if rank in ranks), [rank])


@dataclass(frozen=True)
class _RoleGroups:
    """One role's groups, as this process sees them (None where it is not a member)."""

    lists: RankLists
    tp: dist.ProcessGroup | None
    dp: dist.ProcessGroup | None
    role: dist.ProcessGroup | None
    pp: dist.ProcessGroup | None
    embedding: dist.ProcessGroup | None
    ep: dist.ProcessGroup | None
    expert_dp: dist.ProcessGroup | None
    cp: dist.ProcessGroup | None
    dp_cp: dist.ProcessGroup | None

    @classmethod
    def create(cls, order: RankOrder, rank: int, timeout: datetime.timedelta,
               ep: int = 1) -> _RoleGroups:
        """Every rank of the world calls it for every role (group creation is collective)."""
        lists = RankLists.of(order, ep)
        experts = ep > 1  # without EP the expert groups are the DP group and one rank each
        return cls(lists, tp=_new_groups(lists.tp, rank, timeout),
                   dp=_new_groups(lists.dp, rank, timeout),
                   role=_new_groups([list(range(order.offset, order.offset + order.size))], rank,
                                    timeout),
                   pp=_new_groups(lists.pp, rank, timeout) if order.pp > 1 else None,
                   embedding=_new_groups(lists.embedding, rank, timeout),
                   ep=_new_groups(lists.ep, rank, timeout) if experts else None,
                   expert_dp=_new_groups(lists.expert_dp, rank, timeout) if experts else None,
                   cp=_new_groups(lists.cp, rank, timeout) if order.cp > 1 else None,
                   dp_cp=_new_groups(lists.dp_cp, rank, timeout) if order.cp > 1 else None)


def make_layout(parallel: ParallelConfig, *,
                device: torch.device | str | None = None) -> ParallelLayout:
    """Build `parallel`'s layout over the already-initialized default process group (or a single
    process); `validate_layout` has checked it against the world. `pp` and `virtual_stages` apply
    to the students (teacher ranks have no pipeline). Every group it creates times out after
    `parallel.timeout_s`."""
    if not dist.is_available() or not dist.is_initialized():
        return ParallelLayout.single(device or "cpu")
    world, rank = dist.get_world_size(), dist.get_rank()
    orders = {role: parallel.rank_order(role, world) for role in (STUDENT, TEACHER)}
    timeout = datetime.timedelta(seconds=parallel.timeout_s)
    eps = {STUDENT: parallel.ep, TEACHER: parallel.teacher_ep}
    groups = {role: _RoleGroups.create(order, rank, timeout, eps[role])
              for role, order in orders.items() if order.size}
    role = STUDENT if rank < orders[TEACHER].offset else TEACHER
    mine, order = groups[role], orders[role]
    tp_rank, pp_rank, dp_rank = order.coords(rank)
    return ParallelLayout(
        world_size=world, rank=rank, tp=order.tp, dp=order.dp, sp=parallel.sp and order.tp > 1,
        tp_rank=tp_rank, dp_rank=dp_rank, role=role, pp=order.pp, pp_rank=pp_rank,
        virtual_stages=parallel.virtual_stages if role == STUDENT else 1,
        pp_ranks=tuple(_find(mine.lists.pp, rank)), students=orders[STUDENT],
        teachers=orders[TEACHER], tp_group=mine.tp, dp_group=mine.dp, role_group=mine.role,
        pp_group=mine.pp, embedding_group=mine.embedding, ep=eps[role],
        ep_rank=(dp_rank * order.cp + order.cp_coord(rank)) % eps[role],
        etp=parallel.etp if role == STUDENT else 1,
        ep_group=mine.ep, expert_dp_group=mine.expert_dp, cp=order.cp, cp_rank=order.cp_coord(rank),
        cp_group=mine.cp, dp_cp_group=mine.dp_cp, device=torch.device(device or "cpu"))


ENV_KEY = "environment"  # the ConfigError key of a broken launcher environment


def _env_int(env: Mapping[str, str], name: str, default: str | None = None) -> int:
    raw = env.get(name, default)
    if raw is None:
        raise ConfigError(ENV_KEY, f"{name} is not set (start the processes with torchrun, which "
                                   "sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(ENV_KEY, f"{name}={raw!r} is not an integer") from None


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun (or SLURM through torchrun) tells this process about the world; parsed once
    per process, by `from_env`, before anything else happens."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> LaunchEnv:
        """Parse and check the launcher's variables; a broken environment is a
        `ConfigError: environment: ...`. With no WORLD_SIZE this is one process, rank 0."""
        world = _env_int(env, "WORLD_SIZE", "1")
        if world < 1:
            raise ConfigError(ENV_KEY, f"WORLD_SIZE={world} must be >= 1")
        rank = _env_int(env, "RANK", None if world > 1 else "0")
        if not 0 <= rank < world:
            raise ConfigError(ENV_KEY, f"RANK={rank} is outside WORLD_SIZE={world} "
                                       f"(0..{world - 1})")
        # LOCAL_RANK only picks the device on this node; the global RANK decides everything else.
        local_rank = _env_int(env, "LOCAL_RANK", str(rank))
        if world > 1 and not (dist.is_available() and dist.is_initialized()):
            for name in ("MASTER_ADDR", "MASTER_PORT"):
                if not env.get(name):
                    raise ConfigError(ENV_KEY, f"WORLD_SIZE={world} but {name} is not set (start "
                                               "the processes with torchrun)")
        return cls(rank=rank, world_size=world, local_rank=local_rank)


def init_parallel(parallel: ParallelConfig, *, backend: str | None = None,
                  launch: LaunchEnv | None = None) -> ParallelLayout:
    """Initialize torch.distributed from the launcher's environment (`launch`, parsed from
    os.environ when not given) and build `parallel`'s layout (checked by `validate_layout`).

    The backend is `backend`, else `parallel.backend`; "auto" (or None) is NCCL when CUDA is
    present, gloo otherwise, and with WORLD_SIZE unset or 1 no process group is created and the
    layout is local. A named backend always creates a group, a world of one included (how a single
    GPU exercises NCCL through the real entry point).
    """
    launch = launch or LaunchEnv.from_env()
    backend = backend or (None if parallel.backend == "auto" else parallel.backend)
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend", "nccl needs a CUDA GPU, and none is visible")
    use_cuda = torch.cuda.is_available() if backend in (None, "nccl") else False
    device = torch.device(f"cuda:{launch.local_rank % torch.cuda.device_count()}") if use_cuda \
        else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if launch.world_size == 1 and backend is None:
        return ParallelLayout.single(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend or ("nccl" if use_cuda else "gloo"), rank=launch.rank,
            world_size=launch.world_size, timeout=datetime.timedelta(seconds=parallel.timeout_s),
            device_id=device if use_cuda else None)
    return make_layout(parallel, device=device)


# How gloo and NCCL word a collective that failed because a peer died or stopped answering. DDP's
# backward re-raises them as plain RuntimeErrors, so the type alone does not tell.
_PEER_FAILURE_MARKERS = ("Timed out", "timed out", "Timeout", "Connection closed by peer",
                         "Connection reset by peer", "Broken pipe", "NCCL error",
                         "NCCL communicator was aborted")


def is_peer_failure(err: BaseException) -> bool:
    """Whether `err` is a collective that failed on a dead or hung peer (not a bug to trace)."""
    if isinstance(err, dist.DistError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _PEER_FAILURE_MARKERS)


def destroy_parallel() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
