"""The authors' encoder body (exlab-research/dmz, dmz/models.py BernoulliEncoder), channels-last.

For each width, the last included: Conv 3x3 stride 2 padding 1 -> BatchNorm2d (eps 1e-5,
momentum 0.1) -> LeakyReLU(0.01); then the feature map is flattened in PyTorch's NCHW order
(so the authors' Linear weight applies unchanged, see dmz_jax.convert.diffusers) ->
Dense(2 * latent_dim), read as latent_dim (off, on) pairs (h.reshape(B, -1, 2)).

Parameter names mirror the authors' state dict: layers.{i}.0 (conv) -> layers_{i}/conv,
layers.{i}.1 (BatchNorm2d) -> layers_{i}/bn (params scale/bias; "batch_stats" mean/var),
proj -> proj. Initialisation follows PyTorch's defaults.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmz_jax.networks.diffusers_layers import conv, dense

LEAKY_SLOPE = 0.01  # torch.nn.LeakyReLU()'s default


def conv_bn_widths(image_size: int, first_width: int = 32) -> tuple[int, ...]:
    """The authors' encoder widths: first_width * 2^i for i < log2(image_size) - 1, so the last
    layer's map is 2x2 (32 px -> 4 widths 32..256, 64 px -> 5, 256 px -> 7)."""
    try:
        size = int(image_size)
    except (TypeError, ValueError):
        size = 0
    if size != image_size or size < 4 or size & (size - 1):
        raise ValueError(
            f"conv_bn encoder: image size {image_size!r} is not a power of two >= 4; its "
            "stride-2 layers halve the image down to 2x2. Resize or crop the images to a power "
            "of two (e.g. 32, 64, 256), or use the resblocks encoder")
    return tuple(first_width * 2 ** i for i in range(size.bit_length() - 2))


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm2d over channels-last input [B, ..., C], computed in float32.

    train=True: normalises with the batch mean and the biased batch variance over every axis
    but the last, and updates the "batch_stats" variables `mean` and `var` (initially 0 and 1)
    as running = (1 - momentum) * running + momentum * batch, with the UNBIASED batch variance
    (n / (n - 1) times the biased one), as PyTorch does; not while initialising.
    train=False: normalises with the running statistics.

    Under jit with a batch sharded over devices the statistics are those of the global batch
    (jnp.mean over a sharded axis is a global reduction), unlike per-device BatchNorm in a
    PyTorch DDP replica, which sees only its own shard.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        running_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        xf = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            count = math.prod(x.shape[:-1])
            mean = xf.mean(axes)
            var = jnp.square(xf - mean).mean(axes)
            if not self.is_initializing():
                m = self.momentum
                unbiased = var * (count / max(count - 1, 1))
                running_mean.value = (1 - m) * running_mean.value + m * mean
                running_var.value = (1 - m) * running_var.value + m * unbiased
        else:
            mean, var = running_mean.value, running_var.value
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(x.dtype)


class _ConvBNLayer(nn.Module):
    width: int
    dtype: Optional[Any] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        h = conv(self.width, x.shape[-1], 3, "conv", self.dtype, strides=2)(x)
        h = BatchNorm(name="bn")(h, train)
        return nn.leaky_relu(h, LEAKY_SLOPE)


class ConvBNEncoder(nn.Module):
    """x [B, H, W, C] in [-1, 1] -> bit logits float32 [B, latent_dim] (on minus off), or with
    return_pairs the (off, on) pairs float32 [B, latent_dim, 2]. `train` selects BatchNorm's
    batch statistics (and updates "batch_stats", which must then be mutable)."""

    latent_dim: int
    widths: Sequence[int]
    dtype: Optional[Any] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_pairs: bool = False):
        h = x
        for i, width in enumerate(self.widths):
            h = _ConvBNLayer(width, self.dtype, name=f"layers_{i}")(h, train)
        b = h.shape[0]
        flat = jnp.transpose(h, (0, 3, 1, 2)).reshape(b, -1)  # PyTorch's NCHW flatten order
        out = dense(2 * self.latent_dim, flat.shape[-1], "proj", self.dtype)(flat)
        pairs = out.astype(jnp.float32).reshape(b, self.latent_dim, 2)
        if return_pairs:
            return pairs
        return pairs[..., 1] - pairs[..., 0]
