"""The parallel layout: tensor-, sequence-, pipeline- and data-parallel coordinates and their groups.

One `ParallelLayout` is built per process (by `init_parallel` from torchrun's environment, or by
`make_layout` once the default process group exists) and passed explicitly to every layer, loss and
trainer. There is no module-level parallel state.

Rank numbering follows Megatron: within a role, TP is fastest, then PP, then DP. The student of
coordinates (dp, pp, tp) is rank dp * (pp_size * tp_size) + pp * tp_size + tp: TP groups are
contiguous ranks, pipeline (PP) groups are strided by TP, DP groups by TP * PP. Each pipeline also
has an embedding group, its first and last stage (same TP rank), which keeps a tied embedding's two
copies in sync. With `teacher_ranks > 0` the last `teacher_ranks` ranks of the world run only the
teacher, at their own TP degree `teacher_tp` (default: the students'), with no pipeline, their own
TP/DP groups and sequence parallelism when `sp` and `teacher_tp > 1`; the first ranks are the
students. The teacher's DP degree (`teacher_ranks / teacher_tp`) must divide the students' (one
teacher replica serves several student replicas).
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
class ParallelConfig:
    tp: int = 1  # tensor-parallel degree (contiguous ranks)
    pp: int = 1  # pipeline-parallel stages of the student (ranks strided by tp)
    virtual_stages: int = 1  # model chunks per pipeline rank (> 1: interleaved 1F1B)
    sp: bool = False  # sequence parallelism over the TP group (needs tp > 1)
    teacher_ranks: int = 0  # ranks that run only the teacher (schedule teacher_ranks)
    teacher_tp: int | None = None  # TP degree of the teacher ranks (default: parallel.tp)
    timeout_s: float = 600.0  # collective timeout: a dead peer ends the run after this long

    def __post_init__(self):
        check(self.tp >= 1, "parallel.tp", f"must be >= 1 (got {self.tp})")
        check(self.pp >= 1, "parallel.pp", f"must be >= 1 (got {self.pp})")
        check(self.virtual_stages >= 1, "parallel.virtual_stages",
              f"must be >= 1 (got {self.virtual_stages})")
        check(self.virtual_stages == 1 or self.pp > 1, "parallel.virtual_stages",
              f"{self.virtual_stages} virtual stages need parallel.pp > 1")
        check(not self.sp or self.tp > 1, "parallel.sp", "sequence parallelism needs parallel.tp > 1")
        check(self.teacher_ranks >= 0, "parallel.teacher_ranks",
              f"must be >= 0 (got {self.teacher_ranks})")
        check(self.timeout_s > 0, "parallel.timeout_s", f"must be > 0 (got {self.timeout_s})")
        check(self.teacher_tp is None or self.teacher_tp >= 1, "parallel.teacher_tp",
              f"must be >= 1 (got {self.teacher_tp})")
        check(self.teacher_tp is None or self.teacher_ranks > 0, "parallel.teacher_tp",
              "only applies with parallel.teacher_ranks > 0")

    @property
    def teacher_tp_degree(self) -> int:
        """The teacher ranks' TP degree: `teacher_tp`, or the students' `tp` when unset."""
        return self.tp if self.teacher_tp is None else self.teacher_tp


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
    teacher_ranks: int = 0
    pp: int = 1
    pp_rank: int = 0
    virtual_stages: int = 1  # model chunks per pipeline rank
    pp_ranks: tuple[int, ...] = (0,)  # global ranks of this pipeline, stage 0 first
    student_tp: int = 0  # the students' TP degree (0: `tp`)
    teacher_tp: int = 0  # the teacher ranks' TP degree (0: `tp`)
    student_pp: int = 1  # the students' PP degree (= pp on a student; teacher ranks serve them)
    tp_group: dist.ProcessGroup | None = field(default=None, repr=False, compare=False)
    dp_group: dist.ProcessGroup | None = field(default=None, repr=False, compare=False)
    role_group: dist.ProcessGroup | None = field(default=None, repr=False, compare=False)
    pp_group: dist.ProcessGroup | None = field(default=None, repr=False, compare=False)
    # the first and last stage of this pipeline (None without PP, and on the middle stages)
    embedding_group: dist.ProcessGroup | None = field(default=None, repr=False, compare=False)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        for name in ("student_tp", "teacher_tp"):
            if not getattr(self, name):
                object.__setattr__(self, name, self.tp)
        if self.role == STUDENT:
            object.__setattr__(self, "student_pp", self.pp)

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> ParallelLayout:
        """The layout of one process with no communication at all."""
        return cls(world_size=1, rank=0, tp=1, dp=1, sp=False, tp_rank=0, dp_rank=0,
                   device=torch.device(device))

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def student_world(self) -> int:
        return self.world_size - self.teacher_ranks

    @property
    def student_dp(self) -> int:
        """The students' DP degree, as the teacher ranks see it."""
        return self.student_world // (self.student_tp * self.student_pp)

    @property
    def teacher_dp(self) -> int:
        return self.teacher_ranks // self.teacher_tp

    @property
    def is_teacher(self) -> bool:
        return self.role == TEACHER

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def global_rank(self, *, role: str, dp_rank: int, tp_rank: int, pp_rank: int = 0) -> int:
        """Global rank of the process with these coordinates (students first, then teachers,
        which have no pipeline)."""
        if role == STUDENT:
            return (dp_rank * self.student_pp + pp_rank) * self.student_tp + tp_rank
        return self.student_world + dp_rank * self.teacher_tp + tp_rank


def validate_layout(*, world_size: int, tp: int, sp: bool, teacher_ranks: int = 0,
                    pp: int = 1, teacher_tp: int | None = None) -> None:
    """Raise `LayoutError` for a layout that cannot be built; cheap, touches no process group.
    `teacher_tp` None: the teacher ranks run at the students' `tp`."""
    if tp < 1:
        raise LayoutError("parallel.tp", f"must be >= 1 (got {tp})")
    if pp < 1:
        raise LayoutError("parallel.pp", f"must be >= 1 (got {pp})")
    if teacher_ranks < 0:
        raise LayoutError("parallel.teacher_ranks", f"must be >= 0 (got {teacher_ranks})")
    students = world_size - teacher_ranks
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
    if sp and tp == 1:
        raise LayoutError("parallel.sp", "parallel.sp=true needs parallel.tp > 1")
    if teacher_ranks:
        _validate_teacher_layout(students // (tp * pp), tp, teacher_ranks, teacher_tp)


def _validate_teacher_layout(student_dp: int, tp: int, teacher_ranks: int,
                             teacher_tp: int | None) -> None:
    key = "parallel.tp" if teacher_tp is None else "parallel.teacher_tp"
    teacher_tp = tp if teacher_tp is None else teacher_tp
    if teacher_tp < 1:
        raise LayoutError("parallel.teacher_tp", f"must be >= 1 (got {teacher_tp})")
    if teacher_ranks % teacher_tp:
        raise LayoutError(key, f"{key}={teacher_tp} does not divide "
                               f"parallel.teacher_ranks={teacher_ranks}")
    teacher_dp = teacher_ranks // teacher_tp
    if student_dp % teacher_dp:
        raise LayoutError("parallel.teacher_ranks",
                          f"the teacher's data-parallel degree {teacher_dp} (parallel.teacher_ranks"
                          f"={teacher_ranks} / {key}={teacher_tp}) does not divide the students' "
                          f"{student_dp}: each teacher replica must serve whole student replicas")


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
    """Every group of one role as lists of global ranks (TP fastest, then PP, then DP)."""

    tp: list[list[int]]
    pp: list[list[int]]
    dp: list[list[int]]
    embedding: list[list[int]]  # first and last stage of each pipeline ([] without PP)

    @classmethod
    def of(cls, offset: int, size: int, *, tp: int, pp: int = 1) -> RankLists:
        dp = size // (tp * pp)

        def rank(d: int, p: int, t: int) -> int:
            return offset + (d * pp + p) * tp + t

        pipelines = [[rank(d, p, t) for p in range(pp)] for d in range(dp) for t in range(tp)]
        return cls(tp=[[rank(d, p, t) for t in range(tp)] for d in range(dp) for p in range(pp)],
                   pp=pipelines,
                   dp=[[rank(d, p, t) for d in range(dp)] for p in range(pp) for t in range(tp)],
                   embedding=[[ranks[0], ranks[-1]] for ranks in pipelines] if pp > 1 else [])


def _find(lists: list[list[int]], rank: int) -> list[int]:
    return next((ranks for ranks in lists if rank in ranks), [rank])


def make_layout(*, tp: int = 1, sp: bool = False, teacher_ranks: int = 0, pp: int = 1,
                virtual_stages: int = 1, teacher_tp: int | None = None,
                device: torch.device | str | None = None, timeout_s: float | None = None) -> ParallelLayout:
    """Build the layout over the already-initialized default process group (or a single process).
    `pp` and `virtual_stages` apply to the students (teacher ranks have no pipeline), `teacher_tp`
    to the teacher ranks (None: `tp`). Every group
    it creates times out after `timeout_s` (None: torch's default)."""
    if not dist.is_available() or not dist.is_initialized():
        validate_layout(world_size=1, tp=tp, sp=sp, teacher_ranks=teacher_ranks, pp=pp,
                        teacher_tp=teacher_tp)
        return ParallelLayout.single(device or "cpu")
    world, rank = dist.get_world_size(), dist.get_rank()
    validate_layout(world_size=world, tp=tp, sp=sp, teacher_ranks=teacher_ranks, pp=pp,
                    teacher_tp=teacher_tp)
    students = world - teacher_ranks
    teacher_tp = tp if teacher_tp is None else teacher_tp
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    groups: dict[str, tuple] = {}
    for role, offset, size, role_tp, role_pp in ((STUDENT, 0, students, tp, pp),
                                                 (TEACHER, students, teacher_ranks, teacher_tp, 1)):
        if size == 0:
            continue
        lists = RankLists.of(offset, size, tp=role_tp, pp=role_pp)
        role_group = _new_groups([list(range(offset, offset + size))], rank, timeout)
        groups[role] = (lists, _new_groups(lists.tp, rank, timeout),
                        _new_groups(lists.dp, rank, timeout), role_group,
                        _new_groups(lists.pp, rank, timeout) if role_pp > 1 else None,
                        _new_groups(lists.embedding, rank, timeout))
    role = STUDENT if rank < students else TEACHER
    local = rank - (0 if role == STUDENT else students)
    lists, tp_group, dp_group, role_group, pp_group, embedding_group = groups[role]
    size, my_tp, role_pp = (students, tp, pp) if role == STUDENT else (teacher_ranks, teacher_tp, 1)
    return ParallelLayout(
        world_size=world, rank=rank, tp=my_tp, dp=size // (my_tp * role_pp), sp=sp and my_tp > 1,
        tp_rank=local % my_tp, dp_rank=local // (my_tp * role_pp), role=role,
        teacher_ranks=teacher_ranks, pp=role_pp, pp_rank=(local // my_tp) % role_pp,
        virtual_stages=virtual_stages if role == STUDENT else 1,
        pp_ranks=tuple(_find(lists.pp, rank)), student_tp=tp, teacher_tp=teacher_tp, student_pp=pp,
        tp_group=tp_group, dp_group=dp_group, role_group=role_group, pp_group=pp_group,
        embedding_group=embedding_group, device=torch.device(device or "cpu"))


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


def init_parallel(*, tp: int = 1, sp: bool = False, teacher_ranks: int = 0, pp: int = 1,
                  virtual_stages: int = 1, teacher_tp: int | None = None, timeout_s: float = 600.0,
                  backend: str | None = None, launch: LaunchEnv | None = None) -> ParallelLayout:
    """Validate the layout, initialize torch.distributed from the launcher's environment (`launch`,
    parsed from os.environ when not given), build the layout.

    NCCL when CUDA is present, gloo otherwise. With WORLD_SIZE unset or 1 and no explicit backend,
    no process group is created and the layout is local.
    """
    launch = launch or LaunchEnv.from_env()
    validate_layout(world_size=launch.world_size, tp=tp, sp=sp, teacher_ranks=teacher_ranks, pp=pp,
                    teacher_tp=teacher_tp)
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
            world_size=launch.world_size, timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if use_cuda else None)
    return make_layout(tp=tp, sp=sp, teacher_ranks=teacher_ranks, pp=pp,
                       virtual_stages=virtual_stages, teacher_tp=teacher_tp, device=device,
                       timeout_s=timeout_s)


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
