"""Fashion-MNIST from local IDX files (e.g. the Debian package), as a TFDS builder.

The Debian package ``dataset-fashion-mnist`` installs the four original
Fashion-MNIST files in ``/usr/share/datasets/fashion-mnist``::

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz   (60000 examples)
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz    (10000 examples)

Their pixel content is the original one, but the gzip wrappers differ from the
upstream downloads, so TFDS's own ``fashion_mnist`` builder rejects them on its
checksum check. :class:`FashionMnistLocal` (registered as
``fashion_mnist_local``) reads them with the small IDX parser below and writes a
normal TFDS dataset (features ``image`` uint8 [28, 28, 1] and ``label``
ClassLabel with 10 names; splits ``train`` and ``test``) into ``data_dir``.

IDX format (http://yann.lecun.com/exdb/mnist/): big-endian magic
``0x00 0x00 <dtype> <ndim>``, then ``ndim`` big-endian uint32 sizes, then the
row-major data. Only dtype ``0x08`` (unsigned byte) is accepted here.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np
import tensorflow_datasets as tfds

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"

# split -> (images file, labels file)
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_UBYTE = 0x08
_MAX_HEADER_BYTES = 4 + 4 * 4


class IdxFormatError(ValueError):
    """An IDX(.gz) file is corrupt, truncated or not what was expected."""


def _open(path: str):
    """Opens ``path`` for binary reading, gunzipping when it ends in ``.gz``."""
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _parse_header(path: str, head: bytes) -> tuple[int, tuple[int, ...]]:
    """Parses an IDX header.

    Args:
        path: file name, for error messages only.
        head: the first bytes of the decompressed file (at least the header).

    Returns:
        (header length in bytes, shape tuple).
    """
    if len(head) < 4:
        raise IdxFormatError(f"{path}: truncated IDX file ({len(head)} bytes, no magic number)")
    zero0, zero1, dtype, ndim = head[0], head[1], head[2], head[3]
    if zero0 != 0 or zero1 != 0 or dtype != _UBYTE or not 1 <= ndim <= 4:
        raise IdxFormatError(
            f"{path}: bad IDX magic number 0x{head[:4].hex()} (expected 0x000008NN: unsigned "
            "bytes, NN = 01..04 dimensions); the file is corrupt or not an IDX ubyte file"
        )
    header_len = 4 + 4 * ndim
    if len(head) < header_len:
        raise IdxFormatError(f"{path}: truncated IDX header ({len(head)} of {header_len} bytes)")
    shape = struct.unpack(f">{ndim}I", head[4:header_len])
    return header_len, tuple(int(s) for s in shape)


def read_idx_shape(path: str) -> tuple[int, ...]:
    """Returns the shape stored in an IDX(.gz) header, reading only the header.

    Cheap (reads ~20 decompressed bytes); does not validate the payload.

    Raises:
        FileNotFoundError: the file does not exist.
        IdxFormatError: the header is corrupt.
    """
    try:
        with _open(path) as f:
            head = f.read(_MAX_HEADER_BYTES)
    except (OSError, EOFError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise IdxFormatError(f"{path}: cannot decompress/read ({e})") from e
    return _parse_header(path, head)[1]


def read_idx(path: str) -> np.ndarray:
    """Reads a whole IDX(.gz) ubyte file.

    Args:
        path: path of the file (gzip-compressed if it ends in ``.gz``).

    Returns:
        uint8 array with the shape stored in the header, e.g. [N, 28, 28] for
        images and [N] for labels.

    Raises:
        FileNotFoundError: the file does not exist.
        IdxFormatError: bad magic number, truncated/overlong payload or a broken gzip stream.
    """
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise IdxFormatError(
            f"{path}: cannot decompress ({type(e).__name__}: {e}); the file is corrupt or truncated"
        ) from e
    header_len, shape = _parse_header(path, raw[:_MAX_HEADER_BYTES])
    expected = int(np.prod(shape, dtype=np.int64))
    got = len(raw) - header_len
    if got != expected:
        what = "truncated" if got < expected else "corrupt (trailing bytes)"
        raise IdxFormatError(
            f"{path}: header says shape {shape} = {expected} data bytes but the file holds "
            f"{got}; the file is {what}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def idx_paths(source_dir: str, split: str) -> tuple[str, str]:
    """Returns (images path, labels path) of ``split`` ("train"/"test")."""
    images, labels = IDX_FILES[split]
    return os.path.join(source_dir, images), os.path.join(source_dir, labels)


def read_split_shape(source_dir: str, split: str) -> int:
    """Number of examples of ``split`` from the IDX headers only (cheap).

    Raises:
        FileNotFoundError / IdxFormatError: a file is absent, or the headers are corrupt or
            disagree (images must be [N, 28, 28], labels [N]).
    """
    images_path, labels_path = idx_paths(source_dir, split)
    image_shape = read_idx_shape(images_path)
    label_shape = read_idx_shape(labels_path)
    _check_shapes(images_path, image_shape, label_shape)
    return image_shape[0]


def _check_shapes(path: str, image_shape, label_shape) -> None:
    if len(image_shape) != 3 or tuple(image_shape[1:]) != (28, 28):
        raise IdxFormatError(f"{path}: images have shape {image_shape}, expected [N, 28, 28]")
    if len(label_shape) != 1 or label_shape[0] != image_shape[0]:
        raise IdxFormatError(f"{path}: {image_shape[0]} images but labels of shape {label_shape}")


def load_split(source_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads and checks one split.

    Returns:
        images: uint8 [N, 28, 28]; labels: uint8 [N] with values in 0..9.
    """
    images_path, labels_path = idx_paths(source_dir, split)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    _check_shapes(images_path, images.shape, labels.shape)
    if labels.size and int(labels.max()) >= len(CLASS_NAMES):
        raise IdxFormatError(f"{labels_path}: label {int(labels.max())} is outside 0..9")
    return images, labels


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST read from local IDX .gz files (no download).

    Usage::

        builder = FashionMnistLocal(data_dir=..., source_dir=DEBIAN_DIR)
        builder.download_and_prepare()   # reads the IDX files, writes TFRecords
        ds = builder.as_dataset(split="train")
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release (reads local IDX files)."}

    def __init__(self, *, source_dir: str = DEBIAN_DIR, **kwargs):
        """Args: source_dir: folder with the four IDX .gz files; kwargs: TFDS."""
        self._source_dir = source_dir
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Fashion-MNIST (Zalando SE, MIT licence) read from local IDX files, e.g. "
                "those of the Debian package dataset-fashion-mnist."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded.
        return {split: self._generate_examples(split) for split in IDX_FILES}

    def _generate_examples(self, split: str):
        images, labels = load_split(self._source_dir, split)
        for i in range(len(labels)):
            yield i, {"image": images[i][..., None], "label": int(labels[i])}
