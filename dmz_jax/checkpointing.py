"""Orbax checkpoints of the train state, with the config saved beside each one.

Safety rules:
  - orbax writes each step into a temporary folder and renames it when complete, so a run
    killed mid-write leaves no checkpoint that looks complete; stale temporary folders are
    removed at start-up.
  - `restore_latest` tries the newest step first. A checkpoint that is *provably corrupt*
    (see `corruption_reason`: its files are missing, truncated or not parseable, which fails
    the same way on every retry) is moved to WORKDIR/checkpoints_corrupt/<step>-<time>, never
    deleted, and the next older one is tried. Any other failure (out of memory, permission
    denied, an I/O error of a flaky file system, a RuntimeError of the backend, a train state
    whose structure no longer matches the saved one) raises `CheckpointRestoreError` and
    leaves every checkpoint in place: retrying may work, and moving a good checkpoint aside
    would restart the run from step 0.
  - several processes: process 0 alone reads the folder and decides (restore step N, step N
    is corrupt, the config differs, a failure); it broadcasts the decision
    (`multihost_utils.broadcast_one_to_all`), every process passes a barrier
    (`multihost_utils.sync_global_devices`), and only then do they restore, and only process
    0 moves files. Each process reads its own shards with the item's handler (not the
    manager, whose restore ends in a barrier that a failed process never reaches); then all
    exchange their outcomes (`process_allgather`), and a restore that failed on any process
    counts for all (the worst outcome wins): a truncated chunk only one process reads ends
    every process the same way. One process: no broadcast, no barrier. Several processes
    must share the workdir (`check_shared_workdir`).
  - a checkpoint written with a different model, diffusion or data geometry is refused with a
    diff of what changed (`ConfigMismatchError`); `set_aside` moves old checkpoints away for a
    fresh start. Keys in RESUMABLE_KEYS may change on resume; each change is logged
    (`Resuming with training.learning_rate 0.001 -> 0.0005`). Nothing is ever deleted except
    orbax's own rotation (keep_checkpoints). Paths go through etils.epath: gs:// works.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

ITEMS = ("state", "config")  # the items of every step folder

# Config keys that may change between a checkpoint and the run resuming from it: how long to
# train, how often to log/save/sample, evaluation, where data is read from, and the step
# size (learning rate, warm-up length, clipping threshold: what a user lowers after a
# divergence; they are read when the optimizer is built, not stored in its state). Every
# other key (model, diffusion, data geometry, optimizer kind, weight decay, encoder scale,
# EMA, batch, seed) must match.
RESUMABLE_KEYS = (
    "training.num_steps", "training.log_every", "training.checkpoint_every",
    "training.sample_every", "training.keep_checkpoints", "training.max_nonfinite_steps",
    "training.learning_rate", "training.warmup_steps", "training.grad_clip",
    "training.init_from",
    # memory and precision knobs: how the same parameters are computed, not what they are
    "model.dtype", "model.remat", "model.attention_impl", "training.grad_accum_steps",
    "model.gumbel_eval",  # how evaluation reads Gumbel-softmax bits, not what is trained
    "sampling.", "eval.", "modes.", "mesh.", "data.data_dir", "data.debian_dir",
    "data.source", "data.download",
)
RETIRED_KEYS = ("data.shuffle_buffer",)  # keys the code dropped: ignored in saved configs
# Resumable keys whose 0 removes an optimizer transform, which changes the structure of the
# optimizer state: they may change only while they stay on the same side of 0.
SWITCH_KEYS = {"training.grad_clip": "gradient clipping",
               "training.warmup_steps": "the warm-up schedule"}

# tensorstore status codes of array data that is missing or short on disk: a data file or
# chunk that is not there (NOT_FOUND), a read past the end of a truncated file
# (OUT_OF_RANGE), a truncated compressed chunk (FAILED_PRECONDITION), a bad checksum
# (DATA_LOSS). PERMISSION_DENIED, UNAVAILABLE, RESOURCE_EXHAUSTED, ... are not corruption.
_CORRUPT_STATUS = ("NOT_FOUND:", "DATA_LOSS:", "OUT_OF_RANGE:", "FAILED_PRECONDITION:")


class ConfigMismatchError(RuntimeError):
    """The workdir holds checkpoints of a different model or config."""


class CheckpointRestoreError(RuntimeError):
    """A checkpoint could not be restored for a reason other than corruption.

    Every checkpoint was left in place; the message says what failed and what to do.
    """


class WorkdirNotSharedError(RuntimeError):
    """Several processes, and some of them do not see the files process 0 writes."""


class _CorruptCheckpoint(Exception):
    """A step folder that cannot be a complete checkpoint (an item is missing)."""


def absolute(path: str) -> epath.Path:
    """`path` made absolute when local (orbax needs that); a gs:// (any URL) path as it is."""
    return epath.Path(path if "://" in str(path) else os.path.abspath(path))


def checkpoint_dir(workdir: str) -> str:
    return str(absolute(workdir) / "checkpoints")


def _move(src: epath.Path, dest: epath.Path) -> None:  # local, or gs:// via tf.io.gfile
    dest.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dest)


def check_shared_workdir(workdir: str) -> None:
    """Several processes: raises WorkdirNotSharedError (on every process) unless each one
    reads the token process 0 just wrote to WORKDIR/.dmz_process_check; one process: nothing.

    A multi-host run whose workdir is a local disk (a relative path on a TPU slice) would
    write checkpoints no restart can reassemble; it is refused before anything runs.
    """
    index, count = _process()
    if count == 1:
        return
    from jax.experimental import multihost_utils
    path = absolute(workdir) / ".dmz_process_check"
    token = np.int32(np.random.SeedSequence().generate_state(1)[0] & 0x7FFFFFFF)
    token = int(multihost_utils.broadcast_one_to_all(token))
    if index == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(token))
    _barrier(f"dmz_workdir_check_{token}")
    try:
        sees = path.read_text().strip() == str(token)
    except OSError:
        sees = False
    seen = multihost_utils.process_allgather(np.int32(sees))
    blind = [i for i, ok in enumerate(np.asarray(seen).reshape(-1)) if not ok]
    if blind:
        raise WorkdirNotSharedError(
            f"--workdir={workdir} is not shared by the {count} processes: process(es) "
            f"{', '.join(map(str, blind))} cannot read {path}, which process 0 wrote. "
            "Several hosts must write their checkpoints to one place: use a gs:// bucket "
            "(--workdir=gs://BUCKET/run) or a file system every host mounts at the same path.")


def save_replicas_whole_on_cpu() -> None:
    """On CPU devices, orbax saves each replicated array whole from one device.

    Its default (replica-parallel saving) splits a replicated array into one slice per device
    so that the devices share the device-to-host transfer: a gain on TPU, none on CPU, where
    "transfer" is a memcpy, and each slice is an eager `lax.slice` compiled once per leaf shape
    and device (8 fake devices, a 30-leaf model: 240 compiles at the first save of a
    process). orbax already turns it off on GPU. Restoring is unchanged: checkpoints written
    either way load the same arrays.
    Call it before saving (create_manager does); it registers the handler once."""
    global _replicas_whole
    if not _replicas_whole and jax.default_backend() == "cpu":
        # orbax's default jax.Array handler, replica-parallel off (its metadata store has no
        # public name in orbax 0.12.8)
        from orbax.checkpoint._src.metadata import array_metadata_store
        handler = ocp.type_handlers.ArrayHandler(
            use_replica_parallel=False, array_metadata_store=array_metadata_store.Store())
        absl_log = logging.getLogger("absl")  # orbax warns of the override: expected here
        level = absl_log.level
        absl_log.setLevel(logging.ERROR)
        try:
            ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
        finally:
            absl_log.setLevel(level)
        _replicas_whole = True


_replicas_whole = False  # save_replicas_whole_on_cpu has registered its handler


def create_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """A manager for WORKDIR/checkpoints keeping the newest `keep` steps."""
    save_replicas_whole_on_cpu()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         config: ml_collections.ConfigDict) -> None:
    """Saves asynchronously; call `manager.wait_until_finished()` before exiting."""
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config.to_dict())))


def placed(abstract: Any, shardings: Any) -> Any:
    """The restore target of `abstract` (a tree of shapes and dtypes) on `shardings` (one
    sharding for all, or a tree of them). With it, a checkpoint saved on another topology
    (other processes, devices or mesh) loads here; without it orbax reuses the saved
    shardings and refuses (topology mismatch)."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, abstract)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, shardings)


def flatten_dict(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; tuples become lists (as in the saved JSON)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _changed(saved: dict, current: ml_collections.ConfigDict) -> list[tuple[str, Any, Any]]:
    """(key, saved, current) for every key that differs; a key the checkpoint does not have
    (added to the code since) counts as its default."""
    from dmz_jax.config_base import base_config
    defaults = flatten_dict(base_config().to_dict())
    old, new = flatten_dict(saved), flatten_dict(current.to_dict())
    old = {k: v for k, v in old.items() if k not in RETIRED_KEYS}
    old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
    keys = sorted(set(old) | set(new))
    return [(k, old.get(k, "<absent>"), new.get(k, "<absent>")) for k in keys
            if old.get(k, "<absent>") != new.get(k, "<absent>")]


def _resumable(key: str, old: Any, new: Any) -> bool:
    if key in SWITCH_KEYS:
        return bool(old) == bool(new)
    return key.startswith(RESUMABLE_KEYS)


def config_diff(saved: dict, current: ml_collections.ConfigDict) -> list[str]:
    """Lines `key: saved -> current` for every key that differs and is not resumable.

    A SWITCH_KEYS change across 0 (clipping or warm-up turned on or off) is not resumable:
    the optimizer state would not fit; its line says so.
    """
    lines = []
    for key, old, new in _changed(saved, current):
        if not _resumable(key, old, new):
            why = (f" ({SWITCH_KEYS[key]} turned {'on' if new else 'off'}: the optimizer "
                   "state differs; keep it on the same side of 0)") if key in SWITCH_KEYS else ""
            lines.append(f"  {key}: {old!r} -> {new!r}{why}")
    return lines


def resumed_changes(saved: dict, current: ml_collections.ConfigDict) -> list[str]:
    """Lines `key saved -> current` for the resumable keys that differ (logged on resume)."""
    return [f"{key} {old!r} -> {new!r}" for key, old, new in _changed(saved, current)
            if _resumable(key, old, new)]


# ---------------------------------------------------------------------------- corruption


def _causes(error: BaseException):
    """`error` and the exceptions it was raised from (orbax wraps tensorstore's)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def corruption_reason(error: BaseException) -> Optional[str]:
    """Why `error` proves the checkpoint's files corrupt, or None when it does not.

    Corrupt: a step folder without one of its items (`_CorruptCheckpoint`); a file orbax
    needs is missing (FileNotFoundError, e.g. state/_METADATA or config/metadata); metadata
    that is not valid JSON or UTF-8 (a truncated or overwritten _METADATA); tensorstore
    reporting array data missing or short (`_CORRUPT_STATUS`). Every other error, OSError
    included, is not evidence of corruption.
    """
    for e in _causes(error):
        if isinstance(e, _CorruptCheckpoint):
            return str(e)
        if isinstance(e, FileNotFoundError):
            return f"a file is missing: {e}"
        if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
            return f"unreadable metadata: {type(e).__name__}: {e}"
        if isinstance(e, ValueError) and str(e).startswith(_CORRUPT_STATUS):
            return f"array data missing or truncated: {str(e).splitlines()[0][:300]}"
    return None


def _step_dir(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    return epath.Path(manager.directory) / str(step)


def read_config(step_dir: epath.Path) -> dict:
    """The config saved in a step folder, read without orbax's cross-process barrier.

    Raises `_CorruptCheckpoint` when the folder lacks an item or the config is not a JSON
    object; a folder that cannot be listed raises its OSError (not corruption).
    """
    missing = [item for item in ITEMS if item not in {p.name for p in step_dir.iterdir()}]
    if missing:
        raise _CorruptCheckpoint(f"the step folder has no {' or '.join(missing)}/ item")
    saved = ocp.JsonCheckpointHandler().restore(step_dir / "config")
    if not isinstance(saved, dict):
        raise _CorruptCheckpoint("the saved config is not a JSON object")
    return saved


# ---------------------------------------------------------------------------- decisions

# what to do with a step; the order matters: over processes, the highest outcome wins
_RESTORE, _EMPTY, _MISMATCH, _CORRUPT, _FAILED = range(5)


@dataclasses.dataclass
class _Decision:
    code: int
    step: int = -1
    detail: str = ""  # why (corrupt, failed) or the diff (mismatch)
    changes: tuple = ()  # resumable keys that changed (restore; process 0 only)


def _process() -> tuple[int, int]:
    """(this process's index, the number of processes); the multi-host tests replace it."""
    return jax.process_index(), jax.process_count()


def _barrier(name: str) -> None:
    """Waits for every process (none to wait for with one process)."""
    if _process()[1] > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _follow_process_0(decision: _Decision, what: str) -> _Decision:
    """Process 0's decision on every process, after a barrier; one process: unchanged."""
    index, count = _process()
    if count == 1:
        return decision
    from jax.experimental import multihost_utils
    code, step = (int(v) for v in multihost_utils.broadcast_one_to_all(
        np.array([decision.code, decision.step], np.int32)))
    _barrier(f"dmz_checkpoint_{what}_{step}_{code}")
    if index == 0:
        return decision
    detail = decision.detail if decision.code == code else ""
    return _Decision(code, step, detail or "decided by process 0: see its log")


def _worst(code: int) -> int:
    """The highest outcome code of all processes (each restores its own shards)."""
    if _process()[1] == 1:
        return code
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.int32(code))))


def _classify(manager: ocp.CheckpointManager, step: int, error: Exception) -> _Decision:
    """Corrupt when `error` proves it and the step folder is still there, else a failure."""
    reason = corruption_reason(error)
    if reason and _step_dir(manager, step).is_dir():
        return _Decision(_CORRUPT, step, reason)
    text = str(error).splitlines()[0][:500] if str(error) else ""
    return _Decision(_FAILED, step, f"{type(error).__name__}: {text}")


def _decide(manager: ocp.CheckpointManager, config: ml_collections.ConfigDict) -> _Decision:
    """Process 0's verdict on the newest step: restore it, or why not."""
    steps = manager.all_steps()
    if not steps:
        return _Decision(_EMPTY)
    step = max(steps)
    try:
        saved = read_config(_step_dir(manager, step))
    except Exception as e:  # noqa: BLE001 - classified, never swallowed
        return _classify(manager, step, e)
    diff = config_diff(saved, config)
    if diff:
        return _Decision(_MISMATCH, step, "\n".join(diff))
    return _Decision(_RESTORE, step, changes=tuple(resumed_changes(saved, config)))


def _restore_state(manager: ocp.CheckpointManager, decision: _Decision,
                   abstract_state: Any) -> tuple[Any, _Decision]:
    """(state or None, outcome) of restoring `decision.step` on every process."""
    state, local = None, _Decision(_RESTORE, decision.step)
    try:  # the item's handler alone: orbax's manager would end in a barrier that a process
        # whose read failed never reaches; every process meets in `_worst` instead
        state = ocp.StandardCheckpointHandler().restore(
            _step_dir(manager, decision.step) / "state",
            args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # noqa: BLE001 - classified, never swallowed
        local = _classify(manager, decision.step, e)
    worst = _worst(local.code)
    detail = local.detail if local.code == worst else "another process failed: see its log"
    outcome = _follow_process_0(_Decision(worst, decision.step, detail), "restore")
    return (state if outcome.code == _RESTORE else None), outcome


def _move_aside(manager: ocp.CheckpointManager, step: int, why: str) -> str:
    """Process 0 moves a corrupt step to WORKDIR/checkpoints_corrupt/; all then reload."""
    dest = (epath.Path(manager.directory).parent / "checkpoints_corrupt"
            / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    logging.warning("Checkpoint at step %d cannot be loaded (%s); moved to %s and skipped.",
                    step, why, dest)
    if _process()[0] == 0 and _step_dir(manager, step).exists():
        _move(_step_dir(manager, step), dest)
    _barrier(f"dmz_checkpoint_moved_{step}")  # nobody reloads before the move is done
    manager.reload()
    return str(dest)


def _failure(manager: ocp.CheckpointManager, decision: _Decision) -> CheckpointRestoreError:
    return CheckpointRestoreError(
        f"Could not restore the checkpoint at step {decision.step} in {manager.directory}: "
        f"{decision.detail}\nThis is not how a corrupt checkpoint fails (those are moved "
        "aside by themselves), so every checkpoint was left in place. Fix the cause (out of "
        "memory: free it or use a larger machine; permission or I/O errors: check the file "
        "system; a structure mismatch: run the code version that wrote the checkpoint) and "
        "rerun the same command to resume. Only --fresh starts over from step 0 (it moves "
        "the checkpoints to WORKDIR/checkpoints.old-*).")


def _mismatch(manager: ocp.CheckpointManager, decision: _Decision) -> ConfigMismatchError:
    return ConfigMismatchError(
        f"{manager.directory} holds checkpoints (newest: step {decision.step}) of a different "
        "model or config:\n" + decision.detail + "\nUse another --workdir, restore the old "
        "settings, or pass --fresh to move the old checkpoints aside (into "
        "WORKDIR/checkpoints.old-*) and start over.")


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   config: ml_collections.ConfigDict) -> Optional[Any]:
    """Restores the newest loadable checkpoint into the shapes/shardings of `abstract_state`.

    Corrupt checkpoints on the way are moved aside (see the module docstring). Returns None
    when the workdir holds no checkpoint left. Raises ConfigMismatchError when the newest one
    was written with a different model or config, CheckpointRestoreError when it fails to
    load for a reason other than corruption.
    """
    moved = []
    while True:
        mine = _decide(manager, config) if _process()[0] == 0 else _Decision(_EMPTY)
        decision = _follow_process_0(mine, "decide")
        if decision.code == _EMPTY:
            if moved:
                logging.warning("All %d checkpoint(s) in %s were corrupt (moved to %s); "
                                "starting from step 0.", len(moved), manager.directory,
                                ", ".join(moved))
            return None
        if decision.code == _MISMATCH:
            raise _mismatch(manager, decision)
        if decision.code == _RESTORE:
            state, outcome = _restore_state(manager, decision, abstract_state)
            if state is not None:
                for line in decision.changes:
                    logging.info("Resuming with %s", line)
                logging.info("Restored checkpoint at step %d from %s", decision.step,
                             manager.directory)
                return state
            decision = outcome
        if decision.code == _FAILED:
            raise _failure(manager, decision)
        moved.append(_move_aside(manager, decision.step, decision.detail))


def set_aside(workdir: str) -> Optional[str]:
    """Moves WORKDIR/checkpoints (and summary.json) to WORKDIR/checkpoints.old-<time>."""
    if not (src := epath.Path(checkpoint_dir(workdir))).exists():
        return None
    dest = src.parent / f"{src.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    if _process()[0] == 0:
        _move(src, dest)
        summary = src.parent / "summary.json"
        if summary.exists():
            _move(summary, dest / "summary.json")
    _barrier("dmz_checkpoint_set_aside")  # nobody opens the folder before it has moved
    logging.warning("Moved the previous checkpoints to %s; starting fresh.", dest)
    return str(dest)
