"""Latent types: how encoder logits become z, and the prior z is drawn from for generation.

Each latent type is a pair of pure functions:
  - `from_logits(logits, rng, mode)`: logits [B, n] -> z [B, n] float32, where mode is
    "train" (stochastic, differentiable), "encode" (deterministic) or "sample" (stochastic,
    not differentiated).
  - `prior(rng, batch, n)`: z [batch, n] drawn from the generation prior.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

MODES = ("train", "train_threshold", "encode", "sample")
BINARY_ESTIMATORS = ("bernoulli", "threshold")  # how "train" mode draws bits


def binary_from_logits(logits: jax.Array, rng: jax.Array, mode: str) -> jax.Array:
    """Bernoulli bits with a straight-through gradient.

    p = sigmoid(logits). "train": b ~ Bernoulli(p), z = b + (p - stop_gradient(p)), whose
    value is exactly b (0 or 1: the subtraction comes first) and whose gradient is that of p.
    "train_threshold": the same with b = 1[p > 0.5] (deterministic straight-through).
    "encode": z = 1[p > 0.5]. "sample": z = b.
    """
    p = jax.nn.sigmoid(logits.astype(jnp.float32))
    if mode == "encode":
        return (p > 0.5).astype(jnp.float32)
    if mode == "train_threshold":
        bits = (p > 0.5).astype(jnp.float32)
    else:
        bits = jax.random.bernoulli(rng, p).astype(jnp.float32)
    if mode == "sample":
        return bits
    return bits + (p - jax.lax.stop_gradient(p))  # p - p is exactly 0: z is exactly b


def binary_prior(rng: jax.Array, batch: int, n: int) -> jax.Array:
    """z ~ Bernoulli(0.5)^n: [batch, n] of exact 0/1 floats."""
    return jax.random.bernoulli(rng, 0.5, (batch, n)).astype(jnp.float32)


def gaussian_from_logits(logits: jax.Array, rng: jax.Array, mode: str) -> jax.Array:
    """A deterministic real-valued code (the paper's Gaussian-z ablation: no KL, N(0, I) prior)."""
    del rng, mode
    return logits.astype(jnp.float32)


def gaussian_prior(rng: jax.Array, batch: int, n: int) -> jax.Array:
    return jax.random.normal(rng, (batch, n), jnp.float32)


class LatentType(NamedTuple):
    from_logits: Callable[[jax.Array, jax.Array, str], jax.Array]
    prior: Callable[[jax.Array, int, int], jax.Array]


LATENT_TYPES = {
    "binary": LatentType(binary_from_logits, binary_prior),
    "gaussian": LatentType(gaussian_from_logits, gaussian_prior),
}


def get_latent_type(name: str) -> LatentType:
    if name not in LATENT_TYPES:
        raise ValueError(f"Unknown latent type {name!r}; choose one of {sorted(LATENT_TYPES)}.")
    return LATENT_TYPES[name]
