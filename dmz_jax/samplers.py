"""Samplers over a `dmz_jax.diffusion.Diffusion` chain: ancestral, DDIM, DDIM inversion.

`model_fn(x_t [B,H,W,C], model_t [B] float32) -> [B,H,W,C] or [B,H,W,2C]`: model_t is
`diff.model_timesteps[t]` (the original-chain timestep, see dmz_jax.diffusion); any
conditioning such as DMZ's z is closed over by the caller.  Every loop is a `lax.fori_loop`,
so each sampler traces the model once and jits as a whole (pass `diff` as an argument or
close over it; `num_timesteps` is static).  Images are NHWC float32 in [-1, 1].
`variance` (one of dmz_jax.diffusion.VARIANCES) says how to read the model output (2C
channels for "learned_range", else C) and, in ancestral steps, the noise scale; DDIM uses
only the eps part.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from dmz_jax import diffusion as dfn
from dmz_jax.diffusion import Diffusion, ModelFn

METHODS = ("ancestral", "ddim")


# --- Single steps

def _nonzero_mask(t: jax.Array, x_shape) -> jax.Array:
    """1.0 where t != 0 else 0.0, shaped [B, 1, ..., 1]."""
    return (t != 0).astype(jnp.float32).reshape((-1,) + (1,) * (len(x_shape) - 1))


def ancestral_step(diff: Diffusion, model_output: jax.Array, x_t: jax.Array, t: jax.Array,
                   noise: jax.Array, clip_denoised: bool, variance: str) -> dict:
    """x_{t-1} = mean + [t != 0] exp(log_var / 2) noise (I-DDPM p_sample).

    Returns dict(sample [B,H,W,C], pred_x0 [B,H,W,C])."""
    out = dfn.p_mean_variance(diff, model_output, x_t, t, variance=variance,
                              clip_denoised=clip_denoised)
    sample = out["mean"] + _nonzero_mask(t, x_t.shape) * jnp.exp(0.5 * out["log_variance"]) * noise
    return dict(sample=sample, pred_x0=out["pred_x0"])


def ddim_step(diff: Diffusion, model_output: jax.Array, x_t: jax.Array, t: jax.Array,
              noise: jax.Array, clip_denoised: bool, variance: str,
              eta: float = 0.0) -> dict:
    """One DDIM step x_t -> x_{t-1} (I-DDPM ddim_sample); eps is re-derived from the (clipped)
    pred_x0, sigma = eta sqrt((1-abar_prev)/(1-abar)) sqrt(1 - abar/abar_prev), no noise at
    t == 0.  `noise` may be anything broadcastable when eta == 0.  Returns dict(sample, pred_x0).
    """
    out = dfn.p_mean_variance(diff, model_output, x_t, t, variance=variance,
                              clip_denoised=clip_denoised)
    eps = dfn.predict_eps_from_x0(diff, x_t, t, out["pred_x0"])
    abar = dfn.extract(diff.alphas_cumprod, t, x_t.shape)
    abar_prev = dfn.extract(diff.alphas_cumprod_prev, t, x_t.shape)
    sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar)) * jnp.sqrt(1.0 - abar / abar_prev)
    # 1 - abar_prev - sigma^2 = (1 - abar_prev)^2 abar / ((1 - abar) abar_prev) >= 0; the max
    # only guards float32 rounding at the last step (abar ~ 1e-9), where it can dip below 0.
    mean = (out["pred_x0"] * jnp.sqrt(abar_prev)
            + jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma ** 2, 0.0)) * eps)
    sample = mean + _nonzero_mask(t, x_t.shape) * sigma * noise
    return dict(sample=sample, pred_x0=out["pred_x0"])


def ddim_reverse_step(diff: Diffusion, model_output: jax.Array, x_t: jax.Array, t: jax.Array,
                      clip_denoised: bool, variance: str) -> dict:
    """One deterministic DDIM inversion step x_t -> x_{t+1} (I-DDPM ddim_reverse_sample,
    eta = 0); at the last step abar_next = 0, so the result is the re-derived eps.
    Returns dict(sample, pred_x0)."""
    out = dfn.p_mean_variance(diff, model_output, x_t, t, variance=variance,
                              clip_denoised=clip_denoised)
    eps = dfn.predict_eps_from_x0(diff, x_t, t, out["pred_x0"])
    abar_next = dfn.extract(diff.alphas_cumprod_next, t, x_t.shape)
    sample = out["pred_x0"] * jnp.sqrt(abar_next) + jnp.sqrt(1.0 - abar_next) * eps
    return dict(sample=sample, pred_x0=out["pred_x0"])


def _step_t(diff: Diffusion, i: jax.Array, batch: int, reverse: bool = True):
    """(t int32 [B], model_t float32 [B]) for loop counter i; reverse walks T-1 .. 0."""
    t_scalar = diff.num_timesteps - 1 - i if reverse else i
    t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
    return t, diff.model_timesteps[t]


def ancestral_sample(diff: Diffusion, model_fn: ModelFn, shape: Sequence[int],
                     rng: jax.Array, *, variance: str, clip_denoised: bool = True,
                     x_T: Optional[jax.Array] = None) -> jax.Array:
    """I-DDPM p_sample_loop: x_T ~ N(0, I) (or the given x_T) -> x0 of `shape` [B,H,W,C]."""
    init_key, loop_key = jax.random.split(rng)
    x = jax.random.normal(init_key, shape, jnp.float32) if x_T is None else x_T

    def body(i, x):
        t, model_t = _step_t(diff, i, shape[0])
        noise = jax.random.normal(jax.random.fold_in(loop_key, i), shape, jnp.float32)
        return ancestral_step(diff, model_fn(x, model_t), x, t, noise,
                                  clip_denoised, variance)["sample"]

    return jax.lax.fori_loop(0, diff.num_timesteps, body, x)


def ddim_sample(diff: Diffusion, model_fn: ModelFn, shape: Sequence[int],
                rng: Optional[jax.Array], *, variance: str, eta: float = 0.0,
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
        return ddim_step(diff, model_fn(x, model_t), x, t, noise, clip_denoised,
                             variance, eta)["sample"]

    return jax.lax.fori_loop(0, diff.num_timesteps, body, x)


def ddim_invert(diff: Diffusion, model_fn: ModelFn, x0: jax.Array, *, variance: str,
                clip_denoised: bool = True) -> jax.Array:
    """Deterministic DDIM inversion (eta = 0), x0 [B,H,W,C] -> x_T [B,H,W,C], walking
    t = 0 .. T-1 with ddim_reverse_step (Diff-AE's "stochastic code")."""

    def body(i, x):
        t, model_t = _step_t(diff, i, x0.shape[0], reverse=False)
        return ddim_reverse_step(diff, model_fn(x, model_t), x, t, clip_denoised,
                                     variance)["sample"]

    return jax.lax.fori_loop(0, diff.num_timesteps, body, x0)


def sample(diff: Diffusion, model_fn: ModelFn, shape: Sequence[int], rng: Optional[jax.Array],
           *, method: str, num_steps: int, variance: str, eta: float = 0.0,
           clip_denoised: bool = True, x_T: Optional[jax.Array] = None) -> jax.Array:
    """Respace `diff` to num_steps (skipped when it already has that many) and run `method`
    ('ancestral' or 'ddim'; eta only applies to DDIM).  Returns x0 of `shape`."""
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; choose one of {METHODS}")
    spaced = diff if num_steps == diff.num_timesteps else diff.respace(num_steps)
    if method == "ancestral":
        return ancestral_sample(spaced, model_fn, shape, rng, variance=variance,
                                clip_denoised=clip_denoised, x_T=x_T)
    return ddim_sample(spaced, model_fn, shape, rng, variance=variance, eta=eta,
                       clip_denoised=clip_denoised, x_T=x_T)
