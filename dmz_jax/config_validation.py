"""Checks a whole config before anything is built, and reports every problem at once.

`validate_config(config)` raises `ConfigError` whose message has one line per problem, each
naming the key, its bad value and what to do instead, e.g.

    Invalid config (2 problems):
      - model.latnet_dim=3: unknown key (not in config_base.base_config()); did you mean
        model.latent_dim?   [one line in the real message]
      - training.batch_size=12: not divisible by the 8 devices; use a multiple of 8, e.g. 16

Pure Python: no compilation, no data access. The only device facts it needs are the number of
devices and of processes, which default to `jax.device_count()` / `jax.process_count()`.
Checks of a value are skipped when the value is missing or of the wrong type (that is already
reported), so one bad key does not hide the others.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import jax
import ml_collections

from dmz_jax.config_base import base_config
from dmz_jax.diffusion import SCHEDULES
from dmz_jax.model import CONDITIONINGS
from dmz_jax.networks.latent import BINARY_ESTIMATORS, LATENT_TYPES
from dmz_jax.samplers import METHODS

# Image channels of each dataset (input_pipeline's raw shapes).
DATASET_CHANNELS = {"fashion_mnist": 1, "cifar10": 3, "celeb_a": 3}
MAX_BINARY_LATENT_DIM = 4096  # sanity bound on |z| for the binary latent
MIN_IMAGE_SIZE = 8
MIN_FASHION_MNIST_SIZE = 28  # input_pipeline pads 28x28 images, it never crops them


class ConfigError(ValueError):
    """A config that cannot work. `problems` holds one line per problem; so does the message."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        n = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"Invalid config ({n} problem{'s' if n != 1 else ''}):\n{lines}")


def validate_config(config, num_devices: Optional[int] = None,
                    process_count: Optional[int] = None) -> None:
    """Raises ConfigError listing every problem of `config`; returns None when it is valid.

    `config` is a ConfigDict (or nested mapping) shaped like `config_base.base_config()`.
    `num_devices` is the size of the device mesh the run will use (default: all devices),
    `process_count` the number of hosts feeding it (default: `jax.process_count()`).
    """
    if num_devices is None:
        num_devices = jax.device_count()
    if process_count is None:
        process_count = jax.process_count()
    checker = _Checker(config, base_config(), num_devices, process_count)
    _check_keys(checker, config, checker.base, "")
    for check in (_check_enums, _check_data, _check_denoiser, _check_encoder, _check_latent,
                  _check_diffusion, _check_training, _check_sampling, _check_eval, _check_mesh):
        check(checker)
    if checker.problems:
        raise ConfigError(checker.problems)


# --------------------------------------------------------------------------------------------
# Plumbing: reading values by dotted path, type compatibility, recording problems.


class _Checker:
    """Holds the config under test, the reference config and the problems found so far."""

    def __init__(self, config, base: ml_collections.ConfigDict, num_devices: int,
                 process_count: int):
        self.config, self.base = config, base
        self.num_devices, self.process_count = num_devices, process_count
        self.problems: list[str] = []

    def add(self, path: str, value: Any, message: str) -> None:
        """Records `path=value: message`."""
        self.problems.append(f"{path}={value!r}: {message}")

    def get(self, path: str) -> Any:
        """The value at `path`, or None when it is missing or not of the base config's type."""
        value = _lookup(self.config, path)
        expected = _lookup_type(self.base, path)
        if value is _MISSING or expected is None or not _type_ok(value, *expected):
            return None
        return value


_MISSING = object()


def _is_mapping(value) -> bool:
    return isinstance(value, (Mapping, ml_collections.ConfigDict))


def _lookup(config, path: str) -> Any:
    """config[a][b][c] for path "a.b.c", or _MISSING."""
    node = config
    for key in path.split("."):
        if not _is_mapping(node) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _lookup_type(base: ml_collections.ConfigDict, path: str):
    """(declared type, default value) of `path` in the base config, or None if absent."""
    *parents, leaf = path.split(".")
    node = base
    for key in parents:
        if key not in node:
            return None
        node = node[key]
    if leaf not in node:
        return None
    return node.get_type(leaf), node[leaf]


def _type_ok(value, expected: type, default) -> bool:
    """Whether `value` may stand where the base config has a field of type `expected`.

    ints may stand for floats; lists for tuples; None where the base default is None (a
    placeholder). Tuple elements must match the type of the default's elements.
    """
    if value is None:
        return default is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        return not default or all(_type_ok(v, type(default[0]), default[0]) for v in value)
    return isinstance(value, expected)


def _type_name(expected: type, default) -> str:
    if expected is tuple and default:
        return f"tuple of {type(default[0]).__name__}"
    name = expected.__name__
    return f"{name} or None" if default is None else name


# --------------------------------------------------------------------------------------------
# Unknown keys, missing keys and types.


def _check_keys(c: _Checker, node, base: ml_collections.ConfigDict, prefix: str) -> None:
    """Recursively compares `node` with `base`: unknown keys, missing keys, wrong types."""
    for key in node.keys():
        path = prefix + key
        if key not in base:
            close = difflib.get_close_matches(key, list(base.keys()), n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else (
                f"valid keys here: {sorted(base.keys())}")
            c.add(path, _short(node[key]),
                  f"unknown key (not in config_base.base_config()); {hint}")
            continue
        value, expected, default = node[key], base.get_type(key), base[key]
        if isinstance(base[key], ml_collections.ConfigDict):
            if _is_mapping(value):
                _check_keys(c, value, base[key], path + ".")
            else:
                c.add(path, value, "must be a section (ConfigDict), as in config_base.py")
        elif not _type_ok(value, expected, default):
            c.add(path, _short(value), f"expected {_type_name(expected, default)}, got "
                  f"{type(value).__name__}; use e.g. {default!r} (the default)")
    for key in base.keys():
        if key not in node:
            c.add(prefix + key, None, "missing; start the config from "
                  "config_base.base_config() so every key has a default")


def _short(value) -> Any:
    """A section is shown by its keys only, not its whole contents."""
    return f"<section {sorted(value.keys())}>" if _is_mapping(value) else value


# --------------------------------------------------------------------------------------------
# Small reusable checks.


def _check_in(c: _Checker, path: str, choices: Sequence[str]) -> None:
    value = c.get(path)
    if value is not None and value not in choices:
        c.add(path, value, f"unknown value; use one of {list(choices)}")


def _check_at_least(c: _Checker, path: str, low, hint: str = "") -> None:
    value = c.get(path)
    if value is not None and value < low:
        c.add(path, value, f"must be >= {low}{hint}")


def _check_positive(c: _Checker, path: str) -> None:
    value = c.get(path)
    if value is not None and not value > 0:
        c.add(path, value, "must be > 0")


def _check_divisible(c: _Checker, path: str, n: int, what: str) -> None:
    """`path` must be a multiple of n (the number of `what`)."""
    value = c.get(path)
    if value is not None and value >= 1 and n >= 1 and value % n:
        c.add(path, value, f"not divisible by the {n} {what}; use a multiple of {n}, "
              f"e.g. {math.ceil(value / n) * n}")


def _largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of n that is <= limit (at least 1)."""
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


# --------------------------------------------------------------------------------------------
# Enums and data.


def _check_enums(c: _Checker) -> None:
    """Every string option against the names the code accepts."""
    from dmz_jax import image_folder, input_pipeline  # imported here: they pull in TensorFlow

    _check_in(c, "data.name", input_pipeline.DATASET_NAMES)
    _check_in(c, "data.source", input_pipeline.FASHION_SOURCES)
    _check_in(c, "data.crop", tuple(input_pipeline.CELEBA_CROPS))
    _check_in(c, "model.latent_type", (*LATENT_TYPES, "none"))
    _check_in(c, "model.conditioning", CONDITIONINGS)
    _check_in(c, "model.binary_estimator", BINARY_ESTIMATORS)
    _check_in(c, "diffusion.schedule", SCHEDULES)
    _check_in(c, "sampling.method", METHODS)
    _check_in(c, "data.bad_images", image_folder.BAD_IMAGE_POLICIES)
    _check_in(c, "data.wrong_size", image_folder.WRONG_SIZE_POLICIES)


def _check_data(c: _Checker) -> None:
    """Image size and channel count against the dataset."""
    name, size, channels = c.get("data.name"), c.get("data.image_size"), c.get("data.channels")
    _check_at_least(c, "data.image_size", MIN_IMAGE_SIZE)
    if (name == "fashion_mnist" and size is not None
            and MIN_IMAGE_SIZE <= size < MIN_FASHION_MNIST_SIZE):
        c.add("data.image_size", size, f"fashion_mnist images are padded, never cropped; use "
              f">= {MIN_FASHION_MNIST_SIZE} (32 is the usual size)")
    if channels is None:
        return
    if channels not in (1, 3):
        c.add("data.channels", channels, "must be 1 (grayscale) or 3 (RGB)")
    elif name in DATASET_CHANNELS and channels != DATASET_CHANNELS[name]:
        c.add("data.channels", channels, f"{name} images have {DATASET_CHANNELS[name]} "
              f"channel(s); set data.channels={DATASET_CHANNELS[name]}")


# --------------------------------------------------------------------------------------------
# Networks: image size vs downsampling, attention resolutions, GroupNorm and head counts.


def _resolutions(size: int, channel_mult: Sequence[int]) -> list[int]:
    """Resolution (pixels) of each level of a U-Net path: size // 2**k."""
    return [size // 2 ** k for k in range(len(channel_mult))]


def _check_mult(c: _Checker, path: str) -> Optional[tuple[int, ...]]:
    """channel_mult must be non-empty with positive entries; returns it when usable."""
    mult = c.get(path)
    if mult is None:
        return None
    if not mult or any(m < 1 for m in mult):
        c.add(path, mult, "must be a non-empty tuple of positive ints, e.g. (1, 2, 2, 2)")
        return None
    return tuple(mult)


def _check_downsampling(c: _Checker, path: str, mult: Sequence[int], size: int,
                        network: str) -> bool:
    """image_size must survive len(mult)-1 halvings exactly; returns whether it does.

    When it does not, the level resolutions are fractional, so the caller skips the
    attention-resolution check (its list of resolutions would be meaningless).
    """
    factor = 2 ** (len(mult) - 1)
    if size % factor:
        c.add(path, tuple(mult), f"the {network}'s {len(mult)} levels downsample by {factor}, "
              f"which does not divide data.image_size={size}; use an image_size that is a "
              f"multiple of {factor}, or fewer levels")
        return False
    return True


def _check_attention_resolutions(c: _Checker, path: str, available: list[int],
                                 network: str) -> None:
    resolutions = c.get(path)
    if resolutions is None:
        return
    bad = [r for r in resolutions if r not in available]
    if bad:
        c.add(path, resolutions, f"{bad} not among the {network}'s resolutions {available}; "
              f"use values from {available}")


def _check_groups(c: _Checker, widths: list[int], network: str, widths_from: str) -> None:
    """GroupNorm: model.num_groups must divide every channel width."""
    groups = c.get("model.num_groups")
    if groups is None or groups < 1:
        return
    bad = sorted({w for w in widths if w % groups})
    if bad:
        g = math.gcd(*widths)
        c.add("model.num_groups", groups, f"does not divide the {network}'s channel widths "
              f"{bad} ({widths_from}); GroupNorm needs it to divide every width: use a "
              f"divisor of {g}, e.g. {_largest_divisor_at_most(g, groups)}")


def _check_heads(c: _Checker, widths: list[int], network: str, where: str) -> None:
    """Attention: model.num_heads must divide the channel width at every attention level."""
    heads = c.get("model.num_heads")
    if heads is None or heads < 1 or not widths:
        return
    bad = sorted({w for w in widths if w % heads})
    if bad:
        g = math.gcd(*widths)
        c.add("model.num_heads", heads, f"does not divide the {network}'s channel widths "
              f"{bad} at its attention levels ({where}); use a divisor of {g}, e.g. "
              f"{_largest_divisor_at_most(g, heads)}")


def _check_denoiser(c: _Checker) -> None:
    """The U-Net denoiser: levels vs image size, attention resolutions, groups and heads."""
    for path in ("model.model_channels", "model.num_heads", "model.num_groups"):
        _check_at_least(c, path, 1)
    _check_at_least(c, "model.num_res_blocks", 1)
    _check_dropout(c, "model.dropout")
    mult, size = _check_mult(c, "model.channel_mult"), c.get("data.image_size")
    ch = c.get("model.model_channels")
    if mult is None or size is None or size < 1:
        return
    available = _resolutions(size, mult)
    if _check_downsampling(c, "model.channel_mult", mult, size, "denoiser"):
        for path in ("model.attention_resolutions", "model.cross_attention_resolutions"):
            _check_attention_resolutions(c, path, available, "denoiser")
    if ch is None or ch < 1:
        return
    widths = [ch] + [ch * m for m in mult]
    _check_groups(c, widths, "denoiser", f"model.model_channels={ch} x channel_mult {mult}")
    attn = set(c.get("model.attention_resolutions") or ())
    if c.get("model.conditioning") == "cross_attention":
        cross = c.get("model.cross_attention_resolutions")
        attn |= set(cross if cross is not None else attn)
    levels = [k for k, r in enumerate(available) if r in attn] + [len(mult) - 1]  # + middle
    _check_heads(c, [ch * mult[k] for k in sorted(set(levels))], "denoiser",
                 f"resolutions {sorted({available[k] for k in levels}, reverse=True)}, "
                 "the lowest being the middle block")


def _uses_encoder(c: _Checker) -> bool:
    """Mirrors model.create_model: the encoder exists unless latent or conditioning is none."""
    return (c.get("model.latent_type") not in (None, "none")
            and c.get("model.conditioning") not in (None, "none"))


def _check_encoder(c: _Checker) -> None:
    """The encoder (only when it is built): levels, attention resolutions, groups, heads."""
    if not _uses_encoder(c):
        return
    _check_at_least(c, "model.encoder.model_channels", 1)
    _check_at_least(c, "model.encoder.num_res_blocks", 1)
    _check_dropout(c, "model.encoder.dropout")
    mult, size = _check_mult(c, "model.encoder.channel_mult"), c.get("data.image_size")
    ch = c.get("model.encoder.model_channels")
    if mult is None or size is None or size < 1:
        return
    available = _resolutions(size, mult)
    if _check_downsampling(c, "model.encoder.channel_mult", mult, size, "encoder"):
        _check_attention_resolutions(c, "model.encoder.attention_resolutions", available,
                                     "encoder")
    if ch is None or ch < 1:
        return
    widths = [ch] + [ch * m for m in mult]
    _check_groups(c, widths, "encoder", f"model.encoder.model_channels={ch} x channel_mult "
                  f"{mult}")
    attn = set(c.get("model.encoder.attention_resolutions") or ())
    levels = [k for k, r in enumerate(available) if r in attn]
    _check_heads(c, [ch * mult[k] for k in levels], "encoder",
                 f"resolutions {[available[k] for k in levels]}")


def _check_dropout(c: _Checker, path: str) -> None:
    rate = c.get(path)
    if rate is not None and not 0 <= rate < 1:
        c.add(path, rate, "must be in [0, 1)")


def _check_latent(c: _Checker) -> None:
    """|z| and the token width."""
    if _uses_encoder(c):
        _check_at_least(c, "model.latent_dim", 1,
                        " when model.latent_type and model.conditioning are not 'none'")
        dim = c.get("model.latent_dim")
        if (c.get("model.latent_type") == "binary" and dim is not None
                and dim > MAX_BINARY_LATENT_DIM):
            c.add("model.latent_dim", dim, f"implausibly many bits for the binary latent; use "
                  f"<= {MAX_BINARY_LATENT_DIM} (the paper uses 16 to 64)")
    _check_at_least(c, "model.token_dim", 1)


# --------------------------------------------------------------------------------------------
# Diffusion, training, sampling, eval, mesh.


def _check_diffusion(c: _Checker) -> None:
    _check_at_least(c, "diffusion.num_timesteps", 2)
    _check_at_least(c, "diffusion.vlb_weight", 0)


def _check_training(c: _Checker) -> None:
    """Batch sharding, step counts and intervals, optimizer and EMA settings."""
    _check_at_least(c, "training.batch_size", 1)
    _check_divisible(c, "training.batch_size", c.num_devices, "devices")
    _check_divisible(c, "training.batch_size", c.process_count, "processes")
    for key in ("num_steps", "log_every", "checkpoint_every", "sample_every",
                "keep_checkpoints", "max_nonfinite_steps"):
        _check_at_least(c, f"training.{key}", 1)
    for key in ("warmup_steps", "weight_decay"):
        _check_at_least(c, f"training.{key}", 0)
    _check_positive(c, "training.learning_rate")
    _check_positive(c, "training.grad_clip")
    _check_positive(c, "training.encoder_lr_scale")
    _check_at_least(c, "model.encoder.center_examples", 0)
    decay = c.get("training.ema_decay")
    if decay is not None and not 0 <= decay < 1:
        c.add("training.ema_decay", decay, "must be in [0, 1), e.g. 0.9999")


def _check_sampling(c: _Checker) -> None:
    """Respaced step counts must lie in 1..num_timesteps."""
    _check_at_least(c, "sampling.num_samples", 1)
    _check_at_least(c, "sampling.eta", 0)
    steps, total = c.get("sampling.steps"), c.get("diffusion.num_timesteps")
    if steps is None or total is None:
        return
    bad = [k for k in steps if not 1 <= k <= total]
    if bad:
        c.add("sampling.steps", steps, f"{bad} outside 1..diffusion.num_timesteps={total}; "
              f"use step counts between 1 and {total}")


def _check_eval(c: _Checker) -> None:
    _check_at_least(c, "eval.encode_batch_size", 1)
    _check_divisible(c, "eval.encode_batch_size", c.num_devices, "devices")
    _check_at_least(c, "eval.probe_train_examples", 1)
    _check_at_least(c, "eval.probe_test_examples", 1)


def _check_mesh(c: _Checker) -> None:
    """mesh.data x mesh.fsdp must cover the devices exactly (data=-1: what fsdp leaves)."""
    data, fsdp, n = c.get("mesh.data"), c.get("mesh.fsdp"), c.num_devices
    if fsdp is not None and fsdp < 1:
        c.add("mesh.fsdp", fsdp, "must be >= 1")
        return
    if data is None or fsdp is None:
        return
    if data == -1:
        if n % fsdp:
            divisors = [d for d in range(1, n + 1) if n % d == 0]
            c.add("mesh.fsdp", fsdp, f"does not divide the {n} devices; use one of {divisors}")
    elif data < 1:
        c.add("mesh.data", data, "must be >= 1, or -1 for 'the devices fsdp leaves'")
    elif data * fsdp != n:
        c.add("mesh.data", data, f"mesh.data x mesh.fsdp = {data} x {fsdp} = {data * fsdp}, "
              f"but there are {n} devices; set mesh.data=-1 to use them all, or make the "
              f"product {n}")
