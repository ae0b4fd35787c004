"""Samplers over a `dmz_jax.diffusion.Diffusion` chain: ancestral, DDIM, DDIM inversion.

`model_fn(x_t [B,H,W,C], model_t [B] float32) -> [B,H,W,C] or [B,H,W,2C]`: model_t is
`diff.model_timesteps[t]` (the original-chain timestep, see dmz_jax.diffusion); any
conditioning such as DMZ's z is closed over by the caller.  Every loop is a `lax.fori_loop`,
so each sampler traces the model once and jits as a whole (pass `diff` as an argument or
close over it; `num_timesteps` is static).  Images are NHWC float32 in [-1, 1].
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from dmz_jax import diffusion as dfn
from dmz_jax.diffusion import Diffusion, ModelFn

METHODS = ("ancestral", "ddim")


def _step_t(diff: Diffusion, i: jax.Array, batch: int, reverse: bool = True):
    """(t int32 [B], model_t float32 [B]) for loop counter i; reverse walks T-1 .. 0."""
    t_scalar = diff.num_timesteps - 1 - i if reverse else i
    t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
    return t, diff.model_timesteps[t]


def ancestral_sample(diff: Diffusion, model_fn: ModelFn, shape: Sequence[int],
                     rng: jax.Array, *, learn_sigma: bool, clip_denoised: bool = True,
                     x_T: Optional[jax.Array] = None) -> jax.Array:
    """I-DDPM p_sample_loop: x_T ~ N(0, I) (or the given x_T) -> x0 of `shape` [B,H,W,C]."""
    init_key, loop_key = jax.random.split(rng)
    x = jax.random.normal(init_key, shape, jnp.float32) if x_T is None else x_T

    def body(i, x):
        t, model_t = _step_t(diff, i, shape[0])
        noise = jax.random.normal(jax.random.fold_in(loop_key, i), shape, jnp.float32)
        return dfn.ancestral_step(diff, model_fn(x, model_t), x, t, noise,
                                  clip_denoised, learn_sigma)["sample"]

    return jax.lax.fori_loop(0, diff.num_timesteps, body, x)


def ddim_sample(diff: Diffusion, model_fn: ModelFn, shape: Sequence[int],
                rng: Optional[jax.Array], *, learn_sigma: bool, eta: float = 0.0,
                clip_denoised: bool = True, x_T: Optional[jax.Array] = None) -> jax.Array:
    """I-DDPM ddim_sample_loop: x_T -> x0 of `shape` [B,H,W,C].

    x_T defaults to N(0, I) noise from rng.  rng may be None only when x_T is given and
    eta == 0 (the sampler is then deterministic).
    """
    if rng is None:
        if x_T is None or not (isinstance(eta, (int, float)) and eta == 0):
            raise ValueError("ddim_sample needs rng unless x_T is given and eta == 0")
        rng = jax.random.PRNGKey(0)  # unused: sigma == 0
    init_key, loop_key = jax.random.split(rng)
    x = jax.random.normal(init_key, shape, jnp.float32) if x_T is None else x_T
    stochastic = not (isinstance(eta, (int, float)) and eta == 0)

    def body(i, x):
        t, model_t = _step_t(diff, i, shape[0])
        noise = (jax.random.normal(jax.random.fold_in(loop_key, i), shape, jnp.float32)
                 if stochastic else jnp.zeros(shape, jnp.float32))
        return dfn.ddim_step(diff, model_fn(x, model_t), x, t, noise, clip_denoised,
                             learn_sigma, eta)["sample"]

    return jax.lax.fori_loop(0, diff.num_timesteps, body, x)


def ddim_invert(diff: Diffusion, model_fn: ModelFn, x0: jax.Array, *, learn_sigma: bool,
                clip_denoised: bool = True) -> jax.Array:
    """Deterministic DDIM inversion (eta = 0), x0 [B,H,W,C] -> x_T [B,H,W,C], walking
    t = 0 .. T-1 with ddim_reverse_step (Diff-AE's "stochastic code")."""

    def body(i, x):
        t, model_t = _step_t(diff, i, x0.shape[0], reverse=False)
        return dfn.ddim_reverse_step(diff, model_fn(x, model_t), x, t, clip_denoised,
                                     learn_sigma)["sample"]

    return jax.lax.fori_loop(0, diff.num_timesteps, body, x0)


def sample(diff: Diffusion, model_fn: ModelFn, shape: Sequence[int], rng: Optional[jax.Array],
           *, method: str, num_steps: int, learn_sigma: bool, eta: float = 0.0,
           clip_denoised: bool = True, x_T: Optional[jax.Array] = None) -> jax.Array:
    """Respace `diff` to num_steps (skipped when it already has that many) and run `method`
    ('ancestral' or 'ddim'; eta only applies to DDIM).  Returns x0 of `shape`."""
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; choose one of {METHODS}")
    spaced = diff if num_steps == diff.num_timesteps else diff.respace(num_steps)
    if method == "ancestral":
        return ancestral_sample(spaced, model_fn, shape, rng, learn_sigma=learn_sigma,
                                clip_denoised=clip_denoised, x_T=x_T)
    return ddim_sample(spaced, model_fn, shape, rng, learn_sigma=learn_sigma, eta=eta,
                       clip_denoised=clip_denoised, x_T=x_T)
