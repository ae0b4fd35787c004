"""What a locked, type-safe ConfigDict cannot check: enums, data vs dataset, networks vs image
size, ranges, batches vs devices; every problem at once. No TensorFlow, devices or compiles."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import ml_collections

from dmz_jax.config_base import base_config
from dmz_jax.data import specs
from dmz_jax.diffusion import SCHEDULES, VARIANCES
from dmz_jax.model import BACKBONES, CONDITIONINGS, DTYPES, ENCODER_TYPES, Z_TOKENS
from dmz_jax.networks.latent import BINARY_ESTIMATORS, GUMBEL_EVALS, LATENT_TYPES
from dmz_jax.networks.layers import ATTENTION_IMPLS
from dmz_jax.samplers import METHODS
from dmz_jax.timestep_sampler import SAMPLERS as TIMESTEP_SAMPLERS

KINDS = ("type", "choice", "range", "dataset", "downsampling", "resolution", "divisible", "mesh")

_CHOICES = {
    "data.name": specs.DATASET_NAMES, "data.source": specs.FASHION_SOURCES, "model.dtype": DTYPES,
    "data.crop": tuple(specs.CELEBA_CROPS), "data.bad_images": specs.BAD_IMAGE_POLICIES,
    "data.wrong_size": specs.WRONG_SIZE_POLICIES, "model.latent_type": (*LATENT_TYPES, "none"),
    "model.conditioning": CONDITIONINGS, "model.binary_estimator": BINARY_ESTIMATORS,
    "model.attention_impl": ATTENTION_IMPLS, "diffusion.schedule": SCHEDULES,
    "sampling.method": METHODS, "diffusion.variance": VARIANCES,
    "training.timestep_sampler": TIMESTEP_SAMPLERS, "model.backbone": BACKBONES,
    "model.encoder.type": ENCODER_TYPES, "model.z_tokens": Z_TOKENS,
    "model.gumbel_eval": GUMBEL_EVALS}

# key -> (test, rule shown). Counts >= 1, rates > 0, dropout and decay in [0, 1).
_COUNT, _NON_NEGATIVE = (lambda v: v >= 1, "must be >= 1"), (lambda v: v >= 0, "must be >= 0")
_POSITIVE, _FRACTION = (lambda v: v > 0, "must be > 0"), (lambda v: 0 <= v < 1, "must be in [0, 1)")
_RANGES = {
    **dict.fromkeys("""model.model_channels model.num_res_blocks model.num_heads
        model.num_groups model.token_dim mesh.fsdp training.batch_size
        training.num_steps training.log_every training.checkpoint_every
        training.sample_every sampling.num_samples training.keep_checkpoints
        training.max_nonfinite_steps training.grad_accum_steps eval.encode_batch_size
        eval.probe_train_examples eval.probe_test_examples""".split(), _COUNT),
    **dict.fromkeys("""training.warmup_steps training.weight_decay diffusion.vlb_weight
        model.encoder.center_examples sampling.eta diffusion.input_perturbation""".split(),
        _NON_NEGATIVE),
    **dict.fromkeys(("training.learning_rate", "training.encoder_lr_scale",
                     "model.gumbel_temperature"), _POSITIVE),
    **dict.fromkeys(("model.dropout", "training.ema_decay", "data.test_fraction"), _FRACTION),
    "model.channel_mult": (lambda v: v and min(v) >= 1, "must be non-empty, each >= 1"),
    "training.grad_clip": (lambda v: v >= 0, "must be >= 0 (0: no clipping)"),
    "diffusion.num_timesteps": (lambda v: v >= 2, "must be >= 2"),
    "mesh.data": (lambda v: v == -1 or v >= 1, "must be >= 1, or -1 (what mesh.fsdp leaves)")}
_ENCODER_RANGES = {  # only when the encoder is built
    **dict.fromkeys(("model.latent_dim", "model.encoder.model_channels",
                     "model.encoder.num_res_blocks"), _COUNT),
    "model.encoder.dropout": _FRACTION, "model.encoder.channel_mult": _RANGES["model.channel_mult"],
}


class Problem(NamedTuple):
    """One problem: the dotted config `key`, its `kind` (one of KINDS), the line shown."""

    key: str
    kind: str
    message: str  # "key=value: what is wrong; what to do"


class ConfigError(ValueError):
    """A config that cannot work; `problems` lists them, the message has one line each."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        lines = "".join(f"\n  - {p.message}" for p in self.problems)
        super().__init__(f"Invalid config ({len(self.problems)} problem(s)):{lines}")


def check_config(config: ml_collections.ConfigDict, *, num_devices: Optional[int] = None,
                 process_count: Optional[int] = None) -> None:
    """Raises ConfigError listing every problem of `config` (from base_config()), else None;
    num_devices (in the mesh) and process_count (hosts): None skips the checks that need it."""
    c = _Checker()
    _read(c, config, base_config(), "")
    encoder = "none" not in (c["model.latent_type"], c["model.conditioning"])  # create_model's
    for key, choices in _CHOICES.items():
        if c.get(key) is not None and c.get(key) not in choices:
            c.add(key, "choice", c.get(key), f"unknown value; use one of {list(choices)}")
    for key, (test, rule) in {**_RANGES, **(_ENCODER_RANGES if encoder else {})}.items():
        if c.get(key) is not None and not test(c.get(key)):
            c.add(key, "range", c.get(key), rule)
    _check_data(c)
    resblocks = encoder and c.get("model.encoder.type") == "resblocks"
    for prefix in ("model", "model.encoder") if resblocks else ("model",):
        _check_unet(c, prefix)
    _check_authors_options(c, encoder)
    steps, total = c.get("sampling.steps"), c.get("diffusion.num_timesteps")
    if steps and total and not all(1 <= k <= total for k in steps):
        c.add("sampling.steps", "range", steps, f"must lie in 1..diffusion.num_timesteps={total}")
    _check_variance(c)
    _check_devices(c, num_devices, process_count)
    if c.problems:
        raise ConfigError(c.problems)


class _Checker(dict):
    """Dotted key -> value of the config under test (None when mistyped); the problems."""

    def __init__(self):
        super().__init__()
        self.problems = []

    def add(self, key: str, kind: str, value, fix: str) -> None:
        self.problems.append(Problem(key, kind, f"{key}={value!r}: {fix}"))


def _read(c: _Checker, node, base: ml_collections.ConfigDict, prefix: str) -> None:
    """Fills `c` with the leaves of `node`; reports None for a non-placeholder, mistyped items."""
    for key, default in base.items():
        path = prefix + key
        c[path] = value = node[key]
        if isinstance(default, ml_collections.ConfigDict):
            _read(c, value, default, path + ".")
        elif (value is None and default is not None) or isinstance(value, (tuple, list)) and any(
                type(v) is not type((default or (0,))[0]) for v in value):
            c.add(path, "type", value, f"must be like the default {default!r}")
            c[path] = None


def _check_data(c: _Checker) -> None:
    """Channels and the smallest image size (pixels) against the dataset."""
    name, size, channels = (c.get(f"data.{k}") for k in ("name", "image_size", "channels"))
    if name == "image_folder" and not c.get("data.image_dir"):
        c.add("data.image_dir", "dataset", None, "image_folder needs it: the folder of images")
    elif name not in specs.DATASET_NAMES:
        return
    spec = specs.SPECS.get(name)  # None: image_folder, which converts to 1 or 3 channels
    allowed = (spec.channels,) if spec else (1, 3)
    options = " or ".join(map(str, allowed))
    if channels is not None and channels not in allowed:
        c.add("data.channels", "dataset", channels, f"{name} yields {options} channel(s); set "
              f"data.channels={options}")
    least = spec.min_image_size if spec else specs.DatasetSpec.min_image_size
    if size is not None and size < least:
        why = " (its 28x28 images are padded, never cropped)" if name == "fashion_mnist" else ""
        c.add("data.image_size", "dataset", size, f"{name} needs >= {least}{why}; use >= {least}")


def _check_unet(c: _Checker, prefix: str) -> None:
    """The denoiser (`prefix` "model") or encoder ("model.encoder"): levels vs image_size,
    attention resolutions (pixels) that exist, GroupNorm groups and heads vs channel widths."""
    network = "encoder" if prefix == "model.encoder" else "denoiser"
    mult, size = c.get(f"{prefix}.channel_mult"), c.get("data.image_size")
    if not mult or min(mult) < 1 or size is None or size < 1:
        return
    available, factor = [size // 2 ** k for k in range(len(mult))], 2 ** (len(mult) - 1)
    attention = {f"{prefix}.attention_resolutions": c.get(f"{prefix}.attention_resolutions")}
    if network == "denoiser":  # None: the same as attention_resolutions
        attention["model.cross_attention_resolutions"] = c.get("model.cross_attention_resolutions")
    if size % factor:
        c.add(f"{prefix}.channel_mult", "downsampling", mult, f"the {network} downsamples by "
              f"{factor}; use fewer levels or a data.image_size that {factor} divides ({size})")
    for key, resolutions in attention.items() if size % factor == 0 else ():
        bad = [r for r in resolutions or () if r not in available]
        if bad:
            c.add(key, "resolution", resolutions, f"{bad} not among the {network}'s "
                  f"resolutions {available}; use values from {available}")
    if (ch := c.get(f"{prefix}.model_channels")) is None or ch < 1:
        return
    _check_divides(c, "model.num_groups", [ch] + [ch * m for m in mult], network,
                   f"{prefix}.model_channels={ch} x channel_mult {tuple(mult)}")
    attended = set(attention[f"{prefix}.attention_resolutions"] or ())
    if network == "denoiser" and c.get("model.backbone") == "diffusers_unet":
        return  # its heads: model.diffusers.attention_head_dim (_check_authors_options)
    if network == "denoiser":  # the middle block attends, and so do cross-attention levels
        cross = (attention["model.cross_attention_resolutions"]
                 if c.get("model.conditioning") == "cross_attention" else ())
        attended |= {available[-1], *(attended if cross is None else cross)}
    levels = [k for k, r in enumerate(available) if r in attended]
    _check_divides(c, "model.num_heads", [ch * mult[k] for k in levels], network,
                   f"resolutions {[available[k] for k in levels]}")


def _check_divides(c: _Checker, key: str, widths: list[int], network: str, where: str) -> None:
    """`key` (GroupNorm groups or attention heads) must divide every width (channels)."""
    n = c.get(key)
    if n is not None and n >= 1 and (bad := sorted({w for w in widths if w % n})):
        c.add(key, "divisible", n, f"does not divide the {network}'s channel widths {bad} "
              f"({where}); use a divisor of {math.gcd(*widths)}")


def _check_authors_options(c: _Checker, encoder: bool) -> None:
    """The combinations the authors' network (diffusers_unet, conv_bn, one_hot_single) and
    ours (iddpm_unet, resblocks, per_bit) have, and the shapes they need."""
    backbone, conditioning = c.get("model.backbone"), c.get("model.conditioning")
    if conditioning in ("z_with_t", "z_concat") and backbone != "diffusers_unet":
        c.add("model.conditioning", "choice", conditioning, "is the diffusers_unet backbone's "
              "class embedding; set model.backbone=diffusers_unet, or use time_embedding (the "
              "iddpm_unet's z added to the time embedding)")
    if conditioning == "time_embedding" and backbone == "diffusers_unet":
        c.add("model.conditioning", "choice", conditioning, "is the iddpm_unet's; with "
              "model.backbone=diffusers_unet use z_with_t (added) or z_concat")
    if encoder and c.get("model.z_tokens") == "one_hot_single" and c.get(
            "model.latent_type") != "binary":
        c.add("model.z_tokens", "choice", "one_hot_single", "is the (off, on) pair of each "
              f"bit, which a {c.get('model.latent_type')} latent does not have; use "
              "model.latent_type=binary or model.z_tokens=per_bit")
    size = c.get("data.image_size")
    if encoder and c.get("model.encoder.type") == "conv_bn" and size:
        if size < 4 or size & (size - 1):
            c.add("model.encoder.type", "dataset", "conv_bn", f"halves data.image_size={size} "
                  "down to 2x2, so it needs a power of two >= 4; use such a size or "
                  "model.encoder.type=resblocks")
        if c.get("model.encoder.center_examples"):
            c.add("model.encoder.center_examples", "choice", c.get(
                "model.encoder.center_examples"), "centres the resblocks encoder's logits; "
                "set it to 0 with model.encoder.type=conv_bn")
    if backbone == "diffusers_unet":
        _check_diffusers_heads(c)


def _check_diffusers_heads(c: _Checker) -> None:
    """Cross-attention resolutions among the attention ones; attention_head_dim (diffusers'
    head count in CrossAttn blocks, head width in Attn blocks) divides their widths."""
    mult, ch, size = (c.get(k) for k in ("model.channel_mult", "model.model_channels",
                                         "data.image_size"))
    heads = c.get("model.diffusers.attention_head_dim")
    attention = set(c.get("model.attention_resolutions") or ())
    cross = c.get("model.cross_attention_resolutions")
    cross = attention if cross is None else set(cross)
    if c.get("model.conditioning") != "cross_attention":
        cross = set()
    if cross - attention:
        c.add("model.cross_attention_resolutions", "resolution", tuple(sorted(cross)),
              f"{sorted(cross - attention)} not among model.attention_resolutions "
              f"{tuple(sorted(attention))}: a diffusers_unet level cross-attends in its "
              "Transformer2D, which also self-attends; add them there")
    if not (mult and ch and size and heads and heads >= 1):
        return
    levels = {size // 2 ** k: ch * m for k, m in enumerate(mult)}
    widths = {w for r, w in levels.items() if r in attention | cross}
    if cross:
        widths.add(ch * mult[-1])  # the mid block's Transformer2D
    bad = sorted(w for w in widths if w % heads)
    if bad:
        c.add("model.diffusers.attention_head_dim", "divisible", heads, f"does not divide the "
              f"attention widths {bad} (diffusers: head count in CrossAttn, head width in Attn "
              "blocks); use a divisor of " + str(math.gcd(*widths)))


def _check_variance(c: _Checker) -> None:
    """diffusion.variance "learned_range" <=> model.learn_sigma (the network's 2C outputs)."""
    variance, learn_sigma = c.get("diffusion.variance"), c.get("model.learn_sigma")
    if variance not in VARIANCES or learn_sigma is None:
        return
    if variance == "learned_range" and not learn_sigma:
        c.add("diffusion.variance", "choice", variance, "needs model.learn_sigma=True (the "
              "network outputs the variance); set model.learn_sigma=True, or diffusion.variance="
              "fixed_small or fixed_large for a network without it")
    elif variance != "learned_range" and learn_sigma:
        c.add("diffusion.variance", "choice", variance, "is a fixed variance, but "
              "model.learn_sigma=True makes the network output one; set model.learn_sigma="
              "False, or diffusion.variance=learned_range")


def _check_devices(c: _Checker, num_devices: Optional[int], process_count: Optional[int]):
    """Batches split over processes and devices; the mesh covers the devices. None: skipped."""
    for key, n, what in (("training.batch_size", process_count, "processes"),
                         ("training.batch_size", num_devices, "devices"),
                         ("eval.encode_batch_size", num_devices, "devices")):
        if n is not None and (value := c.get(key)) is not None and value >= 1 and value % n:
            c.add(key, "divisible", value, f"not divisible by the {n} {what}; use a multiple "
                  f"of {n}, e.g. {math.ceil(value / n) * n}")
    batch, k, d = c.get("training.batch_size"), c.get("training.grad_accum_steps"), num_devices or 1
    if batch and k and batch >= 1 and k >= 1 and batch % d == 0 and batch // d % k:  # per device
        c.add("training.grad_accum_steps", "divisible", k, f"training.batch_size={batch} does not "
              f"split into {k} microbatches over {d} device(s); use a divisor of {batch // d}")
    data, fsdp, n = c.get("mesh.data"), c.get("mesh.fsdp"), num_devices
    if n is None or data is None or fsdp is None or fsdp < 1:
        return
    if data == -1 and n % fsdp:
        c.add("mesh.fsdp", "divisible", fsdp, f"does not divide the {n} devices; use one of "
              f"{[d for d in range(1, n + 1) if n % d == 0]}")
    elif data >= 1 and data * fsdp != n:
        c.add("mesh.data", "mesh", data, f"mesh.data x mesh.fsdp = {data} x {fsdp} = "
              f"{data * fsdp}, but there are {n} devices; set mesh.data=-1 to use them all")
