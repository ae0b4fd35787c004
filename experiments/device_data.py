"""Fashion-MNIST for the device grid in numpy alone: no TensorFlow (the device has none).

Reads the subset bundled with the package (dmz_jax/data/fashion_mnist_subset.npz: the first
10,000 train and 2,000 test images) and preprocesses it as dmz_jax.data does for
data.source="bundled": x / 127.5 - 1 in float32, padded with -1 to image_size (28 -> 32).
So `load_split` returns the same arrays as dmz_jax.data.load_split for that source (checked
in tests/test_device_grid.py where TensorFlow is installed). The training order is this
module's own (`train_batches`), not dmz_jax's data stream: a function of the seed alone, so
every arm of a seed sees the same batches.
"""

from __future__ import annotations

import functools
from typing import Iterator, Optional

import numpy as np

from dmz_jax.data import specs  # a plain module (paths, shapes): no TensorFlow


@functools.lru_cache(maxsize=1)
def _raw() -> dict:
    """{train,test}_images uint8 [N, 28, 28], {train,test}_labels uint8 [N]."""
    with np.load(specs.BUNDLED_PATH) as f:
        return {k: f[k] for k in f.files}


def preprocess(images: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 [N, h, w] -> float32 [N, S, S, 1] in [-1, 1], centred and padded with -1 (S =
    image_size >= h, w)."""
    x = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    x = np.clip(x, -1.0, 1.0)[..., None]
    h, w = images.shape[1:3]
    top, left = (image_size - h) // 2, (image_size - w) // 2
    pad = ((0, 0), (top, image_size - h - top), (left, image_size - w - left), (0, 0))
    return np.pad(x, pad, constant_values=-1.0)


def load_split(data_cfg, split: str, max_examples: Optional[int] = None) -> dict:
    """The first max_examples (None: all) of `split` in file order: {"image": float32 [N, S,
    S, 1] in [-1, 1], "label": int32 [N]}. Only fashion_mnist (the device grid's data)."""
    if data_cfg.name != "fashion_mnist" or data_cfg.channels != 1:
        raise ValueError(f"device_data reads the bundled Fashion-MNIST only, not "
                         f"{data_cfg.name} with {data_cfg.channels} channel(s)")
    raw = _raw()
    images, labels = raw[f"{split}_images"], raw[f"{split}_labels"]
    n = len(labels) if max_examples is None else min(int(max_examples), len(labels))
    return {"image": preprocess(images[:n], int(data_cfg.image_size)),
            "label": labels[:n].astype(np.int32)}


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The permutation of 0..n-1 that epoch `epoch` of seed `seed` reads, int64 [n]."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def train_batches(split: dict, batch_size: int, seed: int, random_flip: bool = False
                  ) -> Iterator[dict]:
    """Endless batches {"image": [B, S, S, 1], "label": [B]} of `split` (load_split's dict):
    the epochs' permutations (`epoch_order`) one after the other, cut into batches of B
    (a batch may span two epochs). random_flip: each image mirrored left-right with
    probability 1/2, from (seed, batch index)."""
    n, stream, epoch, step = len(split["label"]), np.zeros((0,), np.int64), 0, 0
    while True:
        while len(stream) < batch_size:
            stream = np.concatenate([stream, epoch_order(seed, epoch, n)])
            epoch += 1
        rows, stream = stream[:batch_size], stream[batch_size:]
        batch = {"image": split["image"][rows], "label": split["label"][rows]}
        if random_flip:
            flip = np.random.default_rng([int(seed), step, 1]).random(batch_size) < 0.5
            batch["image"] = np.where(flip[:, None, None, None], batch["image"][:, :, ::-1],
                                      batch["image"])
        step += 1
        yield batch
