"""The I-DDPM U-Net denoiser with an optional latent pathway, and the DMZ encoder.

The denoiser computes eps(x_t, t, cond): with `cond=None` (or conditioning "none") it is
exactly I-DDPM's `UNetModel` (same blocks, same order, skip concatenation as [h | skip]).
The latent enters in one of two ways, chosen by the caller (`dmz_jax.model`):
  - cross-attention: `cond.tokens` [B, L, D]; a `CrossAttention` sublayer follows every
    self-attention block at the cross-attention resolutions and in the middle block;
  - time embedding: `cond.time` [B, E] is added to the timestep embedding.

Memory and precision knobs (none changes the parameters or their names):
  - `dtype`: compute dtype of convs, dense layers and activations (None: float32); the
    output is float32 either way;
  - `remat`: every ResBlock, AttentionBlock and CrossAttention is rematerialised
    (flax.linen.remat): its activations are recomputed in the backward pass, not stored;
  - `attention_impl`: one of layers.ATTENTION_IMPLS.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dmz_jax.networks import layers


@flax.struct.dataclass
class Conditioning:
    """What the latent contributes to the denoiser; either field may be None."""

    tokens: Optional[jax.Array] = None  # [B, L, D], keys/values for cross-attention
    time: Optional[jax.Array] = None  # [B, 4 * model_channels], added to the time embedding


# (ResBlock, AttentionBlock, CrossAttention), plain and rematerialised. ResBlock's `train`
# (argument 3, counting self) is a Python bool, so it is static under remat.
_BLOCKS = (layers.ResBlock, layers.AttentionBlock, layers.CrossAttention)
_REMAT_BLOCKS = (nn.remat(layers.ResBlock, static_argnums=(3,)),
                 nn.remat(layers.AttentionBlock), nn.remat(layers.CrossAttention))


def blocks(remat: bool) -> tuple[type, type, type]:
    """The (ResBlock, AttentionBlock, CrossAttention) classes, rematerialised if `remat`."""
    return _REMAT_BLOCKS if remat else _BLOCKS


class UNet(nn.Module):
    """I-DDPM U-Net.  x_t: [B, H, W, C], t: [B] float -> [B, H, W, out_channels].

    `attention_ds` and `cross_attention_ds` are downsampling factors (image_size // resolution),
    as in I-DDPM's `attention_resolutions` after conversion.
    """

    model_channels: int
    out_channels: int
    num_res_blocks: int
    channel_mult: Sequence[int]
    attention_ds: Sequence[int]
    cross_attention_ds: Sequence[int] = ()
    num_heads: int = 4
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    conv_resample: bool = True
    num_groups: int = 32
    dtype: Optional[Any] = None  # compute dtype; None: float32
    remat: bool = False
    attention_impl: str = "xla"

    def _res(self, channels: int, name: str) -> layers.ResBlock:
        return blocks(self.remat)[0](channels, self.dropout, self.use_scale_shift_norm,
                                     self.num_groups, self.dtype, name=name)

    def _self_attn(self, name: str) -> layers.AttentionBlock:
        return blocks(self.remat)[1](self.num_heads, self.num_groups, self.dtype,
                                     self.attention_impl, name=name)

    def _cross_attn(self, name: str) -> layers.CrossAttention:
        return blocks(self.remat)[2](self.num_heads, self.num_groups, self.dtype,
                                     self.attention_impl, name=name)

    def _attend(self, h, ds: int, cond: Optional[Conditioning], name: str):
        """Self-attention at the attention resolutions, then cross-attention where asked."""
        if ds in self.attention_ds:
            h = self._self_attn(f"{name}_attn")(h)
        if cond is not None and cond.tokens is not None and ds in self.cross_attention_ds:
            h = self._cross_attn(f"{name}_cross_attn")(h, cond.tokens)
        return h

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, cond: Optional[Conditioning] = None,
                 train: bool = False) -> jax.Array:
        ch = self.model_channels
        emb = layers.timestep_embedding(t, ch)
        emb = nn.Dense(4 * ch, dtype=self.dtype, name="time_embed_0")(emb)
        emb = nn.Dense(4 * ch, dtype=self.dtype, name="time_embed_1")(nn.silu(emb))
        if cond is not None and cond.time is not None:
            emb = emb + cond.time

        h = layers.conv3x3(ch, name="in_conv", dtype=self.dtype)(x)
        skips, ds = [h], 1
        for level, mult in enumerate(self.channel_mult):
            for i in range(self.num_res_blocks):
                h = self._res(mult * ch, f"down_{level}_{i}")(h, emb, train)
                h = self._attend(h, ds, cond, f"down_{level}_{i}")
                skips.append(h)
            if level != len(self.channel_mult) - 1:
                h = layers.Downsample(self.conv_resample, self.dtype,
                                      name=f"down_{level}_downsample")(h)
                skips.append(h)
                ds *= 2

        h = self._res(h.shape[-1], "mid_0")(h, emb, train)
        h = self._self_attn("mid_attn")(h)
        if cond is not None and cond.tokens is not None:
            h = self._cross_attn("mid_cross_attn")(h, cond.tokens)
        h = self._res(h.shape[-1], "mid_1")(h, emb, train)

        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = self._res(mult * ch, f"up_{level}_{i}")(h, emb, train)
                h = self._attend(h, ds, cond, f"up_{level}_{i}")
                if level and i == self.num_res_blocks:
                    h = layers.Upsample(self.conv_resample, self.dtype,
                                        name=f"up_{level}_upsample")(h)
                    ds //= 2

        h = nn.silu(layers.GroupNorm32(self.num_groups, name="out_norm")(h))
        out = layers.conv3x3(self.out_channels, name="out_conv", zero_init=True,
                             dtype=self.dtype)(h)
        return out.astype(jnp.float32)


class Encoder(nn.Module):
    """The U-Net's down path without time input, pooled to latent logits.

    x: [B, H, W, C] in [-1, 1] -> logits [B, latent_dim] (GroupNorm -> SiLU -> global
    average pool -> Dense).
    """

    latent_dim: int
    model_channels: int
    num_res_blocks: int
    channel_mult: Sequence[int]
    attention_ds: Sequence[int]
    num_heads: int = 4
    dropout: float = 0.0
    num_groups: int = 32
    dtype: Optional[Any] = None  # the UNet's knobs, for the encoder's blocks
    remat: bool = False
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        res_block, attn_block, _ = blocks(self.remat)
        h = layers.conv3x3(self.model_channels, name="in_conv", dtype=self.dtype)(x)
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for i in range(self.num_res_blocks):
                h = res_block(mult * self.model_channels, self.dropout, True, self.num_groups,
                              self.dtype, name=f"down_{level}_{i}")(h, None, train)
                if ds in self.attention_ds:
                    h = attn_block(self.num_heads, self.num_groups, self.dtype,
                                   self.attention_impl, name=f"down_{level}_{i}_attn")(h)
            if level != len(self.channel_mult) - 1:
                h = layers.Downsample(True, self.dtype, name=f"down_{level}_downsample")(h)
                ds *= 2
        h = nn.silu(layers.GroupNorm32(self.num_groups, name="out_norm")(h))
        pooled = jnp.mean(h.astype(jnp.float32), axis=(1, 2))  # float32 mean over H x W
        logits = nn.Dense(self.latent_dim, dtype=self.dtype, name="to_logits")(pooled)
        return logits.astype(jnp.float32)
