"""Tests of dmz_jax/input_pipeline.py and dmz_jax/fashion_mnist_local.py.

Nothing is written outside pytest's tmp folders: every tfds data_dir points into tmp_path.
CIFAR-10 / CelebA are exercised with tfds.testing.mock_data (random examples).
"""

import gzip
import hashlib
import importlib.util
import os
import struct
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from dmz_jax import config_base
from dmz_jax import fashion_mnist_local as fml
from dmz_jax import input_pipeline as ip

DEBIAN_PRESENT = all(
    os.path.isfile(p) for split in fml.IDX_FILES for p in fml.idx_paths(fml.DEBIAN_DIR, split))
needs_debian = pytest.mark.skipif(not DEBIAN_PRESENT,
                                  reason=f"Debian dataset-fashion-mnist not in {fml.DEBIAN_DIR}")


def data_cfg(name="fashion_mnist", **overrides):
    """config.data of config_base (the real schema), with overrides."""
    cfg = config_base.base_config().data
    cfg.name = name
    cfg.image_size = {"fashion_mnist": 32, "cifar10": 32, "celeb_a": 64}[name]
    cfg.channels = 1 if name == "fashion_mnist" else 3
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def first_batch(cfg, seed, batch_size=16, **kw):
    return next(ip.train_iterator(cfg, batch_size=batch_size, seed=seed, process_index=0,
                                  process_count=1, **kw))


def image_hashes(images):
    return [hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest() for x in images]


def write_idx_gz(path, array):
    """Writes uint8 `array` as a gzipped IDX file."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.asarray(array, np.uint8).tobytes())


@pytest.fixture(scope="module")
def bundled():
    with np.load(ip.BUNDLED_PATH) as f:
        return {k: f[k] for k in f.files}


# ----------------------------------------------------------------------------- bundled subset


def test_bundled_file_is_small_and_complete(bundled):
    assert os.path.getsize(ip.BUNDLED_PATH) < 6 * 2**20
    assert bundled["train_images"].shape == (10_000, 28, 28)
    assert bundled["test_images"].shape == (2_000, 28, 28)
    assert bundled["train_images"].dtype == np.uint8
    assert set(np.unique(bundled["train_labels"])) == set(range(10))


def test_bundled_batches(bundled):
    cfg = data_cfg(source="bundled")
    info = ip.dataset_info(cfg)
    assert (info.source, info.num_train_examples, info.channels, info.num_classes) == (
        "bundled", 10_000, 1, 10)
    batch = first_batch(cfg, seed=0, batch_size=32)
    image, label = batch["image"], batch["label"]
    assert image.shape == (32, 32, 32, 1) and image.dtype == np.float32
    assert label.shape == (32,) and label.dtype == np.int32
    assert image.min() >= -1.0 and image.max() <= 1.0
    assert image.max() == 1.0  # some pixel is 255: scaled, not clipped to a smaller range
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert np.all(image[:, border, 0] == -1.0)
    assert np.all(image[:, 2:30, 2:30].reshape(32, -1).max(axis=1) > -1.0)
    assert label.min() >= 0 and label.max() <= 9
    # Every image is one of the bundled training images, with its label.
    index = {h: i for i, h in enumerate(image_hashes(bundled["train_images"]))}
    raw = np.round((image[:, 2:30, 2:30, 0] + 1.0) * 127.5).astype(np.uint8)
    rows = [index[h] for h in image_hashes(raw)]
    np.testing.assert_array_equal(bundled["train_labels"][rows], label)


def test_seed_determinism():
    cfg = data_cfg(source="bundled")
    a, b, c = first_batch(cfg, seed=1), first_batch(cfg, seed=1), first_batch(cfg, seed=2)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(a["image"], c["image"])
    it = ip.train_iterator(cfg, batch_size=16, seed=1, process_index=0, process_count=1)
    next(it)
    assert not np.array_equal(next(it)["image"], a["image"])  # the stream moves on


def test_random_flip_mirrors_about_half():
    """Same seed with/without flip: same order; each image equal or mirrored, both occur."""
    plain = first_batch(data_cfg(source="bundled"), seed=3, batch_size=64)["image"]
    flipped = first_batch(data_cfg(source="bundled", random_flip=True), seed=3,
                          batch_size=64)["image"]
    same = np.all(plain == flipped, axis=(1, 2, 3))
    mirrored = np.all(plain[:, :, ::-1] == flipped, axis=(1, 2, 3))
    assert np.all(same | mirrored)
    assert 10 <= int(np.sum(mirrored & ~same)) <= 54


def test_load_split_fixed_order(bundled):
    cfg = data_cfg(source="bundled")
    a = ip.load_split(cfg, "test", 50)
    assert a["image"].shape == (50, 32, 32, 1) and a["label"].dtype == np.int32
    expected = bundled["test_images"][:50].astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(a["image"][:, 2:30, 2:30, 0], expected, atol=1e-6)
    np.testing.assert_array_equal(a["label"], bundled["test_labels"][:50])
    b = ip.load_split(cfg, "test", None)
    assert len(b["label"]) == 2_000
    np.testing.assert_array_equal(b["image"][:50], a["image"])
    with pytest.raises(ValueError, match="split"):
        ip.load_split(cfg, "validation", 5)


def test_process_shards_are_disjoint(bundled):
    """2 processes: each covers its own half of the bundled train split, no overlap."""
    cfg = data_cfg(source="bundled")
    index = {h: i for i, h in enumerate(image_hashes(bundled["train_images"]))}
    rows = []
    for p in range(2):
        it = ip.train_iterator(cfg, batch_size=100, seed=0, process_index=p, process_count=2)
        images = np.concatenate([next(it)["image"] for _ in range(50)])  # 5000 = one epoch
        raw = np.round((images[:, 2:30, 2:30, 0] + 1.0) * 127.5).astype(np.uint8)
        rows.append({index[h] for h in image_hashes(raw)})
    assert not rows[0] & rows[1]
    assert len(rows[0]) == len(rows[1]) == 5_000  # a full epoch of each half


# ----------------------------------------------------------------------------- IDX + Debian


def test_idx_parser_rejects_corrupt_files(tmp_path):
    good = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    ok = tmp_path / "ok-idx3-ubyte.gz"
    write_idx_gz(ok, good)
    np.testing.assert_array_equal(fml.read_idx(str(ok)), good)

    bad_magic = tmp_path / "magic.gz"
    with gzip.open(bad_magic, "wb") as f:
        f.write(b"\x12\x34\x08\x03" + struct.pack(">3I", 2, 28, 28) + good.tobytes())
    with pytest.raises(fml.IdxFormatError, match="magic number") as e:
        fml.read_idx(str(bad_magic))
    assert "magic.gz" in str(e.value)

    short_payload = tmp_path / "short.gz"
    with gzip.open(short_payload, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 28, 28) + good.tobytes()[:-10])
    with pytest.raises(fml.IdxFormatError, match="truncated"):
        fml.read_idx(str(short_payload))

    cut_gzip = tmp_path / "cut.gz"
    cut_gzip.write_bytes(ok.read_bytes()[:40])
    with pytest.raises(fml.IdxFormatError, match="corrupt or truncated"):
        fml.read_idx(str(cut_gzip))

    with pytest.raises(FileNotFoundError):
        fml.read_idx(str(tmp_path / "absent.gz"))


@needs_debian
def test_real_debian_files_parse():
    images, labels = fml.load_split(fml.DEBIAN_DIR, "train")
    assert images.shape == (60_000, 28, 28) and labels.shape == (60_000,)
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 6_000))
    assert fml.read_split_shape(fml.DEBIAN_DIR, "test") == 10_000


@pytest.fixture(scope="module")
def small_debian_dir(tmp_path_factory):
    """A debian_dir holding the first 300 train / 100 test examples of the real files."""
    if not DEBIAN_PRESENT:
        pytest.skip("Debian dataset-fashion-mnist not installed")
    out = tmp_path_factory.mktemp("debian")
    for split, n in (("train", 300), ("test", 100)):
        images, labels = fml.load_split(fml.DEBIAN_DIR, split)
        images_path, labels_path = fml.idx_paths(str(out), split)
        write_idx_gz(images_path, images[:n])
        write_idx_gz(labels_path, labels[:n])
    return str(out)


def test_debian_source_through_local_builder(small_debian_dir, tmp_path):
    cfg = data_cfg(source="auto", debian_dir=small_debian_dir, data_dir=str(tmp_path))
    info = ip.dataset_info(cfg)  # Cheap: reads headers, prepares nothing.
    assert (info.source, info.num_train_examples) == ("debian", 300)
    assert not (tmp_path / "fashion_mnist_local").exists()

    batch = first_batch(cfg, seed=0, batch_size=64)
    assert batch["image"].shape == (64, 32, 32, 1)
    assert batch["image"].min() == -1.0 and batch["image"].max() <= 1.0
    assert np.all(batch["image"][:, :2] == -1.0)
    assert tfds.builder("fashion_mnist_local", data_dir=str(tmp_path)).is_prepared()
    np.testing.assert_array_equal(batch["image"], first_batch(cfg, seed=0, batch_size=64)["image"])

    # load_split: fixed order, exactly the 100 test examples with their labels.
    test = ip.load_split(cfg, "test", None)
    again = ip.load_split(cfg, "test", None)
    np.testing.assert_array_equal(test["image"], again["image"])
    images, labels = fml.load_split(small_debian_dir, "test")
    want = dict(zip(image_hashes(images), labels))
    raw = np.round((test["image"][:, 2:30, 2:30, 0] + 1.0) * 127.5).astype(np.uint8)
    got = dict(zip(image_hashes(raw), test["label"]))
    assert got == want


def test_auto_falls_back_to_bundled_then_fails(tmp_path, monkeypatch):
    cfg = data_cfg(source="auto", debian_dir=str(tmp_path / "no_debian"),
                   data_dir=str(tmp_path / "tfds"))
    assert ip.dataset_info(cfg).source == "bundled"
    monkeypatch.setattr(ip, "BUNDLED_PATH", str(tmp_path / "missing.npz"))
    with pytest.raises(ip.DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        ip.dataset_info(cfg)
    with pytest.raises(ip.DatasetNotFoundError, match="download_and_prepare"):
        ip.train_iterator(cfg, batch_size=4, seed=0, process_index=0, process_count=1)


def test_explicit_debian_source_reports_corrupt_file(small_debian_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(small_debian_dir):
        (broken / name).write_bytes(open(os.path.join(small_debian_dir, name), "rb").read())
    (broken / fml.IDX_FILES["train"][0]).write_bytes(b"\x1f\x8b garbage")
    cfg = data_cfg(source="debian", debian_dir=str(broken), data_dir=str(tmp_path / "tfds"))
    with pytest.raises(fml.IdxFormatError, match="train-images-idx3-ubyte.gz"):
        ip.dataset_info(cfg)


# ----------------------------------------------------------------------------- CIFAR-10, CelebA


@pytest.fixture
def mocked_tfds(monkeypatch):
    """tfds.testing.mock_data, with the datasets reported as prepared."""
    monkeypatch.setattr(ip, "_is_prepared", lambda builder: True)
    with tfds.testing.mock_data(num_examples=40):
        yield


def test_cifar10_pipeline(mocked_tfds):
    cfg = data_cfg("cifar10", random_flip=True)
    info = ip.dataset_info(cfg)
    assert (info.channels, info.num_classes, info.image_size) == (3, 10, 32)
    batch = first_batch(cfg, seed=0, batch_size=8)
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["image"].std() > 0.1  # random images, not a constant fill
    assert batch["label"].shape == (8,) and 0 <= batch["label"].min() <= batch["label"].max() < 10
    split = ip.load_split(cfg, "test", 10)
    assert split["image"].shape == (10, 32, 32, 3) and split["label"].shape == (10,)


def test_celeb_a_pipeline(mocked_tfds):
    cfg = data_cfg("celeb_a", random_flip=True)
    info = ip.dataset_info(cfg)
    assert (info.channels, info.num_classes, info.image_size) == (3, 0, 64)
    batch = first_batch(cfg, seed=0, batch_size=8)
    assert batch["image"].shape == (8, 64, 64, 3) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["image"].std() > 0.01
    np.testing.assert_array_equal(batch["label"], np.zeros(8, np.int32))
    assert batch["attributes"].shape == (8, 40) and batch["attributes"].dtype == np.int32
    assert set(np.unique(batch["attributes"])) <= {0, 1}
    split = ip.load_split(cfg, "validation", 6)
    assert split["image"].shape == (6, 64, 64, 3) and split["attributes"].shape == (6, 40)


@pytest.mark.parametrize("crop,box", [("diffae", (57, 185, 25, 153)),
                                      ("center", (20, 198, 0, 178))])
def test_celeb_a_crop_boxes(crop, box):
    """At image_size = box side (no resampling) the output is exactly the documented box."""
    top, bottom, left, right = box
    image = np.random.RandomState(0).randint(0, 256, (218, 178, 3)).astype(np.uint8)
    cfg = data_cfg("celeb_a", crop=crop, image_size=bottom - top)
    out = ip.preprocess_image(tf.constant(image), cfg).numpy()
    np.testing.assert_allclose(out, image[top:bottom, left:right] / 127.5 - 1.0, atol=1e-6)
    # The pipeline's JPEG path (decode only the crop window) uses the same box.
    smooth = np.kron(image[::8, ::8], np.ones((8, 8, 1), np.uint8))[:218, :178]
    jpeg = tf.io.encode_jpeg(tf.constant(smooth), quality=100)
    ex = ip._example_fn(cfg, "celeb_a")({"image": jpeg, "label": tf.constant(0)})
    full = ip.preprocess_image(tf.io.decode_jpeg(jpeg, channels=3), cfg)
    np.testing.assert_allclose(ex["image"].numpy(), full.numpy(), atol=1e-6)
    # And it resizes to the configured size.
    cfg.image_size = 64
    assert ip.preprocess_image(tf.constant(image), cfg).shape == (64, 64, 3)


@pytest.mark.parametrize("name,needle", [("cifar10", "tfds.builder('cifar10'"),
                                         ("celeb_a", "downloads/manual/")])
def test_absent_datasets_fail_fast_with_instructions(name, needle, tmp_path):
    cfg = data_cfg(name, data_dir=str(tmp_path))
    start = time.time()
    with pytest.raises(ip.DatasetNotFoundError) as e:
        ip.dataset_info(cfg)
    assert time.time() - start < 5.0
    assert needle in str(e.value) and "download_and_prepare()" in str(e.value)
    if name == "celeb_a":
        for f in ("img_align_celeba.zip", "list_eval_partition.txt", "list_attr_celeba.txt",
                  "list_landmarks_align_celeba.txt", "identity_CelebA.txt"):
            assert f in str(e.value)
    with pytest.raises(ip.DatasetNotFoundError):
        ip.train_iterator(cfg, batch_size=4, seed=0, process_index=0, process_count=1)
    assert os.listdir(tmp_path) == []  # nothing downloaded or created


def test_config_errors():
    with pytest.raises(ValueError, match="fashion_mnist.*cifar10.*celeb_a"):
        ip.dataset_info(_named("mnist"))
    with pytest.raises(ValueError, match="auto"):
        ip.dataset_info(data_cfg(source="internet"))
    with pytest.raises(ValueError, match="crop"):
        ip.dataset_info(data_cfg("celeb_a", crop="tight"))
    with pytest.raises(ValueError, match="channels"):
        ip.dataset_info(data_cfg("cifar10", channels=1))


def _named(name):
    cfg = data_cfg()
    cfg.name = name
    return cfg


# ----------------------------------------------------------------------------- GPU guard


def _import_fresh_copy(monkeypatch):
    """Executes input_pipeline.py as a new module (dmz_jax.input_pipeline stays as it is)."""
    spec = importlib.util.spec_from_file_location("input_pipeline_copy", ip.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


def test_import_hides_gpus_from_tensorflow(monkeypatch):
    calls = []
    monkeypatch.setattr(tf.config, "set_visible_devices", lambda *a: calls.append(a))
    _import_fresh_copy(monkeypatch)
    assert calls == [([], "GPU")]

    def refuse(*a):
        raise RuntimeError("Visible devices cannot be modified after being initialized")
    monkeypatch.setattr(tf.config, "set_visible_devices", refuse)
    _import_fresh_copy(monkeypatch)  # Guarded: must not raise.
    monkeypatch.undo()
    assert tf.config.get_visible_devices("GPU") == []
