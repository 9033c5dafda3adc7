"""Sharded, atomic, verified checkpoints that resume exactly and load at another TP degree.

A checkpoint is a directory `root/step_{step:08d}/`:

    metadata.json              format, step, resolved config, parallel layout, vocab_size, every
                               file's size and sha256, every tensor's shard shape, dtype and split
    model_tp{t:03d}.safetensors    model shard of TP rank t (written by its DP rank 0)
    optim_tp{t:03d}.safetensors    optimizer state of TP rank t, keyed by parameter name
    (with PP: model_tp{t:03d}_pp{p:03d}.safetensors and optim_..., one per TP rank and stage)
    rank_{r:05d}.safetensors       per rank: RNG states (torch CPU/CUDA as tensors; Python and
                                   NumPy as JSON in the header), the caller's `state` (JSON) and
                                   `rank_tensors` (e.g. the states of private dropout generators)

Model replicas over DP are identical (DDP), so model and optimizer are written once per TP rank;
RNG and `state` (data position, counters) are per rank. Nothing is pickled. A distributed optimizer
(engine/dist_optim.py) gathers its DP-sharded states into this same per-parameter form, so a
checkpoint loads at any DP degree with the option on or off.

Saving is atomic: every rank writes into `step_X.tmp/`, the ranks agree (one all_reduce) that all
files are there, rank 0 writes `metadata.json` last, renames the directory into place, then moves
the `latest` pointer (a text file naming the directory) and prunes to `keep`. A crash at any point
leaves the previous checkpoint complete and still `latest`; `*.tmp` leftovers are ignored by
`latest_checkpoint` and removed by the next save. A rank that fails to write makes every rank
raise `CheckpointError` instead of hanging. Multi-node runs need a filesystem shared by all nodes
(rank 0 renames what the other ranks wrote).

Pipeline stages. Parameters keep their global names on every stage, so a PP checkpoint is the PP=1
checkpoint cut into one file per stage: the metadata lists, per TP rank, the files of the stages
and, per tensor, the stage whose file holds it (`stages`; the tied embedding's two copies are
equal and the first stage's is used). A rank loads the names its (stage) model has, from whichever
files hold them, so a checkpoint loads at any PP degree as at any TP degree.

Loading verifies the size and digest of every file before reading it, refuses a model whose
parameters do not match (naming the first), and reshards on the fly when the saved TP degree
differs (see engine/checkpoint_state.py); RNG states are restored only when the layout matches.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine import collectives
from engine.checkpoint_files import (
    CheckpointError,
    TensorFile,
    check_size,
    fsync_dir,
    read_json,
    safe_child,
    safe_torch_load,
    to_json_text,
    verify_file,
    write_json,
    write_tensors,
)
from engine.checkpoint_state import (
    ShardReader,
    load_model_state,
    load_optimizer_state,
    merge_stage_meta,
    model_state,
    optimizer_state,
    parse_header,
    rng_state,
    set_rng_state,
)
from engine.config import ConfigError
from engine.dist_optim import ShardedAdamW
from engine.log import get_logger
from engine.parallel import ParallelLayout, RankOrder

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
           "checkpoint_metadata", "resolve_checkpoint", "ResolvedCheckpoint", "open_checkpoint",
           "checked_metadata",
           "checkpoints_after", "is_intact", "newest_intact_checkpoint", "ranks_agree", "safe_torch_load"]

log = get_logger(__name__)

FORMAT = "megadistill-checkpoint"
VERSION = 1
METADATA = "metadata.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"step_(\d{8,})")
_LAYOUT_KEYS = ("world_size", "tp", "dp", "sp", "teacher_ranks")
_EXTRA = "extra."  # prefix of the caller's `rank_tensors` inside a rank file


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _stage_suffix(pp_rank: int, pp: int) -> str:
    return f"_pp{pp_rank:03d}" if pp > 1 else ""


def _expert_suffix(ep_rank: int, ep: int) -> str:
    return f"_ep{ep_rank:03d}" if ep > 1 else ""


def _model_file(tp_rank: int, pp_rank: int = 0, pp: int = 1, ep_rank: int = 0, ep: int = 1) -> str:
    return f"model_tp{tp_rank:03d}{_stage_suffix(pp_rank, pp)}{_expert_suffix(ep_rank, ep)}.safetensors"


def _optim_file(tp_rank: int, pp_rank: int = 0, pp: int = 1, ep_rank: int = 0, ep: int = 1) -> str:
    return f"optim_tp{tp_rank:03d}{_stage_suffix(pp_rank, pp)}{_expert_suffix(ep_rank, ep)}.safetensors"


def _parts(layout: ParallelLayout) -> int:
    """Files per TP rank: one per pipeline stage and expert-parallel rank."""
    return layout.pp * layout.ep


def _tp_files(name_of: Callable[..., str], layout: ParallelLayout) -> list:
    """Per TP rank: its file (no PP or EP), or the list of its parts' files, in rank order
    (EP rank major, then stage: the order in which `_metadata` merges their tensors)."""
    if _parts(layout) == 1:
        return [name_of(t) for t in range(layout.tp)]
    return [[name_of(t, p, layout.pp, e, layout.ep) for e in range(layout.ep) for p in range(layout.pp)]
            for t in range(layout.tp)]


def _flat_files(files: list) -> list[str]:
    return [name for entry in files for name in ([entry] if isinstance(entry, str) else entry)]


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


def _manifest_file(rank: int) -> str:
    return f"manifest_{rank:05d}.json"


# ----------------------------------------------------------------------------- finding checkpoints

def _complete_steps(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every finished checkpoint under `root`, oldest first."""
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.fullmatch(child.name)
        if match and child.is_dir() and (child / METADATA).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _pointer_target(root: Path) -> Path | None:
    try:
        name = (root / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not _STEP_DIR.fullmatch(name) or not (root / name / METADATA).is_file():
        return None
    return root / name


def checkpoints_after(root: Path | str, step: int) -> list[Path]:
    """The complete checkpoints under `root` past `step`, oldest first."""
    root = Path(root)
    return [path for s, path in _complete_steps(root) if s > step] if root.is_dir() else []


def latest_checkpoint(root: Path | str) -> Path | None:
    """The checkpoint `root/latest` names; if that pointer is missing or broken, the newest complete
    `step_*` directory; `None` when there is none. `*.tmp` directories never count."""
    root = Path(root)
    if not root.is_dir():
        return None
    target = _pointer_target(root)
    if target is not None:
        return target
    complete = _complete_steps(root)
    if (root / LATEST).exists():
        log.warning("%s/%s is unusable; falling back to the newest complete checkpoint", root, LATEST)
    return complete[-1][1] if complete else None


def resolve_checkpoint(path: str | Path, *, key: str) -> Path:
    """A checkpoint directory, or a directory of checkpoints (its newest complete one); a
    `ConfigError` naming `key` when there is none."""
    given = Path(path).expanduser()
    if (given / METADATA).is_file():
        return given
    found = latest_checkpoint(given) or latest_checkpoint(given / "checkpoints")
    if found is None:
        raise ConfigError(key, f"no complete checkpoint at {path}")
    return found


def checked_metadata(path: Path, *, key: str) -> dict[str, Any]:
    """Start-up check of a checkpoint a run will read: valid metadata, and every file present at
    its recorded size (one stat per file: a truncated copy or a full disk shows here). Digests are
    verified later, as each rank reads its own files. A ConfigError naming `key` otherwise."""
    try:
        meta = _read_metadata(path)
        _check_files(path, meta, check_size)
    except CheckpointError as err:
        raise ConfigError(key, str(err)) from None
    return meta


def _check_files(path: Path, meta: dict[str, Any],
                 check: Callable[[Path, Any], None]) -> None:
    """Apply `check` (size only, or size and digest) to every file the metadata records."""
    for name, record in meta["files"].items():
        check(safe_child(path, name), record)


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """A checkpoint a command reads, found and checked once at start-up (`open_checkpoint`); the
    later checks and the loading read this instead of the files again."""

    path: Path  # the step directory
    key: str  # the setting or flag that named it: what errors about it name
    meta: dict[str, Any]  # its validated metadata (every file present at its recorded size)

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def has_optimizer(self) -> bool:
        return self.meta["optimizer"] is not None

    @property
    def weights_digest(self) -> str:
        """sha256 over the model files' recorded digests: which weights these are, without
        reading them (a copy of the checkpoint has the same)."""
        records = {name: self.meta["files"].get(name, {}).get("sha256")
                   for name in _flat_files(self.meta["model"]["files"])}
        return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()

    @property
    def run_config(self) -> dict[str, Any]:
        """The resolved run config it was saved with (a ConfigError naming `key` when it records
        no model config)."""
        config = self.meta.get("config")
        if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
            raise ConfigError(self.key, f"{self.path / METADATA} records no model config")
        return config


def open_checkpoint(path: str | Path, *, key: str) -> ResolvedCheckpoint:
    """`resolve_checkpoint` and `checked_metadata` of `path`, once (no tensor file is read)."""
    step_dir = resolve_checkpoint(path, key=key)
    return ResolvedCheckpoint(step_dir, key, checked_metadata(step_dir, key=key))


def is_intact(path: Path) -> bool:
    """Whether every file of the checkpoint at `path` matches its size and digest (reads them
    all: for the paths that handle a damaged checkpoint, not for the normal one)."""
    try:
        _check_files(path, _read_metadata(path), verify_file)
    except CheckpointError:
        return False
    return True


def newest_intact_checkpoint(root: Path, *, before: int) -> Path | None:
    """The newest complete checkpoint under `root` older than step `before` that `is_intact`."""
    return next((path for step, path in reversed(_complete_steps(root))
                 if step < before and is_intact(path)), None)


# ----------------------------------------------------------------------------- saving

def _discard(path: Path) -> None:
    """Delete a checkpoint directory so that an interruption never leaves it looking complete."""
    doomed = path if path.name.endswith(".tmp") else path.rename(path.with_name(path.name + ".old.tmp"))
    shutil.rmtree(doomed, ignore_errors=True)


def _prepare(root: Path, tmp: Path) -> None:
    """Rank 0, before anyone writes: create `root`, drop leftovers of interrupted saves."""
    root.mkdir(parents=True, exist_ok=True)
    for child in root.iterdir():
        if child.name.endswith(".tmp") and child.is_dir() and _STEP_DIR.match(child.name):
            log.info("removing %s left by an interrupted save", child)
            _discard(child)
    tmp.mkdir()


def ranks_agree(layout: ParallelLayout, ok: bool) -> bool:
    """True when every rank of this role reports success (one all_reduce(min); also a barrier).
    Every rank of the role must call it at the same point."""
    flag = torch.tensor([int(ok)], dtype=torch.int32, device=layout.device)
    group = layout.role_group if layout.world_size > 1 else None
    return bool(collectives.all_reduce(flag, group, op="min").item())


def _write_rank_files(tmp: Path, *, layout: ParallelLayout, model: nn.Module,
                      optimizer: torch.optim.Optimizer | None, state: dict,
                      rank_tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Write this rank's files and its manifest; return the tensor metadata rank 0 publishes."""
    records, meta = {}, {}
    optim = None
    if optimizer is not None:
        # Every DP rank takes part: a distributed optimizer gathers its DP-sharded states to DP
        # rank 0, the writer (the others never hold them whole).
        saved = optimizer.state_dict(to_dp_rank=0) if isinstance(optimizer, ShardedAdamW) else None
    # The first `ep` DP x CP ranks (DP-major) hold every expert between them (EP rank = their place
    # there); without EP the CP ranks of one DP rank hold the same parameters, the first writes them.
    writer = layout.dp_cp_index < layout.ep
    if optimizer is not None and writer:
        optim = optimizer_state(optimizer, model, saved=saved)
    part = (layout.tp_rank, layout.pp_rank, layout.pp, layout.ep_rank, layout.ep)
    if writer:
        flat = model_state(model)
        name = _model_file(*part)
        records[name] = write_tensors(tmp / name, flat.tensors)
        meta["model"] = flat.meta
        if optim is not None:
            flat = optim
            name = _optim_file(*part)
            records[name] = write_tensors(tmp / name, flat.tensors)
            meta["optimizer"] = flat.meta
    rng = rng_state()
    header = {"state": to_json_text(state, "checkpoint state"), "rng": to_json_text(rng.meta, "rng")}
    tensors = {**rng.tensors, **{_EXTRA + name: t for name, t in rank_tensors.items()}}
    records[_rank_file(layout.rank)] = write_tensors(tmp / _rank_file(layout.rank), tensors, header)
    stage_meta = meta if _parts(layout) > 1 and writer and layout.tp_rank == 0 else {}
    write_json(tmp / _manifest_file(layout.rank), {"files": records, "tensors": stage_meta})
    return meta


def _layout_json(layout: ParallelLayout) -> dict[str, Any]:
    return {**{key: getattr(layout, key) for key in _LAYOUT_KEYS}, "pp": layout.pp,
            "virtual_stages": layout.virtual_stages, "ep": layout.ep, "cp": layout.cp}


def _saved_pp(saved: dict[str, Any]) -> int:
    return saved.get("pp", 1)  # checkpoints from before pipeline parallelism have none


def _metadata(tmp: Path, step: int, *, layout: ParallelLayout, tensor_meta: dict[str, Any],
              config: dict, vocab_size: int | None) -> dict[str, Any]:
    """Rank 0: merge every rank's manifest into the metadata document (manifests are removed)."""
    files: dict[str, Any] = {}
    stages: list[dict[str, Any]] = []  # with PP or EP: each part's tensor metadata, rank order
    for rank in range(layout.student_world):
        manifest = tmp / _manifest_file(rank)
        if not manifest.is_file():
            raise CheckpointError(f"rank {rank}'s files are not visible in {tmp}: is the checkpoint "
                                  "directory on a filesystem shared by all nodes?")
        written = read_json(manifest)
        files.update(written["files"])
        if written["tensors"]:
            stages.append(written["tensors"])
        manifest.unlink()
    if _parts(layout) > 1:
        tensor_meta = {key: merge_stage_meta([stage[key] for stage in stages])
                       for key in stages[0]}
    meta = {"format": FORMAT, "version": VERSION, "step": step, "layout": _layout_json(layout),
            "vocab_size": vocab_size, "config": config, "files": files,
            "ranks": [_rank_file(r) for r in range(layout.student_world)],
            "model": dict(tensor_meta["model"], files=_tp_files(_model_file, layout)),
            "optimizer": None}
    if "optimizer" in tensor_meta:
        meta["optimizer"] = dict(tensor_meta["optimizer"], files=_tp_files(_optim_file, layout))
    return meta


def _publish(root: Path, tmp: Path, final: Path, meta: dict[str, Any], keep: int) -> None:
    """Rank 0, once every rank's files are in `tmp`: metadata, rename, `latest`, prune."""
    write_json(tmp / METADATA, meta)
    fsync_dir(tmp)
    if final.exists():
        log.warning("replacing the existing checkpoint %s", final)
        _discard(final)
    tmp.rename(final)
    fsync_dir(root)
    _point_latest(root, final.name)
    _prune(root, keep, meta["step"])


def _point_latest(root: Path, name: str) -> None:
    """Move `root/latest` to `name` atomically (write aside, then rename over)."""
    partial = root / f"{LATEST}.partial"
    partial.write_text(name + "\n")
    partial.replace(root / LATEST)
    fsync_dir(root)


def _prune(root: Path, keep: int, step: int) -> None:
    """Keep the `keep` newest checkpoints up to `step` (0 keeps all); never touch newer ones."""
    if keep <= 0:
        return
    older = [path for s, path in _complete_steps(root) if s < step]
    for path in older[:max(0, len(older) - (keep - 1))]:
        log.info("pruning %s", path)
        _discard(path)


def save_checkpoint(root: Path | str, step: int, *, layout: ParallelLayout, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, state: dict, config: dict, keep: int,
                    vocab_size: int | None = None,
                    rank_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `root/step_{step:08d}/` from every student rank (all must call it at the same step).

    `state` is this rank's JSON-serializable plain data (scheduler state, data position, ...);
    `config` the resolved config as plain data; `keep` how many checkpoints stay (0: all);
    `vocab_size` the real vocabulary of vocab-parallel parameters (needed to reshard them);
    `rank_tensors` this rank's extra tensors (generator states the global RNGs do not cover).
    Raises `CheckpointError` on every rank when any rank failed; the previous checkpoint stays.
    """
    if layout.is_teacher:
        raise CheckpointError("save_checkpoint is called by student ranks only")
    if keep < 0:
        raise CheckpointError(f"keep must be >= 0 (got {keep})")
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = final.with_name(final.name + ".tmp")
    tensor_meta: dict[str, Any] = {}

    def prepare() -> None:
        if layout.is_rank0:
            to_json_text(config, "checkpoint config")
            _prepare(root, tmp)

    def write() -> None:
        tensor_meta.update(_write_rank_files(tmp, layout=layout, model=model, optimizer=optimizer,
                                             state=state, rank_tensors=rank_tensors or {}))

    def publish() -> None:
        if layout.is_rank0:
            meta = _metadata(tmp, step, layout=layout, tensor_meta=tensor_meta, config=config,
                             vocab_size=vocab_size)
            _publish(root, tmp, final, meta, keep)

    for stage in (prepare, write, publish):
        _run_stage(stage, layout, final, tmp)
    log.info("saved checkpoint %s", final)
    return final


def _speaks_for_role(layout: ParallelLayout) -> bool:
    """The rank whose error line the entry points print (the role's first)."""
    return layout.tp_rank == 0 and layout.dp_rank == 0


def _run_stage(stage: Callable[[], None], layout: ParallelLayout, final: Path, tmp: Path) -> None:
    """Run one save stage on this rank, then fail on every rank if it failed on any; a failed
    save leaves no partial directory behind (a full disk must not fill up further)."""
    error: BaseException | None = None
    try:
        stage()
    except Exception as err:
        error = err
        if not _speaks_for_role(layout):  # the role's first rank says it in the final line
            log.error("saving %s failed in %s: %s", final, stage.__name__, err,
                      extra={"all_ranks": True})
    if ranks_agree(layout, error is None):
        return
    if layout.is_rank0:  # every rank has stopped writing: they all agreed above
        shutil.rmtree(tmp, ignore_errors=True)
    kept = f"{tmp.name} removed, the previous checkpoint and `latest` unchanged"
    if error is not None:
        raise CheckpointError(f"saving {final} failed ({stage.__name__}: {error}); {kept}") from None
    raise CheckpointError(f"saving {final} failed on another rank ({stage.__name__}, its log line "
                          f"says why); {kept}")


# ----------------------------------------------------------------------------- loading

class _VerifiedFiles:
    """Opens files of one checkpoint by metadata name, verifying each once before first use."""

    def __init__(self, path: Path, records: dict[str, Any]):
        self.path, self._records, self._open = path, records, {}

    def __call__(self, name: str) -> TensorFile:
        if name not in self._open:
            if name not in self._records:
                raise CheckpointError(f"{self.path}: metadata lists no size/digest for {name!r}")
            file_path = safe_child(self.path, name)
            verify_file(file_path, self._records[name])
            self._open[name] = TensorFile(file_path)
        return self._open[name]


def checkpoint_metadata(path: Path | str) -> dict[str, Any]:
    """The validated metadata of the checkpoint at `path` (no tensor file is read)."""
    return _read_metadata(Path(path))


def _read_metadata(path: Path) -> dict[str, Any]:
    if not (path / METADATA).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {METADATA})")
    meta = read_json(path / METADATA)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path / METADATA} is not a {FORMAT} version {VERSION} file")
    try:
        _check_metadata(meta)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path / METADATA} is malformed ({type(err).__name__}: {err})") from None
    for name in [*meta["files"], *meta["ranks"], *_flat_files(meta["model"]["files"]),
                 *_flat_files((meta["optimizer"] or {}).get("files", []))]:
        safe_child(path, name)
    return meta


def _check_metadata(meta: dict[str, Any]) -> None:
    """Raise KeyError/TypeError/ValueError when a required entry is missing or of the wrong type."""
    layout = {key: meta["layout"][key] for key in _LAYOUT_KEYS}
    if not isinstance(meta["step"], int) or not isinstance(meta["vocab_size"], (int, type(None))):
        raise ValueError("step must be an integer and vocab_size an integer or null")
    sections = [meta["model"]] + ([meta["optimizer"]] if meta["optimizer"] is not None else [])
    if not all(isinstance(s["tensors"], dict) and len(s["files"]) == layout["tp"] for s in sections):
        raise ValueError("tensor sections must list one file per TP rank")
    ranks = layout["tp"] * layout["dp"] * _saved_pp(meta["layout"]) * meta["layout"].get("cp", 1)
    if not isinstance(meta["files"], dict) or len(meta["ranks"]) != ranks:
        raise ValueError("files must map names to records and ranks list one file per rank")


def _resolve_vocab(meta: dict[str, Any], vocab_size: int | None) -> int | None:
    saved = meta["vocab_size"]
    if vocab_size is not None and saved is not None and vocab_size != saved:
        raise CheckpointError(f"vocab_size={vocab_size} but the checkpoint was saved with "
                              f"vocab_size={saved}")
    return vocab_size if vocab_size is not None else saved


def _same_layout(saved: dict[str, Any], layout: ParallelLayout) -> bool:
    """Whether this rank is the one that wrote its own rank file (students only save)."""
    return not layout.is_teacher and _saved_pp(saved) == layout.pp and saved.get("ep", 1) == layout.ep \
        and saved.get("cp", 1) == layout.cp \
        and all(saved[key] == getattr(layout, key) for key in ("tp", "dp", "teacher_ranks"))


def _state_rank(saved: dict[str, Any], layout: ParallelLayout) -> int:
    """Whose rank file this rank reads: its own when the layout matches, else the saved rank with
    the same DP coordinate (TP rank 0, first stage), else rank 0."""
    if _same_layout(saved, layout):
        return layout.rank
    saved_cp = saved.get("cp", 1)
    saved_order = RankOrder(size=saved["tp"] * _saved_pp(saved) * saved["dp"] * saved_cp,
                            tp=saved["tp"], pp=_saved_pp(saved), cp=saved_cp)
    return saved_order.rank(dp=layout.dp_rank) if layout.dp_rank < saved["dp"] else 0


def load_checkpoint(path: Path | str, *, layout: ParallelLayout, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, vocab_size: int | None = None,
                    restore_rng: bool = True, only_prefix: str = "") -> dict[str, Any]:
    """Load the checkpoint at `path` into this rank's model (and optimizer), resharding over TP.

    Returns {"step", "config", "layout" (the saved one), "same_layout" (tp, dp and teacher_ranks
    equal this run's), "state" and "rank_tensors" (this rank's saved ones when `same_layout`, else
    those of the saved rank with the same DP coordinate, see `_state_rank`)}.
    RNG states are restored only when `restore_rng` and `same_layout`. `only_prefix` loads just
    the model entries under that name prefix (see `load_model_state`).

    Every rank of the role calls it (each verifies the files it reads): a CheckpointError on any
    rank is raised on all of them, instead of leaving the others waiting in the next collective.
    """
    path = Path(path)
    try:
        loaded = _load(path, layout=layout, model=model, optimizer=optimizer, vocab_size=vocab_size,
                       restore_rng=restore_rng, only_prefix=only_prefix)
    except CheckpointError as err:
        if not _speaks_for_role(layout):  # the role's first rank says it in the final line
            log.error("loading %s failed: %s", path, err, extra={"all_ranks": True})
        ranks_agree(layout, False)
        raise
    if not ranks_agree(layout, True):
        raise CheckpointError(f"loading {path} failed on another rank (its log line says why)")
    return loaded


def _load(path: Path, *, layout: ParallelLayout, model: nn.Module,
          optimizer: torch.optim.Optimizer | None, vocab_size: int | None, restore_rng: bool,
          only_prefix: str) -> dict[str, Any]:
    meta = _read_metadata(path)
    files = _VerifiedFiles(path, meta["files"])
    vocab = _resolve_vocab(meta, vocab_size)
    tp_args = {"tp": layout.tp, "tp_rank": layout.tp_rank, "vocab": vocab}
    stage = _parts(layout) > 1  # this rank's model (a stage, some experts) is a part of the checkpoint's
    load_model_state(model, meta["model"], ShardReader(files, meta["model"], **tp_args),
                     only_prefix=only_prefix, partial=stage)
    if optimizer is not None:
        if meta["optimizer"] is None:
            raise CheckpointError(f"{path} holds no optimizer state")
        load_optimizer_state(optimizer, model, meta["optimizer"],
                             ShardReader(files, meta["optimizer"], **tp_args), partial=stage)
    rank_file = files(meta["ranks"][_state_rank(meta["layout"], layout)])
    _restore_rng(rank_file, meta["layout"], layout, restore_rng)
    log.info("loaded checkpoint %s (step %d)", path, meta["step"])
    extra = {name.removeprefix(_EXTRA): rank_file.get(name) for name in rank_file.keys()
             if name.startswith(_EXTRA)}
    return {"step": int(meta["step"]), "config": meta["config"], "layout": meta["layout"],
            "same_layout": _same_layout(meta["layout"], layout),
            "state": parse_header(rank_file, "state"), "rank_tensors": extra}


def _restore_rng(rank_file: TensorFile, saved: dict[str, Any], layout: ParallelLayout,
                 restore: bool) -> None:
    if not restore:
        return
    if not _same_layout(saved, layout):
        log.warning("checkpoint layout %s differs from this run's: RNG states are not restored",
                    {**{k: saved[k] for k in ("tp", "dp", "teacher_ranks")}, "pp": _saved_pp(saved)})
        return
    skipped = set_rng_state(rank_file, parse_header(rank_file, "rng"))
    if skipped:
        log.warning("could not restore RNG state of %s (device count differs)", ", ".join(skipped))
