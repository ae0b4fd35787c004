"""Writes dmz_jax/data/fashion_mnist_subset.npz, the Fashion-MNIST subset shipped in the package.

It holds the FIRST 10000 train and FIRST 2000 test examples of the original IDX files (in file
order), so the pipeline works offline with neither tfds data nor the Debian package:

    train_images uint8 [10000, 28, 28]   train_labels uint8 [10000]   (values 0..9)
    test_images  uint8 [2000, 28, 28]    test_labels  uint8 [2000]

Usage (source: the Debian package `dataset-fashion-mnist`, or any folder holding the four
original `*-ubyte.gz` files):

    python tools/make_fashion_mnist_subset.py [--source_dir /usr/share/datasets/fashion-mnist]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dmz_jax.data import fashion_mnist, specs  # noqa: E402  (after the sys.path fix)

NUM_TRAIN = 10_000
NUM_TEST = 2_000
MAX_BYTES = 6 * 1024 * 1024
DEFAULT_OUT = specs.BUNDLED_PATH


def make_subset(source_dir: str, out_path: str) -> int:
    """Reads the IDX files in `source_dir`, writes the subset to `out_path`; returns its bytes."""
    arrays = {}
    for split, n in (("train", NUM_TRAIN), ("test", NUM_TEST)):
        images, labels = fashion_mnist.read_split(source_dir, split)
        if len(labels) < n:
            raise ValueError(f"{source_dir}: split {split} has {len(labels)} < {n} examples")
        arrays[f"{split}_images"] = np.ascontiguousarray(images[:n], dtype=np.uint8)
        arrays[f"{split}_labels"] = np.ascontiguousarray(labels[:n], dtype=np.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    np.savez_compressed(out_path, **arrays)
    size = os.path.getsize(out_path)
    if size > MAX_BYTES:
        raise RuntimeError(f"{out_path} is {size} bytes, over the {MAX_BYTES}-byte budget")
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source_dir", default=specs.DEBIAN_DIR)
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    size = make_subset(args.source_dir, args.out)
    print(f"wrote {os.path.normpath(args.out)}: {size} bytes ({size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
