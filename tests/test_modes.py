"""Using a trained DMZ: the Python API and every --mode on a tiny workdir, and bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, mode_config
from dmz_jax import api, checkpointing, data, evaluate, modes, sharding
from dmz_jax.model import DMZ



@pytest.fixture(scope="module")
def workdir(tiny_workdir):
    return tiny_workdir


@pytest.fixture(scope="module")
def model(workdir):
    return api.load(workdir, config=mode_config())


@pytest.mark.slow  # trains a tiny model
def test_load_gives_the_ema_parameters_of_the_newest_checkpoint(workdir, model):
    assert model.step == 4
    with checkpointing.create_manager(workdir, 3) as manager:
        assert manager.latest_step() == 4
    raw = api.load(workdir, config=mode_config(), ema=False)
    leaves = zip(jax.tree.leaves(model.params), jax.tree.leaves(raw.params))
    assert any(not np.array_equal(a, b) for a, b in leaves)  # EMA differs from the raw params
    older = api.load(workdir, config=mode_config(), checkpoint=2)
    assert older.step == 2
    assert api.load(workdir).config.model.latent_dim == 8  # the checkpoint's own config


@pytest.mark.slow
def test_encode_decode_shapes_and_exact_bits(model):
    x = data.load_split(model.config.data, "test", 10)["image"]
    z = model.encode(x)
    assert z.shape == (10, 8) and set(np.unique(z)) <= {0.0, 1.0}
    p = model.encode_probabilities(x)
    np.testing.assert_array_equal(z, (p > 0.5).astype(np.float32))
    images = model.decode(z, steps=2)
    assert images.shape == (10, 32, 32, 1)
    # one DDIM step (K = 1 keeps t = 0, and abar_prev = 1) from x_T = x is the clipped x0
    # prediction, by hand: x / sqrt(abar_0) - sqrt(1 / abar_0 - 1) eps(x, 0, z)
    abar = 1.0 - model.diff.betas64.value[0]
    denoise = jax.jit(lambda p, x, t, z: model.model.apply({"params": p}, x, t, z,
                                                             method=DMZ.denoise))
    eps = denoise(model.params, x, np.zeros(10, np.float32), z)[..., :1]  # one compile
    want = np.clip(x / np.sqrt(abar) - np.sqrt(1.0 / abar - 1.0) * np.asarray(eps), -1, 1)
    one_step = model.decode(z, x, steps=1, method="ddim", eta=0.0)
    np.testing.assert_allclose(one_step, want, atol=2e-5)
    assert np.abs(one_step - x).mean() > 1e-3  # eps(z) moved it: not the input passed through
    # the same z and x_T decode deterministically with DDIM
    _, x_T = model.invert(x[:3], steps=5)
    a = model.decode(z[:3], x_T, steps=5, method="ddim", eta=0.0)
    b = model.decode(z[:3], x_T, steps=5, method="ddim", eta=0.0)
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sampling_is_split_over_the_devices_and_compiled_once_per_K(model):
    """3 rows and 19 rows (3 batches of 8, the last padded) at K=2: one executable, whose
    output is split over the 8 devices; another K is a second executable."""
    s = model.config.sampling
    decode_fn = lambda k: model._decode_fn(k, s.method, float(s.eta), False,  # noqa: E731
                                           bool(s.clip_denoised))
    assert model.sample(3, steps=2).shape == (3, 32, 32, 1)
    many = model.sample(19, steps=2, seed=1)
    assert many.shape == (19, 32, 32, 1) and np.all(np.isfinite(many))
    fn = decode_fn(2)
    split = sharding.batch_sharding(model.mesh)
    batch = {"z": jax.device_put(np.zeros((8, 8), np.float32), split),
             "key": jax.device_put(np.zeros((8, 2), np.uint32), split)}  # a key per row
    out = fn(model.variables, batch)
    assert len(out.sharding.device_set) == 8 and out.sharding.shard_shape(out.shape)[0] == 1
    assert fn._cache_size() == 1
    model.sample(2, steps=3)
    assert decode_fn(3)._cache_size() == 1 and fn._cache_size() == 1


@pytest.mark.slow
def test_priors_and_interpolation_paths(model, tmp_path):
    z = model.prior_sample(500, "bernoulli")
    assert set(np.unique(z)) == {0.0, 1.0} and abs(z.mean() - 0.5) < 0.05
    empirical = model.prior_sample(2000, "empirical", seed=1).mean(0)
    np.testing.assert_allclose(empirical, model.training_codes().mean(0), atol=0.05)
    without_prior = model.with_params(model.params)
    without_prior.workdir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="train_prior"):
        without_prior.prior_sample(2, "learned")
    # the bit path flips exactly the differing bits, least confident first
    za, zb = np.array([[0., 0., 1., 1.]]), np.array([[1., 0., 0., 1.]])
    pa = np.array([[0.45, 0.1, 0.9, 0.8]])  # bit 0 is the least confident
    path = api._bit_path(za, zb, pa, 3)
    np.testing.assert_array_equal(path[0], za)
    np.testing.assert_array_equal(path[1], [[1., 0., 1., 1.]])
    np.testing.assert_array_equal(path[2], zb)
    # slerp keeps the ends and the norm of orthogonal unit noises
    a, b = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    np.testing.assert_allclose(api._slerp(a, b, 0.5), [[2 ** -0.5, 2 ** -0.5]], rtol=1e-6)
    np.testing.assert_allclose(api._slerp(a, b, 0.0), a, atol=1e-7)


# the analysis modes have their own files: test_bit_meaning.py, test_mutual_information.py,
# test_bridge.py
BASIC_MODES = ("sample", "encode", "reconstruct", "interpolate", "manipulate", "train_prior")


def test_every_mode_is_tested():
    own_files = {"bits", "mutual_information", "train_bridge", "translate"}
    assert set(modes.MODES) == set(BASIC_MODES) | own_files


@pytest.mark.slow
@pytest.mark.parametrize("mode", BASIC_MODES + ("evaluate",))
def test_each_mode_writes_its_outputs(mode, workdir):
    config = mode_config()
    config.modes.label = "Trouser"
    run = evaluate.run_evaluation if mode == "evaluate" else modes.MODES[mode]
    if mode == "evaluate" and not os.path.exists(os.path.join(workdir, "prior")):
        modes.train_prior(mode_config(), workdir)  # then FD is reported for it too
    out = run(config, workdir)
    files = set(os.listdir(out))
    want = {"sample": {"bernoulli_ancestral_K2.png", "bernoulli_ancestral_K5.npz"},
            "encode": {"codes.npz"}, "reconstruct": {"metrics.json"},
            "interpolate": {"bits_slerp_K5.png"}, "manipulate": {"Trouser_K5.png"},
            "train_prior": {"metrics.json"}, "evaluate": {"metrics.json"}}[mode]
    assert want <= files, files
    if mode == "encode":
        codes = np.load(os.path.join(out, "codes.npz"))
        assert codes["bits"].shape == (2000, 8) and codes["labels"].shape == (2000,)
    if mode == "sample":
        assert np.load(os.path.join(out, "bernoulli_ancestral_K5.npz"))["images"].dtype == np.uint8
    if mode == "train_prior":
        m = json.load(open(os.path.join(out, "metrics.json")))
        assert m["bernoulli_bits_per_code"] == 8.0
        assert m["learned_bits_per_code"] < 8.0  # the codes are not uniform
    if mode == "evaluate":
        m = json.load(open(os.path.join(out, "metrics.json")))
        assert m["fd_features"] == "classifier" and m["step"] == 4
        assert m["fd_num_samples"] == 32 and m["fd_K2"] > 0 and m["fd_learned_K2"] > 0
        # the numbers are those of the model on the configured examples, recomputed here
        model = api.load(workdir, config=config)
        test = data.load_split(config.data, "test")["image"]
        codes = model.encode(test[:config.eval.probe_test_examples])  # 100 codes
        p = np.clip(codes.mean(0), 1e-6, 1 - 1e-6)
        kl = 8 - np.sum(-p * np.log2(p) - (1 - p) * np.log2(1 - p))  # n - sum_i H(p_i)
        assert abs(m["prior_fit"]["kl_factorised_bits"] - kl) < 1e-6
        np.testing.assert_allclose(m["prior_fit"]["bit_means_test"], p, atol=5e-5)
        x = test[:8]
        assert abs(m["nll_bpd"] - float(model.nll_bpd(x).mean())) < 1e-4
        from dmz_jax.metrics import image_quality as iq
        inverted = float(np.mean(iq.psnr(x, model.reconstruct(x, steps=5))))
        assert abs(m["recon_inverted_psnr"] - inverted) < 1e-3
        assert m["recon_inverted_psnr"] > m["recon_z_only_psnr"] + 3  # x_T carries the rest
        assert 0 < m["recon_z_only_ssim"] < m["recon_inverted_ssim"]
        # chance is 0.1; the tiny model's centred bits carry the class well above it
        assert m["probe_accuracy"] > 0.18 and m["probe_accuracy_at_init"] > 0.18
    if mode == "encode":  # a rerun writes a new folder; nothing is overwritten
        assert run(config, workdir).endswith("encode.1")


@pytest.mark.slow
def test_bad_input_is_refused_before_compiling(workdir, tmp_path):
    with pytest.raises(api.NoCheckpointError, match="train first"):
        api.load(str(tmp_path))
    with pytest.raises(api.NoCheckpointError, match="steps there"):
        api.load(workdir, checkpoint=3)
    other = mode_config()
    other.model.latent_dim = 16
    with pytest.raises(checkpointing.ConfigMismatchError, match="latent_dim"):
        api.load(workdir, config=other)
    config = mode_config()
    config.modes.label = "Sneakers"
    with pytest.raises(modes.ModeError, match="Sneaker"):
        modes.manipulate(config, workdir)
    config.data.name = "image_folder"
    with pytest.raises(modes.ModeError, match="no named labels"):
        modes.label_names(config)


def test_prior_fit_on_codes_with_known_answers():
    rng = np.random.default_rng(0)
    uniform = rng.integers(0, 2, (4000, 6)).astype(np.float32)
    fit = evaluate.prior_fit(uniform, uniform, rng, neighbour_bits=0)
    assert fit["kl_factorised_bits"] < 0.01  # Bernoulli(0.5) bits
    assert fit["near_fraction_within_0_bits"] == 1.0  # all 64 codes occur
    constant = np.zeros((100, 6), np.float32)
    fit = evaluate.prior_fit(constant, constant, rng, neighbour_bits=1)
    assert fit["kl_factorised_bits"] > 5.9 and fit["distinct_codes_test"] == 1
    # P(a uniform 6-bit sample has at most 1 one) = 7 / 64
    assert abs(fit["near_fraction_within_1_bits"] - 7 / 64) < 0.03


@pytest.mark.slow  # a subprocess
def test_command_line_mode_on_an_empty_workdir_says_what_to_do(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "dmz_jax.main",
                           f"--config={ROOT}/configs/fashion_mnist.py:tiny",
                           f"--workdir={tmp_path}", "--mode=sample"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "train first" in proc.stderr
    assert not os.path.exists(os.path.join(tmp_path, "sample"))


@pytest.mark.slow
def test_inversion_round_trip_beats_the_code_alone(model):
    from dmz_jax.metrics import image_quality as iq
    x = data.load_split(model.config.data, "test", 8)["image"]
    inverted = model.reconstruct(x, steps=20, inverted=True)
    z_only = model.reconstruct(x, steps=20, inverted=False)
    # measured on the 4-step tiny model: 14.3 dB against 4.8 dB (41.6 dB at K=100 on the
    # README's trained model); x_T carries what z does not
    assert float(np.mean(iq.psnr(x, inverted))) > float(np.mean(iq.psnr(x, z_only))) + 5.0


def _png_rows(path, num_rows, height=32, pad=2):
    """The rows of a grid PNG written by the modes: [num_rows, columns, H, W, C] uint8."""
    import tensorflow as tf
    grid = tf.io.decode_png(tf.io.read_file(path)).numpy()
    columns = (grid.shape[1] - pad) // (height + pad)
    return np.stack([[grid[pad + r * (height + pad):pad + r * (height + pad) + height,
                           pad + c * (height + pad):pad + c * (height + pad) + height]
                      for c in range(columns)] for r in range(num_rows)])


@pytest.mark.slow
def test_manipulate_at_scale_zero_is_the_inverted_reconstruction(workdir):
    config = mode_config()
    config.modes.update(label="Trouser", scales=(-1.0, 0.0, 1.0))
    edited = _png_rows(os.path.join(modes.manipulate(config, workdir), "Trouser_K5.png"), 4)
    recon = _png_rows(os.path.join(modes.reconstruct(config, workdir),
                                   "input_zonly_inverted_K5.png"), 3)
    np.testing.assert_array_equal(edited[0], recon[0])  # the inputs
    np.testing.assert_array_equal(edited[2], recon[2])  # scale 0 = z and x_T unchanged
    assert not np.array_equal(edited[1], edited[3])  # the direction changes the images
    config.modes.bits = (0, 3)  # flipping named bits: one row each, no label needed
    config.modes.label = None
    flipped = _png_rows(os.path.join(modes.manipulate(config, workdir), "bits_K5.png"), 3)
    np.testing.assert_array_equal(flipped[0], recon[0])
    assert not np.array_equal(flipped[1], recon[2])
    config.modes.bits = (8,)
    with pytest.raises(modes.ModeError, match="not in 0..7"):
        modes.manipulate(config, workdir)


def test_empirical_prior_of_a_gaussian_latent_is_a_normal_per_dimension(monkeypatch):
    """Gaussian codes: the empirical prior draws N(mean, std) per dimension of the training
    codes (it drew Bernoulli bits from real-valued means before)."""
    from dmz_jax.model import create_model
    from dmz_jax.train_state import make_diffusion
    config = mode_config()
    config.model.latent_type = "gaussian"
    model = api.Model(config, create_model(config), make_diffusion(config), None, 0, None,
                      sharding.create_mesh(1, 1, jax.devices()[:1]))
    codes = np.random.default_rng(0).normal([3.0, -1.0] * 4, [0.5, 2.0] * 4, (4000, 8))
    monkeypatch.setattr(model, "training_codes", lambda: codes)
    z = model.prior_sample(20_000, "empirical", seed=3)
    assert z.shape == (20_000, 8) and len(np.unique(z)) > 1000  # real values, not bits
    np.testing.assert_allclose(z.mean(0), codes.mean(0), atol=0.05)
    np.testing.assert_allclose(z.std(0), codes.std(0), rtol=0.03)
