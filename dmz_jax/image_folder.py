"""The "image_folder" dataset: a folder of image files as training data.

Selected with ``data.name = "image_folder"``; the fields it reads from ``config.data`` (all but
``image_dir`` have defaults, see ``dmz_jax/config_base.py``):

* ``image_dir``: the (local) folder, searched recursively for ``.png .jpg .jpeg .bmp .gif`` files
  (extension case ignored), taken in sorted path order. Symbolic links are not followed.
* Labels: when image files lie in first-level subfolders, each such subfolder is a class and
  the label is the index of its name among the sorted class names (``num_classes`` of them);
  image files directly in ``image_dir`` are then skipped as unlabeled. Without subfolders
  every label is 0 and ``num_classes`` is 0 (no class labels).
* ``test_fraction`` (0.1), ``split_seed`` (0): all candidate files (before validation) are
  permuted with ``split_seed``; the last ``round(test_fraction * n)`` of them form the "test"
  split, the rest "train". A file's split thus depends neither on the policies below nor on
  which other files are bad. Within a split files keep their sorted order.
* ``bad_images``: "skip" (default) or "error": what to do with a file that cannot be read or
  decoded (corrupt, truncated, not an image) or, with ``convert_channels=False``, that has the
  wrong number of channels. "error" raises :class:`ImageFolderError` naming the file.
* ``convert_channels`` (True): bring every image to ``data.channels`` (1 or 3). An alpha
  channel is used to composite the image on black and then dropped (RGBA -> RGB * A / 255);
  grayscale -> RGB repeats the gray value; RGB -> grayscale is the ITU-R 601 luma
  ``0.299 R + 0.587 G + 0.114 B`` (kept in float, not rounded). False: an image whose channel
  count differs from ``data.channels`` is a bad image (see ``bad_images``).
* ``wrong_size``: for an image that is not ``image_size`` x ``image_size``: "resize" (default:
  centre-crop to a square of side min(H, W), then bilinear resize with antialias), "skip" or
  "error".

Every file is decoded once at startup by :func:`scan_image_folder` (eager
``tf.io.decode_image`` per file: O(number of files), meant for small to medium folders); the
result is cached per configuration so :func:`dataset_info`, :func:`train_iterator` and
:func:`load_split` scan only once per process (:func:`clear_scan_cache` forgets it, e.g. after
the folder changed). The tf.data pipeline then decodes the files that passed, in graph mode,
each epoch. Images are scaled like the other datasets: ``x / 127.5 - 1`` in [-1, 1].
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Iterator, Optional

import numpy as np
import tensorflow as tf

from dmz_jax import input_pipeline as ip

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
BAD_IMAGE_POLICIES = ("skip", "error")
WRONG_SIZE_POLICIES = ("resize", "skip", "error")
SPLITS = ("train", "test")
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601


class ImageFolderError(ValueError):
    """A file violates an "error" policy (bad image, wrong channels, wrong size)."""


@dataclasses.dataclass(frozen=True)
class ScanReport:
    """Result of :func:`scan_image_folder`.

    Attributes:
      image_dir: the scanned folder.
      class_names: sorted first-level subfolder names (empty: no class labels).
      files: the usable files, full paths, sorted.
      labels: their labels (index into class_names, or 0).
      is_test: whether each usable file is in the "test" split.
      n_ok: usable files (including the converted and resized ones).
      n_corrupt: files that could not be read or decoded (skipped).
      n_converted: usable files whose channels were converted.
      n_resized: usable files that will be centre-cropped and resized.
      n_skipped_size: files skipped for their size (wrong_size="skip").
      n_skipped_channels: files skipped for their channel count (convert_channels=False).
      n_unlabeled: files directly in image_dir, skipped because class subfolders exist.
      skipped: (path, reason) of every skipped file, in path order.
    """

    image_dir: str
    class_names: tuple
    files: tuple
    labels: tuple
    is_test: tuple
    n_ok: int = 0
    n_corrupt: int = 0
    n_converted: int = 0
    n_resized: int = 0
    n_skipped_size: int = 0
    n_skipped_channels: int = 0
    n_unlabeled: int = 0
    skipped: tuple = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, split: str) -> tuple[tuple, tuple]:
        """(files, labels) of `split` ("train" or "test"), in sorted path order."""
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r} for image_folder; expected one of "
                             f"{list(SPLITS)}.")
        want_test = split == "test"
        keep = [i for i, t in enumerate(self.is_test) if t == want_test]
        return tuple(self.files[i] for i in keep), tuple(self.labels[i] for i in keep)

    @property
    def n_train(self) -> int:
        return len(self.is_test) - sum(self.is_test)

    @property
    def n_test(self) -> int:
        return sum(self.is_test)

    def summary(self) -> str:
        """One line, e.g. "image_folder: 120 ok, 3 corrupt skipped, 5 converted, 2 resized"."""
        text = (f"image_folder: {self.n_ok} ok, {self.n_corrupt} corrupt skipped, "
                f"{self.n_converted} converted, {self.n_resized} resized")
        extra = [(self.n_skipped_size, "wrong-size skipped"),
                 (self.n_skipped_channels, "wrong-channels skipped"),
                 (self.n_unlabeled, "unlabeled skipped")]
        text += "".join(f", {n} {what}" for n, what in extra if n)
        return (f"{text} ({self.n_train} train / {self.n_test} test, "
                f"{self.num_classes} classes, in {self.image_dir})")


# ----------------------------------------------------------------------------- config


def check_config(data_cfg) -> None:
    """Validates the image_folder fields of `data_cfg` (raises ValueError)."""
    if not ip._cfg(data_cfg, "image_dir"):
        raise ValueError("data.image_dir must be set for data.name='image_folder'.")
    if ip._cfg(data_cfg, "channels") not in (1, 3):
        raise ValueError(f"data.channels must be 1 or 3 for image_folder, got "
                         f"{ip._cfg(data_cfg, 'channels')!r}.")
    fraction = ip._cfg(data_cfg, "test_fraction", 0.1)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.test_fraction must be in [0, 1), got {fraction!r}.")
    for key, default, allowed in (("bad_images", "skip", BAD_IMAGE_POLICIES),
                                  ("wrong_size", "resize", WRONG_SIZE_POLICIES)):
        if ip._cfg(data_cfg, key, default) not in allowed:
            raise ValueError(f"Unknown data.{key} {ip._cfg(data_cfg, key)!r}; expected one of "
                             f"{list(allowed)}.")


def _settings(data_cfg) -> tuple:
    """The fields that determine a scan, as a hashable tuple (also the cache key)."""
    check_config(data_cfg)
    return (os.path.abspath(os.path.expanduser(str(data_cfg.image_dir))),
            int(data_cfg.image_size), int(data_cfg.channels),
            bool(ip._cfg(data_cfg, "convert_channels", True)),
            ip._cfg(data_cfg, "bad_images", "skip"), ip._cfg(data_cfg, "wrong_size", "resize"),
            float(ip._cfg(data_cfg, "test_fraction", 0.1)),
            int(ip._cfg(data_cfg, "split_seed", 0)))


# ----------------------------------------------------------------------------- scanning


def list_image_files(image_dir: str) -> list[str]:
    """Paths of the image files under `image_dir` (recursive), sorted."""
    found = []
    for root, dirs, names in os.walk(image_dir):
        dirs.sort()
        found += [os.path.join(root, n) for n in names
                  if n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def _class_of(path: str, image_dir: str) -> Optional[str]:
    """First-level subfolder of `path` under `image_dir`, or None if directly in it."""
    parts = os.path.relpath(path, image_dir).split(os.sep)
    return parts[0] if len(parts) > 1 else None


def _test_mask(n: int, fraction: float, seed: int) -> np.ndarray:
    """bool [n]: the last round(fraction * n) of a seeded permutation are True."""
    order = np.random.default_rng(seed).permutation(n)
    mask = np.zeros(n, bool)
    mask[order[n - int(round(fraction * n)):]] = True
    return mask


def _op_error_text(e: tf.errors.OpError) -> str:
    """The first line of a TF error, without its "{{function_node ...}}" / "[Op:...]" noise."""
    text = str(e.message if hasattr(e, "message") else e).splitlines()[0]
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", text).split(" [Op:")[0]
    return text.strip() or type(e).__name__


def _decoded_shape(path: str) -> tuple[Optional[tuple[int, int, int]], str]:
    """((H, W, C), "") of the decoded image at `path`, or (None, reason) if unreadable."""
    try:
        image = tf.io.decode_image(tf.io.read_file(path), channels=0, dtype=tf.uint8,
                                   expand_animations=False)
    except tf.errors.OpError as e:
        return None, f"corrupt: {_op_error_text(e)}"
    return tuple(int(d) for d in image.shape), ""


def _classify(shape, settings) -> tuple[str, str]:
    """Verdict on a decoded image of `shape`: (kind, reason).

    kind: "ok" | "converted" | "resized" | "converted+resized" | "channels" | "size".
    """
    _, size, channels, convert, _, wrong_size, _, _ = settings
    h, w, c = shape
    kinds = []
    if c != channels:
        if not convert:
            return "channels", f"wrong channels: {c}, expected {channels}"
        kinds.append("converted")
    if (h, w) != (size, size):
        if wrong_size != "resize":
            return "size", f"wrong size: {h}x{w}, expected {size}x{size}"
        kinds.append("resized")
    return "+".join(kinds) or "ok", ""


def _apply_policy(path: str, kind: str, reason: str, settings) -> None:
    """Raises ImageFolderError when the policy for `kind` is "error"; else returns (skip)."""
    bad_images, wrong_size = settings[4], settings[5]
    policy = wrong_size if kind == "size" else bad_images
    if policy == "error":
        key = "wrong_size" if kind == "size" else "bad_images"
        raise ImageFolderError(f"image_folder: {path}: {reason} (data.{key}='error').")


def scan_image_folder(data_cfg) -> ScanReport:
    """Decodes every image file of `data_cfg.image_dir` and sorts them out by the policies.

    Eager decode of each file (O(files) at startup); logs one summary line (a warning when
    files were skipped) and each skipped file at DEBUG level. Not cached: see `cached_scan`.

    Raises:
      DatasetNotFoundError: the folder is missing, or holds no usable training image.
      ImageFolderError: a file violates an "error" policy; the message names it.
      ValueError: invalid config fields.
    """
    settings = _settings(data_cfg)
    image_dir, _, _, _, _, _, fraction, seed = settings
    if not os.path.isdir(image_dir):
        raise ip.DatasetNotFoundError(
            f"image_folder: data.image_dir={image_dir} does not exist or is not a folder.")
    candidates = list_image_files(image_dir)
    if not candidates:
        raise ip.DatasetNotFoundError(
            f"image_folder: no image files ({' '.join(IMAGE_EXTENSIONS)}) under {image_dir}.")
    folders = [_class_of(p, image_dir) for p in candidates]
    class_names = tuple(sorted({f for f in folders if f is not None}))
    test_mask = _test_mask(len(candidates), fraction, seed)
    counts = dict.fromkeys(("corrupt", "converted", "resized", "size", "channels",
                            "unlabeled"), 0)
    files, labels, is_test, skipped = [], [], [], []
    for path, folder, test in zip(candidates, folders, test_mask):
        if class_names and folder is None:
            kind, reason = "unlabeled", "unlabeled: not in a class subfolder"
        else:
            shape, reason = _decoded_shape(path)
            kind, reason = ("corrupt", reason) if shape is None else _classify(shape, settings)
        if kind in ("corrupt", "channels", "size"):
            _apply_policy(path, kind, reason, settings)
        if reason:  # skipped
            counts[kind] += 1
            skipped.append((path, reason))
            log.debug("image_folder: skipping %s: %s", path, reason)
            continue
        for part in kind.split("+"):
            if part in counts:
                counts[part] += 1
        files.append(path)
        labels.append(class_names.index(folder) if class_names else 0)
        is_test.append(bool(test))
    report = ScanReport(
        image_dir=image_dir, class_names=class_names, files=tuple(files), labels=tuple(labels),
        is_test=tuple(is_test), n_ok=len(files), n_corrupt=counts["corrupt"],
        n_converted=counts["converted"], n_resized=counts["resized"],
        n_skipped_size=counts["size"], n_skipped_channels=counts["channels"],
        n_unlabeled=counts["unlabeled"], skipped=tuple(skipped))
    log.log(logging.WARNING if skipped else logging.INFO, "%s", report.summary())
    if report.n_train == 0:
        first = "".join(f"\n  {p}: {r}" for p, r in skipped[:5])
        raise ip.DatasetNotFoundError(
            f"image_folder: no usable training images in {image_dir}. {report.summary()}"
            f"{first}")
    return report


_SCAN_CACHE: dict = {}


def cached_scan(data_cfg) -> ScanReport:
    """`scan_image_folder`, once per process and configuration (folder, size, policies...)."""
    key = _settings(data_cfg)
    if key not in _SCAN_CACHE:
        _SCAN_CACHE[key] = scan_image_folder(data_cfg)
    return _SCAN_CACHE[key]


def clear_scan_cache() -> None:
    """Forgets every cached scan (the next call rescans its folder)."""
    _SCAN_CACHE.clear()


# ----------------------------------------------------------------------------- graph-mode ops


def convert_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """float32 [H, W, c] (c in 1..4, values 0..255) -> [H, W, channels].

    An alpha channel (c = 2 or 4) is applied on black and dropped; then gray is repeated to
    RGB, or RGB is reduced to its ITU-R 601 luma. Identity when c == channels.
    """
    c = tf.shape(image)[-1]
    color = tf.cond(tf.equal(c % 2, 0),
                    lambda: image[..., :-1] * (image[..., -1:] / 255.0),
                    lambda: image)
    if channels == 3:
        return tf.broadcast_to(color, tf.concat([tf.shape(color)[:2], [3]], 0))

    def luma():
        return tf.reduce_sum(color * tf.constant(LUMA_WEIGHTS), -1, keepdims=True)
    return tf.cond(tf.equal(tf.shape(color)[-1], 3), luma, lambda: color)


def crop_and_resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """float32 [H, W, C] -> [size, size, C]: centre square crop, bilinear antialias resize.

    Identity when the image already is size x size.
    """
    h, w = tf.shape(image)[0], tf.shape(image)[1]

    def fit():
        side = tf.minimum(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = image[top:top + side, left:left + side]
        return tf.image.resize(square, (size, size), method="bilinear", antialias=True)

    same = tf.logical_and(tf.equal(h, size), tf.equal(w, size))
    return tf.cond(same, lambda: image, fit)


def load_image(path: tf.Tensor, size: int, channels: int) -> tf.Tensor:
    """Image file -> float32 [size, size, channels] in [-1, 1] (graph or eager mode)."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=0, dtype=tf.uint8,
                               expand_animations=False)
    image = convert_channels(tf.cast(image, tf.float32), channels)
    image = crop_and_resize(image, size)
    image.set_shape([size, size, channels])
    return ip._to_unit_range(image)


def _example_fn(data_cfg):
    size, channels = int(data_cfg.image_size), int(data_cfg.channels)

    def fn(path, label):
        return {"image": load_image(path, size, channels), "label": label}
    return fn


def _files_dataset(files, labels) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(
        (tf.constant(list(files), tf.string), np.asarray(labels, np.int32)))


# ----------------------------------------------------------------------------- public API


def dataset_info(data_cfg) -> ip.DatasetInfo:
    """DatasetInfo of the folder (scans it on first use, see `cached_scan`)."""
    report = cached_scan(data_cfg)
    return ip.DatasetInfo(name="image_folder", image_size=int(data_cfg.image_size),
                          channels=int(data_cfg.channels), num_classes=report.num_classes,
                          num_train_examples=report.n_train, source="image_folder")


def train_iterator(data_cfg, *, batch_size: int, seed: int, process_index: Optional[int] = None,
                   process_count: Optional[int] = None, start_step: int = 0) -> Iterator[dict]:
    """Infinite iterator over this process's training batches (see input_pipeline's).

    Process p of P takes every P-th train file starting at p (equal shares, remainder
    dropped), shuffles its file list with `seed` (all of it; reshuffled every epoch), repeats
    forever, skips the first `start_step` batches (resume), decodes, optionally flips
    left-right (`data.random_flip`) and drops incomplete batches. Yields numpy {"image": float32 [B, S, S, C] in [-1, 1], "label": int32 [B]}.
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    report = cached_scan(data_cfg)
    process_index, process_count = ip._process_slot(process_index, process_count)
    files, labels = report.split("train")
    per_process = len(files) // process_count
    if per_process == 0:
        raise ip.DatasetNotFoundError(
            f"image_folder: {len(files)} train images cannot be shared by {process_count} "
            "processes.")
    share = slice(process_index, per_process * process_count, process_count)
    seed = ip._mix_seed(seed, process_index)
    ds = _files_dataset(files[share], labels[share])
    ds = ds.shuffle(per_process, seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.skip(int(start_step) * int(batch_size))  # file names only: nothing decoded
    ds = ds.map(_example_fn(data_cfg), num_parallel_calls=tf.data.AUTOTUNE)
    return ip.batch_for_training(ds, data_cfg, batch_size, seed, start_step)


def load_split(data_cfg, split: str, max_examples: Optional[int] = None) -> dict:
    """The first `max_examples` (None: all) images of `split` ("train"/"test"), sorted by path.

    Returns numpy {"image": float32 [N, S, S, C] in [-1, 1], "label": int32 [N]}.
    """
    report = cached_scan(data_cfg)
    files, labels = report.split(split)
    if max_examples is not None:
        if max_examples < 0:
            raise ValueError(f"max_examples must be >= 0 or None, got {max_examples}.")
        files, labels = files[:max_examples], labels[:max_examples]
    size, channels = int(data_cfg.image_size), int(data_cfg.channels)
    if not files:
        return {"image": np.zeros((0, size, size, channels), np.float32),
                "label": np.zeros((0,), np.int32)}
    ds = _files_dataset(files, labels).map(_example_fn(data_cfg),
                                           num_parallel_calls=tf.data.AUTOTUNE)
    batches = list(ds.batch(1024).prefetch(2).as_numpy_iterator())
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
