"""Tests of dmz_jax/data (Fashion-MNIST sources, CIFAR-10, CelebA; image_folder has its own file).

Nothing is written outside pytest's tmp folders: every tfds data_dir points into tmp_path.
CIFAR-10 / CelebA are exercised with tfds.testing.mock_data (random examples). The Debian
source is exercised with IDX files written from the bundled subset, so it runs everywhere.
"""

import gzip
import hashlib
import importlib.util
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import ROOT
from dmz_jax import config_base, data
from dmz_jax.data import fashion_mnist, pipeline, specs, tfds_source

DEBIAN_PRESENT = all(os.path.isfile(os.path.join(specs.DEBIAN_DIR, f))
                     for files in specs.IDX_FILES.values() for f in files)


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
    return next(data.train_iterator(cfg, batch_size=batch_size, seed=seed, process_index=0,
                                    process_count=1, **kw))


def image_hashes(images):
    return [hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest() for x in images]


def unpad(images):
    """float32 [N, 32, 32, 1] of the pipeline -> the uint8 [N, 28, 28] it came from."""
    return np.round((images[:, 2:30, 2:30, 0] + 1.0) * 127.5).astype(np.uint8)


def write_idx_gz(path, array):
    """Writes uint8 `array` as a gzipped IDX file."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.asarray(array, np.uint8).tobytes())


def write_debian_dir(path, arrays, n_train, n_test):
    """The four IDX files of a Debian-like folder holding the first n_train / n_test examples."""
    os.makedirs(path, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        for key, name in zip(("images", "labels"), specs.IDX_FILES[split]):
            write_idx_gz(os.path.join(path, name), arrays[f"{split}_{key}"][:n])
    return str(path)


@pytest.fixture(scope="module")
def bundled():
    with np.load(specs.BUNDLED_PATH) as f:
        return {k: f[k] for k in f.files}


# ----------------------------------------------------------------------------- bundled subset


def test_bundled_file_is_small_and_complete(bundled):
    assert os.path.getsize(specs.BUNDLED_PATH) < 6 * 2**20
    assert bundled["train_images"].shape == (10_000, 28, 28)
    assert bundled["test_images"].shape == (2_000, 28, 28)
    assert bundled["train_images"].dtype == np.uint8
    assert set(np.unique(bundled["train_labels"])) == set(range(10))


def test_bundled_batches(bundled):
    cfg = data_cfg(source="bundled")
    info = data.dataset_info(cfg)
    assert (info.source, info.num_train_examples, info.channels, info.num_classes) == (
        "bundled", 10_000, 1, 10)
    batch = first_batch(cfg, seed=0, batch_size=32)
    image, label = batch["image"], batch["label"]
    assert image.shape == (32, 32, 32, 1) and image.dtype == np.float32
    assert label.shape == (32,) and label.dtype == np.int32
    assert image.min() >= -1.0 and image.max() == 1.0  # some pixel is 255: scaled to +1
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert np.all(image[:, border, 0] == -1.0)
    # Every image is one of the bundled training images (exactly x / 127.5 - 1), with its label.
    index = {h: i for i, h in enumerate(image_hashes(bundled["train_images"]))}
    rows = [index[h] for h in image_hashes(unpad(image))]
    np.testing.assert_array_equal(image[:, 2:30, 2:30, 0],
                                  bundled["train_images"][rows] / np.float32(127.5) - 1)
    np.testing.assert_array_equal(bundled["train_labels"][rows], label)


def test_odd_padding_puts_the_extra_pixel_bottom_right():
    fn = tfds_source.example_fn(data_cfg(image_size=33))
    out = fn({"image": tf.fill([28, 28, 1], tf.constant(255, tf.uint8)), "label": 0})["image"]
    expected = np.full((33, 33, 1), -1.0, np.float32)
    expected[2:30, 2:30] = 1.0  # 2 pixels top/left, 3 bottom/right
    np.testing.assert_array_equal(out.numpy(), expected)


def test_seed_determinism():
    cfg = data_cfg(source="bundled")
    a, b, c = first_batch(cfg, seed=1), first_batch(cfg, seed=1), first_batch(cfg, seed=2)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(a["image"], c["image"])
    it = data.train_iterator(cfg, batch_size=16, seed=1, process_index=0, process_count=1)
    next(it)
    assert not np.array_equal(next(it)["image"], a["image"])  # the stream moves on


def test_resume_yields_exactly_the_same_batches():
    cfg = data_cfg(source="bundled", random_flip=True)
    it = data.train_iterator(cfg, batch_size=16, seed=4, process_index=1, process_count=2)
    batches = [next(it) for _ in range(6)]
    for start in (1, 4):
        resumed = data.train_iterator(cfg, batch_size=16, seed=4, process_index=1,
                                      process_count=2, start_step=start)
        for want in batches[start:start + 2]:
            got = next(resumed)
            np.testing.assert_array_equal(got["image"], want["image"])
            np.testing.assert_array_equal(got["label"], want["label"])


def test_every_epoch_is_a_fresh_permutation_and_far_resumes_are_immediate(bundled):
    """The bundled train split (10,000 examples), 5 batches of 2,000 per epoch: each epoch
    holds every example once, in a new order; step 10^9 (an epoch past 2^31 examples) is
    reached without replaying the stream and is again a permutation of the split."""
    cfg = data_cfg(source="bundled")
    index = {h: i for i, h in enumerate(image_hashes(bundled["train_images"]))}

    def epoch_order(start_step):
        it = data.train_iterator(cfg, batch_size=2000, seed=0, process_index=0,
                                 process_count=1, start_step=start_step)
        return [index[h] for _ in range(5) for h in image_hashes(unpad(next(it)["image"]))]

    first, second = epoch_order(0), epoch_order(5)
    assert len(first) == len(set(first)) == 10_000
    assert set(first) == set(second) == set(range(10_000)) and first != second
    far = epoch_order(10**9)  # 2e12 examples in: 2e8 epochs exactly
    assert set(far) == set(range(10_000)) and far not in (first, second)


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
    a = data.load_split(cfg, "test", 50)
    assert a["image"].shape == (50, 32, 32, 1) and a["label"].dtype == np.int32
    expected = bundled["test_images"][:50].astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(a["image"][:, 2:30, 2:30, 0], expected, atol=1e-6)
    np.testing.assert_array_equal(a["label"], bundled["test_labels"][:50])
    b = data.load_split(cfg, "test", None)
    assert len(b["label"]) == 2_000
    np.testing.assert_array_equal(b["image"][:50], a["image"])
    empty = data.load_split(cfg, "train", 0)
    assert empty["image"].shape == (0, 32, 32, 1) and empty["label"].dtype == np.int32
    with pytest.raises(ValueError, match="split"):
        data.load_split(cfg, "validation", 5)


def test_the_global_batch_does_not_depend_on_the_number_of_processes():
    """Processes 0 and 1 of 2 (4 images each) yield rows 0-3 and 4-7 of the global batch of
    8 that one process yields, flips included, at every step and after a resume: a run on 2
    hosts trains on the same data as on one."""
    cfg = data_cfg(source="bundled", random_flip=True)
    one = data.train_iterator(cfg, batch_size=8, seed=2, process_index=0, process_count=1)
    two = [data.train_iterator(cfg, batch_size=4, seed=2, process_index=p, process_count=2)
           for p in range(2)]
    resumed = data.train_iterator(cfg, batch_size=4, seed=2, process_index=1, process_count=2,
                                  start_step=3)
    for step in range(5):
        want, parts = next(one), [next(it) for it in two]
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([b[key] for b in parts]), want[key])
        if step >= 3:
            np.testing.assert_array_equal(next(resumed)["image"], want["image"][4:])
    assert not np.array_equal(parts[0]["image"], parts[1]["image"])
def test_idx_reader_rejects_corrupt_files(tmp_path):
    good = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    ok = tmp_path / "ok-idx3-ubyte.gz"
    write_idx_gz(ok, good)
    np.testing.assert_array_equal(fashion_mnist.read_idx(str(ok)), good)
    assert fashion_mnist.read_idx(str(ok), header_only=True) == (2, 28, 28)

    bad_magic = tmp_path / "magic.gz"
    with gzip.open(bad_magic, "wb") as f:
        f.write(b"\x12\x34\x08\x03" + struct.pack(">3I", 2, 28, 28) + good.tobytes())
    with pytest.raises(fashion_mnist.IdxFormatError, match="magic.gz: bad IDX magic number"):
        fashion_mnist.read_idx(str(bad_magic))

    short_payload = tmp_path / "short.gz"
    with gzip.open(short_payload, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 28, 28) + good.tobytes()[:-10])
    with pytest.raises(fashion_mnist.IdxFormatError, match="holds 1558: truncated"):
        fashion_mnist.read_idx(str(short_payload))

    cut_gzip = tmp_path / "cut.gz"
    cut_gzip.write_bytes(ok.read_bytes()[:40])
    with pytest.raises(fashion_mnist.IdxFormatError, match="cut.gz: .*corrupt or truncated"):
        fashion_mnist.read_idx(str(cut_gzip))

    not_gzip = tmp_path / "plain.gz"
    not_gzip.write_bytes(b"\x00\x00\x08\x01 not gzip")
    with pytest.raises(fashion_mnist.IdxFormatError, match="plain.gz: cannot decompress"):
        fashion_mnist.read_idx(str(not_gzip))

    with pytest.raises(FileNotFoundError):
        fashion_mnist.read_idx(str(tmp_path / "absent.gz"))


@pytest.mark.skipif(not DEBIAN_PRESENT, reason=f"dataset-fashion-mnist not in {specs.DEBIAN_DIR}")
def test_real_debian_files_parse():
    images, labels = fashion_mnist.read_split(specs.DEBIAN_DIR, "train")
    assert images.shape == (60_000, 28, 28) and labels.shape == (60_000,)
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 6_000))
    assert fashion_mnist.read_split(specs.DEBIAN_DIR, "test", header_only=True) == 10_000


@pytest.fixture(scope="module")
def small_debian_dir(tmp_path_factory, bundled):
    """A debian_dir holding the first 300 train / 100 test examples of the bundled subset."""
    return write_debian_dir(tmp_path_factory.mktemp("debian"), bundled, 300, 100)


def test_debian_source_reads_the_idx_files(small_debian_dir, bundled, tmp_path):
    cfg = data_cfg(source="auto", debian_dir=small_debian_dir, data_dir=str(tmp_path))
    info = data.dataset_info(cfg)  # Cheap: reads headers only.
    assert (info.source, info.num_train_examples) == ("debian", 300)

    batch = first_batch(cfg, seed=0, batch_size=64)
    assert batch["image"].shape == (64, 32, 32, 1)
    index = {h: i for i, h in enumerate(image_hashes(bundled["train_images"][:300]))}
    rows = [index[h] for h in image_hashes(unpad(batch["image"]))]
    np.testing.assert_array_equal(bundled["train_labels"][rows], batch["label"])
    np.testing.assert_array_equal(batch["image"], first_batch(cfg, seed=0, batch_size=64)["image"])
    assert not os.listdir(tmp_path)  # nothing prepared or written in data_dir

    # load_split: fixed order, exactly the 100 test examples with their labels.
    test = data.load_split(cfg, "test", None)
    np.testing.assert_array_equal(test["image"], data.load_split(cfg, "test", None)["image"])
    want = dict(zip(image_hashes(bundled["test_images"][:100]), bundled["test_labels"][:100]))
    assert dict(zip(image_hashes(unpad(test["image"])), test["label"])) == want


def test_auto_falls_back_to_bundled_then_fails(tmp_path, monkeypatch):
    cfg = data_cfg(source="auto", debian_dir=str(tmp_path / "no_debian"),
                   data_dir=str(tmp_path / "tfds"))
    assert data.dataset_info(cfg).source == "bundled"
    monkeypatch.setattr(specs, "BUNDLED_PATH", str(tmp_path / "missing.npz"))
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.dataset_info(cfg)
    for needle in ("tfds: 'fashion_mnist' is not prepared", "no_debian", "missing.npz",
                   "1. Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist",
                   "2. With network access", "3. Restore the bundled subset"):
        assert needle in str(e.value)
    with pytest.raises(data.DatasetNotFoundError, match="download_and_prepare"):
        data.train_iterator(cfg, batch_size=4, seed=0, process_index=0, process_count=1)


def test_corrupt_debian_file(small_debian_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(small_debian_dir):
        (broken / name).write_bytes(open(os.path.join(small_debian_dir, name), "rb").read())
    (broken / specs.IDX_FILES["train"][0]).write_bytes(b"\x1f\x8b garbage")
    cfg = data_cfg(source="debian", debian_dir=str(broken), data_dir=str(tmp_path / "tfds"))
    with pytest.raises(fashion_mnist.IdxFormatError, match="train-images-idx3-ubyte.gz"):
        data.dataset_info(cfg)  # explicit source: the error itself
    cfg.source = "auto"  # auto: skipped, with the reason logged, the bundled subset used
    assert data.dataset_info(cfg).source == "bundled"


def test_make_fashion_mnist_subset_rebuilds_the_shipped_file(bundled, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "make_subset", os.path.join(ROOT, "tools", "make_fashion_mnist_subset.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    source = write_debian_dir(tmp_path / "idx", bundled, 10_000, 2_000)
    tool.make_subset(source, str(tmp_path / "out.npz"))
    digest = [hashlib.sha256(open(p, "rb").read()).hexdigest()
              for p in (tmp_path / "out.npz", specs.BUNDLED_PATH)]
    assert digest[0] == digest[1]


# ----------------------------------------------------------------------------- CIFAR-10, CelebA


@pytest.fixture
def mocked_tfds(monkeypatch):
    """tfds.testing.mock_data, with the datasets reported as prepared."""
    monkeypatch.setattr(tfds_source, "is_prepared", lambda builder: True)
    with tfds.testing.mock_data(num_examples=40):
        yield


def test_cifar10_pipeline(mocked_tfds):
    cfg = data_cfg("cifar10", random_flip=True)
    info = data.dataset_info(cfg)
    assert (info.channels, info.num_classes, info.image_size, info.source) == (3, 10, 32, "tfds")
    it = data.train_iterator(cfg, batch_size=8, seed=0, process_index=0, process_count=1)
    batches = [next(it) for _ in range(7)]  # 40 examples: past the first epoch
    batch = batches[0]
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["image"].std() > 0.1  # random images, not a constant fill
    assert batch["label"].shape == (8,) and 0 <= batch["label"].min() <= batch["label"].max() < 10
    resumed = next(data.train_iterator(cfg, batch_size=8, seed=0, process_index=0,
                                       process_count=1, start_step=6))
    np.testing.assert_array_equal(resumed["image"], batches[6]["image"])
    split = data.load_split(cfg, "test", 10)
    assert split["image"].shape == (10, 32, 32, 3) and split["label"].shape == (10,)
    cfg.image_size = 16  # bilinear resize, antialiased
    assert data.load_split(cfg, "test", 2)["image"].shape == (2, 16, 16, 3)


def test_celeb_a_pipeline(mocked_tfds):
    cfg = data_cfg("celeb_a", random_flip=True)
    info = data.dataset_info(cfg)
    assert (info.channels, info.num_classes, info.image_size) == (3, 0, 64)
    batch = first_batch(cfg, seed=0, batch_size=8)
    assert batch["image"].shape == (8, 64, 64, 3) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["image"].std() > 0.01
    np.testing.assert_array_equal(batch["label"], np.zeros(8, np.int32))
    assert batch["attributes"].shape == (8, 40) and batch["attributes"].dtype == np.int32
    assert set(np.unique(batch["attributes"])) == {0, 1}
    split = data.load_split(cfg, "validation", 6)
    assert split["image"].shape == (6, 64, 64, 3) and split["attributes"].shape == (6, 40)


@pytest.mark.parametrize("crop,box", [("diffae", (57, 185, 25, 153)),
                                      ("center", (20, 198, 0, 178))])
def test_celeb_a_crop_boxes(crop, box):
    """At image_size = box side (no resampling) the output is exactly the documented box."""
    top, bottom, left, right = box
    blocks = np.random.RandomState(0).randint(0, 256, (28, 23, 3)).astype(np.uint8)
    image = np.kron(blocks, np.ones((8, 8, 1), np.uint8))[:218, :178]  # edges everywhere
    jpeg = tf.io.encode_jpeg(tf.constant(image), quality=100)
    decoded = tf.io.decode_jpeg(jpeg, channels=3).numpy()
    cfg = data_cfg("celeb_a", crop=crop, image_size=bottom - top)
    out = tfds_source.example_fn(cfg)({"image": jpeg, "label": tf.constant(0)})["image"]
    np.testing.assert_allclose(out.numpy(), decoded[top:bottom, left:right] / 127.5 - 1.0,
                               atol=1e-6)
    cfg.image_size = 64
    assert tfds_source.example_fn(cfg)({"image": jpeg})["image"].shape == (64, 64, 3)


@pytest.mark.parametrize("name,needle", [("cifar10", "tfds.builder('cifar10'"),
                                         ("celeb_a", "downloads/manual/")])
def test_absent_datasets_fail_fast_with_instructions(name, needle, tmp_path):
    cfg = data_cfg(name, data_dir=str(tmp_path))
    start = time.time()
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.dataset_info(cfg)
    assert time.time() - start < 5.0
    assert needle in str(e.value) and "download_and_prepare()" in str(e.value)
    assert "  1. " in str(e.value) and "  3. " in str(e.value)
    if name == "celeb_a":
        for f in ("img_align_celeba.zip", "list_eval_partition.txt", "list_attr_celeba.txt",
                  "list_landmarks_align_celeba.txt", "identity_CelebA.txt"):
            assert f in str(e.value)
    with pytest.raises(data.DatasetNotFoundError):
        data.train_iterator(cfg, batch_size=4, seed=0, process_index=0, process_count=1)
    assert os.listdir(tmp_path) == []  # nothing downloaded or created


# ----------------------------------------------------------------------------- TensorFlow


def test_pipeline_import_hides_gpus_from_tensorflow(monkeypatch):
    def import_fresh_copy():
        spec = importlib.util.spec_from_file_location("pipeline_copy", pipeline.__file__)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))

    calls = []
    monkeypatch.setattr(tf.config, "set_visible_devices", lambda *a: calls.append(a))
    import_fresh_copy()
    assert calls == [([], "GPU")]

    def refuse(*a):
        raise RuntimeError("Visible devices cannot be modified after being initialized")
    monkeypatch.setattr(tf.config, "set_visible_devices", refuse)
    import_fresh_copy()  # Guarded: must not raise.
    monkeypatch.undo()
    assert tf.config.get_visible_devices("GPU") == []


@pytest.mark.slow
def test_package_import_does_not_import_tensorflow():
    code = ("import sys, dmz_jax.data as d; assert d.DatasetInfo and d.DatasetNotFoundError; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'tensorflow_datasets', 'jax')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
