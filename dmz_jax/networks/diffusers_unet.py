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

The layers live in diffusers_layers.py. Parameter names follow diffusers' state-dict names
with "." between a list and its index replaced by "_"
(down_blocks.0.resnets.1.conv1.weight -> down_blocks_0/resnets_1/conv1/kernel; "weight" is
"kernel" for convs and dense layers, "scale" for norms), with one addition: each
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

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmz_jax.networks import layers
from dmz_jax.networks.diffusers_layers import (
    BlockOptions, GroupNorm, ResnetBlock2D, SpatialAttention, TimestepEmbedding, Transformer2D, conv, dense, diffusers_timestep_embedding)

MID_BLOCKS = ("cross_attention", "resnet", "attention")
CLASS_EMBEDS = ("none", "add", "concat")
TIME_SCALE_SHIFTS = ("default", "scale_shift")


# ResnetBlock2D's `train` (argument 3, counting self) is a Python bool: static under remat.
_REMAT = {ResnetBlock2D: nn.remat(ResnetBlock2D, static_argnums=(3,)),
          Transformer2D: nn.remat(Transformer2D),
          SpatialAttention: nn.remat(SpatialAttention)}


def _block(cls, opts: BlockOptions):
    return _REMAT[cls] if opts.remat else cls


def _attention_block(kind: str, head_arg: Optional[int], opts: BlockOptions, name: str):
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
    opts: BlockOptions

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
    opts: BlockOptions

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
    opts: BlockOptions

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
    opts: BlockOptions

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

    def _options(self) -> BlockOptions:
        return BlockOptions(groups=self.norm_num_groups, eps=self.norm_eps, dropout=self.dropout,
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
