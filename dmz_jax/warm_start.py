"""training.init_from: a new run starts from the parameters of another run's checkpoint.

The use: fine-tuning at a higher resolution (configs/celebahq256.py from a configs/celeba64.py
run). No parameter of the U-Net or the encoder depends on the image size (convolutions,
attention, an encoder that averages over H x W), so a model with the same widths and levels
(attention at the same level: 4x the pixels at 4x the size) has parameters of the same shapes.
The raw and the EMA parameters are copied, and the encoder's BatchNorm statistics when both
models have them (a Conv-BN encoder, e.g. the authors' DiffDecoder converted by
`python -m dmz_jax.convert`); the optimizer state, the step and the rng start afresh. Any parameter whose path or shape differs is an error listing them all, raised when
the run is set up, before anything is compiled.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from dmz_jax import checkpointing

COPIED = ("params", "ema_params")


class IncompatibleInitError(checkpointing.ConfigMismatchError):
    """training.init_from names no checkpoint, or one whose parameters do not fit."""


def committed_steps(folder: epath.Path) -> list[int]:
    """The steps that orbax finalized in `folder` (a WORKDIR/checkpoints), ascending.

    Asked of orbax (ocp.step), not read off the folder names: a step being written is
    `<step>.orbax-checkpoint-tmp-*` on a local disk, but `<step>` without its
    commit_success.txt on GCS, where a listing would take it for a finished one."""
    return sorted(int(path.name) for path in ocp.step.checkpoint_steps_paths(folder)
                  if path.name.isdigit())


def newest_state_dir(workdir: str) -> epath.Path:
    """WORKDIR/checkpoints/<newest committed step>/state; IncompatibleInitError when none.

    A committed step without its state/ item (a damaged copy) is skipped with a warning."""
    folder = epath.Path(checkpointing.checkpoint_dir(workdir))
    for step in reversed(committed_steps(folder)):
        state_dir = folder / str(step) / "state"
        if state_dir.is_dir():
            return state_dir
        logging.warning("training.init_from: %s has no state/ item; trying an older step.",
                        folder / str(step))
    raise IncompatibleInitError(
        f"training.init_from={workdir!r} holds no checkpoint (no committed "
        f"{folder}/<step>/ with a state/ item): give the --workdir of a run that has saved one.")


def _shapes(tree: Any) -> dict[str, tuple]:
    """{"a/b/c": shape} of every leaf of a nested dict of arrays or array metadata."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in flat}


def mismatches(saved: Any, wanted: Any) -> list[str]:
    """Lines `path: checkpoint shape -> this model's shape` (or absent) where they differ."""
    have, want = _shapes(saved), _shapes(wanted)
    return [f"  {path}: {have.get(path, 'absent')} -> {want.get(path, 'absent')}"
            for path in sorted(set(have) | set(want)) if have.get(path) != want.get(path)]


def check(init_from: str, abstract_params: Any) -> epath.Path:
    """The state folder to copy from, after checking every parameter's path and shape
    against `abstract_params` (shapes only: reads the checkpoint's metadata, no array)."""
    state_dir = newest_state_dir(init_from)
    saved = ocp.StandardCheckpointer().metadata(state_dir).item_metadata
    if saved is None or "params" not in saved:
        raise IncompatibleInitError(f"{state_dir} is not a dmz_jax train state.")
    lines = mismatches(saved["params"], abstract_params)
    if lines:
        raise IncompatibleInitError(
            f"training.init_from={init_from!r}: {len(lines)} parameter(s) of {state_dir} do "
            "not fit this model (checkpoint -> this config):\n" + "\n".join(lines[:20])
            + ("\n  ..." if len(lines) > 20 else "") + "\nOnly image_size and the attention "
            "resolutions that go with it may differ; keep model_channels, channel_mult, "
            "num_res_blocks, num_heads, the latent and the encoder of that run.")
    return state_dir


def load(state_dir: epath.Path, placed_params: Any) -> tuple[Any, Any]:
    """(params, ema_params) of the checkpoint in `state_dir`, onto the shapes and shardings
    of `placed_params` (checkpointing.placed), whatever topology wrote it."""
    target = {name: placed_params for name in COPIED}
    restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
    logging.info("Initialised the parameters (raw and EMA) from %s.", state_dir)
    return restored["params"], restored["ema_params"]


def load_batch_stats(state_dir: epath.Path, placed_stats: Any) -> Optional[Any]:
    """The checkpoint's BatchNorm statistics onto `placed_stats` (this model's), or None when
    the checkpoint has none or of other shapes (the model's own initial ones are kept)."""
    saved = ocp.StandardCheckpointer().metadata(state_dir).item_metadata
    if placed_stats is None or "batch_stats" not in saved or mismatches(
            saved["batch_stats"], placed_stats):
        logging.info("training.init_from: BatchNorm statistics start afresh.")
        return None
    target = {"batch_stats": placed_stats}
    restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
    logging.info("Initialised the BatchNorm statistics from %s.", state_dir)
    return restored["batch_stats"]
