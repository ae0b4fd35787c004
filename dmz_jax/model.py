"""The DMZ model: encoder -> latent z -> z pathway -> U-Net denoiser.

Two designs share this module, chosen by config (`create_model`):
  - ours: the I-DDPM U-Net (`model.backbone=iddpm_unet`), a ResBlock encoder, straight-through
    bits, one token per bit (`model.z_tokens=per_bit`);
  - the authors' (exlab-research/dmz): diffusers' UNet2DConditionModel layout
    (`diffusers_unet`), the Conv-BN encoder (`model.encoder.type=conv_bn`), Gumbel-softmax bits
    (`model.binary_estimator=gumbel_softmax`) and one token, the 2|z| vector of (off, on)
    pairs (`one_hot_single`).

Parameters live under four top-level names, which is how `--mode=describe` counts them:
  encoder     the image encoder (logits of z)
  z_tokens    z -> tokens for cross-attention   } the conditioning pathway, together with
  z_time      z -> timestep-embedding offset    } every `*cross_attn` module and the
                                                } `class_embedding` in the denoiser
  denoiser    the U-Net
The Conv-BN encoder's BatchNorm running statistics are the "batch_stats" collection.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dmz_jax.networks import latent as latent_lib
from dmz_jax.networks.conv_bn import ConvBNEncoder, conv_bn_widths
from dmz_jax.networks.diffusers_unet import DiffusersUNet
from dmz_jax.networks.latent import Encoding
from dmz_jax.networks.unet import Conditioning, Encoder, UNet

# time_embedding is the I-DDPM backbone's name of z_with_t: Dense(z) added to the time embedding
CONDITIONINGS = ("cross_attention", "time_embedding", "z_with_t", "z_concat", "none")
BACKBONES = ("iddpm_unet", "diffusers_unet")
ENCODER_TYPES = ("resblocks", "conv_bn")
Z_TOKENS = ("per_bit", "one_hot_single")
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
    Stochastic encodings draw from the "latent" rng stream; dropout from "dropout". With a
    Conv-BN encoder, encode(train=True) updates the "batch_stats" collection (apply it with
    mutable=["batch_stats"]); train=False uses the running statistics.
    Gumbel-softmax bits with gumbel_eval="sample" encode DETERMINISTIC as a draw (the authors'
    evaluation), from the "latent" rng when given, else from key 0.
    """

    denoiser: Any  # UNet | DiffusersUNet
    encoder: Optional[Any]  # Encoder | ConvBNEncoder
    latent_type: str = "binary"
    conditioning: str = "cross_attention"
    token_dim: int = 128
    token_mlp: bool = False
    token_init_scale: float = 1.0
    binary_estimator: str = "bernoulli"  # one of latent_lib.BINARY_ESTIMATORS
    gumbel_temperature: float = 1.0
    gumbel_eval: str = "argmax"  # one of latent_lib.GUMBEL_EVALS
    z_token_kind: str = "per_bit"  # model.z_tokens: one of Z_TOKENS

    @property
    def uses_latent(self) -> bool:
        return self.encoder is not None and self.conditioning != "none"

    @property
    def latent_dim(self) -> int:
        return self.encoder.latent_dim if self.uses_latent else 0

    @property
    def diffusers_backbone(self) -> bool:
        return isinstance(self.denoiser, DiffusersUNet)

    def setup(self):
        dtype = self.denoiser.dtype
        if self.conditioning == "cross_attention" and self.z_token_kind == "per_bit":
            self.z_tokens = ZTokens(self.token_dim, self.token_mlp, self.token_init_scale, dtype)
        elif self.conditioning == "time_embedding":
            self.z_time = nn.Dense(4 * self.denoiser.model_channels, dtype=dtype)

    def encode(self, x: jax.Array, *, encoding: Encoding = Encoding.DETERMINISTIC,
               train: bool = False) -> jax.Array:
        """Images [B, H, W, C] -> z [B, latent_dim]; `train` switches the encoder's dropout
        (ResBlock encoder) or batch statistics (Conv-BN encoder)."""
        logits = self.encoder(x, train=train)
        if (encoding is Encoding.DETERMINISTIC and self.binary_estimator == "gumbel_softmax"
                and self.gumbel_eval == "sample"):
            encoding = Encoding.SAMPLE
        rng = None
        if encoding.needs_rng:
            rng = self.make_rng("latent") if self.has_rng("latent") else jax.random.PRNGKey(0)
        return latent_lib.get_latent_type(self.latent_type).from_logits(
            logits, rng, encoding, self.binary_estimator, self.gumbel_temperature)

    def encode_logits(self, x: jax.Array) -> jax.Array:
        return self.encoder(x, train=False)

    def z_features(self, z: jax.Array) -> jax.Array:
        """What the denoiser reads of z [B, n]: the (off, on) pairs [B, 2n] for one_hot_single
        tokens, else z itself."""
        return latent_lib.one_hot_pairs(z) if self.z_token_kind == "one_hot_single" else z

    def _conditioning(self, z: Optional[jax.Array]) -> Optional[Conditioning]:
        if z is None or not self.uses_latent:
            return None
        if self.conditioning == "cross_attention":
            if self.z_token_kind == "one_hot_single":
                return Conditioning(tokens=self.z_features(z)[:, None, :])  # [B, 1, 2n]
            return Conditioning(tokens=self.z_tokens(z))
        if self.conditioning in ("z_with_t", "z_concat"):  # DiffusersUNet's class embedding
            return Conditioning(time=self.z_features(z))
        return Conditioning(time=self.z_time(z))

    def denoise(self, x_t: jax.Array, t: jax.Array, z: Optional[jax.Array], *,
                train: bool = False) -> jax.Array:
        cond = self._conditioning(z)
        if not self.diffusers_backbone:
            return self.denoiser(x_t, t, cond, train=train)
        cond = cond or Conditioning()
        return self.denoiser(x_t, t, encoder_hidden_states=cond.tokens, class_labels=cond.time,
                             train=train)

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
    m = config.model
    encoder = None
    if m.latent_type != "none" and m.conditioning != "none":
        encoder = _encoder(config)
    return DMZ(denoiser=_denoiser(config), encoder=encoder, latent_type=m.latent_type,
               conditioning=m.conditioning, token_dim=m.token_dim, token_mlp=m.token_mlp,
               token_init_scale=m.token_init_scale, binary_estimator=m.binary_estimator,
               gumbel_temperature=m.gumbel_temperature, gumbel_eval=m.gumbel_eval,
               z_token_kind=m.z_tokens)


def _knobs(m: ml_collections.ConfigDict) -> dict:
    return dict(dtype=DTYPES[m.dtype], remat=m.remat, attention_impl=m.attention_impl)


def _cross_resolutions(m: ml_collections.ConfigDict) -> tuple:
    """The resolutions (pixels) where the denoiser cross-attends to z; () without tokens."""
    if m.conditioning != "cross_attention" or m.latent_type == "none":
        return ()
    res = m.cross_attention_resolutions
    return tuple(m.attention_resolutions if res is None else res)


def _denoiser(config: ml_collections.ConfigDict):
    m, size = config.model, config.data.image_size
    out_channels = config.data.channels * (2 if m.learn_sigma else 1)
    if m.backbone == "diffusers_unet":
        return _diffusers_unet(config, out_channels)
    return UNet(
        model_channels=m.model_channels,
        out_channels=out_channels,
        num_res_blocks=m.num_res_blocks,
        channel_mult=tuple(m.channel_mult),
        attention_ds=resolutions_to_ds(size, m.attention_resolutions),
        cross_attention_ds=resolutions_to_ds(size, _cross_resolutions(m)),
        num_heads=m.num_heads,
        dropout=m.dropout,
        use_scale_shift_norm=m.use_scale_shift_norm,
        num_groups=m.num_groups,
        **_knobs(m),
    )


def _diffusers_unet(config: ml_collections.ConfigDict, out_channels: int) -> DiffusersUNet:
    """The authors' backbone: level k (resolution image_size / 2^k) is a CrossAttn block where
    z is cross-attended, an Attn block at the other attention resolutions, else plain; the mid
    block cross-attends when z does, else it is one resnet (or resnet-attention-resnet with
    model.diffusers.mid_attention, the HF DDPM checkpoints' layout)."""
    m, h, size = config.model, config.model.diffusers, config.data.image_size
    levels = [size // 2 ** k for k in range(len(m.channel_mult))]
    cross = _cross_resolutions(m)
    if cross:
        mid = "cross_attention"
    else:
        mid = "attention" if h.mid_attention else "resnet"
    width = m.latent_dim * (2 if m.z_tokens == "one_hot_single" else 1)
    class_embed = {"z_with_t": "add", "z_concat": "concat"}.get(m.conditioning, "none")
    if m.latent_type == "none":
        class_embed = "none"
    return DiffusersUNet(
        block_out_channels=tuple(m.model_channels * k for k in m.channel_mult),
        layers_per_block=m.num_res_blocks,
        out_channels=out_channels,
        attention_levels=tuple(k for k, r in enumerate(levels)
                               if r in m.attention_resolutions or r in cross),
        cross_attention_levels=tuple(k for k, r in enumerate(levels) if r in cross),
        mid_block=mid,
        attention_head_dim=h.attention_head_dim,
        cross_attention_dim=width if m.z_tokens == "one_hot_single" else m.token_dim,
        class_embed=class_embed,
        class_embed_input_dim=width if class_embed != "none" else 0,
        dropout=m.dropout,
        norm_num_groups=m.num_groups,
        norm_eps=h.norm_eps,
        flip_sin_to_cos=h.flip_sin_to_cos,
        freq_shift=h.freq_shift,
        downsample_padding=h.downsample_padding,
        resnet_time_scale_shift="scale_shift" if m.use_scale_shift_norm else "default",
        **_knobs(m),
    )


def _encoder(config: ml_collections.ConfigDict):
    m, e, size = config.model, config.model.encoder, config.data.image_size
    knobs = _knobs(m)
    if e.type == "conv_bn":
        return ConvBNEncoder(latent_dim=m.latent_dim,
                             widths=conv_bn_widths(size, e.model_channels), dtype=knobs["dtype"])
    return Encoder(
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


def init_variables(model: DMZ, rng: jax.Array, image_shape: tuple[int, ...]) -> dict:
    """All variables from a batch of one: {"params"}, and {"batch_stats"} (BatchNorm's running
    mean 0 and variance 1) when the encoder has BatchNorm; image_shape = (H, W, C)."""
    x = jnp.zeros((1, *image_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.float32)
    params_rng, dropout_rng, latent_rng = jax.random.split(rng, 3)
    return dict(model.init({"params": params_rng, "dropout": dropout_rng, "latent": latent_rng},
                           x, x, t, train=False))


def init_params(model: DMZ, rng: jax.Array, image_shape: tuple[int, ...]) -> Any:
    """Initialises parameters from a batch of one; image_shape = (H, W, C)."""
    return init_variables(model, rng, image_shape)["params"]


def variables(params: Any, batch_stats: Optional[Any] = None) -> dict:
    """The variables of `model.apply`: {"params"}, plus {"batch_stats"} when not None."""
    return {"params": params} if batch_stats is None else {"params": params,
                                                             "batch_stats": batch_stats}


def _path_names(path) -> list[str]:
    return [getattr(k, "key", str(k)) for k in path]


def parameter_groups(params) -> dict[str, int]:
    """Counts parameters by group: encoder, conditioning (z pathway), denoiser (plain U-Net)."""
    counts = {"encoder": 0, "conditioning": 0, "denoiser": 0}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = _path_names(path)
        if names[0] == "encoder":
            group = "encoder"
        elif names[0] in ("z_tokens", "z_time") or any(
                n.endswith("cross_attn") or n == "class_embedding" for n in names):
            group = "conditioning"
        else:
            group = "denoiser"
        counts[group] += int(leaf.size)
    counts["total"] = sum(counts.values())
    return counts
