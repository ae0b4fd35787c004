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

# How training draws bits: straight-through Bernoulli or threshold bits (ours), or the authors'
# Gumbel-softmax relaxation (soft in training, no straight-through).
BINARY_ESTIMATORS = ("bernoulli", "threshold", "gumbel_softmax")
GUMBEL_EVALS = ("argmax", "sample")  # gumbel_softmax at evaluation: 1[p > 0.5] or a draw


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


def gumbel_softmax_bits(logits: jax.Array, rng: jax.Array, temperature: float = 1.0) -> jax.Array:
    """The "on" entry of a two-category Gumbel-softmax sample per bit (Jang et al. 2017).

    logits [B, n] are l_on - l_off of each bit's (off, on) pair. With Gumbel draws g_off, g_on,
    softmax((l + g) / tau)_on = sigmoid((l_on - l_off + g_on - g_off) / tau), and g_on - g_off is
    Logistic(0, 1): so z = sigmoid((logits + log u - log(1 - u)) / tau), u ~ U(0, 1). The pair is
    (1 - z, z) exactly. Soft, in (0, 1), differentiable in the logits; no straight-through.
    """
    u = jax.random.uniform(rng, logits.shape, jnp.float32, minval=1e-20, maxval=1.0)
    noise = jnp.log(u) - jnp.log1p(-u)
    return jax.nn.sigmoid((logits.astype(jnp.float32) + noise) / temperature)


def binary_from_logits(logits: jax.Array, rng: Optional[jax.Array], encoding: Encoding,
                       estimator: str = "bernoulli", temperature: float = 1.0) -> jax.Array:
    """Bits with a straight-through gradient in training, or a Gumbel-softmax relaxation.

    estimator "gumbel_softmax", TRAIN: z = gumbel_softmax_bits(logits, rng, temperature), soft.
    Otherwise p = sigmoid(logits). TRAIN: b ~ Bernoulli(p) (estimator "bernoulli") or b = 1[p > 0.5]
    ("threshold"), and z = b + (p - stop_gradient(p)): its value is exactly b (the subtraction
    comes first) and its gradient that of p. DETERMINISTIC: z = 1[p > 0.5]. SAMPLE: z = b.
    """
    if encoding is Encoding.TRAIN and estimator == "gumbel_softmax":
        return gumbel_softmax_bits(logits, rng, temperature)
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
                         estimator: str = "bernoulli", temperature: float = 1.0) -> jax.Array:
    """A deterministic real-valued code (the paper's Gaussian-z ablation: no KL, N(0, I) prior)."""
    del rng, encoding, estimator, temperature
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


def one_hot_pairs(z: jax.Array) -> jax.Array:
    """Bits z [B, n] in [0, 1] -> the authors' [B, 2n] vector [off_0, on_0, off_1, on_1, ...]
    with off_i = 1 - z_i (their Gumbel-softmax pair, flattened)."""
    return jnp.stack([1.0 - z, z], axis=-1).reshape(*z.shape[:-1], 2 * z.shape[-1])
