"""Latent types: how encoder logits become z, and the prior z is drawn from for generation.

Each latent type is a pair of pure functions:
  - `from_logits(logits, rng, encoding, estimator)`: logits [B, n] -> z [B, n] float32;
  - `prior(rng, batch, n)`: z [batch, n] drawn from the generation prior.
"""

from __future__ import annotations

import enum
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

BINARY_ESTIMATORS = ("bernoulli", "threshold")  # how training draws bits


class Encoding(enum.Enum):
    """How an image's logits become z.

    TRAIN: differentiable (straight-through for binary z), drawn as `binary_estimator` says.
    DETERMINISTIC: exact bits 1[p > 0.5] (evaluation, reconstruction).
    SAMPLE: bits drawn from Bernoulli(p), not differentiated.
    """

    TRAIN = "train"
    DETERMINISTIC = "deterministic"
    SAMPLE = "sample"

    @property
    def needs_rng(self) -> bool:
        return self is not Encoding.DETERMINISTIC


def binary_from_logits(logits: jax.Array, rng: Optional[jax.Array], encoding: Encoding,
                       estimator: str = "bernoulli") -> jax.Array:
    """Bits with a straight-through gradient in training.

    p = sigmoid(logits). TRAIN: b ~ Bernoulli(p) (estimator "bernoulli") or b = 1[p > 0.5]
    ("threshold"), and z = b + (p - stop_gradient(p)): its value is exactly b (the subtraction
    comes first) and its gradient that of p. DETERMINISTIC: z = 1[p > 0.5]. SAMPLE: z = b.
    """
    p = jax.nn.sigmoid(logits.astype(jnp.float32))
    if encoding is Encoding.DETERMINISTIC or (encoding is Encoding.TRAIN
                                              and estimator == "threshold"):
        bits = (p > 0.5).astype(jnp.float32)
    else:
        bits = jax.random.bernoulli(rng, p).astype(jnp.float32)
    if encoding is Encoding.TRAIN:
        return bits + (p - jax.lax.stop_gradient(p))  # p - p is exactly 0: z is exactly b
    return bits


def binary_prior(rng: jax.Array, batch: int, n: int) -> jax.Array:
    """z ~ Bernoulli(0.5)^n: [batch, n] of exact 0/1 floats."""
    return jax.random.bernoulli(rng, 0.5, (batch, n)).astype(jnp.float32)


def gaussian_from_logits(logits: jax.Array, rng: Optional[jax.Array], encoding: Encoding,
                         estimator: str = "bernoulli") -> jax.Array:
    """A deterministic real-valued code (the paper's Gaussian-z ablation: no KL, N(0, I) prior)."""
    del rng, encoding, estimator
    return logits.astype(jnp.float32)


def gaussian_prior(rng: jax.Array, batch: int, n: int) -> jax.Array:
    return jax.random.normal(rng, (batch, n), jnp.float32)


class LatentType(NamedTuple):
    from_logits: Callable[..., jax.Array]
    prior: Callable[[jax.Array, int, int], jax.Array]


LATENT_TYPES = {
    "binary": LatentType(binary_from_logits, binary_prior),
    "gaussian": LatentType(gaussian_from_logits, gaussian_prior),
}


def get_latent_type(name: str) -> LatentType:
    if name not in LATENT_TYPES:
        raise ValueError(f"Unknown latent type {name!r}; choose one of {sorted(LATENT_TYPES)}.")
    return LATENT_TYPES[name]
