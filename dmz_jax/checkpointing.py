"""Orbax checkpoints of the train state, with the config saved beside each one."""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp


def create_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """A manager for WORKDIR/checkpoints keeping the newest `keep` steps."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "config"))


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         config: ml_collections.ConfigDict) -> None:
    """Saves asynchronously; call `manager.wait_until_finished()` before exiting."""
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config.to_dict())))


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Optional[Any]:
    """Restores the newest checkpoint into the shapes and shardings of `abstract_state`.

    Returns None when the workdir holds no checkpoint.
    """
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    logging.info("Restored checkpoint at step %d from %s", step, manager.directory)
    return restored.state


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing `state`, for restoring into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
