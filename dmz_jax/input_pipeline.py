"""Input pipelines: Fashion-MNIST, CIFAR-10, CelebA and image folders as numpy batches in [-1, 1].

Public API (``data_cfg`` is the ``config.data`` ConfigDict of ``dmz_jax/config_base.py``):

* :func:`dataset_info` -- cheap metadata; raises :class:`DatasetNotFoundError` when the data
  is absent (no download, no network access, no preparation).
* :func:`train_iterator` -- infinite iterator of per-process training batches.
* :func:`load_split` -- a whole split (or its first ``max_examples``) in a fixed order.

Every image is uint8 -> float32 ``x / 127.5 - 1`` (so 0 -> -1, 255 -> +1), then:

* ``fashion_mnist`` (28x28x1): zero-padded, with -1 (black), to ``image_size`` (2 pixels on
  each side for 32), the padding split evenly, any odd pixel at the bottom/right.
* ``cifar10`` (32x32x3): as is (resized, bilinear with antialias, if ``image_size != 32``).
* ``celeb_a`` (aligned 218x178x3, tfds ``celeb_a``): cropped with the preset ``data_cfg.crop``
  (see :data:`CELEBA_CROPS`), then resized to ``image_size`` (bilinear with antialias, like
  PIL/torchvision ``Resize`` on a PIL image). CelebA has no class: ``label`` is always 0 and
  the batch also holds ``attributes``, int32 [B, 40] in {0, 1}, ordered as
  :data:`CELEBA_ATTRIBUTES`.

Fashion-MNIST sources (``data_cfg.source``); "auto" tries them in this order and logs the one
it uses:

1. ``"tfds"``: tfds ``fashion_mnist`` already prepared in ``data_dir`` (in "auto" mode never
   downloaded; with ``source="tfds"`` it is downloaded and prepared when missing).
2. ``"debian"``: the IDX files of the Debian package ``dataset-fashion-mnist`` in
   ``data_cfg.debian_dir``, turned once into the tfds dataset ``fashion_mnist_local`` in
   ``data_dir`` (see ``dmz_jax/fashion_mnist_local.py``; takes ~15 s).
3. ``"bundled"``: ``dmz_jax/data/fashion_mnist_subset.npz``, the first 10000 train / 2000
   test examples (see ``dmz_jax/data/README.md``).

CIFAR-10 and CelebA are read with tfds's own builders and are never downloaded unless the
optional field ``data_cfg.download`` is True.

``image_folder`` (a folder of PNG/JPEG/BMP/GIF files, ``data_cfg.image_dir``) is handled by
``dmz_jax/image_folder.py``, whose docstring describes its split, labels and policies.

TensorFlow is kept off the GPUs (``tf.config.set_visible_devices([], "GPU")`` at import), so
it never takes accelerator memory from JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Iterator, Optional

import numpy as np
import tensorflow as tf

try:
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError) as _e:  # TF already initialised its devices.
    logging.getLogger(__name__).warning("Could not hide the GPUs from TensorFlow: %s", _e)

import tensorflow_datasets as tfds  # noqa: E402  (after the GPU guard)

from dmz_jax import fashion_mnist_local  # noqa: E402

log = logging.getLogger(__name__)

DATASET_NAMES = ("fashion_mnist", "cifar10", "celeb_a", "image_folder")
FASHION_SOURCES = ("auto", "tfds", "debian", "bundled")
BUNDLED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                            "fashion_mnist_subset.npz")

# CelebA crop presets on the aligned 218x178 image: (top, left, height, width) in pixels,
# i.e. rows top..top+height-1 and columns left..left+width-1 (0-based, end exclusive below).
CELEBA_CROPS = {
    # DDIM / Diff-AE ("d2c_crop"): centre (x=89, y=121), half size 64:
    # rows 57:185, cols 25:153 -- a 128x128 box.
    "diffae": (57, 25, 128, 128),
    # Central square: rows 20:198, cols 0:178 -- a 178x178 box.
    "center": (20, 0, 178, 178),
}

# Order of the 40 binary attributes (as in list_attr_celeba.txt and tfds `celeb_a`).
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings",
    "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static facts of a dataset: tfds name, raw image shape (H, W, C), classes, splits."""

    tfds_name: str
    raw_shape: tuple[int, int, int]
    num_classes: int  # 0: no class labels (label is always 0)
    num_examples: dict  # split -> size of the full dataset (fallback when tfds does not say)


_SPECS = {
    "fashion_mnist": _Spec("fashion_mnist", (28, 28, 1), 10, {"train": 60_000, "test": 10_000}),
    "cifar10": _Spec("cifar10", (32, 32, 3), 10, {"train": 50_000, "test": 10_000}),
    "celeb_a": _Spec("celeb_a", (218, 178, 3), 0,
                     {"train": 162_770, "validation": 19_867, "test": 19_962}),
}


class DatasetNotFoundError(RuntimeError):
    """The requested dataset is not available locally; the message says how to get it."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model needs to know about the data.

    Attributes:
      name: "fashion_mnist" | "cifar10" | "celeb_a" | "image_folder".
      image_size: side in pixels of the (square) images the pipeline yields.
      channels: 1 (Fashion-MNIST) or 3 (image_folder: data.channels).
      num_classes: 10, or 0 for CelebA (no class labels; ``label`` is always 0); for
        image_folder the number of class subfolders (0: none).
      num_train_examples: examples in the whole train split (all processes together).
      source: where the data is read from: "tfds" | "debian" | "bundled" | "image_folder".
    """

    name: str
    image_size: int
    channels: int
    num_classes: int
    num_train_examples: int
    source: str


@dataclasses.dataclass(frozen=True)
class _Resolved:
    """A dataset located on this machine (see `_resolve`)."""

    name: str
    source: str  # "tfds" | "debian" | "bundled"
    builder: Any  # tfds builder, or None for "bundled"
    needs_prepare: bool  # call builder.download_and_prepare() before reading
    num_train_examples: int
    instructions: str  # how to get the data, for errors while preparing


class _Unavailable(Exception):
    """A Fashion-MNIST source cannot be used here (internal to `_resolve_fashion`)."""


# ----------------------------------------------------------------------------- config


def _cfg(data_cfg, key: str, default=None):
    """`data_cfg.key`, or `default` when the field is absent or None."""
    value = data_cfg.get(key, default) if hasattr(data_cfg, "get") else getattr(
        data_cfg, key, default)
    return default if value is None else value


def _check_config(data_cfg) -> str:
    """Validates the fields this module reads; returns the dataset name."""
    name = _cfg(data_cfg, "name")
    if name not in DATASET_NAMES:
        raise ValueError(f"Unknown data.name {name!r}; expected one of {list(DATASET_NAMES)}.")
    size = _cfg(data_cfg, "image_size")
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"data.image_size must be a positive int, got {size!r}.")
    if name == "image_folder":
        from dmz_jax import image_folder  # Lazy: image_folder imports this module.
        image_folder.check_config(data_cfg)
        return name
    if name == "fashion_mnist" and size < 28:
        raise ValueError(f"fashion_mnist is padded, not cropped: image_size {size} < 28.")
    if name == "celeb_a" and _cfg(data_cfg, "crop", "diffae") not in CELEBA_CROPS:
        raise ValueError(f"Unknown data.crop {_cfg(data_cfg, 'crop')!r} for celeb_a; expected "
                         f"one of {list(CELEBA_CROPS)}.")
    channels = _cfg(data_cfg, "channels")
    if channels is not None and channels != _SPECS[name].raw_shape[2]:
        raise ValueError(f"data.channels={channels} but {name} has "
                         f"{_SPECS[name].raw_shape[2]} channels.")
    return name


def _check_split(name: str, split: str) -> None:
    if split not in _SPECS[name].num_examples:
        raise ValueError(f"Unknown split {split!r} for {name}; expected one of "
                         f"{list(_SPECS[name].num_examples)}.")


def _data_dir_text(data_dir: Optional[str]) -> str:
    return data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"


# ----------------------------------------------------------------------------- instructions


def _tfds_instructions(name: str, data_dir: Optional[str]) -> str:
    """Step-by-step manual download/prepare instructions for `name`."""
    d = _data_dir_text(data_dir)
    dd = f", data_dir='{d}'" if data_dir else ""
    if name == "cifar10":
        return (
            f"CIFAR-10 (tfds 'cifar10') is not prepared in {d}. To get it:\n"
            "  1. On a machine with network access run\n"
            "       python -c \"import tensorflow_datasets as tfds; "
            f"tfds.builder('cifar10'{dd}).download_and_prepare()\"\n"
            "     (downloads ~163 MB from cs.toronto.edu, writes ~130 MB).\n"
            f"  2. If that machine is not this one, copy its {d}/cifar10/ folder (the\n"
            f"     '3.0.2/' subfolder with dataset_info.json) to {d}/cifar10/ here.\n"
            "  3. Or set data.download=True to let the pipeline download it itself.")
    if name == "celeb_a":
        return (
            f"CelebA (tfds 'celeb_a', version 2.1.0) is not prepared in {d}. TFDS fetches it\n"
            "from Google Drive, which is often over quota; to prepare it by hand:\n"
            "  1. From the CelebA page https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html\n"
            "     (Google Drive / Baidu links, 'Align&Cropped Images') download these five\n"
            "     files, keeping their names:\n"
            "       Img/img_align_celeba.zip              (1,443,490,838 bytes)\n"
            "       Eval/list_eval_partition.txt\n"
            "       Anno/list_attr_celeba.txt\n"
            "       Anno/list_landmarks_align_celeba.txt\n"
            "       Anno/identity_CelebA.txt\n"
            f"  2. Put all five (flat, no subfolders) into {d}/downloads/manual/\n"
            "  3. Run\n"
            "       python -c \"import tensorflow_datasets as tfds; "
            f"tfds.builder('celeb_a'{dd}).download_and_prepare()\"\n"
            "     tfds takes the files from downloads/manual/ (checking their sha256 against\n"
            "     its registered checksums: re-zipped copies from other mirrors fail) and\n"
            f"     writes {d}/celeb_a/2.1.0/ (~1.4 GB; tens of minutes).\n"
            "  4. Or copy a prepared celeb_a/2.1.0/ folder from another machine to\n"
            f"     {d}/celeb_a/2.1.0/.")
    return (f"tfds '{name}' is not prepared in {d}: run tfds.builder('{name}'{dd})"
            ".download_and_prepare() on a machine with network access.")


def _fashion_instructions(data_cfg, attempts: list[str]) -> str:
    d = _data_dir_text(_cfg(data_cfg, "data_dir"))
    debian_dir = _cfg(data_cfg, "debian_dir", fashion_mnist_local.DEBIAN_DIR)
    tried = "".join(f"\n  - {a}" for a in attempts)
    return (
        f"Fashion-MNIST is not available (data.source={_cfg(data_cfg, 'source', 'auto')!r})."
        f" Tried:{tried}\n"
        "Any one of these makes it available:\n"
        "  1. Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist\n"
        f"     (installs the IDX files into {fashion_mnist_local.DEBIAN_DIR}; or put the four\n"
        f"     original *-ubyte.gz files into data.debian_dir={debian_dir}), then use\n"
        "     data.source='auto' or 'debian'.\n"
        "  2. With network access: python -c \"import tensorflow_datasets as tfds; "
        "tfds.builder('fashion_mnist').download_and_prepare()\"\n"
        f"     (or copy a prepared fashion_mnist/ folder into {d}), then data.source='auto'.\n"
        f"  3. Restore the bundled subset {BUNDLED_PATH}\n"
        "     (python tools/make_fashion_mnist_subset.py, from the Debian files) and use\n"
        "     data.source='auto' or 'bundled'.")


# ----------------------------------------------------------------------------- resolution


def _num_examples(builder, name: str, split: str) -> int:
    """Split size from tfds's metadata, else the dataset's known size."""
    try:
        n = int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError, TypeError, AttributeError):
        n = 0
    return n or _SPECS[name].num_examples[split]


def _is_prepared(builder) -> bool:
    """builder.is_prepared(), without tfds's warning when the folder does not even exist."""
    return tf.io.gfile.exists(builder.data_dir) and builder.is_prepared()


def _is_writable(path) -> bool:
    """Whether `path` (or its nearest existing ancestor) is a directory we may write to."""
    path = os.fspath(path)
    if "://" in path:  # gs://, s3://: assume the user knows.
        return True
    path = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def _resolve_tfds(name: str, data_cfg) -> _Resolved:
    """cifar10 / celeb_a: a prepared tfds dataset (downloaded only if data.download)."""
    data_dir = _cfg(data_cfg, "data_dir")
    builder = tfds.builder(_SPECS[name].tfds_name, data_dir=data_dir)
    instructions = _tfds_instructions(name, data_dir)
    prepared = _is_prepared(builder)
    if not prepared and not _cfg(data_cfg, "download", False):
        raise DatasetNotFoundError(instructions)
    return _Resolved(name, "tfds", builder, not prepared,
                     _num_examples(builder, name, "train"), instructions)


def _fashion_tfds(data_cfg, auto: bool) -> _Resolved:
    data_dir = _cfg(data_cfg, "data_dir")
    builder = tfds.builder("fashion_mnist", data_dir=data_dir)
    prepared = _is_prepared(builder)
    if not prepared and auto:
        raise _Unavailable(f"tfds: 'fashion_mnist' is not prepared in {_data_dir_text(data_dir)}")
    return _Resolved("fashion_mnist", "tfds", builder, not prepared,
                     _num_examples(builder, "fashion_mnist", "train"),
                     _fashion_instructions(data_cfg, ["tfds: download failed"]))


def _fashion_debian(data_cfg, auto: bool) -> _Resolved:
    data_dir = _cfg(data_cfg, "data_dir")
    source_dir = _cfg(data_cfg, "debian_dir", fashion_mnist_local.DEBIAN_DIR)
    builder = fashion_mnist_local.FashionMnistLocal(data_dir=data_dir, source_dir=source_dir)
    instructions = _fashion_instructions(data_cfg, [f"debian: {source_dir}"])
    if _is_prepared(builder):
        return _Resolved("fashion_mnist", "debian", builder, False,
                         _num_examples(builder, "fashion_mnist", "train"), instructions)
    try:
        num_train = fashion_mnist_local.read_split_shape(source_dir, "train")
        fashion_mnist_local.read_split_shape(source_dir, "test")
    except FileNotFoundError as e:
        raise _Unavailable(f"debian: {e.filename or e} not found (package "
                           "dataset-fashion-mnist not installed?)") from e
    except fashion_mnist_local.IdxFormatError as e:
        if not auto:
            raise
        raise _Unavailable(f"debian: {e}") from e
    if auto and not _is_writable(builder.data_dir_root):
        raise _Unavailable(f"debian: cannot write the prepared copy to {builder.data_dir_root}")
    return _Resolved("fashion_mnist", "debian", builder, True, num_train, instructions)


def _fashion_bundled(data_cfg, auto: bool) -> _Resolved:
    del auto
    if not os.path.isfile(BUNDLED_PATH):
        raise _Unavailable(f"bundled: {BUNDLED_PATH} not found")
    num_train = len(_load_bundled()["train_labels"])
    return _Resolved("fashion_mnist", "bundled", None, False, num_train,
                     _fashion_instructions(data_cfg, [f"bundled: {BUNDLED_PATH}"]))


_FASHION_RESOLVERS = {"tfds": _fashion_tfds, "debian": _fashion_debian,
                      "bundled": _fashion_bundled}


def _resolve_fashion(data_cfg) -> _Resolved:
    """Picks the Fashion-MNIST source (see the module docstring)."""
    source = _cfg(data_cfg, "source", "auto")
    if source not in FASHION_SOURCES:
        raise ValueError(f"Unknown data.source {source!r}; expected one of "
                         f"{list(FASHION_SOURCES)}.")
    auto = source == "auto"
    attempts = []
    for candidate in ("tfds", "debian", "bundled") if auto else (source,):
        try:
            resolved = _FASHION_RESOLVERS[candidate](data_cfg, auto)
        except _Unavailable as e:
            attempts.append(str(e))
            continue
        if auto:
            log.info("fashion_mnist: using source %r (%d train examples)%s", candidate,
                     resolved.num_train_examples,
                     "".join(f"; skipped {a}" for a in attempts))
        return resolved
    raise DatasetNotFoundError(_fashion_instructions(data_cfg, attempts))


def _resolve(data_cfg) -> _Resolved:
    """Locates the dataset of `data_cfg` without reading or preparing it (cheap)."""
    name = _check_config(data_cfg)
    if name == "fashion_mnist":
        return _resolve_fashion(data_cfg)
    return _resolve_tfds(name, data_cfg)


def dataset_info(data_cfg) -> DatasetInfo:
    """Metadata of the configured dataset, without reading it.

    Cheap (well under a second once TensorFlow is imported): never downloads or prepares.

    Raises:
      DatasetNotFoundError: the data is not available; the message says how to get it.
      ValueError: unknown dataset name / source / crop, or inconsistent fields.

    image_folder: scans (decodes) the whole folder on first use; see dmz_jax/image_folder.py.
    """
    if _check_config(data_cfg) == "image_folder":
        from dmz_jax import image_folder
        return image_folder.dataset_info(data_cfg)
    r = _resolve(data_cfg)
    spec = _SPECS[r.name]
    return DatasetInfo(name=r.name, image_size=int(data_cfg.image_size),
                       channels=spec.raw_shape[2], num_classes=spec.num_classes,
                       num_train_examples=r.num_train_examples, source=r.source)


# ----------------------------------------------------------------------------- reading


@functools.lru_cache(maxsize=1)
def _load_bundled() -> dict:
    """The bundled subset: {train,test}_images uint8 [N, 28, 28], {train,test}_labels [N]."""
    with np.load(BUNDLED_PATH) as f:
        return {k: f[k] for k in f.files}


def _ensure_prepared(r: _Resolved) -> None:
    """Prepares `r.builder` if needed (Debian IDX -> tfds, or an explicit download)."""
    if not r.needs_prepare or _is_prepared(r.builder):
        return
    if r.source == "debian":
        log.info("Preparing fashion_mnist_local from the IDX files into %s (once).",
                 r.builder.data_dir)
        config = tfds.download.DownloadConfig(try_download_gcs=False)
        r.builder.download_and_prepare(download_config=config)
        return
    log.info("Downloading and preparing tfds %r into %s.", r.builder.name, r.builder.data_dir)
    try:
        r.builder.download_and_prepare()
    except Exception as e:  # noqa: BLE001  (network/checksum errors come in many types)
        raise DatasetNotFoundError(f"{r.instructions}\nDownload failed: {e!r}") from e


def _canonical_fn(name: str):
    """Raw tfds example -> {"image", "label" int32[, "attributes" int32 [40]]}."""
    if name == "celeb_a":
        def fn(ex):
            attributes = tf.stack([tf.cast(ex["attributes"][k], tf.int32)
                                   for k in CELEBA_ATTRIBUTES])
            return {"image": ex["image"], "label": tf.zeros([], tf.int32),
                    "attributes": attributes}
    else:
        def fn(ex):
            return {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32)}
    return fn


def _bundled_dataset(split: str, process_index: int, process_count: int) -> tf.data.Dataset:
    """Contiguous 1/process_count slice of the bundled split (remainder dropped)."""
    arrays = _load_bundled()
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    per_process = len(labels) // process_count
    sl = slice(process_index * per_process, (process_index + 1) * per_process)
    return tf.data.Dataset.from_tensor_slices(
        {"image": images[sl][..., None], "label": labels[sl].astype(np.int32)})


def _raw_dataset(r: _Resolved, split: str, *, shuffle_files: bool, seed: int,
                 process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    """Examples of this process's share of `split`, before preprocessing.

    Yields {"image": uint8 [H, W, C] (celeb_a: the encoded JPEG string), "label": int32 []
    [, "attributes": int32 [40]]}.
    """
    if r.source == "bundled":
        return _bundled_dataset(split, process_index, process_count)
    _ensure_prepared(r)
    if process_count > 1:
        split = tfds.split_for_jax_process(split, process_index=process_index,
                                           process_count=process_count, drop_remainder=True)
    decoders = {"image": tfds.decode.SkipDecoding()} if r.name == "celeb_a" else None
    ds = r.builder.as_dataset(split=split, shuffle_files=shuffle_files, decoders=decoders,
                              read_config=tfds.ReadConfig(shuffle_seed=seed,
                                                          try_autocache=False))
    return ds.map(_canonical_fn(r.name), num_parallel_calls=tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------- preprocessing


def _to_unit_range(image: tf.Tensor) -> tf.Tensor:
    """uint8-valued [.., C] (any dtype, 0..255) -> float32 in [-1, 1] (x / 127.5 - 1)."""
    return tf.clip_by_value(tf.cast(image, tf.float32) / 127.5 - 1.0, -1.0, 1.0)


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """[H, W, C] 0..255 -> float32 [size, size, C] (bilinear, antialias); no-op if same size."""
    image = tf.cast(image, tf.float32)
    if tuple(image.shape[:2]) == (size, size):
        return image
    return tf.image.resize(image, (size, size), method="bilinear", antialias=True)


def _pad_to(image: tf.Tensor, size: int) -> tf.Tensor:
    """float32 [h, w, C] in [-1, 1] -> [size, size, C], padded with -1 (black), centred."""
    h, w = int(image.shape[0]), int(image.shape[1])
    top, left = (size - h) // 2, (size - w) // 2
    paddings = [[top, size - h - top], [left, size - w - left], [0, 0]]
    return tf.pad(image, paddings, constant_values=-1.0)


def _crop_box(data_cfg) -> tuple[int, int, int, int]:
    return CELEBA_CROPS[_cfg(data_cfg, "crop", "diffae")]


def preprocess_image(image: tf.Tensor, data_cfg) -> tf.Tensor:
    """Decoded uint8 image [H, W, C] of dataset `data_cfg.name` -> float32 [S, S, C] in [-1, 1].

    S = data_cfg.image_size. See the module docstring for each dataset's geometry.
    """
    name, size = data_cfg.name, int(data_cfg.image_size)
    if name == "fashion_mnist":
        return _pad_to(_to_unit_range(image), size)
    if name == "celeb_a":
        top, left, height, width = _crop_box(data_cfg)
        image = image[top:top + height, left:left + width]
    return _to_unit_range(_resize(image, size))


def _example_fn(data_cfg, name: str):
    """Canonical example -> preprocessed example ("image" float32 [S, S, C] in [-1, 1])."""
    def fn(ex):
        ex = dict(ex)
        if name == "celeb_a":  # Decode only the crop box of the JPEG.
            box = tf.constant(_crop_box(data_cfg), tf.int32)
            image = tf.image.decode_and_crop_jpeg(ex["image"], box, channels=3)
            image.set_shape(_crop_box(data_cfg)[2:] + (3,))
            ex["image"] = _to_unit_range(_resize(image, int(data_cfg.image_size)))
        else:
            ex["image"] = preprocess_image(ex["image"], data_cfg)
        return ex
    return fn


def _process_slot(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
    """(process_index, process_count), defaulting to JAX's."""
    if process_index is None or process_count is None:
        import jax  # Local import: only needed for the defaults.
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
    return int(process_index), int(process_count)


def _mix_seed(seed: int, process_index: int) -> int:
    """A non-negative int31 seed that differs between processes."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, process_index]).generate_state(1)
    return int(state[0] & 0x7FFFFFFF)


def train_iterator(data_cfg, *, batch_size: int, seed: int, process_index: Optional[int] = None,
                   process_count: Optional[int] = None, start_step: int = 0) -> Iterator[dict]:
    """Infinite iterator over this process's training batches.

    Each process reads a disjoint, equally sized contiguous share of the train split, shuffles
    it with `seed` (reshuffled every epoch, deterministic for a given seed and process),
    repeats it forever, and drops incomplete batches. With `data_cfg.random_flip`, images are
    flipped left-right with probability 1/2 (also deterministic in `seed`).

    Args:
      data_cfg: the `config.data` ConfigDict.
      batch_size: PER-PROCESS batch size.
      seed: shuffling / augmentation seed.
      process_index, process_count: this process's slot; default jax.process_index() /
        jax.process_count().
      start_step: the first batch to yield: the stream is a deterministic function of
        (seed, process), and batch `start_step` of it is exactly the batch an iterator started
        at 0 yields after `start_step` batches (the skipped examples are not decoded). This is
        what makes resumed training bit-exact.

    Yields:
      {"image": float32 [batch_size, S, S, C] in [-1, 1], "label": int32 [batch_size]}, plus
      "attributes": int32 [batch_size, 40] for celeb_a. Numpy arrays.

    Raises:
      DatasetNotFoundError (at call time, not at the first `next`): data absent.
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if _check_config(data_cfg) == "image_folder":
        from dmz_jax import image_folder
        return image_folder.train_iterator(data_cfg, batch_size=batch_size, seed=seed,
                                           process_index=process_index,
                                           process_count=process_count, start_step=start_step)
    r = _resolve(data_cfg)
    process_index, process_count = _process_slot(process_index, process_count)
    seed = _mix_seed(seed, process_index)
    ds = _raw_dataset(r, "train", shuffle_files=True, seed=seed, process_index=process_index,
                      process_count=process_count)
    if r.name != "celeb_a":
        ds = ds.cache()  # Decoded uint8: 47 MB (Fashion-MNIST), 150 MB (CIFAR-10).
    buffer = int(_cfg(data_cfg, "shuffle_buffer", 10_000))
    ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.skip(int(start_step) * int(batch_size))  # raw records: no decoding
    ds = ds.map(_example_fn(data_cfg, r.name), num_parallel_calls=tf.data.AUTOTUNE)
    return batch_for_training(ds, data_cfg, batch_size, seed, start_step)


def batch_for_training(ds: tf.data.Dataset, data_cfg, batch_size: int, seed: int,
                       start_step: int) -> Iterator[dict]:
    """Optional random flip (`data.random_flip`), batching, prefetch -> numpy iterator.

    The flip of the example at stream position i (counted from step 0) is a stateless
    function of (seed, i), so it does not depend on where the iterator started.
    """
    if _cfg(data_cfg, "random_flip", False):
        def flip(index, ex):
            ex = dict(ex)
            op_seed = tf.stack([tf.constant(seed, tf.int64), index])
            ex["image"] = tf.image.stateless_random_flip_left_right(ex["image"], op_seed)
            return ex
        ds = ds.enumerate(start=int(start_step) * int(batch_size))
        ds = ds.map(flip, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(int(batch_size), drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.as_numpy_iterator()


def load_split(data_cfg, split: str, max_examples: Optional[int] = None) -> dict:
    """The first `max_examples` (None: all) examples of `split`, in a fixed order.

    For linear probes and evaluation: no shuffling, no augmentation, not split across
    processes (every process gets the same arrays).

    Args:
      data_cfg: the `config.data` ConfigDict.
      split: "train" or "test" ("validation" too for celeb_a).
      max_examples: cap on the number of examples, or None.

    Returns:
      {"image": float32 [N, S, S, C] in [-1, 1], "label": int32 [N]} (+ "attributes": int32
      [N, 40] for celeb_a), numpy.
    """
    if _check_config(data_cfg) == "image_folder":
        from dmz_jax import image_folder
        return image_folder.load_split(data_cfg, split, max_examples)
    r = _resolve(data_cfg)
    _check_split(r.name, split)
    if max_examples is not None and max_examples < 0:
        raise ValueError(f"max_examples must be >= 0 or None, got {max_examples}.")
    ds = _raw_dataset(r, split, shuffle_files=False, seed=0)
    if max_examples is not None:
        ds = ds.take(max_examples)
    ds = ds.map(_example_fn(data_cfg, r.name), num_parallel_calls=tf.data.AUTOTUNE)
    batches = list(ds.batch(1024).prefetch(2).as_numpy_iterator())
    if not batches:
        return _empty_split(data_cfg, r.name)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _empty_split(data_cfg, name: str) -> dict:
    size, channels = int(data_cfg.image_size), _SPECS[name].raw_shape[2]
    out = {"image": np.zeros((0, size, size, channels), np.float32),
           "label": np.zeros((0,), np.int32)}
    if name == "celeb_a":
        out["attributes"] = np.zeros((0, len(CELEBA_ATTRIBUTES)), np.int32)
    return out
