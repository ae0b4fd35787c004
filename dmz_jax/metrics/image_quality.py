"""Per-image reconstruction metrics for float images [B, H, W, C] in [-1, 1] (jax.numpy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DATA_RANGE = 2.0  # images in [-1, 1]


def mse(x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared error per image: [B, H, W, C] x2 -> [B]."""
    diff = jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)
    return jnp.mean(jnp.square(diff), axis=(1, 2, 3))


def psnr(x: jax.Array, y: jax.Array, data_range: float = DATA_RANGE) -> jax.Array:
    """Peak signal-to-noise ratio per image in dB, 10 log10(data_range^2 / mse): [B].

    Identical images give +inf (never NaN, no warning); average finite values only, or
    report the count of exact reconstructions separately.
    """
    return 10.0 * jnp.log10(data_range ** 2 / mse(x, y))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian [size] (skimage's gaussian_filter kernel for truncate=3.5)."""
    offsets = np.arange(size) - (size - 1) / 2
    window = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (window / window.sum()).astype(np.float32)


def _filter_valid(x: jax.Array, window: np.ndarray) -> jax.Array:
    """Separable Gaussian filter of [N, H, W, 1], 'valid' region only: [N, H-k+1, W-k+1, 1]."""
    k = window.shape[0]
    for kernel in (window.reshape(k, 1, 1, 1), window.reshape(1, k, 1, 1)):
        x = jax.lax.conv_general_dilated(x, jnp.asarray(kernel), (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=jax.lax.Precision.HIGHEST)
    return x


def ssim(x: jax.Array, y: jax.Array, data_range: float = DATA_RANGE, window_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> jax.Array:
    """Structural similarity per image (Wang et al. 2004): [B, H, W, C] x2 -> [B].

    Gaussian-weighted local statistics (population covariance), the SSIM map averaged over
    the positions where the window fits (H, W >= window_size) and over channels; equal to
    skimage's structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=2, channel_axis=-1).
    """
    b, h, w, c = x.shape
    if min(h, w) < window_size:
        raise ValueError(f"Images {h}x{w} are smaller than the SSIM window {window_size}.")

    def planes(img):  # [B, H, W, C] -> [B * C, H, W, 1]
        return jnp.asarray(img, jnp.float32).transpose(0, 3, 1, 2).reshape(b * c, h, w, 1)

    x, y = planes(x), planes(y)
    window = gaussian_window(window_size, sigma)
    mu_x, mu_y, xx, yy, xy = (_filter_valid(v, window) for v in (x, y, x * x, y * y, x * y))
    var_x, var_y, cov = xx - mu_x ** 2, yy - mu_y ** 2, xy - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
                / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))
    return ssim_map.reshape(b, -1).mean(axis=1)
