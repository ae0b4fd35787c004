"""The state a fresh run starts from, and so the untrained baseline of the probes.

One definition for the run (dmz_jax.train.Run.fresh_state), the end-of-training summary
(summary.json's probe_accuracy_at_init) and --mode=evaluate (evaluate/metrics.json's): the
parameters initialised from config.seed, then either copied from training.init_from's newest
checkpoint (dmz_jax.warm_start: raw and EMA parameters, and the BatchNorm statistics when
they fit) or, without it, the encoder's logits centred on the first
model.encoder.center_examples training images (train_state.center_encoder_logits).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import optax

from dmz_jax import checkpointing, data, sharding, warm_start
from dmz_jax.model import DMZ
from dmz_jax.train_state import (TrainState, center_encoder_logits, copy_tree,
                                 create_train_state)


def init_source(config, abstract_state: TrainState, state_sharding: TrainState
                ) -> Optional[tuple]:
    """training.init_from, checked against this model (warm_start.check: paths and shapes,
    no array read), as `start_from` takes it: (state folder, the placed parameters[, the
    placed BatchNorm statistics]); None without init_from."""
    if not config.training.init_from:
        return None
    source = (warm_start.check(config.training.init_from, abstract_state.params),
              checkpointing.placed(abstract_state.params, state_sharding.params))
    if abstract_state.batch_stats is not None:
        source += (checkpointing.placed(abstract_state.batch_stats, state_sharding.batch_stats),)
    return source


def start_from(config, model: DMZ, state: TrainState, source: Optional[tuple],
               params_sharding: Any) -> TrainState:
    """`state` (fresh from create_train_state) made into the state a new run starts from.

    source (from `init_source`): the parameters (raw and EMA) of that checkpoint, and its
    BatchNorm statistics when they fit. None: the encoder bias centred on the first
    model.encoder.center_examples training images (fixed order), when that is > 0 (the
    result placed on params_sharding).
    """
    if source is not None:
        params, ema_params = warm_start.load(*source[:2])
        state = state.replace(params=params, ema_params=ema_params)
        if len(source) == 3:
            stats = warm_start.load_batch_stats(*source[::2])
            state = state if stats is None else state.replace(batch_stats=stats)
        return state
    n = config.model.encoder.center_examples
    if model.uses_latent and n:
        images = data.load_split(config.data, "train", n)["image"]
        # the EMA parameters start as a copy, made in the same compiled function (copied
        # leaf by leaf outside jit, every shape would compile its own copy)
        params, ema_params = jax.jit(
            lambda p, x: _with_copy(center_encoder_logits(model, p, x)),
            out_shardings=(params_sharding, params_sharding))(state.params, images)
        state = state.replace(params=params, ema_params=ema_params)
    return state


def _with_copy(tree):
    """(tree, a copy of it): under jit, two sets of buffers."""
    return tree, copy_tree(tree)


def untrained(config, model: DMZ, mesh, init: Optional[Callable[[], TrainState]] = None
              ) -> tuple[Any, Any]:
    """(params, batch_stats) that a fresh run of `config` starts from (its raw parameters;
    batch_stats None without BatchNorm): the untrained baseline of the probes.

    init: a jitted () -> fresh TrainState placed on the mesh (a run's own, so nothing is
    compiled twice); default: one with no optimizer state, placed as training places it.
    """
    if init is None:
        fresh = functools.partial(create_train_state, config, model, optax.identity())
        init = jax.jit(fresh, out_shardings=sharding.state_shardings(jax.eval_shape(fresh),
                                                                     mesh))
    abstract = jax.eval_shape(init)
    shardings = sharding.state_shardings(abstract, mesh)
    state = start_from(config, model, init(), init_source(config, abstract, shardings),
                       shardings.params)
    return state.params, state.batch_stats
