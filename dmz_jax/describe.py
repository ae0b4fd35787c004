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


def describe(config: ml_collections.ConfigDict) -> str:
    """The text printed by --mode=describe; its last four lines are `name: N` counts."""
    params = abstract_params(config)
    counts = parameter_groups(params)
    table = parameter_overview.get_parameter_overview(params, include_stats=False)
    return "\n".join([table] + [f"{group}_params: {counts[group]}" for group in
                                ("encoder", "conditioning", "denoiser", "total")])
