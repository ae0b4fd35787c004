"""Fashion-MNIST from whichever offline source data.source names (preprocessing: tfds_source).

"auto" tries these in order, logs the one it uses, and never downloads:
  "tfds": tfds `fashion_mnist` prepared in data_dir (source="tfds" downloads it when missing);
  "debian": the IDX files of Debian's dataset-fashion-mnist in data.debian_dir, read directly
    (0.3 s for all 70,000; Debian's gzip wrappers fail tfds's checksums, so tfds cannot);
  "bundled": specs.BUNDLED_PATH, the first 10000 train / 2000 test examples.
"""

import errno
import functools
import gzip
import logging
import math
import os
import struct
import zlib

from etils import epath

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

    header_only: return the shape, reading ~20 bytes. `path` may be local or gs://. Raises
    FileNotFoundError (its filename: `path`), IdxFormatError.
    """
    if not epath.Path(path).is_file():
        raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
    try:
        with epath.Path(path).open("rb") as raw_file, gzip.GzipFile(fileobj=raw_file) as f:
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


@functools.lru_cache(maxsize=2)
def _arrays(source: str, path: str) -> dict:
    """{train,test}_images uint8 [N, 28, 28], {train,test}_labels uint8 [N] of the "bundled"
    file or the "debian" folder `path`."""
    if source == "debian":
        return {f"{split}_{kind}": array for split in specs.IDX_FILES
                for kind, array in zip(("images", "labels"), read_split(path, split))}
    with epath.Path(path).open("rb") as raw, np.load(raw) as f:
        return {k: f[k] for k in f.files}


class _Unavailable(Exception):
    """A source that "auto" skips; the message says why."""


def _try_tfds(data_cfg, auto):
    builder = tfds.builder("fashion_mnist", data_dir=data_cfg.data_dir)
    if auto and not tfds_source.is_prepared(builder):
        raise _Unavailable(f"tfds: 'fashion_mnist' is not prepared in {builder.data_dir_root}")
    return builder, tfds_source.num_examples(builder, "fashion_mnist", "train")


def _try_debian(data_cfg, auto):
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
    return None, num_train


def _try_bundled(data_cfg, auto):
    if not epath.Path(specs.BUNDLED_PATH).is_file():
        raise _Unavailable(f"bundled: {specs.BUNDLED_PATH} not found")
    return None, len(_arrays("bundled", specs.BUNDLED_PATH)["train_labels"])


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
    if source == "tfds":
        how_to_get = instructions.fashion_mnist(data_cfg, ["tfds: download failed"])
        tfds_source.prepare(builder, how_to_get)
        return tfds_source.read(builder, "fashion_mnist", split, process_index, process_count)
    arrays = _arrays(source, data_cfg.debian_dir if source == "debian" else specs.BUNDLED_PATH)
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    n = len(labels) // process_count  # a contiguous 1/process_count, remainder dropped
    share = slice(process_index * n, (process_index + 1) * n)
    return tf.data.Dataset.from_tensor_slices(
        {"image": images[share][..., None], "label": labels[share].astype(np.int32)})
