"""Layers of diffusers 0.32.0's UNet2DConditionModel in Flax, channels-last (NHWC): the
resnet, attention and transformer blocks that `diffusers_unet.DiffusersUNet` assembles.

Parameter names follow diffusers' state-dict names (see diffusers_unet's docstring);
initialisation follows PyTorch's defaults; GroupNorm / LayerNorm statistics and the attention
softmax are float32 whatever the compute dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmz_jax.networks import layers

TRANSFORMER_NORM_EPS = 1e-6  # Transformer2DModel's GroupNorm (transformer_2d.py, fixed)
LAYER_NORM_EPS = 1e-5  # BasicTransformerBlock's LayerNorms (norm_eps default)

# ---------------------------------------------------------------------------------------------
# Layers with PyTorch's default initialisation


def _torch_bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


# kaiming_uniform(a=sqrt(5)) as torch.nn.Linear / Conv2d: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
_TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def dense(features: int, fan_in: int, name: str, dtype: Optional[Any] = None,
          use_bias: bool = True) -> nn.Dense:
    """torch.nn.Linear(fan_in, features) as a Flax Dense; `dtype` is the compute dtype."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=_TORCH_KERNEL_INIT,
                    bias_init=_torch_bias_init(fan_in), name=name)


def conv(features: int, in_features: int, kernel: int, name: str, dtype: Optional[Any] = None,
         strides: int = 1, padding: Any = None) -> nn.Conv:
    """torch.nn.Conv2d(in_features, features, kernel, stride, padding) as a Flax Conv (NHWC).

    `padding` None: (kernel - 1) // 2 on every side, as diffusers' convs."""
    if padding is None:
        p = (kernel - 1) // 2
        padding = ((p, p), (p, p))
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                   dtype=dtype, kernel_init=_TORCH_KERNEL_INIT,
                   bias_init=_torch_bias_init(in_features * kernel * kernel), name=name)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over channels-last input ([B, ..., C]), computed in float32.

    Two-pass variance (as PyTorch), then cast back to the input's dtype."""

    num_groups: int = 32
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.num_groups} "
                             "groups; choose norm_num_groups dividing every channel count")
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        g = xf.reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
        mean = g.mean(axes, keepdims=True)
        var = jnp.square(g - mean).mean(axes, keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(xf.shape)
        return (y * scale + bias).astype(x.dtype)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis, computed in float32."""

    epsilon: float = LAYER_NORM_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale + bias).astype(x.dtype)


def diffusers_timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool,
                                 freq_shift: float, max_period: float = 10000.0) -> jax.Array:
    """diffusers' get_timestep_embedding (embeddings.py), float32 [B] -> [B, dim].

    f_i = exp(-ln(max_period) * i / (dim//2 - freq_shift)), i < dim//2; [sin(t f) | cos(t f)],
    [cos | sin] when flip_sin_to_cos; a zero column appended when dim is odd."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    exponent = exponent / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


# ---------------------------------------------------------------------------------------------
# Blocks


@dataclass(frozen=True)
class BlockOptions:
    """The settings every block shares (one hashable attribute instead of ten)."""

    groups: int
    eps: float
    dropout: float
    time_scale_shift: str
    downsample_padding: int
    cross_attention_dim: int
    dtype: Optional[Any]
    remat: bool
    attention_impl: str


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D (resnet.py). x [B, H, W, Cin], temb [B, E] -> [B, H, W, out]."""

    out_channels: int
    opts: BlockOptions

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
        o, cin, cout = self.opts, x.shape[-1], self.out_channels
        h = nn.silu(GroupNorm(o.groups, o.eps, name="norm1")(x))
        h = conv(cout, cin, 3, "conv1", o.dtype)(h)
        scale_shift = o.time_scale_shift == "scale_shift"
        t = dense(2 * cout if scale_shift else cout, temb.shape[-1], "time_emb_proj",
                  o.dtype)(nn.silu(temb))[:, None, None, :]
        norm2 = GroupNorm(o.groups, o.eps, name="norm2")
        if scale_shift:
            scale, shift = jnp.split(t, 2, axis=-1)
            h = norm2(h) * (1 + scale) + shift
        else:
            h = norm2(h + t)
        h = nn.Dropout(o.dropout, deterministic=not train)(nn.silu(h))
        h = conv(cout, cout, 3, "conv2", o.dtype)(h)
        if cin != cout:
            x = conv(cout, cin, 1, "conv_shortcut", o.dtype)(x)
        return x + h



def _attention(x: jax.Array, context: Optional[jax.Array], heads: int, head_dim: int,
               qkv_bias: bool, opts: BlockOptions) -> jax.Array:
    """diffusers' Attention with AttnProcessor2_0 on tokens, called inside a compact method
    (its to_q, to_k, to_v, to_out_0 become children of that module): x [B, T, C], context
    [B, S, Cc] (None: self-attention) -> [B, T, C], the residual not added."""
    inner = heads * head_dim
    kv = x if context is None else context
    b, t, c = x.shape
    q = dense(inner, c, "to_q", opts.dtype, qkv_bias)(x)
    k = dense(inner, kv.shape[-1], "to_k", opts.dtype, qkv_bias)(kv)
    v = dense(inner, kv.shape[-1], "to_v", opts.dtype, qkv_bias)(kv)

    def split(a):
        return a.reshape(b, a.shape[1], heads, head_dim)
    h = layers.attend(split(q), split(k), split(v), opts.attention_impl).reshape(b, t, inner)
    return dense(c, inner, "to_out_0", opts.dtype)(h)


class SpatialAttention(nn.Module):
    """The self-attention of Attn{Down,Up}Block2D and UNetMidBlock2D: diffusers' Attention
    built with _from_deprecated_attn_block (GroupNorm inside, q/k/v/out biases, residual).
    x [B, H, W, C] -> [B, H, W, C]; heads = C // head_dim (head_dim None: one head)."""

    head_dim: Optional[int]
    use_group_norm: bool
    opts: BlockOptions

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        head_dim = c if self.head_dim is None else self.head_dim
        heads = c // head_dim
        if heads < 1:
            raise ValueError(f"attention_head_dim {head_dim} (the head dimension of an "
                             f"AttnDown/AttnUp/mid attention) exceeds its {c} channels")
        h = x.reshape(b, hgt * wid, c)
        if self.use_group_norm:
            h = GroupNorm(self.opts.groups, self.opts.eps, name="group_norm")(h)
        h = _attention(h, None, heads, head_dim, True, self.opts)
        return x + h.reshape(b, hgt, wid, c).astype(x.dtype)


class CrossAttention(nn.Module):
    """BasicTransformerBlock's cross-attention sublayer: norm2 (LayerNorm) -> attn2 (queries
    from the image tokens, keys and values from `context`), residual added by the caller."""

    heads: int
    head_dim: int
    opts: BlockOptions

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        h = LayerNorm(LAYER_NORM_EPS, name="norm2")(x)
        return _TokenAttention(self.heads, self.head_dim, self.opts, name="attn2")(h, context)


class _TokenAttention(nn.Module):
    """Attention inside a BasicTransformerBlock (attn1, attn2): q/k/v without bias, out with."""

    heads: int
    head_dim: int
    opts: BlockOptions

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
        return _attention(x, context, self.heads, self.head_dim, False, self.opts)


class FeedForward(nn.Module):
    """diffusers' FeedForward with GEGLU: Linear(C, 8C) -> [h | gate] -> h * GELU_erf(gate)
    -> Linear(4C, C)."""

    opts: BlockOptions

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        h = _GEGLU(4 * c, self.opts, name="net_0")(x)
        return dense(c, 4 * c, "net_2", self.opts.dtype)(h)


class _GEGLU(nn.Module):
    features: int
    opts: BlockOptions

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = dense(2 * self.features, x.shape[-1], "proj", self.opts.dtype)(x)
        h, gate = jnp.split(h, 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class BasicTransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock (attention.py), layer_norm variant, on [B, T, C]."""

    heads: int
    head_dim: int
    opts: BlockOptions

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        o = self.opts
        x = x + _TokenAttention(self.heads, self.head_dim, o, name="attn1")(
            LayerNorm(LAYER_NORM_EPS, name="norm1")(x))
        x = x + CrossAttention(self.heads, self.head_dim, o, name="cross_attn")(x, context)
        return x + FeedForward(o, name="ff")(LayerNorm(LAYER_NORM_EPS, name="norm3")(x))


class Transformer2D(nn.Module):
    """diffusers' Transformer2DModel for continuous input, one layer, 1x1-conv projections.

    x [B, H, W, C], context [B, S, cross_attention_dim] -> [B, H, W, C];
    heads = `heads`, head_dim = C // heads."""

    heads: int
    opts: BlockOptions

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        o = self.opts
        b, hgt, wid, c = x.shape
        head_dim = c // self.heads
        if head_dim < 1:
            raise ValueError(f"attention_head_dim {self.heads} (the head COUNT of a "
                             f"Transformer2D) exceeds its {c} channels")
        inner = self.heads * head_dim
        h = GroupNorm(o.groups, TRANSFORMER_NORM_EPS, name="norm")(x)
        h = conv(inner, c, 1, "proj_in", o.dtype)(h).reshape(b, hgt * wid, inner)
        h = BasicTransformerBlock(self.heads, head_dim, o, name="transformer_blocks_0")(
            h, context)
        h = conv(c, inner, 1, "proj_out", o.dtype)(h.reshape(b, hgt, wid, inner))
        return h + x


class TimestepEmbedding(nn.Module):
    """diffusers' TimestepEmbedding: linear_1 -> SiLU -> linear_2."""

    features: int
    dtype: Optional[Any] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = dense(self.features, x.shape[-1], "linear_1", self.dtype)(x)
        return dense(self.features, self.features, "linear_2", self.dtype)(nn.silu(h))
