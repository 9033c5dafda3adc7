"""The run directory: one run at a time, and an earlier run is never replaced without being asked.

**Lock.** Rank 0 takes `RUN_DIR/.lock` before any process group exists and gives it back when the
run ends; a second run on the same directory stops with `ConfigError: train.run_dir: in use by host
H pid P`. The lock is a file created by `link(2)` of a fully written temporary file, the way
open(2)'s manual recommends for NFS: the create is atomic on a shared filesystem, where
fcntl/flock locks are not reliable, and a reader never sees a half-written owner (a filesystem
without hard links gets an O_EXCL create, also atomic). A lock whose
owner is known to be gone is taken over, with a warning:
  - same host, and that pid no longer runs (or runs a process started at another time, or is this
    very process: a restarted container reuses pids);
  - same launcher job (`SLURM_JOB_ID`, or torchrun's `TORCHELASTIC_RUN_ID`) at an earlier restart
    (`SLURM_RESTART_COUNT`, `TORCHELASTIC_RESTART_COUNT`): a requeued or restarted job, whose
    previous incarnation the launcher has ended, may land on another node.
Any other lock is refused: from another host, liveness cannot be checked. If that run is really
gone (its node died), delete the lock file by hand; the error message names it.

**Earlier runs.** `train.resume=none` in a directory that holds checkpoints is refused, unless
`train.overwrite=true`, which moves the earlier run's files into `RUN_DIR/replaced-<time>/` (and
says so) rather than deleting them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.checkpoint import latest_checkpoint
from engine.config import ConfigError
from engine.log import get_logger

log = get_logger(__name__)

LOCK_NAME = ".lock"
_NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)
KEY = "train.run_dir"
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.yaml", "tensorboard")  # what a run writes


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of process `pid`'s /proc stat line (Linux), or None where there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()  # after the command name, which may hold spaces


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux /proc), or None."""
    fields = _stat_fields(pid)
    return fields[19] if fields else None  # field 22


def _launcher_job(env: dict[str, str]) -> tuple[str, list[int]]:
    """(job id, restart counts) of the launcher; "" when this process is not part of a job."""
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    job = f"slurm:{env['SLURM_JOB_ID']}" if env.get("SLURM_JOB_ID") else \
        (f"torchrun:{run_id}" if run_id not in ("", "none") else "")
    restarts = [int(env.get("SLURM_RESTART_COUNT") or 0),
                int(env.get("TORCHELASTIC_RESTART_COUNT") or 0)]
    return job, restarts


@dataclass(frozen=True)
class Owner:
    """Who holds a run directory's lock."""

    host: str
    pid: int
    started: str | None  # the process's start time (Linux), to tell a reused pid
    job: str  # launcher job id, "" outside one
    restarts: list[int]  # the job's restart counts when it took the lock
    token: str  # unique per acquisition

    @classmethod
    def this_process(cls) -> Owner:
        job, restarts = _launcher_job(dict(os.environ))
        return cls(host=socket.gethostname(), pid=os.getpid(), started=_process_start(os.getpid()),
                   job=job, restarts=restarts, token=secrets.token_hex(8))

    def gone_because(self, me: Owner) -> str | None:
        """Why this owner is known to have ended, seen from `me`; None when it may be running."""
        if self.job and self.job == me.job and self.restarts < me.restarts:
            return f"an earlier run of job {self.job}"
        if self.host != me.host:
            return None
        if self.pid == me.pid:
            return "this process's own pid, left by an earlier process"
        started = _process_start(self.pid)
        if not _pid_alive(self.pid):
            return "its process has exited"
        if started is not None and self.started is not None and started != self.started:
            return "its pid now belongs to another process"
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    # A killed rank stays a zombie until its parent (or, once torchrun is gone too, init) reaps
    # it: signals still reach its pid, but it has ended and holds nothing.
    fields = _stat_fields(pid)
    return not (fields and fields[0] in ("Z", "X"))


def _read_owner(path: Path) -> Owner | None:
    """The lock's owner; None when there is no lock (any more)."""
    for _ in range(10):
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            break
        if text:
            try:
                return Owner(**json.loads(text))
            except (ValueError, TypeError):
                break
        time.sleep(0.2)  # an O_EXCL lock being written (filesystems without hard links)
    raise ConfigError(KEY, f"{path} is not a readable lock file; if no run uses {path.parent}, "
                           "delete it")


class RunDirLock:
    """The lock on one run directory (see the module docstring). `acquire` raises ConfigError."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.owner = Owner.this_process()
        self.held = False

    def acquire(self) -> RunDirLock:
        make_run_dir(self.run_dir)
        for _ in range(5):  # each round either takes the lock, refuses, or clears a stale one
            if self._try_create():
                self.held = True
                return self
            holder = _read_owner(self.path)
            if holder is None:
                continue  # released meanwhile
            reason = holder.gone_because(self.owner)
            if reason is None:
                raise ConfigError(KEY, f"in use by host {holder.host} pid {holder.pid} (lock "
                                       f"{self.path}; if that run is gone, delete the lock)")
            self._clear_stale(holder, reason)
        raise ConfigError(KEY, f"could not take the lock {self.path}: other runs keep taking it")

    def _try_create(self) -> bool:
        """Create the lock with link(2): atomic, also on NFS, where link may report a failure
        that happened to succeed, so the link count decides. Filesystems without hard links get
        an O_EXCL create instead (atomic too; a reader may briefly find it empty)."""
        content = json.dumps(asdict(self.owner))
        scratch = self.path.with_name(f"{LOCK_NAME}.{self.owner.token}.tmp")
        scratch.write_text(content)
        try:
            os.link(scratch, self.path)
        except FileExistsError:
            pass
        except OSError as err:
            if err.errno in _NO_HARD_LINKS:
                scratch.unlink()
                return self._create_exclusive(content)
            if scratch.stat().st_nlink != 2:
                scratch.unlink()
                raise ConfigError(KEY, f"cannot create the lock {self.path}: {err.strerror}") from None
        created = scratch.stat().st_nlink == 2
        scratch.unlink()
        return created

    def _create_exclusive(self, content: str) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(content)
        return True

    def _clear_stale(self, holder: Owner, reason: str) -> None:
        """Move the stale lock aside, then make sure it was that one (a racing run may have
        replaced it meanwhile: put that one back)."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.owner.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = _read_owner(aside)
        if moved is not None and moved.token != holder.token:
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        else:
            log.warning("taking over the lock of host %s pid %d on %s: %s", holder.host,
                        holder.pid, self.run_dir, reason)
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if it is still this run's."""
        if not self.held:
            return
        self.held = False
        try:
            holder = _read_owner(self.path)
        except ConfigError:
            return
        if holder is not None and holder.token == self.owner.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def make_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(KEY, f"{run_dir} is a file, not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(KEY, f"cannot create {run_dir}: {err.strerror}") from None


def check_run_dir(run_dir: str | Path, *, resume: str, overwrite: bool) -> None:
    """Before any process group, on every rank: the directory can be used and this run does not
    silently replace an earlier one (`train.resume=none` over checkpoints needs
    `train.overwrite=true`). Reads only."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(KEY, f"{run_dir} is a file, not a directory")
    earlier = latest_checkpoint(run_dir / "checkpoints")
    if resume == "none" and earlier is not None and not overwrite:
        raise ConfigError("train.resume", f"is none, but {run_dir} holds the checkpoints of an "
                                          f"earlier run (newest {earlier.name}): continue it with "
                                          "train.resume=auto, choose another train.run_dir, or "
                                          "pass train.overwrite=true to move that run aside")


def set_aside_earlier_run(run_dir: str | Path) -> Path | None:
    """`train.overwrite`: move what an earlier run wrote into `run_dir/replaced-<time>/`; returns
    that directory (None when there was nothing). Rank 0, holding the lock, before the run."""
    run_dir = Path(run_dir)
    present = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not present:
        return None
    aside = run_dir / time.strftime("replaced-%Y%m%d-%H%M%S")
    while aside.exists():
        aside = aside.with_name(aside.name + "x")
    aside.mkdir()
    for name in present:
        (run_dir / name).rename(aside / name)
    log.warning("train.overwrite: moved the earlier run's %s to %s", ", ".join(present), aside)
    return aside


def claim_run_dir(run_dir: str | Path, *, overwrite: bool) -> RunDirLock:
    """Rank 0, before any process group: lock the run directory, then (train.overwrite) move an
    earlier run aside. Release the returned lock when the run ends."""
    lock = RunDirLock(run_dir).acquire()
    if overwrite:
        set_aside_earlier_run(run_dir)
    return lock
