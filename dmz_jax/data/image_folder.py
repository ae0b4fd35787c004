"""data.name = "image_folder": the .png/.jpg/.jpeg/.bmp/.gif files under data.image_dir.

Files: recursive, sorted by path. Labels: each first-level subfolder is a class (index among
the sorted names; files directly in image_dir are then skipped as unlabeled); no subfolders:
label 0, no classes. Split: the last round(test_fraction * n) of all candidate files permuted
with split_seed are "test", whatever the policies. `scan` decodes every file once and applies
data.bad_images (undecodable, or wrong channels without convert_channels), convert_channels
(alpha on black; gray -> RGB; RGB -> luma 0.299 R + 0.587 G + 0.114 B) and wrong_size
("resize": centre square crop, bilinear antialias resize); "error" raises ImageFolderError.
data.image_dir may be local or gs://BUCKET/... (listed and read through etils.epath; tf.data
reads the files with tf.io.read_file, which knows gs:// too).
"""

import collections
import dataclasses
import functools
import logging
import os
import re

from etils import epath

from dmz_jax.data import pipeline  # first: hides the GPUs from TensorFlow
from dmz_jax.data.specs import (IMAGE_EXTENSIONS, DatasetInfo, DatasetNotFoundError,
                                ImageFolderError)

import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601


@dataclasses.dataclass(frozen=True)
class ScanReport:
    """files, labels, is_test: the usable files (sorted), labels, whether in "test". counts:
    "ok" (usable; "converted", "resized" among them), "corrupt", "channels", "size",
    "unlabeled" (skipped). skipped: (path, reason) of each skipped file."""

    image_dir: str
    class_names: tuple
    files: tuple
    labels: tuple
    is_test: tuple
    counts: dict
    skipped: tuple

    def split(self, split: str) -> tuple[tuple, tuple]:
        """(files, labels) of "train" or "test", in path order."""
        keep = [i for i, t in enumerate(self.is_test) if t == (split == "test")]
        return tuple(self.files[i] for i in keep), tuple(self.labels[i] for i in keep)

    def summary(self) -> str:
        """E.g. "image_folder: 120 ok, 3 corrupt skipped, 5 converted, 2 resized (...)"."""
        c, n_test = self.counts, sum(self.is_test)
        extra = [(c["size"], "wrong-size skipped"), (c["channels"], "wrong-channels skipped"),
                 (c["unlabeled"], "unlabeled skipped")]
        return (f"image_folder: {c['ok']} ok, {c['corrupt']} corrupt skipped, "
                f"{c['converted']} converted, {c['resized']} resized"
                + "".join(f", {n} {what}" for n, what in extra if n)
                + f" ({len(self.files) - n_test} train / {n_test} test, "
                f"{len(self.class_names)} classes, in {self.image_dir})")


def _op_error_text(e: tf.errors.OpError) -> str:
    """The first line of a TF error, without "{{function_node ...}}" and "[Op:...]"."""
    text = str(e.message).splitlines()[0]
    return re.sub(r"\{\{[^}]*\}\}\s*", "", text).split(" [Op:")[0].strip() or type(e).__name__


def _verdict(path: str, cfg) -> tuple[str, str, list]:
    """(skip kind, reason, []) for a file to skip; ("", "", fixes) for a usable one."""
    size, channels = int(cfg.image_size), int(cfg.channels)
    try:
        h, w, c = tf.io.decode_image(epath.Path(path).read_bytes(), channels=0,
                                     dtype=tf.uint8, expand_animations=False).shape
    except tf.errors.OpError as e:
        kind, reason = "corrupt", f"corrupt: {_op_error_text(e)}"
    except OSError as e:  # listed, but cannot be read (gone since, or no permission)
        kind, reason = "corrupt", f"unreadable: {e}"
    else:
        convert, resize = c != channels, (h, w) != (size, size)
        if convert and not cfg.convert_channels:
            kind, reason = "channels", f"wrong channels: {c}, expected {channels}"
        elif resize and cfg.wrong_size != "resize":
            kind, reason = "size", f"wrong size: {h}x{w}, expected {size}x{size}"
        else:
            return "", "", ["converted"] * convert + ["resized"] * resize
    key = "wrong_size" if kind == "size" else "bad_images"
    if getattr(cfg, key) == "error":
        raise ImageFolderError(f"image_folder: {path}: {reason} (data.{key}='error').")
    return kind, reason, []


# The fields of config.data a scan depends on (hashable: the cache key of `_scan`).
_Settings = collections.namedtuple("_Settings", ("image_dir", "image_size", "channels",
                                                 "convert_channels", "bad_images", "wrong_size",
                                                 "test_fraction", "split_seed"))


def scan(data_cfg) -> ScanReport:
    """Decodes every file of data.image_dir and applies the policies; once per process and
    settings (`_scan.cache_clear()` forgets). Raises DatasetNotFoundError, ImageFolderError."""
    settings = _Settings(*(getattr(data_cfg, f) for f in _Settings._fields))
    return _scan(settings._replace(image_dir=_absolute(settings.image_dir)))


def _absolute(path: str) -> str:
    """A local path made absolute (~ expanded); a gs:// (any URL) path as it is."""
    path = str(path)
    return path.rstrip("/") if "://" in path else os.path.abspath(os.path.expanduser(path))


def _image_files(image_dir: str) -> list[tuple[str, tuple[str, ...]]]:
    """(path, its folder names below image_dir) of every image file under image_dir, by path."""
    found = []
    for root, _, names in epath.Path(image_dir).walk():
        below = epath.Path(root).relative_to(epath.Path(image_dir)).parts
        found += [(str(epath.Path(root) / name), tuple(below)) for name in names
                  if name.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


@functools.lru_cache(maxsize=None)
def _scan(cfg: _Settings) -> ScanReport:
    image_dir = cfg.image_dir
    if not epath.Path(image_dir).is_dir():
        raise DatasetNotFoundError(
            f"image_folder: data.image_dir={image_dir} does not exist or is not a folder.")
    found = _image_files(image_dir)
    if not found:
        raise DatasetNotFoundError(
            f"image_folder: no image files ({' '.join(IMAGE_EXTENSIONS)}) under {image_dir}.")
    paths = [path for path, _ in found]
    folders = [below[0] if below else None for _, below in found]
    class_names = tuple(sorted({f for f in folders if f is not None}))
    n = len(paths)
    test = np.zeros(n, bool)
    test[np.random.default_rng(cfg.split_seed).permutation(n)[
        n - int(round(cfg.test_fraction * n)):]] = True
    counts = dict.fromkeys(("ok", "converted", "resized", "corrupt", "channels", "size",
                            "unlabeled"), 0)
    usable, skipped = [], []
    for path, folder, is_test in zip(paths, folders, test):
        if class_names and folder is None:
            kind, reason, fixes = "unlabeled", "unlabeled: not in a class subfolder", []
        else:
            kind, reason, fixes = _verdict(path, cfg)
        for key in [kind or "ok", *fixes]:
            counts[key] += 1
        if kind:
            skipped.append((path, reason))
            log.debug("image_folder: skipping %s: %s", path, reason)
        else:
            usable.append((path, class_names.index(folder) if class_names else 0, bool(is_test)))
    files, labels, is_test = (tuple(x) for x in zip(*usable)) if usable else ((), (), ())
    report = ScanReport(image_dir, class_names, files, labels, is_test, counts, tuple(skipped))
    log.log(logging.WARNING if skipped else logging.INFO, "%s", report.summary())
    if not report.split("train")[0]:
        raise DatasetNotFoundError(
            f"image_folder: no usable training images in {image_dir}. {report.summary()}"
            + "".join(f"\n  {p}: {r}" for p, r in skipped[:5]))
    return report


def convert_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """float32 [H, W, c] (c in 1..4, 0..255) -> [H, W, channels] (see the module docstring)."""
    c = tf.shape(image)[-1]
    color = tf.cond(tf.equal(c % 2, 0), lambda: image[..., :-1] * (image[..., -1:] / 255.0),
                    lambda: image)
    if channels == 3:
        return tf.broadcast_to(color, tf.concat([tf.shape(color)[:2], [3]], 0))
    return tf.cond(tf.equal(tf.shape(color)[-1], 3),
                   lambda: tf.reduce_sum(color * tf.constant(LUMA_WEIGHTS), -1, keepdims=True),
                   lambda: color)


def crop_and_resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """float32 [H, W, C] -> [size, size, C]: centre square crop, bilinear antialias resize."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]

    def fit():
        side = tf.minimum(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = image[top:top + side, left:left + side]
        return tf.image.resize(square, (size, size), method="bilinear", antialias=True)
    return tf.cond(tf.logical_and(tf.equal(h, size), tf.equal(w, size)), lambda: image, fit)


def example_fn(data_cfg):
    """(path, label) -> {"image": float32 [S, S, C] in [-1, 1], "label": int32 []}."""
    size, channels = int(data_cfg.image_size), int(data_cfg.channels)

    def fn(path, label):
        image = tf.io.decode_image(tf.io.read_file(path), channels=0, dtype=tf.uint8,
                                   expand_animations=False)
        image = crop_and_resize(convert_channels(tf.cast(image, tf.float32), channels), size)
        image.set_shape([size, size, channels])
        return {"image": pipeline.to_unit_range(image), "label": label}
    return fn


def dataset_info(data_cfg) -> DatasetInfo:
    report = scan(data_cfg)
    return DatasetInfo("image_folder", int(data_cfg.image_size), int(data_cfg.channels),
                       len(report.class_names), len(report.split("train")[0]), "image_folder")


def examples(data_cfg, split, process_index=0, process_count=1):
    """(path, label) of `split`; process p of P takes every P-th file from p (equal shares)."""
    files, labels = scan(data_cfg).split(split)
    per_process = len(files) // process_count
    if per_process == 0 and process_count > 1:
        raise DatasetNotFoundError(f"image_folder: {len(files)} {split} images cannot be shared "
                                   f"by {process_count} processes.")
    share = slice(process_index, per_process * process_count, process_count)
    return tf.data.Dataset.from_tensor_slices((tf.constant(files[share], tf.string),
                                               np.asarray(labels[share], np.int32)))
