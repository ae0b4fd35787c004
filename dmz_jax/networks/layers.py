"""Building blocks of the I-DDPM ("ADM") U-Net, channels-last (NHWC).

Each block computes the same function as its counterpart in OpenAI's improved-diffusion
`unet.py` given the same weights: 3x3 convolutions padded by one pixel on every side (also
when striding), GroupNorm with 32 groups and epsilon 1e-5 computed in float32, the timestep
embedding laid out as [cos | sin], scale-shift conditioning applied as norm(h) * (1 + scale)
+ shift with scale first, and the qkv projection split into heads as contiguous
[q | k | v] blocks per head.

Precision: `dtype` None computes in the input's dtype (float32); jnp.bfloat16 casts the
float32 parameters and the activations of every conv and dense layer to bfloat16, while
GroupNorm statistics and the attention softmax stay float32 (see `attend`).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

# Same padding as PyTorch's `padding=1`; Flax's "SAME" pads (0, 1) when striding by 2.
PAD_1 = ((1, 1), (1, 1))
# How attention is computed: "xla" is the explicit softmax(q k^T / sqrt(d)) v below;
# "dot_product_attention" is jax.nn.dot_product_attention (implementation=None).
ATTENTION_IMPLS = ("xla", "dot_product_attention")


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
            strides: int = 1, dtype: Optional[Any] = None) -> nn.Conv:
    """3x3 conv padded by one pixel on every side; `dtype` is the compute dtype."""
    init = nn.initializers.zeros if zero_init else nn.linear.default_kernel_init
    return nn.Conv(features, (3, 3), strides=(strides, strides), padding=PAD_1,
                   kernel_init=init, dtype=dtype, name=name)


class Downsample(nn.Module):
    """Halves H and W: a stride-2 3x3 conv (padding 1) or 2x2 average pooling."""

    use_conv: bool = True
    dtype: Optional[Any] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_conv:
            return conv3x3(x.shape[-1], strides=2, dtype=self.dtype, name="op")(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
    """Doubles H and W by nearest-neighbour repetition, then an optional 3x3 conv."""

    use_conv: bool = True
    dtype: Optional[Any] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if self.use_conv:
            x = conv3x3(x.shape[-1], dtype=self.dtype, name="conv")(x)
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
    dtype: Optional[Any] = None  # compute dtype (None: the input's)

    @nn.compact
    def __call__(self, x: jax.Array, emb: Optional[jax.Array], train: bool) -> jax.Array:
        h = nn.silu(GroupNorm32(self.num_groups, name="in_norm")(x))
        h = conv3x3(self.out_channels, name="in_conv", dtype=self.dtype)(h)
        out_norm = GroupNorm32(self.num_groups, name="out_norm")
        if emb is None:
            h = out_norm(h)
        else:
            width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
            emb_out = nn.Dense(width, dtype=self.dtype, name="emb_proj")(nn.silu(emb))
            emb_out = emb_out[:, None, None, :]
            if self.use_scale_shift_norm:
                scale, shift = jnp.split(emb_out, 2, axis=-1)
                h = out_norm(h) * (1 + scale) + shift
            else:
                h = out_norm(h + emb_out)
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
        h = conv3x3(self.out_channels, name="out_conv", zero_init=True, dtype=self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="skip")(x)
        return x + h


def attend(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "xla") -> jax.Array:
    """Scaled dot-product attention. q: [B, Tq, H, D]; k, v: [B, Tk, H, D] -> [B, Tq, H, D].

    impl "xla": q and k each scaled by D^-1/4 (I-DDPM's order), logits and softmax in float32
    whatever the input dtype, weights cast back to v's dtype. "dot_product_attention":
    jax.nn.dot_product_attention (scale D^-1/2, float32 logits and softmax as well); with
    implementation=None, which in jax 0.10 always runs the same XLA computation.
    """
    if impl == "dot_product_attention":
        return jax.nn.dot_product_attention(q, k, v, implementation=None)
    scale = 1.0 / math.sqrt(math.sqrt(q.shape[-1]))
    wide = {} if q.dtype == jnp.float32 else {"preferred_element_type": jnp.float32}
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k * scale, **wide).astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection (I-DDPM's AttentionBlock).

    x: [B, H, W, C] -> [B, H, W, C]. The 1x1 qkv projection gives 3C channels, split into
    `num_heads` contiguous blocks of 3C/heads, each of which is [q | k | v].
    """

    num_heads: int = 1
    num_groups: int = 32
    dtype: Optional[Any] = None
    attention_impl: str = "xla"  # one of ATTENTION_IMPLS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        assert c % self.num_heads == 0, (c, self.num_heads)
        normed = GroupNorm32(self.num_groups, name="norm")(x)
        qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(normed)
        qkv = qkv.reshape(b, hgt * wid, self.num_heads, 3 * c // self.num_heads)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        h = attend(q, k, v, self.attention_impl).reshape(b, hgt, wid, c)
        return x + _zero_dense(c, self.dtype)(h)


class CrossAttention(nn.Module):
    """Cross-attention from image features to latent tokens, with a residual connection.

    x: [B, H, W, C] (queries from GroupNorm(x)); tokens: [B, L, D] (keys and values).
    Returns [B, H, W, C]. The output projection starts at zero, so a freshly initialised
    block is the identity and the U-Net starts out as the unconditional I-DDPM network.
    """

    num_heads: int = 1
    num_groups: int = 32
    dtype: Optional[Any] = None
    attention_impl: str = "xla"  # one of ATTENTION_IMPLS

    @nn.compact
    def __call__(self, x: jax.Array, tokens: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        heads, head_dim = self.num_heads, c // self.num_heads
        q = nn.Dense(c, dtype=self.dtype, name="q")(GroupNorm32(self.num_groups, name="norm")(x))
        k = nn.Dense(c, dtype=self.dtype, name="k")(tokens)
        v = nn.Dense(c, dtype=self.dtype, name="v")(tokens)
        q = q.reshape(b, hgt * wid, heads, head_dim)
        k = k.reshape(b, tokens.shape[1], heads, head_dim)
        v = v.reshape(b, tokens.shape[1], heads, head_dim)
        h = attend(q, k, v, self.attention_impl).reshape(b, hgt, wid, c)
        return x + _zero_dense(c, self.dtype)(h)


def _zero_dense(features: int, dtype: Optional[Any]) -> nn.Dense:
    """The zero-initialised output projection "proj_out" of the attention blocks."""
    return nn.Dense(features, kernel_init=nn.initializers.zeros, dtype=dtype, name="proj_out")
