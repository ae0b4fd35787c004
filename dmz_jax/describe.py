"""`--mode=describe`: the parameter table (clu) and the four group counts of DMZ.

Shapes come from `jax.eval_shape`, so nothing is allocated or compiled and no data is read.
"""

from __future__ import annotations

import jax
import ml_collections
from clu import parameter_overview

from dmz_jax.model import create_model, image_shape, init_params, parameter_groups


def abstract_params(config: ml_collections.ConfigDict):
    """The parameter pytree as jax.ShapeDtypeStruct leaves."""
    model = create_model(config)
    return jax.eval_shape(lambda key: init_params(model, key, image_shape(config)),
                          jax.random.PRNGKey(0))


def unet_params(params) -> int:
    """Parameters of the U-Net module as a whole, its cross-attention included (what the
    authors' code logs as "number of parameters in unet")."""
    return sum(int(leaf.size) for leaf in jax.tree.leaves(params.get("denoiser", {})))


def describe(config: ml_collections.ConfigDict) -> str:
    """The text printed by --mode=describe; its last five lines are `name: N` counts: the
    U-Net module (`unet_params`), then the four groups of `model.parameter_groups`."""
    params = abstract_params(config)
    counts = parameter_groups(params)
    table = parameter_overview.get_parameter_overview(params, include_stats=False)
    return "\n".join([table, f"unet_params: {unet_params(params)}"]
                      + [f"{group}_params: {counts[group]}" for group in
                         ("encoder", "conditioning", "denoiser", "total")])
