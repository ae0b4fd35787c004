"""Tests of dmz_jax/data/image_folder.py (the "image_folder" dataset), mostly through dmz_jax.data.

Every folder is built in pytest's tmp folders from images written with tf.io.encode_png /
encode_jpeg: two class subfolders of good 16x16 RGB images, plus a corrupt file, a truncated
PNG, a grayscale PNG, an RGBA PNG and a 24x32 image.
"""

import hashlib
import logging
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from dmz_jax import config_base, data
from dmz_jax.data import image_folder as imf
from fake_gcs import fake_gcs

SIZE = 16
GRAY_VALUE = 100
RGBA_COLOR = (10, 20, 30)


def write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(tf.io.encode_png(np.asarray(array, np.uint8)).numpy())


def write_jpeg(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(tf.io.encode_jpeg(np.asarray(array, np.uint8), quality=95).numpy())


def rgba_image():
    """Left half transparent (alpha 0, colour white), right half opaque RGBA_COLOR."""
    image = np.full((SIZE, SIZE, 4), 255, np.uint8)
    image[:, SIZE // 2:, :3] = RGBA_COLOR
    image[:, :SIZE // 2, 3] = 0
    return image


def wide_image():
    """24x32: red 4-column bands left and right, a gradient in the central 24x24 square."""
    image = np.zeros((24, 32, 3), np.uint8)
    image[:, :4, 0] = image[:, 28:, 0] = 255
    image[:, 4:28, 1] = np.arange(24, dtype=np.uint8)[:, None] * 10
    return image


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """17 candidate files: 12 good RGB, corrupt, truncated, gray, RGBA, wrong size; + a .txt."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.RandomState(0)
    for cls in ("cats", "dogs"):
        for i in range(6):
            image = rng.randint(0, 256, (SIZE, SIZE, 3))
            if i < 4:
                write_png(root / cls / f"img{i}.png", image)
            else:
                write_jpeg(root / cls / f"img{i}.JPG", image)
    (root / "cats" / "corrupt.png").write_bytes(rng.bytes(300))
    png = tf.io.encode_png(rng.randint(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)).numpy()
    (root / "dogs" / "truncated.png").write_bytes(png[:len(png) // 2])
    write_png(root / "cats" / "gray.png", np.full((SIZE, SIZE, 1), GRAY_VALUE))
    write_png(root / "dogs" / "sub" / "rgba.png", rgba_image())  # deeper: still class "dogs"
    write_png(root / "dogs" / "wide.png", wide_image())
    (root / "cats" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(autouse=True)
def fresh_cache():
    imf._scan.cache_clear()
    yield
    imf._scan.cache_clear()


def scan(cfg):
    """An uncached scan."""
    imf._scan.cache_clear()
    return imf.scan(cfg)


def cfg_for(image_dir, **overrides):
    """config.data of config_base (the real schema) for image_folder, with overrides."""
    cfg = config_base.base_config().data
    cfg.name = "image_folder"
    cfg.image_dir = str(image_dir)
    cfg.image_size = SIZE
    cfg.channels = 3
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def copy_subset(src, dst, names):
    """Copies the files `names` (relative paths) of folder `src` to `dst`; returns dst."""
    for name in names:
        os.makedirs(os.path.dirname(dst / name), exist_ok=True)
        shutil.copy(src / name, dst / name)
    return dst


def image_of(split, report, name):
    """The image of `split` (load_split of "train", test_fraction=0) for file `name`."""
    return split["image"][[os.path.basename(f) for f in report.files].index(name)]


def unit(x):
    return np.asarray(x, np.float32) / 127.5 - 1.0


# ----------------------------------------------------------------------------- scan + policies


def test_default_policies_scan_counts_and_summary(folder, caplog):
    with caplog.at_level(logging.INFO, logger=imf.__name__):
        report = scan(cfg_for(folder))
    assert report.counts == {"ok": 15, "corrupt": 2, "converted": 2, "resized": 1, "size": 0,
                             "channels": 0, "unlabeled": 0}
    lines = [r.getMessage() for r in caplog.records if r.name == imf.__name__]
    assert len(lines) == 1
    assert lines[0].startswith("image_folder: 15 ok, 2 corrupt skipped, 2 converted, 1 resized")
    assert lines[0] == report.summary()
    skipped = {os.path.basename(p): reason for p, reason in report.skipped}
    assert set(skipped) == {"corrupt.png", "truncated.png"}
    assert all(r.startswith("corrupt: ") for r in skipped.values())
    assert "PNG" in skipped["truncated.png"]
    assert not any("{{" in r or "[Op:" in r for r in skipped.values())  # TF noise removed
    assert "notes.txt" not in " ".join(report.files)
    assert list(report.files) == sorted(report.files)


def test_labels_from_first_level_subfolders(folder):
    report = scan(cfg_for(folder))
    assert report.class_names == ("cats", "dogs")
    for path, label in zip(report.files, report.labels):
        assert label == ("cats", "dogs").index(os.path.relpath(path, folder).split(os.sep)[0])
    assert report.labels.count(0) == 7 and report.labels.count(1) == 8  # rgba.png is deeper


def test_scan_of_a_gs_folder_matches_the_local_scan(folder, tmp_path):
    """data.image_dir=gs://... (the celebahq256 data path): listed and decoded through epath,
    the same files, labels, split and verdicts as the same folder on disk."""
    local = scan(cfg_for(folder))
    shutil.copytree(folder, tmp_path / "gcs" / "bucket" / "images")
    with fake_gcs(tmp_path / "gcs"):
        remote = scan(cfg_for("gs://bucket/images/"))
        with pytest.raises(data.DatasetNotFoundError, match="gs://bucket/absent does not exist"):
            scan(cfg_for("gs://bucket/absent"))
    assert remote.image_dir == "gs://bucket/images"
    assert remote.files == tuple(f.replace(str(folder), "gs://bucket/images")
                                 for f in local.files)
    assert (remote.labels, remote.is_test, remote.class_names, remote.counts) == (
        local.labels, local.is_test, local.class_names, local.counts)
    assert {os.path.basename(p) for p, _ in remote.skipped} == {"corrupt.png", "truncated.png"}


def test_no_subfolders_means_label_zero_and_root_files_skipped_otherwise(folder, tmp_path):
    flat = tmp_path / "flat"
    for name in ("img0.png", "img1.png", "gray.png"):
        os.makedirs(flat, exist_ok=True)
        shutil.copy(folder / "cats" / name, flat / name)
    report = scan(cfg_for(flat, test_fraction=0.0))
    assert report.class_names == () and report.labels == (0, 0, 0)
    assert data.dataset_info(cfg_for(flat)).num_classes == 0
    copy_subset(folder, flat, ["dogs/img0.png"])  # now a class folder exists
    report = scan(cfg_for(flat, test_fraction=0.0))
    assert report.class_names == ("dogs",) and report.files == (str(flat / "dogs/img0.png"),)
    assert report.counts["ok"] == 1 and report.counts["unlabeled"] == 3
    assert "1 ok" in report.summary() and "3 unlabeled skipped" in report.summary()


def test_no_conversion_skips_wrong_channels(folder):
    report = scan(cfg_for(folder, convert_channels=False))
    c = report.counts
    assert (c["ok"], c["corrupt"], c["converted"], c["channels"]) == (13, 2, 0, 2)
    reasons = {os.path.basename(p): r for p, r in report.skipped}
    assert "wrong channels: 1" in reasons["gray.png"] and "wrong channels: 4" in reasons["rgba.png"]
    assert "2 wrong-channels skipped" in report.summary()


def test_wrong_size_skip(folder):
    report = scan(cfg_for(folder, wrong_size="skip"))
    assert (report.counts["ok"], report.counts["resized"], report.counts["size"]) == (14, 0, 1)
    assert [(os.path.basename(p), r) for p, r in report.skipped if "wrong size" in r] == [
        ("wide.png", "wrong size: 24x32, expected 16x16")]


@pytest.mark.parametrize("bad", ["cats/corrupt.png", "dogs/truncated.png"])
def test_bad_images_error_names_the_file(folder, tmp_path, bad):
    sub = copy_subset(folder, tmp_path, ["cats/img0.png", "dogs/img0.png", bad])
    with pytest.raises(data.ImageFolderError, match=os.path.basename(bad)) as e:
        data.dataset_info(cfg_for(sub, bad_images="error"))
    assert "bad_images" in str(e.value) and "corrupt" in str(e.value)


def test_error_policies_for_channels_and_size(folder, tmp_path):
    sub = copy_subset(folder, tmp_path, ["cats/img0.png", "cats/gray.png", "dogs/wide.png"])
    with pytest.raises(data.ImageFolderError, match="gray.png.*wrong channels"):
        scan(cfg_for(sub, convert_channels=False, bad_images="error"))
    with pytest.raises(data.ImageFolderError, match="wide.png.*wrong size.*wrong_size"):
        scan(cfg_for(folder, wrong_size="error"))  # corrupt ones skipped


def test_missing_empty_or_unusable_folder(folder, tmp_path):
    with pytest.raises(data.DatasetNotFoundError, match="does not exist"):
        data.dataset_info(cfg_for(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(data.DatasetNotFoundError, match="no image files"):
        data.train_iterator(cfg_for(tmp_path / "empty"), batch_size=2, seed=0, process_index=0,
                            process_count=1)
    bad = copy_subset(folder, tmp_path / "bad", ["cats/corrupt.png", "dogs/truncated.png"])
    with pytest.raises(data.DatasetNotFoundError, match="no usable training images") as e:
        data.load_split(cfg_for(bad), "train")
    assert "truncated.png" in str(e.value)


# ----------------------------------------------------------------------------- pixel values


def test_converted_and_resized_values(folder):
    cfg = cfg_for(folder, test_fraction=0.0)
    report = imf.scan(cfg)
    train = data.load_split(cfg, "train")
    assert train["image"].shape == (15, SIZE, SIZE, 3) and train["image"].dtype == np.float32
    np.testing.assert_array_equal(image_of(train, report, "gray.png"),
                                  np.full((SIZE, SIZE, 3), unit(GRAY_VALUE)))
    rgba = image_of(train, report, "rgba.png")
    np.testing.assert_array_equal(rgba[:, :SIZE // 2], -1.0)  # alpha 0 -> black
    np.testing.assert_array_equal(rgba[:, SIZE // 2:], np.broadcast_to(unit(RGBA_COLOR),
                                                                       (SIZE, SIZE // 2, 3)))
    # wide.png: the centre 24x24 square only (no red band), resized with antialias.
    wide = image_of(train, report, "wide.png")
    square = tf.constant(wide_image()[:, 4:28], tf.float32)
    want = tf.image.resize(square, (SIZE, SIZE), method="bilinear", antialias=True).numpy()
    np.testing.assert_allclose(wide, unit(want), atol=1e-5)
    assert np.all(wide[..., 0] == -1.0)
    # A good PNG is exact.
    index = [os.path.basename(f) for f in report.files].index("img0.png")  # first: cats
    raw = tf.io.decode_png(tf.io.read_file(report.files[index])).numpy()
    np.testing.assert_array_equal(train["image"][index], unit(raw))


def test_grayscale_target_uses_luma(folder, tmp_path):
    sub = tmp_path / "gray_target"
    write_png(sub / "rgb.png", np.broadcast_to(np.uint8([200, 100, 50]), (SIZE, SIZE, 3)))
    write_png(sub / "rgba.png", rgba_image())
    shutil.copy(folder / "cats" / "gray.png", sub / "gray.png")
    cfg = cfg_for(sub, channels=1, test_fraction=0.0)
    report = scan(cfg)
    assert (report.counts["ok"], report.counts["converted"]) == (3, 2)
    images = data.load_split(cfg, "train")["image"]  # sorted: gray, rgb, rgba
    assert images.shape == (3, SIZE, SIZE, 1)
    np.testing.assert_array_equal(images[0], unit(GRAY_VALUE))
    luma = 0.299 * 200 + 0.587 * 100 + 0.114 * 50
    np.testing.assert_allclose(images[1], unit(luma), atol=1e-5)
    np.testing.assert_array_equal(images[2][:, :SIZE // 2], -1.0)
    rgba_luma = np.dot([0.299, 0.587, 0.114], RGBA_COLOR)
    np.testing.assert_allclose(images[2][:, SIZE // 2:], unit(rgba_luma), atol=1e-5)


# ----------------------------------------------------------------------------- splits, iterators


def test_split_is_seeded_and_disjoint(folder):
    cfg = cfg_for(folder)  # test_fraction 0.1 of 17 candidates: 2 files drawn for "test"
    report = imf.scan(cfg)
    n_train, n_test = len(report.split("train")[0]), len(report.split("test")[0])
    assert n_train + n_test == report.counts["ok"] == 15 and n_test <= 2
    train, test = data.load_split(cfg, "train"), data.load_split(cfg, "test")
    assert len(train["label"]) == n_train and len(test["label"]) == n_test
    assert not set(report.split("train")[0]) & set(report.split("test")[0])
    assert scan(cfg).split("test") == report.split("test")
    splits = {scan(cfg_for(folder, split_seed=s)).split("test")[0] for s in range(6)}
    assert len(splits) > 1
    info = data.dataset_info(cfg)
    assert (info.name, info.num_classes, info.channels) == ("image_folder", 2, 3)
    assert info.num_train_examples == n_train
    with pytest.raises(ValueError, match="split"):
        data.load_split(cfg, "validation")
    assert data.load_split(cfg_for(folder, test_fraction=0.0), "test")["image"].shape == (
        0, SIZE, SIZE, 3)
    assert data.load_split(cfg, "train", 3)["image"].shape == (3, SIZE, SIZE, 3)


def test_scan_is_cached_across_api_calls(folder, monkeypatch):
    decoded = []
    real = tf.io.decode_image
    monkeypatch.setattr(tf.io, "decode_image", lambda *a, **k: decoded.append(1) or real(*a, **k))
    cfg = cfg_for(folder)
    data.dataset_info(cfg)
    assert len(decoded) == 17  # every candidate file, once
    data.train_iterator(cfg, batch_size=4, seed=0, process_index=0, process_count=1)
    data.load_split(cfg, "test")
    assert len(decoded) == 17 + 2  # + one trace of each tf.data map: no second scan
    data.dataset_info(cfg_for(folder, wrong_size="skip"))  # another config: scanned anew
    assert len(decoded) == 2 * 17 + 2


def hashes(images):
    return [hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest() for x in images]


def test_train_iterator_batches_and_shards(folder):
    cfg = cfg_for(folder, test_fraction=0.0, random_flip=True)
    it = data.train_iterator(cfg, batch_size=4, seed=1, process_index=0, process_count=1)
    batch = next(it)
    assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert set(batch["label"]) <= {0, 1}
    for _ in range(5):  # infinite: more batches than one epoch of 15
        assert next(it)["image"].shape == (4, SIZE, SIZE, 3)
    again = next(data.train_iterator(cfg, batch_size=4, seed=1, process_index=0, process_count=1))
    np.testing.assert_array_equal(batch["image"], again["image"])

    # Two processes without flips: rows 0-6 and 7-13 of the first global batch of 14 (one
    # epoch of 15 images, so distinct images): disjoint, 7 each.
    cfg.random_flip = False
    known = dict(zip(hashes(data.load_split(cfg, "train")["image"]), range(15)))
    shares = []
    for p in range(2):
        it = data.train_iterator(cfg, batch_size=7, seed=0, process_index=p, process_count=2)
        shares.append({known[h] for h in hashes(next(it)["image"])})
    assert len(shares[0]) == len(shares[1]) == 7 and not shares[0] & shares[1]


def test_resume_is_exact_across_epochs(folder):
    """15 files, batches of 4: batches straddle epochs; flips depend on the stream position."""
    cfg = cfg_for(folder, test_fraction=0.0, random_flip=True)
    it = data.train_iterator(cfg, batch_size=4, seed=5, process_index=0, process_count=1)
    batches = [next(it) for _ in range(9)]
    for start in (1, 3, 7):
        resumed = next(data.train_iterator(cfg, batch_size=4, seed=5, process_index=0,
                                           process_count=1, start_step=start))
        np.testing.assert_array_equal(resumed["image"], batches[start]["image"])
        np.testing.assert_array_equal(resumed["label"], batches[start]["label"])
