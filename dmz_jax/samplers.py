"""Samplers over a `dmz_jax.diffusion.Diffusion` chain: ancestral, DDIM, DDIM inversion.

`model_fn(x_t [B,H,W,C], model_t [B] float32) -> [B,H,W,C] or [B,H,W,2C]`: model_t is
`diff.model_timesteps[t]` (the original-chain timestep, see dmz_jax.diffusion); any
conditioning such as DMZ's z is closed over by the caller.  `rng` is one key, or one key per
example ([B] keys: a raw [B, 2] uint32 array or typed keys [B]); with per-example keys, row b
of a result depends on key b alone, so it does not depend on how rows are batched.
Every loop is a `lax.fori_loop`,
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
import numpy as np

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


def step_t(diff: Diffusion, i: jax.Array, batch: int, reverse: bool = True):
    """(t int32 [B], model_t float32 [B]) for loop counter i; reverse walks T-1 .. 0."""
    t_scalar = diff.num_timesteps - 1 - i if reverse else i
    t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
    return t, diff.model_timesteps[t]


# --- Keys: one for the batch, or one per example


def per_example(rng: jax.Array) -> bool:
    """Whether `rng` holds one key per example ([B] keys) rather than one key."""
    typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    return rng.ndim == (1 if typed else 2)


def split(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two keys (or two [B] key arrays) from `rng`, per example when it has one per example."""
    if per_example(rng):
        keys = jax.vmap(jax.random.split)(rng)
        return keys[:, 0], keys[:, 1]
    a, b = jax.random.split(rng)
    return a, b


def fold_in(rng: jax.Array, i: jax.Array) -> jax.Array:
    """`rng` folded with the integer i (each example's key, when it has one per example)."""
    if per_example(rng):
        return jax.vmap(jax.random.fold_in, (0, None))(rng, i)
    return jax.random.fold_in(rng, i)


def normal(rng: jax.Array, shape: Sequence[int]) -> jax.Array:
    """float32 N(0, I) noise of `shape` [B, ...]; with per-example keys row b is drawn from key
    b alone (normal(key_b, shape[1:]))."""
    if per_example(rng):
        return jax.vmap(lambda key: jax.random.normal(key, tuple(shape[1:]), jnp.float32))(rng)
    return jax.random.normal(rng, shape, jnp.float32)


# --- Loops


def _reverse_loop(diff: Diffusion, step, x: jax.Array, record: Sequence[int] = ()):
    """Runs step(i, x) -> x for i = 0 .. K-1 (chain index k = K-1-i, K = diff.num_timesteps).

    Returns (x, states [S, B, ...]): states[s] is the input x_k of chain index k = record[s]
    (indices of this chain, 0 .. K-1); states is None when record is empty."""
    if not record:
        return jax.lax.fori_loop(0, diff.num_timesteps, step, x), None
    slot = np.full((diff.num_timesteps,), -1, np.int32)
    for s, k in enumerate(record):
        if not 0 <= int(k) < diff.num_timesteps:
            raise ValueError(f"record index {k} is not a step of this "
                             f"{diff.num_timesteps}-step chain")
        slot[int(k)] = s
    slot = jnp.asarray(slot)

    def body(i, carry):
        x, states = carry
        s = slot[diff.num_timesteps - 1 - i]
        at = jnp.maximum(s, 0)
        kept = jax.lax.dynamic_index_in_dim(states, at, keepdims=False)
        states = jax.lax.dynamic_update_index_in_dim(states, jnp.where(s >= 0, x, kept), at, 0)
        return step(i, x), states

    states = jnp.zeros((len(record),) + x.shape, x.dtype)
    return jax.lax.fori_loop(0, diff.num_timesteps, body, (x, states))


def ancestral_sample(diff: Diffusion, model_fn: ModelFn, shape: Sequence[int],
                     rng: jax.Array, *, variance: str, clip_denoised: bool = True,
                     x_T: Optional[jax.Array] = None, record: Sequence[int] = ()):
    """I-DDPM p_sample_loop: x_T ~ N(0, I) (or the given x_T) -> x0 of `shape` [B,H,W,C].

    record: chain indices k (0 .. T-1) whose inputs x_k to keep; with them, returns
    (x0, states [S, B, H, W, C]) (see `_reverse_loop`)."""
    init_key, loop_key = split(rng)
    x = normal(init_key, shape) if x_T is None else x_T

    def body(i, x):
        t, model_t = step_t(diff, i, shape[0])
        noise = normal(fold_in(loop_key, i), shape)
        return ancestral_step(diff, model_fn(x, model_t), x, t, noise,
                              clip_denoised, variance)["sample"]

    x0, states = _reverse_loop(diff, body, x, record)
    return (x0, states) if record else x0


def ddim_sample(diff: Diffusion, model_fn: ModelFn, shape: Sequence[int],
                rng: Optional[jax.Array], *, variance: str, eta: float = 0.0,
                clip_denoised: bool = True, x_T: Optional[jax.Array] = None,
                record: Sequence[int] = ()):
    """I-DDPM ddim_sample_loop: x_T -> x0 of `shape` [B,H,W,C].

    x_T defaults to N(0, I) noise from rng.  rng may be None only when x_T is given and
    eta == 0 (the sampler is then deterministic).  record: as in `ancestral_sample`.
    """
    if rng is None:
        if x_T is None or not (isinstance(eta, (int, float)) and eta == 0):
            raise ValueError("ddim_sample needs rng unless x_T is given and eta == 0")
        rng = jax.random.PRNGKey(0)  # unused: sigma == 0
    init_key, loop_key = split(rng)
    x = normal(init_key, shape) if x_T is None else x_T
    stochastic = not (isinstance(eta, (int, float)) and eta == 0)

    def body(i, x):
        t, model_t = step_t(diff, i, shape[0])
        noise = (normal(fold_in(loop_key, i), shape) if stochastic
                 else jnp.zeros(shape, jnp.float32))
        return ddim_step(diff, model_fn(x, model_t), x, t, noise, clip_denoised,
                         variance, eta)["sample"]

    x0, states = _reverse_loop(diff, body, x, record)
    return (x0, states) if record else x0


def ddim_invert(diff: Diffusion, model_fn: ModelFn, x0: jax.Array, *, variance: str,
                clip_denoised: bool = True) -> jax.Array:
    """Deterministic DDIM inversion (eta = 0), x0 [B,H,W,C] -> x_T [B,H,W,C], walking
    t = 0 .. T-1 with ddim_reverse_step (Diff-AE's "stochastic code")."""

    def body(i, x):
        t, model_t = step_t(diff, i, x0.shape[0], reverse=False)
        return ddim_reverse_step(diff, model_fn(x, model_t), x, t, clip_denoised,
                                 variance)["sample"]

    return jax.lax.fori_loop(0, diff.num_timesteps, body, x0)


def sample(diff: Diffusion, model_fn: ModelFn, shape: Sequence[int], rng: Optional[jax.Array],
           *, method: str, num_steps: int, variance: str, eta: float = 0.0,
           clip_denoised: bool = True, x_T: Optional[jax.Array] = None,
           record: Sequence[int] = ()):
    """Respace `diff` to num_steps (skipped when it already has that many) and run `method`
    ('ancestral' or 'ddim'; eta only applies to DDIM).  Returns x0 of `shape`; with `record`
    (indices 0 .. num_steps-1 of the respaced chain), (x0, the inputs x_k at those indices
    [S, B, H, W, C]): the public reverse chain with its intermediate states."""
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; choose one of {METHODS}")
    spaced = diff if num_steps == diff.num_timesteps else diff.respace(num_steps)
    if method == "ancestral":
        return ancestral_sample(spaced, model_fn, shape, rng, variance=variance,
                                clip_denoised=clip_denoised, x_T=x_T, record=record)
    return ddim_sample(spaced, model_fn, shape, rng, variance=variance, eta=eta,
                       clip_denoised=clip_denoised, x_T=x_T, record=record)
