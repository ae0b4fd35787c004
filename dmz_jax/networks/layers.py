"""Building blocks of the I-DDPM ("ADM") U-Net, channels-last (NHWC).

Each block computes the same function as its counterpart in OpenAI's improved-diffusion
`unet.py` given the same weights: 3x3 convolutions padded by one pixel on every side (also
when striding), GroupNorm with 32 groups and epsilon 1e-5 computed in float32, the timestep
embedding laid out as [cos | sin], scale-shift conditioning applied as norm(h) * (1 + scale)
+ shift with scale first, and the qkv projection split into heads as contiguous
[q | k | v] blocks per head.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

# Same padding as PyTorch's `padding=1`; Flax's "SAME" pads (0, 1) when striding by 2.
PAD_1 = ((1, 1), (1, 1))


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    Args:
      timesteps: [B] float, the timestep fed to the network (original scale, not respaced).
      dim: embedding width.
    Returns:
      [B, dim] float32: [cos(t * f_0..f_{h-1}) | sin(t * f_0..f_{h-1})] with
      f_i = max_period^(-i/h), h = dim // 2; a zero column is appended when dim is odd.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class GroupNorm32(nn.Module):
    """GroupNorm over channels-last input, computed in float32 (I-DDPM's GroupNorm32)."""

    num_groups: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.GroupNorm(num_groups=self.num_groups, epsilon=1e-5, dtype=jnp.float32)(
            x.astype(jnp.float32))
        return y.astype(x.dtype)


def conv3x3(features: int, name: Optional[str] = None, zero_init: bool = False,
            strides: int = 1) -> nn.Conv:
    init = nn.initializers.zeros if zero_init else nn.linear.default_kernel_init
    return nn.Conv(features, (3, 3), strides=(strides, strides), padding=PAD_1,
                   kernel_init=init, name=name)


class Downsample(nn.Module):
    """Halves H and W: a stride-2 3x3 conv (padding 1) or 2x2 average pooling."""

    use_conv: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_conv:
            return conv3x3(x.shape[-1], strides=2, name="op")(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
    """Doubles H and W by nearest-neighbour repetition, then an optional 3x3 conv."""

    use_conv: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if self.use_conv:
            x = conv3x3(x.shape[-1], name="conv")(x)
        return x


class ResBlock(nn.Module):
    """Residual block with optional timestep conditioning.

    x: [B, H, W, Cin]; emb: [B, E] or None (the encoder has no time input).
    Returns [B, H, W, out_channels].
    """

    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    num_groups: int = 32

    @nn.compact
    def __call__(self, x: jax.Array, emb: Optional[jax.Array], train: bool) -> jax.Array:
        h = nn.silu(GroupNorm32(self.num_groups, name="in_norm")(x))
        h = conv3x3(self.out_channels, name="in_conv")(h)
        out_norm = GroupNorm32(self.num_groups, name="out_norm")
        if emb is None:
            h = out_norm(h)
        else:
            width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
            emb_out = nn.Dense(width, name="emb_proj")(nn.silu(emb))[:, None, None, :]
            if self.use_scale_shift_norm:
                scale, shift = jnp.split(emb_out, 2, axis=-1)
                h = out_norm(h) * (1 + scale) + shift
            else:
                h = out_norm(h + emb_out)
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
        h = conv3x3(self.out_channels, name="out_conv", zero_init=True)(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), name="skip")(x)
        return x + h


def _attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Scaled dot-product attention. q: [B, Tq, H, D]; k, v: [B, Tk, H, D] -> [B, Tq, H, D].

    The softmax runs in float32 whatever the input dtype.
    """
    scale = 1.0 / math.sqrt(math.sqrt(q.shape[-1]))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k * scale).astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection (I-DDPM's AttentionBlock).

    x: [B, H, W, C] -> [B, H, W, C]. The 1x1 qkv projection gives 3C channels, split into
    `num_heads` contiguous blocks of 3C/heads, each of which is [q | k | v].
    """

    num_heads: int = 1
    num_groups: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        assert c % self.num_heads == 0, (c, self.num_heads)
        qkv = nn.Dense(3 * c, name="qkv")(GroupNorm32(self.num_groups, name="norm")(x))
        qkv = qkv.reshape(b, hgt * wid, self.num_heads, 3 * c // self.num_heads)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        h = _attend(q, k, v).reshape(b, hgt, wid, c)
        return x + nn.Dense(c, kernel_init=nn.initializers.zeros, name="proj_out")(h)


class CrossAttention(nn.Module):
    """Cross-attention from image features to latent tokens, with a residual connection.

    x: [B, H, W, C] (queries from GroupNorm(x)); tokens: [B, L, D] (keys and values).
    Returns [B, H, W, C]. The output projection starts at zero, so a freshly initialised
    block is the identity and the U-Net starts out as the unconditional I-DDPM network.
    """

    num_heads: int = 1
    num_groups: int = 32

    @nn.compact
    def __call__(self, x: jax.Array, tokens: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        heads, head_dim = self.num_heads, c // self.num_heads
        q = nn.Dense(c, name="q")(GroupNorm32(self.num_groups, name="norm")(x))
        k = nn.Dense(c, name="k")(tokens)
        v = nn.Dense(c, name="v")(tokens)
        q = q.reshape(b, hgt * wid, heads, head_dim)
        k = k.reshape(b, tokens.shape[1], heads, head_dim)
        v = v.reshape(b, tokens.shape[1], heads, head_dim)
        h = _attend(q, k, v).reshape(b, hgt, wid, c)
        return x + nn.Dense(c, kernel_init=nn.initializers.zeros, name="proj_out")(h)
