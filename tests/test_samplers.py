"""Tests for dmz_jax.samplers with analytic "oracle" denoisers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmz_jax import diffusion as d
from dmz_jax import samplers as s

SHAPE = (2, 4, 4, 3)


@pytest.fixture(scope="module")
def base():
    return d.make_diffusion("cosine", 1000)


@pytest.fixture(scope="module")
def spaced(base):
    return base.respace(10)


@pytest.fixture(scope="module")
def target():
    """The single data point c [2, 4, 4, 3] (one per batch row), inside (-1, 1)."""
    return jax.random.uniform(jax.random.PRNGKey(42), SHAPE, minval=-0.8, maxval=0.8)


def _abar32(base):
    return jnp.asarray(base.alphas_cumprod64(), jnp.float32)


def point_oracle(base, c, variance="fixed_large", v=0.0):
    """Exact eps for data concentrated at c; looks up abar by the *original* timestep, so
    a wrong model_t (e.g. the respaced index) gives wrong samples."""
    abar = _abar32(base)

    def model(x_t, model_t):
        a = abar[model_t.astype(jnp.int32)][:, None, None, None]
        eps = (x_t - jnp.sqrt(a) * c) / jnp.sqrt(1 - a)
        learned = variance == "learned_range"
        return jnp.concatenate([eps, jnp.full_like(eps, v)], -1) if learned else eps

    return model


def gauss_oracle(base, mu, sd):
    """Exact eps for data x0 ~ N(mu, sd^2) iid per dimension:
    E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a sd^2 + 1 - a)."""
    abar = _abar32(base)

    def model(x_t, model_t):
        a = abar[model_t.astype(jnp.int32)][:, None, None, None]
        return jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * mu) / (a * sd ** 2 + 1 - a)

    return model


@pytest.mark.parametrize("variance,v", [("fixed_large", 0.0), ("fixed_small", 0.0),
                                        ("learned_range", 0.0), ("learned_range", -1.0)])
def test_ancestral_point_oracle(base, spaced, target, variance, v):
    model = point_oracle(base, target, variance, v)
    fn = jax.jit(lambda df, k: s.ancestral_sample(df, model, SHAPE, k, variance=variance))
    x = fn(spaced, jax.random.PRNGKey(0))
    assert x.shape == SHAPE and x.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(x), np.asarray(target), atol=1e-3)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_point_oracle(base, spaced, target, eta):
    model = point_oracle(base, target, variance="learned_range")
    x = jax.jit(lambda k: s.ddim_sample(spaced, model, SHAPE, k, variance="learned_range",
                                        eta=eta))(
        jax.random.PRNGKey(1))
    assert x.shape == SHAPE
    np.testing.assert_allclose(np.asarray(x), np.asarray(target), atol=1e-3)


def test_wrong_timesteps_break_the_oracle(base, spaced, target):
    """Feeding the respaced index (0..9) instead of the original timestep must show: the
    inverted x_T no longer equals the closed form of test_ddim_invert_point_oracle."""
    model = point_oracle(base, target)
    a0 = float(base.alphas_cumprod64()[0])
    want = np.asarray(target) * (1 - math.sqrt(a0)) / math.sqrt(1 - a0)
    good = s.ddim_invert(spaced, model, target, variance="fixed_large")
    np.testing.assert_allclose(np.asarray(good), want, atol=2e-4)
    bad = spaced.replace(model_timesteps=jnp.arange(10, dtype=jnp.float32))
    x_T = s.ddim_invert(bad, model, target, variance="fixed_large")
    assert float(jnp.abs(x_T - want).max()) > 0.05


def test_ddim_invert_point_oracle(base, spaced, target):
    """Inverting x0 = c keeps eps constant along the path, so x_T is the eps the oracle gives
    for x = c at step 0: c (1 - sqrt(abar_0)) / sqrt(1 - abar_0); sampling x_T returns c."""
    model = point_oracle(base, target, variance="learned_range", v=0.5)
    x_T = jax.jit(lambda x0: s.ddim_invert(spaced, model, x0, variance="learned_range"))(target)
    a0 = float(base.alphas_cumprod64()[0])
    want = np.asarray(target) * (1 - math.sqrt(a0)) / math.sqrt(1 - a0)
    np.testing.assert_allclose(np.asarray(x_T), want, atol=2e-4)
    x0 = s.ddim_sample(spaced, model, SHAPE, None, variance="learned_range", x_T=x_T)
    np.testing.assert_allclose(np.asarray(x0), np.asarray(target), atol=1e-3)


def test_ddim_invert_reconstructs_gaussian_data(base):
    """With the exact eps of Gaussian data the DDIM ODE is a bijection: 1000-step inversion
    then sampling recovers distinct x0 values; a random x_T does not."""
    model = gauss_oracle(base, 0.1, 0.5)
    x0 = jnp.linspace(-0.9, 0.9, 16).reshape(16, 1, 1, 1)

    @jax.jit
    def roundtrip(x0):
        x_T = s.ddim_invert(base, model, x0, variance="fixed_large", clip_denoised=False)
        return x_T, s.ddim_sample(base, model, x0.shape, None, variance="fixed_large",
                                  clip_denoised=False, x_T=x_T)

    x_T, rec = roundtrip(x0)
    np.testing.assert_allclose(np.asarray(rec), np.asarray(x0), atol=1e-2)
    # x_T is the standardised x0 (monotone map), not noise.
    assert np.all(np.diff(np.asarray(x_T).ravel()) > 0)
    np.testing.assert_allclose(np.asarray(x_T).ravel(), (np.asarray(x0).ravel() - 0.1) / 0.5,
                               atol=3e-2)
    other = s.ddim_sample(base, model, x0.shape, jax.random.PRNGKey(0), variance="fixed_large",
                          clip_denoised=False)
    assert float(jnp.abs(other - x0).max()) > 0.3


@pytest.mark.parametrize("method,eta", [("ancestral", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_samplers_match_gaussian_data_statistics(base, method, eta):
    """1000-step samplers with the exact eps of N(0.1, 0.5^2) data reproduce its moments."""
    model = gauss_oracle(base, 0.1, 0.5)
    x = jax.jit(lambda k: s.sample(base, model, (4000, 1, 1, 1), k, method=method,
                                   num_steps=1000, variance="fixed_large", eta=eta,
                                   clip_denoised=False))(jax.random.PRNGKey(1))
    assert abs(float(x.mean()) - 0.1) < 0.03
    assert abs(float(x.std()) - 0.5) < 0.03


def test_sample_dispatch_and_respacing(base, target):
    model = point_oracle(base, target, variance="learned_range")
    for method in ("ancestral", "ddim"):
        x = jax.jit(lambda df, k: s.sample(df, model, SHAPE, k, method=method, num_steps=5,
                                           variance="learned_range"))(
            base, jax.random.PRNGKey(3))
        assert x.shape == SHAPE
        np.testing.assert_allclose(np.asarray(x), np.asarray(target), atol=1e-3)
    with pytest.raises(ValueError, match="ancestral"):
        s.sample(base, model, SHAPE, jax.random.PRNGKey(0), method="euler", num_steps=5,
                 variance="learned_range")


def test_ddim_without_rng_needs_x_T(spaced, base, target):
    with pytest.raises(ValueError):
        s.ddim_sample(spaced, point_oracle(base, target), SHAPE, None, variance="fixed_large")


def test_model_traced_once_per_sampler(spaced, target, base):
    calls = []
    oracle = point_oracle(base, target)

    def model(x_t, model_t):
        calls.append(x_t.shape)
        return oracle(x_t, model_t)

    jax.jit(lambda k: s.ancestral_sample(spaced, model, SHAPE, k, variance="fixed_large"))(
        jax.random.PRNGKey(0))
    assert calls == [SHAPE]


def test_step_functions_at_t0_add_no_noise(spaced):
    x = jnp.full((2, 1, 1, 1), 0.3)
    eps = jnp.zeros_like(x)
    t = jnp.array([0, 0])
    big = jnp.full_like(x, 100.0)
    a = s.ancestral_step(spaced, eps, x, t, big, True, "fixed_large")["sample"]
    b = s.ddim_step(spaced, eps, x, t, big, True, "fixed_large", eta=1.0)["sample"]
    # At t = 0 with eps = 0: pred_x0 = x / sqrt(abar_0), and the step returns it (coef2 = 0).
    want = 0.3 / math.sqrt(float(spaced.alphas_cumprod64()[0]))
    np.testing.assert_allclose(np.asarray(a), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(b), want, rtol=1e-5)
    # At t > 0 the noise enters with std exp(log_var / 2) (ancestral) or sigma (DDIM).
    t1 = jnp.array([4, 4])
    a1 = s.ancestral_step(spaced, eps, x, t1, big, False, "fixed_large")["sample"]
    a0 = s.ancestral_step(spaced, eps, x, t1, jnp.zeros_like(x), False, "fixed_large")["sample"]
    beta4 = float(spaced.betas64.value[4])
    np.testing.assert_allclose(np.asarray(a1 - a0), 100 * math.sqrt(beta4), rtol=1e-4)
    abar = spaced.alphas_cumprod64()
    # fixed_small: the posterior variance beta~_4 = beta_4 (1 - abar_3) / (1 - abar_4)
    small = [s.ancestral_step(spaced, eps, x, t1, n, False, "fixed_small")["sample"]
             for n in (big, jnp.zeros_like(x))]
    np.testing.assert_allclose(np.asarray(small[0] - small[1]),
                               100 * math.sqrt(beta4 * (1 - abar[3]) / (1 - abar[4])), rtol=1e-4)
    np.testing.assert_array_equal(small[1], a0)  # the same mean
    sigma = math.sqrt((1 - abar[3]) / (1 - abar[4]) * (1 - abar[4] / abar[3]))
    b1 = s.ddim_step(spaced, eps, x, t1, big, False, "fixed_large", eta=1.0)["sample"]
    b0 = s.ddim_step(spaced, eps, x, t1, jnp.zeros_like(x), False, "fixed_large", eta=1.0)["sample"]
    np.testing.assert_allclose(np.asarray(b1 - b0), 100 * sigma, rtol=1e-4)


def test_ddim_steps_rederive_eps_from_clipped_x0(spaced):
    """With clipping active, DDIM uses eps re-derived from the clipped pred_x0, not raw eps."""
    x = jnp.full((1, 1, 1, 1), 3.0)
    eps = jnp.full_like(x, -0.5)
    t = jnp.array([5])
    abar = spaced.alphas_cumprod64()
    eps_hat = (3.0 / math.sqrt(abar[5]) - 1.0) / math.sqrt(1 / abar[5] - 1)  # pred_x0 -> 1
    fwd = s.ddim_step(spaced, eps, x, t, jnp.zeros_like(x), True, "fixed_large")
    assert float(fwd["pred_x0"][0, 0, 0, 0]) == 1.0
    assert float(fwd["sample"][0, 0, 0, 0]) == pytest.approx(
        math.sqrt(abar[4]) + math.sqrt(1 - abar[4]) * eps_hat, rel=1e-5)
    rev = s.ddim_reverse_step(spaced, eps, x, t, True, "fixed_large")
    assert float(rev["sample"][0, 0, 0, 0]) == pytest.approx(
        math.sqrt(abar[6]) + math.sqrt(1 - abar[6]) * eps_hat, rel=1e-5)
