"""Orbax checkpoints of the train state, with the config saved beside each one.

Safety rules:
  - orbax writes each step into a temporary folder and renames it when complete, so a run
    killed mid-write leaves no checkpoint that looks complete; stale temporary folders are
    removed at start-up.
  - a checkpoint that fails to load (truncated or corrupt files) is skipped with a warning and
    moved to WORKDIR/checkpoints_corrupt/, never loaded; the next older one is tried.
  - a checkpoint written with a different model, diffusion or data geometry is refused with a
    diff of what changed (`ConfigMismatchError`); `set_aside` moves old checkpoints away for a
    fresh start. Nothing is ever deleted except orbax's own rotation (keep_checkpoints).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

# Config keys that may change between a checkpoint and the run resuming from it: how long to
# train, how often to log/save/sample, evaluation, and where data is read from. Every other
# key (model, diffusion, data geometry, optimizer, batch, seed) must match.
RESUMABLE_KEYS = (
    "training.num_steps", "training.log_every", "training.checkpoint_every",
    "training.sample_every", "training.keep_checkpoints", "training.max_nonfinite_steps",
    "sampling.", "eval.", "modes.", "mesh.", "data.data_dir", "data.debian_dir",
    "data.source", "data.download",
)


class ConfigMismatchError(RuntimeError):
    """The workdir holds checkpoints of a different model or config."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def create_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """A manager for WORKDIR/checkpoints keeping the newest `keep` steps."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 item_names=("state", "config"))


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         config: ml_collections.ConfigDict) -> None:
    """Saves asynchronously; call `manager.wait_until_finished()` before exiting."""
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config.to_dict())))


def flatten_dict(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; tuples become lists (as in the saved JSON)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_diff(saved: dict, current: ml_collections.ConfigDict) -> list[str]:
    """Lines `key: saved -> current` for every key that differs and is not resumable.

    A key the checkpoint does not have (added to the code since) counts as its default.
    """
    from dmz_jax.config_base import base_config
    defaults = flatten_dict(base_config().to_dict())
    old, new = flatten_dict(saved), flatten_dict(current.to_dict())
    old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
    lines = []
    for key in sorted(set(old) | set(new)):
        if key.startswith(RESUMABLE_KEYS) or old.get(key, "<absent>") == new.get(key, "<absent>"):
            continue
        lines.append(f"  {key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
    return lines


def _move_aside(manager: ocp.CheckpointManager, step: int, why: str) -> None:
    src = os.path.join(str(manager.directory), str(step))
    dest_root = os.path.join(os.path.dirname(str(manager.directory)), "checkpoints_corrupt")
    os.makedirs(dest_root, exist_ok=True)
    dest = os.path.join(dest_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    logging.warning("Checkpoint at step %d cannot be loaded (%s); moved to %s and skipped.",
                    step, why, dest)
    if jax.process_index() == 0 and os.path.exists(src):
        shutil.move(src, dest)
    manager.reload()


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   config: ml_collections.ConfigDict) -> Optional[Any]:
    """Restores the newest loadable checkpoint into the shapes/shardings of `abstract_state`.

    Returns None when the workdir holds no loadable checkpoint. Raises ConfigMismatchError
    when the newest one was written with a different model or config.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            saved_config = manager.restore(step, args=ocp.args.Composite(
                config=ocp.args.JsonRestore())).config
        except Exception as e:  # noqa: BLE001 - any failure to read means corrupt
            _move_aside(manager, step, f"config unreadable: {type(e).__name__}: {e}")
            continue
        diff = config_diff(saved_config, config)
        if diff:
            raise ConfigMismatchError(
                f"{manager.directory} holds checkpoints (newest: step {step}) of a different "
                "model or config:\n" + "\n".join(diff) + "\nUse another --workdir, restore "
                "the old settings, or pass --fresh to move the old checkpoints aside (into "
                "WORKDIR/checkpoints.old-*) and start over.")
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))
        except Exception as e:  # noqa: BLE001
            _move_aside(manager, step, f"{type(e).__name__}: {str(e)[:300]}")
            continue
        logging.info("Restored checkpoint at step %d from %s", step, manager.directory)
        return restored.state
    return None


def set_aside(workdir: str) -> Optional[str]:
    """Moves WORKDIR/checkpoints (and summary.json) to WORKDIR/checkpoints.old-<time>."""
    src = checkpoint_dir(workdir)
    if not os.path.exists(src):
        return None
    dest = f"{src}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
        shutil.move(src, dest)
        summary = os.path.join(workdir, "summary.json")
        if os.path.exists(summary):
            shutil.move(summary, os.path.join(dest, "summary.json"))
    logging.warning("Moved the previous checkpoints to %s; starting fresh.", dest)
    return dest
