"""--mode=bits: the per-bit statistics on codes with hand-computed answers, and the mode on a
tiny workdir (outputs, values, bad input)."""

import json
import os
import sys

import numpy as np
import pytest

from conftest import mode_config
from dmz_jax import api, bit_meaning as bm, data, modes
from dmz_jax.data import specs

H_QUARTER = -(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75))  # H(Bernoulli(1/4)) = 0.8113 bits


def test_means_and_entropies():
    bits = np.array([[1, 0, 1], [1, 0, 0], [0, 0, 0], [0, 1, 0]])
    np.testing.assert_allclose(bm.bit_means(bits), [0.5, 0.25, 0.25])
    np.testing.assert_allclose(bm.bit_entropies(bits), [1.0, H_QUARTER, H_QUARTER])
    assert str(bm.bit_entropies(np.ones((3, 1)))[0]) == "0.0"  # a constant bit, not -0.0


def test_correlations_of_complements_copies_and_a_constant_bit():
    x = np.array([1, 1, 0, 0])
    y = np.array([1, 0, 0, 0])  # cov 0.25 - 0.5 * 0.25 = 0.125; stds 0.5, sqrt(3) / 4
    bits = np.stack([x, 1 - x, x, y, np.ones(4)], axis=1)
    r = bm.bit_correlations(bits)
    assert r.shape == (5, 5) and not np.isnan(r).any()
    np.testing.assert_allclose(np.diag(r), 1.0)
    assert r[0, 1] == pytest.approx(-1.0) and r[0, 2] == pytest.approx(1.0)
    assert r[0, 3] == pytest.approx(1 / np.sqrt(3)) and r[1, 3] == pytest.approx(-1 / np.sqrt(3))
    np.testing.assert_array_equal(r[4, :4], 0.0)  # the constant bit: defined as uncorrelated
    np.testing.assert_array_equal(r[:4, 4], 0.0)
    np.testing.assert_allclose(r, r.T)


def test_a_class_indicator_bit_has_the_indicator_entropy_and_predicts_its_class():
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])  # class 1 has p = 1/4
    indicator = (labels == 1).astype(np.uint8)
    halves = (labels < 2).astype(np.uint8)  # classes {0, 1} against {2, 3}
    bits = np.stack([indicator, 1 - indicator, halves], axis=1)
    one_vs_rest = bm.one_vs_rest(labels, 4)
    mi = bm.indicator_mutual_information(bits, one_vs_rest)
    assert mi.shape == (3, 4)
    assert mi[0, 1] == pytest.approx(H_QUARTER) and mi[1, 1] == pytest.approx(H_QUARTER)
    # I(1[c < 2]; 1[c = 1]) = H(1[c = 1]) - H(1[c = 1] | bit) = 0.8113 - 1/2 * 1
    assert mi[2, 1] == pytest.approx(H_QUARTER - 0.5)
    # I(bit; class): the indicator keeps H(1[c = 1]); the halves bit is one full bit
    np.testing.assert_allclose(bm.class_mutual_information(bits, labels, 4),
                               [H_QUARTER, H_QUARTER, 1.0])
    best = bm.best_labels(bits[:, :2], one_vs_rest)
    np.testing.assert_array_equal(best["index"], [1, 1])
    np.testing.assert_array_equal(best["label_when_bit"], [1, 0])  # the complement: bit = 0
    np.testing.assert_allclose(best["accuracy"], 1.0)
    np.testing.assert_allclose(best["balanced_accuracy"], 1.0)
    np.testing.assert_allclose(best["mi_bits"], H_QUARTER)


def test_an_independent_bit_carries_no_information():
    labels = np.tile([0, 1], 4)  # every (bit, label) pair occurs exactly twice
    bit = np.repeat([0, 1], 4)[:, None]
    assert bm.class_mutual_information(bit, labels, 2)[0] == pytest.approx(0.0, abs=1e-12)
    assert bm.indicator_mutual_information(bit, bm.one_vs_rest(labels, 2)).max() < 1e-12
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 20_000)
    bits = rng.integers(0, 2, (20_000, 3))
    # the plug-in bias is about (cells - 1) / (2 N ln 2) = 9 / 27726 bits
    assert bm.class_mutual_information(bits, labels, 10).max() < 0.002
    accuracy = bm.single_bit_accuracy(bits, bm.one_vs_rest(labels, 10))
    np.testing.assert_allclose(accuracy["balanced_accuracy"], 0.5, atol=0.03)


def test_single_bit_accuracy_and_balanced_accuracy_by_hand():
    label = np.array([1, 1, 0, 0, 0, 0, 0, 0])
    bit = np.array([1, 0, 0, 0, 0, 0, 0, 1])  # TPR 1/2, TNR 5/6, 6 of 8 right
    for column, when in ((bit, 1), (1 - bit, 0)):
        got = bm.single_bit_accuracy(column[:, None], label[:, None])
        assert got["label_when_bit"][0, 0] == when
        assert got["accuracy"][0, 0] == pytest.approx(0.75)
        assert got["balanced_accuracy"][0, 0] == pytest.approx((1 / 2 + 5 / 6) / 2)
    constant_label = bm.single_bit_accuracy(bit[:, None], np.zeros((8, 1)))
    assert constant_label["balanced_accuracy"][0, 0] == 0.5


def test_attributes_and_a_constant_bit():
    attributes = np.stack([np.repeat([0, 1], 4), np.tile([0, 1], 4)], axis=1)
    bits = np.stack([attributes[:, 0], np.ones(8), attributes[:, 0] ^ attributes[:, 1]], 1)
    mi = bm.indicator_mutual_information(bits, attributes)
    np.testing.assert_allclose(mi, [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]], atol=1e-12)
    best = bm.best_labels(bits, attributes)
    np.testing.assert_array_equal(best["index"], [0, -1, -1])  # XOR: no single attribute
    assert np.isnan(best["accuracy"][1]) and np.isnan(best["balanced_accuracy"][2])
    assert best["accuracy"][0] == 1.0 and best["mi_bits"][0] == pytest.approx(1.0)


def test_colour_map_cells_and_colours():
    picture = bm.colour_map(np.array([[-1.0, 0.0], [1.0, 5.0]]), -1.0, 1.0, cell=3)
    assert picture.shape == (6, 6, 3) and picture.dtype == np.uint8
    np.testing.assert_array_equal(picture[0, 0], [33, 102, 172])  # low: blue
    np.testing.assert_array_equal(picture[2, 5], [255, 255, 255])  # middle: white
    np.testing.assert_array_equal(picture[5, 0], [178, 24, 43])  # high: red
    np.testing.assert_array_equal(picture[3, 3], [178, 24, 43])  # clipped to high


def test_heat_map_without_matplotlib_is_a_plain_colour_map(tmp_path, monkeypatch):
    from dmz_jax import images
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # its import now fails
    saved = {}
    monkeypatch.setattr(images, "save_png", saved.__setitem__)  # no TensorFlow needed
    path = str(tmp_path / "mi.png")
    bm._save_heatmap(path, np.array([[0.0, 0.5, 1.0]] * 2), 1.0, "MI", ["a", "b", "c"],
                     signed=False)
    picture = saved[path]
    assert picture.shape == (16, 24, 3)  # 8 pixels a cell
    np.testing.assert_array_equal(picture[0, 0], [255, 255, 255])  # MI 0: white
    np.testing.assert_array_equal(picture[15, 23], [178, 24, 43])  # the highest: red


def _png(path):
    import tensorflow as tf
    return tf.io.decode_png(tf.io.read_file(path)).numpy()


def _config(**per_bit):
    config = mode_config()
    config.modes.per_bit.update(examples=64, flip_images=2, flip_bits=(0, 3))
    config.modes.per_bit.update(**per_bit)
    return config


@pytest.mark.slow  # trains a tiny model (shared), then encodes, inverts and decodes at K=5
def test_bits_mode_writes_the_per_bit_tables_and_pictures(tiny_workdir):
    config = _config()
    out = modes.bits(config, tiny_workdir)
    assert os.path.basename(out).startswith("bits")
    assert {"bits.json", "correlation.png", "mi_bits_labels.png", "flips_K5.png",
            "codes.npz", "config.json"} <= set(os.listdir(out))
    result = json.load(open(os.path.join(out, "bits.json")))
    assert result["latent_dim"] == 8 and result["examples"] == 64 and result["step"] == 4
    assert result["options"]["flip_bits"] == [0, 3] and result["options"]["steps"] == 5
    images = data.load_split(config.data, "test", 64)["image"]
    codes = api.load(tiny_workdir, config=config).encode(images)
    per_bit = result["per_bit"]
    assert [row["index"] for row in per_bit] == list(range(8))
    np.testing.assert_allclose([row["mean"] for row in per_bit], codes.mean(0), atol=1e-6)
    np.testing.assert_array_equal(np.load(os.path.join(out, "codes.npz"))["bits"], codes)
    mi = np.array(result["mi_table"]["mi_bits"])
    assert mi.shape == (8, 10) and result["mi_table"]["columns"] == list(
        specs.FASHION_MNIST_CLASSES)
    for row, mi_row in zip(per_bit, mi):
        assert row["mi_bits"] == pytest.approx(mi_row.max(), abs=1e-6)
        assert row["mi_bits"] <= row["entropy_bits"] + 1e-6
        assert row["mi_class_bits"] <= row["entropy_bits"] + 1e-6
        if row["best_label"] is not None:
            assert row["best_label"] == specs.FASHION_MNIST_CLASSES[int(np.argmax(mi_row))]
            assert 0.5 <= row["balanced_accuracy"] <= 1 and 0 <= row["accuracy"] <= 1
    changes = [row["mean_abs_pixel_change"] for row in per_bit]
    assert changes[0] >= 0 and changes[3] >= 0
    assert changes[1] is None and changes[7] is None
    # flips: a row of the 2 inputs, then one row per flipped bit; 32-pixel images, pad 2
    flips = _png(os.path.join(out, "flips_K5.png"))
    assert flips.shape == (2 + 3 * 34, 2 + 2 * 34, 1)
    from dmz_jax import images as images_lib
    np.testing.assert_array_equal(flips[2:34, 2:34, :], images_lib.to_uint8(images[0]))
    for name in ("correlation.png", "mi_bits_labels.png"):
        picture = _png(os.path.join(out, name))
        assert picture.ndim == 3 and min(picture.shape[:2]) > 100


@pytest.mark.slow
def test_bits_mode_refuses_bad_options_before_loading(tiny_workdir):
    before = set(os.listdir(tiny_workdir))
    with pytest.raises(modes.ModeError, match=r"\[8\] not in 0..7"):
        modes.bits(_config(flip_bits=(0, 8)), tiny_workdir)
    with pytest.raises(modes.ModeError, match="at least 2"):
        modes.bits(_config(examples=1), tiny_workdir)
    gaussian = _config()
    gaussian.model.latent_type = "gaussian"
    with pytest.raises(modes.ModeError, match="latent_type='binary'"):
        modes.bits(gaussian, tiny_workdir)
    assert set(os.listdir(tiny_workdir)) == before  # no output folder was made
