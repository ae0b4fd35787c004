"""The DMZ model: encoder -> latent z -> z pathway -> U-Net denoiser.

Parameters live under four top-level names, which is how `--mode=describe` counts them:
  encoder     the image encoder (logits of z)
  z_tokens    z -> tokens for cross-attention   } the conditioning pathway, together with
  z_time      z -> timestep-embedding offset    } every `*_cross_attn` module in the denoiser
  denoiser    the I-DDPM U-Net
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dmz_jax.networks import latent as latent_lib
from dmz_jax.networks.latent import Encoding
from dmz_jax.networks.unet import Conditioning, Encoder, UNet

CONDITIONINGS = ("cross_attention", "time_embedding", "none")
# model.dtype -> the networks' compute dtype. Parameters (and so gradients and the optimizer
# state) are float32 in both; None keeps float32 compute exactly as before the knob existed.
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


class ZTokens(nn.Module):
    """z [B, n] -> tokens [B, n, D]: token_i = pos_i + z_i * on_i + (1 - z_i) * off_i.

    Linear in z, so the straight-through gradient reaches the encoder; an optional residual
    MLP follows.
    """

    token_dim: int
    mlp: bool = False
    init_scale: float = 1.0  # std of pos, on and off at initialisation
    dtype: Optional[Any] = None  # compute dtype of the MLP's dense layers

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        n, d = z.shape[-1], self.token_dim
        init = nn.initializers.normal(self.init_scale)
        pos = self.param("pos", init, (n, d))
        on = self.param("on", init, (n, d))
        off = self.param("off", init, (n, d))
        zz = z[..., None]
        tokens = pos + zz * on + (1.0 - zz) * off
        if self.mlp:
            h = nn.Dense(4 * d, dtype=self.dtype, name="mlp_in")(
                nn.LayerNorm(name="mlp_norm")(tokens))
            tokens = tokens + nn.Dense(d, dtype=self.dtype, name="mlp_out")(nn.gelu(h))
        return tokens


class DMZ(nn.Module):
    """Diffusion autoencoder.

    Call conventions (images NHWC in [-1, 1], t the network timestep, float [B]):
      encode(x, encoding=DETERMINISTIC, train=False) -> z [B, latent_dim] (exact 0/1 bits)
      denoise(x_t, t, z, train=False)  -> [B, H, W, C or 2C]  (eps, and the variance value v)
      __call__(x0, x_t, t, train)      -> denoise(x_t, t, encode(x0, encoding=TRAIN), train)
    Stochastic encodings draw from the "latent" rng stream; dropout from "dropout".
    """

    denoiser: UNet
    encoder: Optional[Encoder]
    latent_type: str = "binary"
    conditioning: str = "cross_attention"
    token_dim: int = 128
    token_mlp: bool = False
    token_init_scale: float = 1.0
    binary_estimator: str = "bernoulli"  # training bits: b ~ Bernoulli(p), or "threshold"

    @property
    def uses_latent(self) -> bool:
        return self.encoder is not None and self.conditioning != "none"

    @property
    def latent_dim(self) -> int:
        return self.encoder.latent_dim if self.uses_latent else 0

    def setup(self):
        dtype = self.denoiser.dtype
        if self.conditioning == "cross_attention":
            self.z_tokens = ZTokens(self.token_dim, self.token_mlp, self.token_init_scale, dtype)
        elif self.conditioning == "time_embedding":
            self.z_time = nn.Dense(4 * self.denoiser.model_channels, dtype=dtype)

    def encode(self, x: jax.Array, *, encoding: Encoding = Encoding.DETERMINISTIC,
               train: bool = False) -> jax.Array:
        """Images [B, H, W, C] -> z [B, latent_dim]; `train` switches the encoder's dropout."""
        logits = self.encoder(x, train=train)
        rng = self.make_rng("latent") if encoding.needs_rng else None
        return latent_lib.get_latent_type(self.latent_type).from_logits(
            logits, rng, encoding, self.binary_estimator)

    def encode_logits(self, x: jax.Array) -> jax.Array:
        return self.encoder(x, train=False)

    def _conditioning(self, z: Optional[jax.Array]) -> Optional[Conditioning]:
        if z is None or not self.uses_latent:
            return None
        if self.conditioning == "cross_attention":
            return Conditioning(tokens=self.z_tokens(z))
        return Conditioning(time=self.z_time(z))

    def denoise(self, x_t: jax.Array, t: jax.Array, z: Optional[jax.Array], *,
                train: bool = False) -> jax.Array:
        return self.denoiser(x_t, t, self._conditioning(z), train=train)

    def __call__(self, x0: jax.Array, x_t: jax.Array, t: jax.Array,
                 train: bool = False) -> jax.Array:
        z = self.encode(x0, encoding=Encoding.TRAIN, train=train) if self.uses_latent else None
        return self.denoise(x_t, t, z, train=train)


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(H, W, C) of the images the model sees."""
    return (config.data.image_size, config.data.image_size, config.data.channels)


def resolutions_to_ds(image_size: int, resolutions) -> tuple[int, ...]:
    """Attention resolutions in pixels (e.g. (16, 8)) -> downsampling factors (e.g. (2, 4))."""
    return tuple(image_size // int(r) for r in resolutions)


def create_model(config: ml_collections.ConfigDict) -> DMZ:
    """Builds the DMZ module from `config.model` and `config.data`.

    model.dtype, model.remat and model.attention_impl reach both networks; none of them
    changes the parameters (names, shapes, float32), only how they are computed with.
    """
    m, size = config.model, config.data.image_size
    channels = config.data.channels
    knobs = dict(dtype=DTYPES[m.dtype], remat=m.remat, attention_impl=m.attention_impl)
    cross_res = m.cross_attention_resolutions
    if cross_res is None:
        cross_res = m.attention_resolutions
    denoiser = UNet(
        model_channels=m.model_channels,
        out_channels=channels * (2 if m.learn_sigma else 1),
        num_res_blocks=m.num_res_blocks,
        channel_mult=tuple(m.channel_mult),
        attention_ds=resolutions_to_ds(size, m.attention_resolutions),
        cross_attention_ds=(resolutions_to_ds(size, cross_res)
                            if m.conditioning == "cross_attention" else ()),
        num_heads=m.num_heads,
        dropout=m.dropout,
        use_scale_shift_norm=m.use_scale_shift_norm,
        num_groups=m.num_groups,
        **knobs,
    )
    encoder = None
    if m.latent_type != "none" and m.conditioning != "none":
        e = m.encoder
        encoder = Encoder(
            latent_dim=m.latent_dim,
            model_channels=e.model_channels,
            num_res_blocks=e.num_res_blocks,
            channel_mult=tuple(e.channel_mult),
            attention_ds=resolutions_to_ds(size, e.attention_resolutions),
            num_heads=m.num_heads,
            dropout=e.dropout,
            num_groups=m.num_groups,
            **knobs,
        )
    return DMZ(denoiser=denoiser, encoder=encoder, latent_type=m.latent_type,
               conditioning=m.conditioning, token_dim=m.token_dim, token_mlp=m.token_mlp,
               token_init_scale=m.token_init_scale, binary_estimator=m.binary_estimator)


def init_params(model: DMZ, rng: jax.Array, image_shape: tuple[int, ...]) -> Any:
    """Initialises parameters from a batch of one; image_shape = (H, W, C)."""
    x = jnp.zeros((1, *image_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.float32)
    params_rng, dropout_rng, latent_rng = jax.random.split(rng, 3)
    variables = model.init({"params": params_rng, "dropout": dropout_rng, "latent": latent_rng},
                           x, x, t, train=False)
    return variables["params"]


def _path_names(path) -> list[str]:
    return [getattr(k, "key", str(k)) for k in path]


def parameter_groups(params) -> dict[str, int]:
    """Counts parameters by group: encoder, conditioning (z pathway), denoiser (plain U-Net)."""
    counts = {"encoder": 0, "conditioning": 0, "denoiser": 0}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = _path_names(path)
        if names[0] == "encoder":
            group = "encoder"
        elif names[0] in ("z_tokens", "z_time") or any(n.endswith("cross_attn") for n in names):
            group = "conditioning"
        else:
            group = "denoiser"
        counts[group] += int(leaf.size)
    counts["total"] = sum(counts.values())
    return counts
