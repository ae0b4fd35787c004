"""Fashion-MNIST from whichever offline source data.source names (preprocessing: tfds_source).

"auto" tries these in order, logs the one it uses, and never downloads:
  "tfds": tfds `fashion_mnist` prepared in data_dir (source="tfds" downloads it when missing);
  "debian": the IDX files of Debian's dataset-fashion-mnist in data.debian_dir, turned once
    (~15 s) into the tfds dataset `fashion_mnist_local` in data_dir;
  "bundled": specs.BUNDLED_PATH, the first 10000 train / 2000 test examples.
"""

import functools
import gzip
import logging
import math
import os
import struct
import zlib

from dmz_jax.data import instructions, specs, tfds_source  # before TF: hides the GPUs

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

log = logging.getLogger(__name__)
SPEC = specs.SPECS["fashion_mnist"]
example_fn = tfds_source.example_fn


class IdxFormatError(ValueError):
    """An IDX(.gz) file is corrupt, truncated or not Fashion-MNIST; the message names it."""


def read_idx(path: str, header_only: bool = False):
    """Gzipped IDX unsigned-byte file -> uint8 array shaped as its header says.

    header_only: return the shape, reading ~20 bytes. Raises FileNotFoundError, IdxFormatError.
    """
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read(20 if header_only else -1)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise IdxFormatError(f"{path}: cannot decompress ({e}); the file is corrupt or "
                             "truncated") from e
    ndim = raw[3] if len(raw) > 3 else 0
    start = 4 + 4 * ndim
    if raw[:3] != b"\0\0\x08" or not 1 <= ndim <= 3 or len(raw) < start:
        raise IdxFormatError(f"{path}: bad IDX magic number or header 0x{raw[:4].hex()} "
                             "(expected 0x000008NN, NN = 1..3 sizes): the file is corrupt, "
                             "truncated or not an IDX ubyte file")
    shape = struct.unpack(f">{ndim}I", raw[4:start])
    if header_only:
        return shape
    if len(raw) - start != math.prod(shape):
        raise IdxFormatError(f"{path}: the header says shape {shape} ({math.prod(shape)} bytes) "
                             f"but the file holds {len(raw) - start}: truncated or corrupt")
    return np.frombuffer(raw, np.uint8, offset=start).reshape(shape)


def read_split(source_dir: str, split: str, header_only: bool = False):
    """(images uint8 [N, 28, 28], labels uint8 [N] in 0..9) of `split`; header_only: N."""
    paths = [os.path.join(source_dir, name) for name in specs.IDX_FILES[split]]
    images, labels = (read_idx(p, header_only) for p in paths)
    shapes = (images, labels) if header_only else (images.shape, labels.shape)
    if len(shapes[0]) != 3 or shapes[0][1:] != SPEC.raw_shape[:2] or shapes[1] != shapes[0][:1]:
        raise IdxFormatError(f"{paths[0]}: images {shapes[0]} and labels {shapes[1]} in "
                             f"{source_dir}; expected [N, 28, 28] and [N]")
    if header_only:
        return shapes[0][0]
    if labels.size and labels.max() >= SPEC.num_classes:
        raise IdxFormatError(f"{paths[1]}: label {labels.max()} is outside 0..9")
    return images, labels


class FashionMnistLocal(tfds.builder_cls("fashion_mnist")):
    """tfds `fashion_mnist_local`: tfds's fashion_mnist (same features) from local IDX files.

    Debian's gzip wrappers differ from the upstream ones and fail tfds's checksums.
    """

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, source_dir: str = specs.DEBIAN_DIR, **kwargs):
        self._source_dir = source_dir
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        return {split: self._examples(split) for split in specs.IDX_FILES}

    def _examples(self, split):
        images, labels = read_split(self._source_dir, split)
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image[..., None], "label": int(label)}


@functools.lru_cache(maxsize=1)
def _bundled(path: str) -> dict:
    """{train,test}_images uint8 [N, 28, 28], {train,test}_labels uint8 [N]."""
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


class _Unavailable(Exception):
    """A source that "auto" skips; the message says why."""


def _writable(path) -> bool:
    """Whether files may be created in folder `path` (or its nearest existing ancestor)."""
    local = os.path.abspath(os.path.expanduser(os.fspath(path)))
    while not os.path.exists(local):
        local = os.path.dirname(local)
    return "://" in os.fspath(path) or os.access(local, os.W_OK | os.X_OK)  # gs://: assume so


def _try_tfds(data_cfg, auto):
    builder = tfds.builder("fashion_mnist", data_dir=data_cfg.data_dir)
    if auto and not tfds_source.is_prepared(builder):
        raise _Unavailable(f"tfds: 'fashion_mnist' is not prepared in {builder.data_dir_root}")
    return builder, tfds_source.num_examples(builder, "fashion_mnist", "train")


def _try_debian(data_cfg, auto):
    builder = FashionMnistLocal(data_dir=data_cfg.data_dir, source_dir=data_cfg.debian_dir)
    if tfds_source.is_prepared(builder):
        return builder, tfds_source.num_examples(builder, "fashion_mnist", "train")
    try:
        num_train = read_split(data_cfg.debian_dir, "train", header_only=True)
        read_split(data_cfg.debian_dir, "test", header_only=True)
    except FileNotFoundError as e:
        raise _Unavailable(f"debian: {e.filename} not found (package dataset-fashion-mnist "
                           "not installed?)") from e
    except IdxFormatError as e:
        if not auto:
            raise
        raise _Unavailable(f"debian: {e}") from e
    if auto and not _writable(builder.data_dir_root):
        raise _Unavailable(f"debian: cannot write the prepared copy to {builder.data_dir_root}")
    return builder, num_train


def _try_bundled(data_cfg, auto):
    if not os.path.isfile(specs.BUNDLED_PATH):
        raise _Unavailable(f"bundled: {specs.BUNDLED_PATH} not found")
    return None, len(_bundled(specs.BUNDLED_PATH)["train_labels"])


def _resolve(data_cfg):
    """(source, tfds builder or None, train examples) of the source to read; cheap."""
    auto, tried = data_cfg.source == "auto", []
    tries = {"tfds": _try_tfds, "debian": _try_debian, "bundled": _try_bundled}
    for source in tries if auto else (data_cfg.source,):
        try:
            builder, num_train = tries[source](data_cfg, auto)
        except _Unavailable as e:
            tried.append(str(e))
            continue
        if auto:
            log.info("fashion_mnist: using source %r (%d train examples)%s", source, num_train,
                     "".join(f"; skipped {t}" for t in tried))
        return source, builder, num_train
    raise specs.DatasetNotFoundError(instructions.fashion_mnist(data_cfg, tried))


def dataset_info(data_cfg) -> specs.DatasetInfo:
    source, _, num_train = _resolve(data_cfg)
    return specs.DatasetInfo("fashion_mnist", int(data_cfg.image_size), SPEC.channels,
                             SPEC.num_classes, num_train, source)


def examples(data_cfg, split, process_index=0, process_count=1):
    source, builder, _ = _resolve(data_cfg)
    if source == "bundled":  # a contiguous 1/process_count of the split, remainder dropped
        arrays = _bundled(specs.BUNDLED_PATH)
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        n = len(labels) // process_count
        share = slice(process_index * n, (process_index + 1) * n)
        return tf.data.Dataset.from_tensor_slices(
            {"image": images[share][..., None], "label": labels[share].astype(np.int32)})
    if source == "tfds":
        how_to_get = instructions.fashion_mnist(data_cfg, ["tfds: download failed"])
        tfds_source.prepare(builder, how_to_get)
    else:
        tfds_source.prepare(builder, download_config=tfds.download.DownloadConfig(
            try_download_gcs=False))
    return tfds_source.read(builder, "fashion_mnist", split, process_index, process_count)
