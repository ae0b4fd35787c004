"""The authors' denoiser: diffusers 0.32.0's UNet2DConditionModel (and UNet2DModel), in Flax.

`DiffusersUNet` computes the same function as diffusers' `UNet2DConditionModel` given the same
weights (`dmz_jax.convert.diffusers.unet_params_from_diffusers` maps a diffusers state dict onto
its parameters), channels-last (NHWC), for the subset of options that exlab-research/dmz uses:

  - levels: `block_out_channels[i]` channels at resolution image_size / 2^i; each down level has
    `layers_per_block` ResnetBlock2D, each up level `layers_per_block + 1`, whose inputs are
    cat([h, skip]) on channels; a Downsample2D after every down level but the last, an
    Upsample2D (nearest x2, then conv 3x3) after every up level but the last. Up block i
    mirrors down level len-1-i.
  - a level in `attention_levels` attends after each of its resnets: with a Transformer2DModel
    (CrossAttn{Down,Up}Block2D) if it is in `cross_attention_levels`, else with a spatial
    self-attention `Attention` (Attn{Down,Up}Block2D).
  - `attention_head_dim` keeps diffusers' two meanings (see AUTHORS_DMZ.md section 2): in a
    Transformer2DModel (CrossAttn blocks and the "cross_attention" mid block) it is the head
    COUNT, head_dim = C // heads; in Attn{Down,Up}Block2D and the "attention" mid block it is
    the head DIM, heads = C // head_dim (None there: one head of C channels, as UNet2DModel).
  - mid block: "cross_attention" = UNetMidBlock2DCrossAttn (resnet, Transformer2D, resnet);
    "resnet" = what UNet2DConditionModel's get_mid_block makes of "UNetMidBlock2D" (num_layers=0,
    add_attention=False: ONE resnet); "attention" = UNetMidBlock2D with its defaults (resnet,
    attention, resnet), the mid block of UNet2DModel and of the authors' HQ model built without
    cross-attention. Its attention has a GroupNorm only when resnet_time_scale_shift is
    "default" (diffusers: attn_groups = resnet_groups if "default" else None).
  - time: diffusers' `get_timestep_embedding` ([sin | cos], [cos | sin] when flip_sin_to_cos,
    frequencies exp(-ln(1e4) i / (C0/2 - freq_shift))) -> Linear(C0, 4 C0) -> SiLU -> Linear.
  - class_embed: "simple_projection", Linear(class_embed_input_dim, 4 C0) of `class_labels`,
    added to the time embedding ("add") or concatenated to it ("concat",
    class_embeddings_concat=True: every resnet then sees 8 C0).
  - ResnetBlock2D: GN -> SiLU -> conv3x3 -> (+ Linear(SiLU(temb)) then GN, for "default"; GN then
    * (1 + scale) + shift, for "scale_shift") -> SiLU -> Dropout -> conv3x3, + (1x1 conv) x.
  - Transformer2DModel: GroupNorm(eps 1e-6) -> 1x1 conv -> BasicTransformerBlock (LN -> self
    attention; LN -> cross attention on encoder_hidden_states; LN -> GEGLU feed-forward, each
    with a residual) -> 1x1 conv -> + input. One transformer layer, no linear projection.
  - heads are contiguous channel chunks; attention scale 1/sqrt(head_dim).

Not covered: diffusers options the authors do not use (fourier/learned time embeddings,
linear projections, several transformer layers, dual/only cross attention, resnet or FIR
up/downsampling, attention masks, "spatial" norms, center_input_sample, output_scale_factor),
and image sizes not divisible by 2^(levels - 1) (diffusers' forward_upsample_size path).

Parameter names follow diffusers' state-dict names with "." between a list and its index
replaced by "_" (down_blocks.0.resnets.1.conv1.weight -> down_blocks_0/resnets_1/conv1/kernel;
"weight" is "kernel" for convs and dense layers, "scale" for norms), with one addition: each
BasicTransformerBlock's cross-attention sublayer (norm2 + attn2) sits in a submodule
`cross_attn`, so that `dmz_jax.model.parameter_groups` counts it as the conditioning pathway,
as it does `class_embedding`.

Precision: `dtype` None computes in float32; jnp.bfloat16 runs convs, dense layers and
activations in bfloat16 (parameters stay float32), while GroupNorm/LayerNorm statistics and
the attention softmax are float32. The output is float32.

Initialisation follows PyTorch's defaults (weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
norms 1 and 0; diffusers zero-initialises nothing here), so a freshly initialised network has
the statistics of a freshly built diffusers one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmz_jax.networks import layers

MID_BLOCKS = ("cross_attention", "resnet", "attention")
CLASS_EMBEDS = ("none", "add", "concat")
TIME_SCALE_SHIFTS = ("default", "scale_shift")
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
class _Options:
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
    opts: _Options

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
               qkv_bias: bool, opts: _Options) -> jax.Array:
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
    opts: _Options

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
    opts: _Options

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        h = LayerNorm(LAYER_NORM_EPS, name="norm2")(x)
        return _TokenAttention(self.heads, self.head_dim, self.opts, name="attn2")(h, context)


class _TokenAttention(nn.Module):
    """Attention inside a BasicTransformerBlock (attn1, attn2): q/k/v without bias, out with."""

    heads: int
    head_dim: int
    opts: _Options

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
        return _attention(x, context, self.heads, self.head_dim, False, self.opts)


class FeedForward(nn.Module):
    """diffusers' FeedForward with GEGLU: Linear(C, 8C) -> [h | gate] -> h * GELU_erf(gate)
    -> Linear(4C, C)."""

    opts: _Options

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        h = _GEGLU(4 * c, self.opts, name="net_0")(x)
        return dense(c, 4 * c, "net_2", self.opts.dtype)(h)


class _GEGLU(nn.Module):
    features: int
    opts: _Options

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = dense(2 * self.features, x.shape[-1], "proj", self.opts.dtype)(x)
        h, gate = jnp.split(h, 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class BasicTransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock (attention.py), layer_norm variant, on [B, T, C]."""

    heads: int
    head_dim: int
    opts: _Options

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
    opts: _Options

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


# ResnetBlock2D's `train` (argument 3, counting self) is a Python bool: static under remat.
_REMAT = {ResnetBlock2D: nn.remat(ResnetBlock2D, static_argnums=(3,)),
          Transformer2D: nn.remat(Transformer2D),
          SpatialAttention: nn.remat(SpatialAttention)}


def _block(cls, opts: _Options):
    return _REMAT[cls] if opts.remat else cls


def _attention_block(kind: str, head_arg: Optional[int], opts: _Options, name: str):
    """The attention after a resnet: kind "cross" -> Transformer2D, "self" -> Attention."""
    if kind == "cross":
        return _block(Transformer2D, opts)(head_arg, opts, name=name)
    return _block(SpatialAttention, opts)(head_arg, True, opts, name=name)


def _apply_attention(block, kind: str, h: jax.Array, context: jax.Array) -> jax.Array:
    return block(h, context) if kind == "cross" else block(h)


class DownBlock(nn.Module):
    """DownBlock2D (attention None), AttnDownBlock2D ("self") or CrossAttnDownBlock2D
    ("cross"). Returns (h, skips): one skip per resnet, and the downsampled h if any."""

    out_channels: int
    num_layers: int
    attention: Optional[str]
    head_arg: Optional[int]
    add_downsample: bool
    opts: _Options

    @nn.compact
    def __call__(self, h, temb, context, train):
        o, skips = self.opts, []
        for j in range(self.num_layers):
            h = _block(ResnetBlock2D, o)(self.out_channels, o, name=f"resnets_{j}")(h, temb, train)
            if self.attention:
                block = _attention_block(self.attention, self.head_arg, o, f"attentions_{j}")
                h = _apply_attention(block, self.attention, h, context)
            skips.append(h)
        if self.add_downsample:
            p = self.opts.downsample_padding
            # diffusers' Downsample2D: padding 0 means F.pad (0, 1, 0, 1), then an unpadded conv
            padding = ((0, 1), (0, 1)) if p == 0 else ((p, p), (p, p))
            h = _Resample(self.out_channels, "down", padding, o, name="downsamplers_0")(h)
            skips.append(h)
        return h, skips


class UpBlock(nn.Module):
    """UpBlock2D / AttnUpBlock2D / CrossAttnUpBlock2D: each resnet takes cat([h, skip]) with
    the last remaining skip."""

    out_channels: int
    num_layers: int
    attention: Optional[str]
    head_arg: Optional[int]
    add_upsample: bool
    opts: _Options

    @nn.compact
    def __call__(self, h, skips, temb, context, train):
        o = self.opts
        skips = list(skips)
        for j in range(self.num_layers):
            h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
            h = _block(ResnetBlock2D, o)(self.out_channels, o, name=f"resnets_{j}")(h, temb, train)
            if self.attention:
                block = _attention_block(self.attention, self.head_arg, o, f"attentions_{j}")
                h = _apply_attention(block, self.attention, h, context)
        if self.add_upsample:
            h = _Resample(self.out_channels, "up", ((1, 1), (1, 1)), o, name="upsamplers_0")(h)
        return h


class _Resample(nn.Module):
    """Downsample2D (conv 3x3 stride 2) or Upsample2D (nearest x2, conv 3x3); child `conv`."""

    channels: int
    direction: str
    padding: Any
    opts: _Options

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        if self.direction == "up":
            h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
            return conv(self.channels, h.shape[-1], 3, "conv", self.opts.dtype)(h)
        return conv(self.channels, h.shape[-1], 3, "conv", self.opts.dtype, strides=2,
                    padding=self.padding)(h)


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn ("cross_attention"), get_mid_block's UNetMidBlock2D ("resnet":
    one resnet) or UNetMidBlock2D with attention ("attention")."""

    kind: str
    head_arg: Optional[int]
    opts: _Options

    @nn.compact
    def __call__(self, h, temb, context, train):
        o, c = self.opts, h.shape[-1]
        h = _block(ResnetBlock2D, o)(c, o, name="resnets_0")(h, temb, train)
        if self.kind == "resnet":
            return h
        if self.kind == "cross_attention":
            h = _block(Transformer2D, o)(self.head_arg, o, name="attentions_0")(h, context)
        else:
            use_norm = o.time_scale_shift == "default"  # attn_groups None otherwise
            h = _block(SpatialAttention, o)(self.head_arg, use_norm, o, name="attentions_0")(h)
        return _block(ResnetBlock2D, o)(c, o, name="resnets_1")(h, temb, train)


class TimestepEmbedding(nn.Module):
    """diffusers' TimestepEmbedding: linear_1 -> SiLU -> linear_2."""

    features: int
    dtype: Optional[Any] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = dense(self.features, x.shape[-1], "linear_1", self.dtype)(x)
        return dense(self.features, self.features, "linear_2", self.dtype)(nn.silu(h))


# ---------------------------------------------------------------------------------------------
# The network


class DiffusersUNet(nn.Module):
    """diffusers 0.32.0 UNet2DConditionModel / UNet2DModel (see the module docstring).

    __call__(x [B, H, W, C], t [B] (original-scale timesteps, int or float),
    encoder_hidden_states [B, S, cross_attention_dim] (None: one token of ones, as the authors'
    DiffDecoder feeds when z does not go through cross-attention; unused without
    cross-attention blocks), class_labels [B, class_embed_input_dim] (needed iff class_embed
    is not "none"), train) -> float32 [B, H, W, out_channels]. Dropout (resnets only, as
    diffusers) draws from the "dropout" rng when `train`.
    """

    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int
    attention_levels: Sequence[int] = ()
    cross_attention_levels: Sequence[int] = ()
    mid_block: str = "cross_attention"
    attention_head_dim: Optional[int] = 8
    cross_attention_dim: int = 1
    class_embed: str = "none"
    class_embed_input_dim: int = 0
    dropout: float = 0.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    resnet_time_scale_shift: str = "default"
    dtype: Optional[Any] = None
    remat: bool = False
    attention_impl: str = "xla"

    def check(self) -> None:
        """Raises ValueError for a configuration diffusers would not build (or we do not cover)."""
        n = len(self.block_out_channels)
        if n < 1:
            raise ValueError("block_out_channels is empty")
        bad = [lvl for lvl in self.attention_levels if not 0 <= lvl < n]
        if bad:
            raise ValueError(f"attention_levels {bad} outside 0..{n - 1}")
        extra = sorted(set(self.cross_attention_levels) - set(self.attention_levels))
        if extra:
            raise ValueError(f"cross_attention_levels {extra} are not in attention_levels "
                             f"{tuple(self.attention_levels)}; a cross-attention level is an "
                             "attention level whose blocks are CrossAttn{Down,Up}Block2D")
        if self.mid_block not in MID_BLOCKS:
            raise ValueError(f"mid_block {self.mid_block!r}: expected one of {MID_BLOCKS}")
        if self.class_embed not in CLASS_EMBEDS:
            raise ValueError(f"class_embed {self.class_embed!r}: expected one of {CLASS_EMBEDS}")
        if self.class_embed != "none" and self.class_embed_input_dim < 1:
            raise ValueError("class_embed needs class_embed_input_dim >= 1")
        if self.resnet_time_scale_shift not in TIME_SCALE_SHIFTS:
            raise ValueError(f"resnet_time_scale_shift {self.resnet_time_scale_shift!r}: "
                             f"expected one of {TIME_SCALE_SHIFTS}")
        if self.attention_impl not in layers.ATTENTION_IMPLS:
            raise ValueError(f"attention_impl {self.attention_impl!r}: expected one of "
                             f"{layers.ATTENTION_IMPLS}")
        if self.uses_cross_attention and not self.attention_head_dim:
            raise ValueError("cross-attention blocks need attention_head_dim (their head count)")

    @property
    def uses_cross_attention(self) -> bool:
        return bool(self.cross_attention_levels) or self.mid_block == "cross_attention"

    def level_attention(self, level: int) -> Optional[str]:
        """None, "self" (Attn{Down,Up}Block2D) or "cross" (CrossAttn{Down,Up}Block2D)."""
        if level in self.cross_attention_levels:
            return "cross"
        return "self" if level in self.attention_levels else None

    def _options(self) -> _Options:
        return _Options(groups=self.norm_num_groups, eps=self.norm_eps, dropout=self.dropout,
                        time_scale_shift=self.resnet_time_scale_shift,
                        downsample_padding=self.downsample_padding,
                        cross_attention_dim=self.cross_attention_dim, dtype=self.dtype,
                        remat=self.remat, attention_impl=self.attention_impl)

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array,
                 encoder_hidden_states: Optional[jax.Array] = None,
                 class_labels: Optional[jax.Array] = None, train: bool = False) -> jax.Array:
        self.check()
        o = self._options()
        n, chans = len(self.block_out_channels), tuple(self.block_out_channels)
        b, hgt, wid, _ = x.shape
        factor = 2 ** (n - 1)
        if hgt % factor or wid % factor:
            raise ValueError(f"image {hgt}x{wid} is not divisible by 2^{n - 1} = {factor} "
                             f"(the {n - 1} downsamplings of {n} levels)")
        c0 = chans[0]
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        emb = diffusers_timestep_embedding(t, c0, self.flip_sin_to_cos, self.freq_shift)
        emb = TimestepEmbedding(4 * c0, self.dtype, name="time_embedding")(emb)
        if self.class_embed != "none":
            if class_labels is None:
                raise ValueError(f"class_embed={self.class_embed!r} needs class_labels "
                                 f"[B, {self.class_embed_input_dim}]")
            labels = jnp.asarray(class_labels).reshape(b, -1)
            class_emb = dense(4 * c0, labels.shape[-1], "class_embedding", self.dtype)(labels)
            if self.class_embed == "concat":
                emb = jnp.concatenate([emb, class_emb.astype(emb.dtype)], axis=-1)
            else:
                emb = emb + class_emb
        context = encoder_hidden_states
        if context is None:
            context = jnp.ones((b, 1, self.cross_attention_dim), jnp.float32)

        h = conv(c0, x.shape[-1], 3, "conv_in", self.dtype)(x)
        skips = [h]
        for level, ch in enumerate(chans):
            h, s = DownBlock(ch, self.layers_per_block, self.level_attention(level),
                             self.attention_head_dim, level < n - 1, o,
                             name=f"down_blocks_{level}")(h, emb, context, train)
            skips.extend(s)
        h = MidBlock(self.mid_block, self.attention_head_dim, o, name="mid_block")(
            h, emb, context, train)
        for i in range(n):
            level = n - 1 - i
            take = self.layers_per_block + 1
            h = UpBlock(chans[level], take, self.level_attention(level),
                        self.attention_head_dim, i < n - 1, o,
                        name=f"up_blocks_{i}")(h, skips[-take:], emb, context, train)
            del skips[-take:]
        h = nn.silu(GroupNorm(self.norm_num_groups, self.norm_eps, name="conv_norm_out")(h))
        h = conv(self.out_channels, c0, 3, "conv_out", self.dtype)(h)
        return h.astype(jnp.float32)
