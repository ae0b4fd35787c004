"""The code bridge (dmz_jax/bridge.py): the MLP on synthetic bits, fashion_mnist_edges, and
--mode=train_bridge / translate on a tiny pair of models (edges |z|=6 -> garments |z|=8)."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import mode_config
from dmz_jax import bridge, data, images, modes

SMALL = dict(learning_rate=3e-3, batch_size=64, seed=0)


def _bits(n, width, seed, p=0.5):
    return (np.random.default_rng(seed).random((n, width)) < p).astype(np.float32)


def _known_mapping(x):
    """8 target bits from 6 source bits: a permutation, two negated, two copies."""
    y = x[:, [3, 0, 5, 1, 4, 2]].copy()
    y[:, :2] = 1.0 - y[:, :2]
    return np.concatenate([y, x[:, :2]], axis=1)


def test_bridge_learns_a_known_mapping_of_bits():
    x, x_test = _bits(1200, 6, 0), _bits(300, 6, 1)
    rows, val = bridge.validation_split(len(x), 0.1, seed=0)
    assert len(val) == 120 and not set(rows) & set(val) and len(rows) + len(val) == 1200
    model = bridge.Bridge((32, 32), 8)
    result = bridge.fit(model, x[rows], _known_mapping(x[rows]), x[val],
                        _known_mapping(x[val]), max_epochs=8, patience=3, **SMALL)
    assert result.best_val_accuracy > 0.99
    predicted = bridge.map_bits(model, result.variables, x_test)
    assert set(np.unique(predicted)) <= {0.0, 1.0} and predicted.shape == (300, 8)
    assert bridge.bit_accuracy(predicted, _known_mapping(x_test)) > 0.99
    assert abs(bridge.chance_accuracy(_known_mapping(x), _known_mapping(x_test)) - 0.5) < 0.1


def test_bridge_on_unrelated_bits_stays_near_chance():
    """Independent targets with biased bits: nothing to learn beyond each bit's majority."""
    p = np.array([0.9, 0.1, 0.7, 0.5, 0.8])
    y = (np.random.default_rng(2).random((1300, 5)) < p).astype(np.float32)
    x = _bits(1300, 6, 3)
    model = bridge.Bridge((32,), 5)
    result = bridge.fit(model, x[:1000], y[:1000], x[1000:1100], y[1000:1100], max_epochs=6,
                        patience=6, **SMALL)
    accuracy = bridge.bit_accuracy(bridge.map_bits(model, result.variables, x[1100:]), y[1100:])
    chance = bridge.chance_accuracy(y[:1000], y[1100:])
    assert 0.65 < chance < 0.85 and abs(accuracy - chance) < 0.05, (accuracy, chance)


def test_early_stopping_keeps_the_best_validation_weights():
    """Validation pairs whose targets are the negation of the learned mapping: the more the
    bridge learns, the worse it validates, so the best epoch is the first and training stops
    `patience` epochs after it, returning the first epoch's weights."""
    x = _bits(800, 6, 4)
    model = bridge.Bridge((32,), 8)
    result = bridge.fit(model, x[:700], _known_mapping(x[:700]), x[700:],
                        1.0 - _known_mapping(x[700:]), max_epochs=20, patience=3, **SMALL)
    val = [h["val_accuracy"] for h in result.history]
    assert result.best_epoch == 1 and len(val) == 4 and result.stopped_early
    assert result.best_val_accuracy == max(val) > val[-1]
    kept = bridge.map_bits(model, result.variables, x[700:])
    assert bridge.bit_accuracy(kept, 1.0 - _known_mapping(x[700:])) == val[0]


def test_batchnorm_uses_running_statistics_at_evaluation():
    x = _bits(256, 6, 5)
    model = bridge.Bridge((16, 16), 8)
    variables = bridge.fit(model, x[:200], _known_mapping(x[:200]), x[200:],
                           _known_mapping(x[200:]), max_epochs=2, patience=2, **SMALL).variables
    stats = variables["batch_stats"]["BatchNorm_0"]
    assert np.abs(np.asarray(stats["mean"])).max() > 0  # the running averages moved
    alone = np.asarray(bridge.predict_logits(model, variables, x[:1]))
    batch = np.asarray(bridge.predict_logits(model, variables, x[:50]))
    other = np.asarray(bridge.predict_logits(model, variables, np.concatenate([x[:1], x[100:149]])))
    np.testing.assert_allclose(batch[:1], alone, atol=1e-5)
    np.testing.assert_allclose(other[:1], alone, atol=1e-5)
    train_mode = model.apply(variables, x[:50], train=True, mutable=["batch_stats"])[0]
    assert np.abs(np.asarray(train_mode)[:1] - alone).max() > 1e-3  # batch statistics differ


def test_edges_dataset_pairs_row_by_row_with_fashion_mnist():
    from configs import fashion_mnist_edges
    edges = fashion_mnist_edges.get_config("tiny").data
    garments = mode_config().data
    a, b = data.load_split(edges, "test", 12), data.load_split(garments, "test", 12)
    np.testing.assert_array_equal(a["label"], b["label"])
    assert a["image"].shape == b["image"].shape == (12, 32, 32, 1)
    assert set(np.unique(a["image"])) == {-1.0, 1.0}  # binary edge maps
    on = a["image"] > 0
    assert 0.05 < on.mean() < 0.4 and not on[:, :1].any()  # edges of the garment, not the frame
    assert bridge.check_paired(edges, garments, "test") == 2000
    assert data.dataset_info(edges).name == "fashion_mnist_edges"


def _folder(path, names):
    os.makedirs(path)
    for name in names:
        images.save_png(os.path.join(path, name), np.zeros((32, 32, 1), np.uint8))
    config = mode_config()
    config.data.update(name="image_folder", image_dir=str(path), test_fraction=0.25)
    return config.data


def test_unpaired_data_is_refused_with_both_names_and_sizes(tmp_path):
    garments = mode_config().data
    four = _folder(tmp_path / "a", ["x1.png", "x2.png", "x3.png", "x4.png"])
    with pytest.raises(modes.ModeError, match=r"fashion_mnist and target image_folder .*"
                                              r"10000 and 3 examples"):
        bridge.check_paired(garments, four, "train")
    renamed = _folder(tmp_path / "b", ["y1.png", "y2.png", "y3.png", "y4.png"])
    with pytest.raises(modes.ModeError, match="differ at"):
        bridge.check_paired(four, renamed, "train")


def test_bad_options_are_refused_before_loading_anything(tmp_path):
    workdir = str(tmp_path / "target")
    config = mode_config()
    with pytest.raises(modes.ModeError, match="source_workdir is not set"):
        bridge.train_bridge_mode(config, workdir)
    config.modes.bridge.source_workdir = workdir + "/"
    with pytest.raises(modes.ModeError, match="is this .target. workdir"):
        bridge.train_bridge_mode(config, workdir)
    config.modes.bridge.source_workdir = str(tmp_path / "missing")
    for fraction in (0.0, 1.0):
        config.modes.bridge.validation_fraction = fraction
        with pytest.raises(modes.ModeError, match=r"validation_fraction.*\(0, 1\)"):
            bridge.train_bridge_mode(config, workdir)
    config.modes.bridge.validation_fraction = 0.1
    with pytest.raises(modes.ModeError, match="source_workdir=.*missing.*train first"):
        bridge.train_bridge_mode(config, workdir)
    os.makedirs(os.path.join(workdir, "bridge"))
    with pytest.raises(modes.ModeError, match="bridge exists; move it away"):
        bridge.train_bridge_mode(config, workdir)
    with pytest.raises(modes.ModeError, match="run --mode=train_bridge"):
        bridge.translate_mode(config, str(tmp_path / "other"))


# --- the modes on a tiny pair of models


def _source_config():
    from configs import fashion_mnist_edges
    config = fashion_mnist_edges.get_config("tiny")
    config.model.latent_dim = 6
    config.sampling.batch_size = 8
    config.training.update(num_steps=2, checkpoint_every=2)
    config.eval.at_end = False
    return config


@pytest.fixture(scope="module")
def source_workdir(tmp_path_factory):
    """A tiny edges model, |z| = 6, trained 2 steps."""
    from dmz_jax import train
    path = str(tmp_path_factory.mktemp("edges"))
    train.train_and_evaluate(_source_config(), path)
    return path


@pytest.fixture(scope="module")
def target_workdir(tiny_workdir, tmp_path_factory):
    """A copy of the shared tiny garments model (|z| = 8): the bridge is saved into it."""
    path = str(tmp_path_factory.mktemp("garments") / "w")
    shutil.copytree(os.path.join(tiny_workdir, "checkpoints"), os.path.join(path, "checkpoints"))
    return path


def _bridge_config(source):
    config = mode_config()
    config.modes.bridge.update(source_workdir=source, hidden=(16, 16), batch_size=32,
                               max_epochs=2, patience=2, train_examples=200, steps=2,
                               num_images=3, translate_examples=8)
    config.eval.update(probe_test_examples=40, fd_num_samples=16, probe_train_examples=64,
                       classifier_steps=5)
    return config


@pytest.mark.slow  # trains a tiny model
def test_train_bridge_then_translate(source_workdir, target_workdir, tmp_path):
    config = _bridge_config(source_workdir)
    config.modes.bridge.train_examples = 20_000
    with pytest.raises(modes.ModeError, match="train_examples=20000 > the 10000 training pairs"):
        bridge.train_bridge_mode(config, target_workdir)
    assert not os.path.exists(os.path.join(target_workdir, "train_bridge"))

    out = modes.MODES["train_bridge"](_bridge_config(source_workdir), target_workdir)
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["fit_pairs"] == 180 and m["validation_pairs"] == 20 and m["test_pairs"] == 40
    assert len(m["history"]) == m["epochs"] <= 2 and 1 <= m["best_epoch"] <= 2
    for key in ("val_bit_accuracy", "test_bit_accuracy", "chance_val_bit_accuracy",
                "chance_test_bit_accuracy", "test_exact_code_accuracy"):
        assert 0.0 <= m[key] <= 1.0, key
    assert (m["z_source"], m["z_target"]) == (6, 8)
    assert m["val_bit_accuracy"] == max(h["val_accuracy"] for h in m["history"])
    assert os.path.exists(os.path.join(out, "config.json"))
    _, variables, meta = bridge.load_bridge(os.path.join(target_workdir, "bridge"))
    assert meta["source_step"] == 2 and meta["hidden"] == [16, 16]
    assert variables["params"]["Dense_0"]["kernel"].shape == (6, 16)
    with pytest.raises(modes.ModeError, match="bridge exists"):
        bridge.train_bridge_mode(_bridge_config(source_workdir), target_workdir)

    out = modes.MODES["translate"](_bridge_config(None), target_workdir)  # source from the bridge
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["mse"] >= 0 and m["psnr"] > 0 and -1 <= m["ssim"] <= 1
    assert m["lpips"] is None and "offline" in m["lpips_note"]
    assert np.isfinite(m["fd"]) and m["fd_features"] == "classifier"
    assert m["num_translations"] == 8 and 0 <= m["code_bit_accuracy"] <= 1
    npz = np.load(os.path.join(out, "translations.npz"))
    assert npz["translations"].shape == (8, 32, 32, 1) and npz["translations"].dtype == np.uint8
    assert npz["bits"].shape == (8, 8)
    grid = images_png(os.path.join(out, "source_translation_target.png"))
    assert grid.shape == (3 * 34 + 2, 3 * 34 + 2, 1)

    other = str(tmp_path / "z8")  # a source model with |z| = 8, not the bridge's 6
    shutil.copytree(os.path.join(target_workdir, "checkpoints"), os.path.join(other, "checkpoints"))
    with pytest.raises(modes.ModeError, match=r"source model .* \|z\|=8 but the bridge"):
        bridge.translate_mode(_bridge_config(other), target_workdir)

    # a folder of source images, unpaired: translations, grid, FD; no paired metrics
    import tensorflow as tf
    folder = tmp_path / "edges"
    folder.mkdir()
    edges = data.load_split(_source_config().data, "test", 3)["image"]
    for i, image in enumerate(images.to_uint8(edges)):
        (folder / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
    config = _bridge_config(None)
    config.modes.bridge.source_dir = str(tmp_path / "missing")
    with pytest.raises(modes.ModeError, match="is not a folder"):
        bridge.translate_mode(config, target_workdir)
    config.modes.bridge.source_dir = str(folder)
    out = bridge.translate_mode(config, target_workdir)
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["paired"] is False and "psnr" not in m and m["num_translations"] == 3
    assert np.isfinite(m["fd"])
    npz = np.load(os.path.join(out, "translations.npz"))
    assert npz["translations"].shape == (3, 32, 32, 1)
    # the folder's images are the test edges: the same bits as translating the split
    paired = np.load(os.path.join(target_workdir, "translate", "translations.npz"))["bits"]
    assert sorted(map(tuple, npz["bits"])) == sorted(map(tuple, paired[:3]))  # any order
    assert images_png(os.path.join(out, "source_translation.png")).shape == (2 * 34 + 2,
                                                                             3 * 34 + 2, 1)


def images_png(path):
    import tensorflow as tf
    return tf.io.decode_png(tf.io.read_file(path)).numpy()
