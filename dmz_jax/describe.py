"""`--mode=describe`: parameter tables of the encoder, the z pathway and the denoiser.

Shapes come from `jax.eval_shape`, so nothing is allocated or compiled and no data is read.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from dmz_jax.model import _path_names, create_model, init_params, parameter_groups


def abstract_params(config: ml_collections.ConfigDict):
    model = create_model(config)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    return jax.eval_shape(lambda key: init_params(model, key, shape), jax.random.PRNGKey(0))


def parameter_table(params, depth: int = 2) -> list[tuple[str, int]]:
    """Parameter counts per module path truncated to `depth` names, in definition order."""
    rows: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        key = "/".join(_path_names(path)[:depth])
        rows[key] = rows.get(key, 0) + int(np.prod(leaf.shape))
    return list(rows.items())


def describe(config: ml_collections.ConfigDict) -> str:
    """The text printed by --mode=describe; its last four lines are `name: N` counts."""
    params = abstract_params(config)
    lines = [f"{'module':<40} {'params':>12}", "-" * 53]
    lines += [f"{name:<40} {count:>12,}" for name, count in parameter_table(params)]
    counts = parameter_groups(params)
    lines += ["-" * 53,
              f"encoder_params: {counts['encoder']}",
              f"conditioning_params: {counts['conditioning']}",
              f"denoiser_params: {counts['denoiser']}",
              f"total_params: {counts['total']}"]
    return "\n".join(lines)
