"""Image grids and PNG files (PNG encoding by TensorFlow, which the input pipeline loads anyway)."""

from __future__ import annotations

import math

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[..., C] floats in [-1, 1] -> uint8 in [0, 255] (rounded, clipped)."""
    x = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """[N, H, W, C] uint8 -> one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] uint8 grid."""
    n, h, w, c = images.shape
    cols = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = image
    return grid


def save_png(path: str, image: np.ndarray) -> None:
    """Writes [H, W, C] uint8 (C in 1, 3, 4) to `path` (local or gs://)."""
    import tensorflow as tf
    tf.io.write_file(path, tf.io.encode_png(image))
