"""Timestep samplers of the training loss (training.timestep_sampler): pure functions of a
small state pytree kept in the TrainState (`TrainState.t_sampler`), so they run inside the
jitted train step, are checkpointed with it and resume exactly.

- "uniform": t ~ U{0..T-1}, every example weighted 1. Its state is None (no arrays: the
  train state, its checkpoints and rng streams are those of a run without a sampler).
- "loss_second_moment" (I-DDPM's LossSecondMomentResampler, DDPM-IP and DMZ's choice): the
  last HISTORY losses of every t ([T, HISTORY] float32) and how many were recorded ([T]
  int32). Uniform until every t has HISTORY losses; then p_t ∝ sqrt(mean of its loss^2),
  mixed with the uniform distribution, (1 - UNIFORM_PROB) p + UNIFORM_PROB / T, t ~ p, and
  example i's loss is weighted 1 / (T p_{t_i}), which keeps the objective's expectation
  that of uniform t while lowering its variance.

The history is updated with the global batch's (t, unweighted per-example loss) pairs in
batch order (I-DDPM's `update_with_all_losses`: a full row shifts out its oldest loss).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

SAMPLERS = ("uniform", "loss_second_moment")
HISTORY = 10  # losses kept per timestep
UNIFORM_PROB = 1e-3  # share of the uniform distribution in the mixture


def init(name: str, num_timesteps: int) -> Optional[dict]:
    """The initial state of sampler `name` over T = num_timesteps steps: None for "uniform",
    else {"history": zeros [T, HISTORY] float32, "count": zeros [T] int32}."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown timestep sampler {name!r}; choose one of {SAMPLERS}")
    if name == "uniform":
        return None
    return {"history": jnp.zeros((num_timesteps, HISTORY), jnp.float32),
            "count": jnp.zeros((num_timesteps,), jnp.int32)}


def warmed_up(state: dict) -> jax.Array:
    """bool scalar: every timestep has HISTORY losses."""
    return jnp.all(state["count"] >= state["history"].shape[1])


def probabilities(state: dict) -> jax.Array:
    """p [T] float32 of the next draw: uniform until `warmed_up`, then sqrt(mean(loss^2))
    normalised and mixed with UNIFORM_PROB of the uniform distribution (uniform too when every
    recorded loss is 0)."""
    T = state["history"].shape[0]
    second_moment = jnp.sqrt(jnp.mean(state["history"] ** 2, axis=-1))
    total = jnp.sum(second_moment)
    p = jnp.where(total > 0, second_moment / jnp.where(total > 0, total, 1.0), 1.0 / T)
    p = (1.0 - UNIFORM_PROB) * p + UNIFORM_PROB / T
    return jnp.where(warmed_up(state), p, jnp.full((T,), 1.0 / T, jnp.float32))


def sample(state: Optional[dict], rng: jax.Array, batch: int,
           num_timesteps: int) -> tuple[jax.Array, Optional[jax.Array]]:
    """(t int32 [batch], loss weights float32 [batch] or None) for one global batch.

    None state ("uniform"): t = randint(rng) and weights None (weight 1, nothing computed).
    Else before warm-up the same randint draw with weights 1, after it t ~ `probabilities`
    (inverse CDF of a uniform draw from rng) with weights 1 / (T p_t).
    """
    uniform_t = jax.random.randint(rng, (batch,), 0, num_timesteps)
    if state is None:
        return uniform_t, None
    p = probabilities(state)
    cdf = jnp.cumsum(p)
    u = jax.random.uniform(rng, (batch,), jnp.float32) * cdf[-1]
    drawn = jnp.minimum(jnp.searchsorted(cdf, u, side="right"), num_timesteps - 1)
    ready = warmed_up(state)
    t = jnp.where(ready, drawn.astype(uniform_t.dtype), uniform_t)
    weights = jnp.where(ready, 1.0 / (num_timesteps * p[t]), 1.0).astype(jnp.float32)
    return t, weights


def update(state: Optional[dict], t: jax.Array, losses: jax.Array) -> Optional[dict]:
    """The state after recording losses [B] (float, unweighted) at timesteps t [B] (int), in
    batch order: as if each (t_i, loss_i) were appended in turn to row t_i, a full row
    (HISTORY losses) dropping its oldest. None ("uniform") stays None.

    Vectorised: example i is the r_i-th of the batch at its t (r_i = earlier examples with the
    same t); row t then holds its old losses followed by the batch's, of which it keeps the
    last HISTORY (its count grows to at most HISTORY).
    """
    if state is None:
        return None
    history, count = state["history"], state["count"]
    T, H = history.shape
    t = t.astype(jnp.int32)
    same = t[:, None] == t[None, :]  # [B, B]
    earlier = jnp.tril(same, k=-1)  # j < i with t_j == t_i
    rank = jnp.sum(earlier, axis=1).astype(jnp.int32)  # [B]
    added = jnp.zeros((T,), jnp.int32).at[t].add(1)  # [T]
    length = count + added  # row length before truncation
    shift = jnp.maximum(length - H, 0)  # oldest entries dropped per row
    # old entries move left by `shift` (slots they vacate are overwritten below)
    slots = jnp.arange(H)[None, :] + shift[:, None]  # [T, H]
    moved = jnp.take_along_axis(history, jnp.minimum(slots, H - 1), axis=1)
    # example i lands at position count + rank, i.e. slot count + rank - shift (< 0: dropped)
    slot = count[t] + rank - shift[t]
    slot = jnp.where(slot >= 0, slot, H)  # out of range: dropped by mode="drop"
    new_history = moved.at[t, slot].set(losses.astype(history.dtype), mode="drop")
    return {"history": new_history, "count": jnp.minimum(length, H).astype(count.dtype)}
