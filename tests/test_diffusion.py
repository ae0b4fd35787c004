"""Tests for dmz_jax.diffusion against hand-computed / independently derived values."""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmz_jax import diffusion as d

LN2 = math.log(2.0)


def _phi(x):
    """Exact standard normal CDF."""
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


@pytest.fixture(scope="module")
def cos1000():
    return d.make_diffusion("cosine", 1000)


@pytest.fixture(scope="module")
def cos20():
    return d.make_diffusion("cosine", 20)


# ---------------------------------------------------------------------------------- schedules

def test_cosine_betas_by_hand_T4():
    def abar(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    expected = [min(1 - abar((i + 1) / 4) / abar(i / 4), 0.999) for i in range(4)]
    got = d.cosine_betas(4)
    assert got.dtype == np.float64 and got.shape == (4,)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # The last step has abar(1) = cos^2(pi/2) ~ 0, so it is clipped.
    assert got[-1] == 0.999
    np.testing.assert_allclose(got[0], 1 - math.cos(0.258 / 1.008 * math.pi / 2) ** 2
                               / math.cos(0.008 / 1.008 * math.pi / 2) ** 2, rtol=1e-12)


def test_linear_betas_by_hand():
    got = d.linear_betas(4)
    np.testing.assert_allclose(got, [0.025, 0.025 + 4.975 / 3, 0.025 + 2 * 4.975 / 3, 5.0],
                               rtol=1e-12)
    b = d.linear_betas(1000)
    assert b.dtype == np.float64
    assert b[0] == pytest.approx(1e-4, rel=1e-12) and b[-1] == pytest.approx(0.02, rel=1e-12)
    np.testing.assert_allclose(np.diff(b), (0.02 - 1e-4) / 999, rtol=1e-9)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_abar_monotone(schedule):
    abar = np.cumprod(1 - d.make_betas(schedule, 1000))
    assert np.all(np.diff(abar) < 0) and abar[0] < 1 and abar[-1] > 0


def test_cosine_clipping_only_at_the_end():
    b = d.cosine_betas(1000)
    assert b[-1] == 0.999
    assert np.all(b[:-1] < 0.999)
    assert b[-2] == pytest.approx(0.75, abs=1e-3)  # 1 - abar(999/1000)/abar(998/1000)


def test_make_betas_unknown():
    with pytest.raises(ValueError, match="cosine.*linear"):
        d.make_betas("quadratic", 10)


def test_diffusion_constants_match_numpy(cos20):
    b = d.cosine_betas(20)
    abar = np.cumprod(1 - b)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    pv = b * (1 - abar_prev) / (1 - abar)
    expect = dict(
        betas=b, alphas_cumprod=abar, alphas_cumprod_prev=abar_prev,
        alphas_cumprod_next=np.concatenate([abar[1:], [0.0]]),
        sqrt_alphas_cumprod=np.sqrt(abar), sqrt_one_minus_alphas_cumprod=np.sqrt(1 - abar),
        sqrt_recip_alphas_cumprod=1 / np.sqrt(abar),
        sqrt_recipm1_alphas_cumprod=np.sqrt((1 - abar) / abar), posterior_variance=pv,
        posterior_mean_coef1=b * np.sqrt(abar_prev) / (1 - abar),
        posterior_mean_coef2=(1 - abar_prev) * np.sqrt(1 - b) / (1 - abar), log_betas=np.log(b),
        model_timesteps=np.arange(20.0))
    for name, val in expect.items():
        arr = getattr(cos20, name)
        assert arr.dtype == jnp.float32 and arr.shape == (20,), name
        np.testing.assert_allclose(np.asarray(arr), val, rtol=2e-6, atol=1e-12, err_msg=name)
    assert cos20.num_timesteps == 20


def test_posterior_log_variance_clipped(cos20):
    plv = np.asarray(cos20.posterior_log_variance_clipped)
    assert plv[0] == plv[1]
    assert float(cos20.posterior_variance[0]) == 0.0
    np.testing.assert_allclose(plv[1:], np.log(np.asarray(cos20.posterior_variance[1:])),
                               rtol=1e-5)


def test_diffusion_is_pytree_with_static_T(cos20):
    leaves, treedef = jax.tree_util.tree_flatten(cos20)
    assert all(leaf.shape == (20,) for leaf in leaves)
    assert jax.tree_util.tree_unflatten(treedef, leaves).num_timesteps == 20
    assert jax.jit(lambda df: df.betas.sum() * df.num_timesteps)(cos20) == pytest.approx(
        float(np.sum(d.cosine_betas(20))) * 20, rel=1e-5)


# ---------------------------------------------------------------------------------- respacing

def test_respaced_timesteps():
    assert list(d.respaced_timesteps(1000, 10)) == [0, 111, 222, 333, 444, 555, 666, 777, 888,
                                                    999]
    assert list(d.respaced_timesteps(1000, 1)) == [0]
    assert list(d.respaced_timesteps(5, 5)) == [0, 1, 2, 3, 4]
    # I-DDPM accumulates the float stride (49.95 per step); here it gives 499 where
    # round(10 * 49.95) would give 500.
    steps = d.respaced_timesteps(1000, 21)
    assert len(steps) == 21 and steps[10] == 499 and steps[9] == 450
    with pytest.raises(ValueError):
        d.respaced_timesteps(10, 11)


def test_respaced_betas_keep_alphas_cumprod(cos1000):
    r = cos1000.respace(10)
    keep = d.respaced_timesteps(1000, 10)
    abar = np.cumprod(1 - d.cosine_betas(1000))
    # (cumprod of 1 - (1 - ratio) loses ~1e-9 relative where abar is ~1e-9)
    np.testing.assert_allclose(r.alphas_cumprod64(), abar[keep], rtol=1e-8)
    np.testing.assert_allclose(np.asarray(r.alphas_cumprod), abar[keep], rtol=1e-5)
    np.testing.assert_allclose(r.betas64.value[0], d.cosine_betas(1000)[0], rtol=1e-12)
    np.testing.assert_allclose(r.betas64.value[1], 1 - abar[111] / abar[0], rtol=1e-12)
    assert r.num_timesteps == 10 and r.original_num_timesteps == 1000
    np.testing.assert_array_equal(np.asarray(r.model_timesteps), keep.astype(np.float32))
    # Module-level respace from raw betas, with timestep rescaling.
    r2 = d.Diffusion.create(d.cosine_betas(1000), rescale_timesteps=True).respace(10)
    np.testing.assert_allclose(np.asarray(r2.model_timesteps), keep.astype(np.float32))
    r3 = d.Diffusion.create(d.linear_betas(500), rescale_timesteps=True).respace(5)
    np.testing.assert_allclose(np.asarray(r3.model_timesteps),
                               d.respaced_timesteps(500, 5) * 2.0)


def test_nested_respace_composes_timestep_map(cos1000):
    r = cos1000.respace(100).respace(10)
    inner = d.respaced_timesteps(1000, 100)
    np.testing.assert_array_equal(r.timestep_map.value, inner[d.respaced_timesteps(100, 10)])
    abar = np.cumprod(1 - d.cosine_betas(1000))
    np.testing.assert_allclose(r.alphas_cumprod64(), abar[r.timestep_map.value], rtol=1e-8)


# ---------------------------------------------------------------------------------- q and posterior

def test_extract_shape(cos20):
    out = d.extract(cos20.betas, jnp.array([0, 5, 19]), (3, 4, 4, 2))
    assert out.shape == (3, 1, 1, 1)
    np.testing.assert_allclose(np.asarray(out).ravel(), np.asarray(cos20.betas)[[0, 5, 19]])


def test_q_sample_closed_form(cos20):
    t = jnp.array([3, 12], jnp.int32)
    x0 = jnp.stack([jnp.full((2, 2, 1), 0.5), jnp.full((2, 2, 1), -0.3)])
    noise = jax.random.normal(jax.random.PRNGKey(0), (2, 20000, 1, 1))
    x0b = jnp.broadcast_to(x0[:, :1, :1], (2, 20000, 1, 1))
    xt = np.asarray(d.q_sample(cos20, x0b, t, noise))
    abar = np.cumprod(1 - d.cosine_betas(20))[[3, 12]]
    np.testing.assert_allclose(xt.mean(axis=(1, 2, 3)), np.sqrt(abar) * [0.5, -0.3], atol=0.02)
    np.testing.assert_allclose(xt.var(axis=(1, 2, 3)), 1 - abar, rtol=0.05)
    # Exact for given noise.
    np.testing.assert_allclose(
        xt[1, 7, 0, 0], np.sqrt(abar[1]) * -0.3 + np.sqrt(1 - abar[1]) * float(noise[1, 7, 0, 0]),
        rtol=1e-5)


def test_q_posterior_vs_gaussian_product(cos20):
    rng = np.random.default_rng(0)
    b = d.cosine_betas(20)
    abar = np.cumprod(1 - b)
    t = np.array([1, 7, 19])
    x0 = rng.uniform(-1, 1, (3, 2, 2, 3))
    xt = rng.normal(size=(3, 2, 2, 3))
    # q(x_{t-1}|x0) = N(sqrt(abar_{t-1}) x0, 1-abar_{t-1}); q(x_t|x_{t-1}) = N(sqrt(a_t) x, b_t)
    prec = 1 / (1 - abar[t - 1]) + (1 - b[t]) / b[t]
    var = 1 / prec
    mean = var[:, None, None, None] * (
        (np.sqrt(abar[t - 1]) / (1 - abar[t - 1]))[:, None, None, None] * x0
        + (np.sqrt(1 - b[t]) / b[t])[:, None, None, None] * xt)
    m, v, lv = d.q_posterior_mean_variance(cos20, jnp.asarray(x0, jnp.float32),
                                           jnp.asarray(xt, jnp.float32), jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(m), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(v).ravel(), var, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(lv).ravel(), np.log(var), rtol=1e-4)


def test_predict_x0_eps_roundtrip(cos20):
    x0 = jax.random.uniform(jax.random.PRNGKey(1), (2, 3, 3, 1), minval=-1, maxval=1)
    eps = jax.random.normal(jax.random.PRNGKey(2), x0.shape)
    t = jnp.array([2, 15])
    xt = d.q_sample(cos20, x0, t, eps)
    np.testing.assert_allclose(d.predict_x0_from_eps(cos20, xt, t, eps), x0, atol=1e-4)
    np.testing.assert_allclose(d.predict_eps_from_x0(cos20, xt, t, x0), eps, atol=1e-4)


# ---------------------------------------------------------------------------------- p(x_{t-1}|x_t)

def test_learned_range_variance_endpoints(cos20):
    b = d.cosine_betas(20)
    abar = np.cumprod(1 - b)
    pv = b[1:] * (1 - abar[:-1]) / (1 - abar[1:])
    x = jnp.zeros((3, 2, 2, 1))
    t = jnp.array([0, 4, 19])
    eps = jnp.zeros_like(x)
    for v, want in [(1.0, b[[0, 4, 19]]), (-1.0, [pv[0], pv[3], pv[18]])]:
        out = d.p_mean_variance(cos20, jnp.concatenate([eps, jnp.full_like(x, v)], -1), x, t,
                                variance="learned_range", clip_denoised=False)
        np.testing.assert_allclose(np.asarray(out["variance"])[:, 0, 0, 0], want, rtol=1e-5)
    out = d.p_mean_variance(cos20, jnp.concatenate([eps, jnp.zeros_like(x)], -1), x, t,
                            variance="learned_range", clip_denoised=False)
    np.testing.assert_allclose(np.asarray(out["log_variance"])[:, 0, 0, 0],
                               0.5 * np.log(b[[0, 4, 19]]) + 0.5 * np.log([pv[0], pv[3], pv[18]]),
                               rtol=1e-5)


def test_fixed_large_variance(cos20):
    b = d.cosine_betas(20)
    abar = np.cumprod(1 - b)
    pv1 = b[1] * (1 - abar[0]) / (1 - abar[1])
    x = jnp.zeros((3, 2, 2, 1))
    out = d.p_mean_variance(cos20, x, x, jnp.array([0, 1, 9]), variance="fixed_large",
                            clip_denoised=True)
    assert out["variance"].shape == x.shape
    np.testing.assert_allclose(np.asarray(out["variance"])[:, 0, 0, 0], [pv1, b[1], b[9]],
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["log_variance"])[:, 0, 0, 0],
                               np.log([pv1, b[1], b[9]]), rtol=1e-5)


def test_fixed_small_variance(cos20):
    """fixed_small: beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t) (0 at t = 0), its log
    clipped to log beta~_1 at t = 0."""
    b = d.cosine_betas(20)
    abar = np.cumprod(1 - b)
    abar_prev = np.append(1.0, abar[:-1])
    pv = b * (1 - abar_prev) / (1 - abar)
    t = [0, 1, 9, 19]
    x = jnp.zeros((4, 2, 2, 1))
    out = d.p_mean_variance(cos20, x, x, jnp.array(t), variance="fixed_small",
                            clip_denoised=False)
    assert out["variance"].shape == x.shape
    np.testing.assert_allclose(np.asarray(out["variance"])[:, 0, 0, 0], pv[t], rtol=1e-5,
                               atol=1e-12)
    assert float(out["variance"][0, 0, 0, 0]) == 0.0
    np.testing.assert_allclose(np.asarray(out["log_variance"])[:, 0, 0, 0],
                               np.log([pv[1], pv[1], pv[9], pv[19]]), rtol=1e-5)
    large = d.p_mean_variance(cos20, x, x, jnp.array(t), variance="fixed_large",
                              clip_denoised=False)
    np.testing.assert_allclose(large["mean"], out["mean"])  # only the variance differs
    assert np.all(np.asarray(large["variance"])[1:] > np.asarray(out["variance"])[1:])


def test_fixed_variance_vb_terms_use_the_fixed_variance(cos20):
    """With the exact eps, the posterior means agree, so each KL term (t > 0) is that of two
    Gaussians of the same mean: 0 for fixed_small (beta~_t), and
    0.5 (log(s_L / s_S) + s_S / s_L - 1) nats for fixed_large (s_L = beta_t, t >= 1)."""
    b = d.cosine_betas(20)
    abar = np.cumprod(1 - b)
    pv = b[1:] * (1 - abar[:-1]) / (1 - abar[1:])  # beta~_t for t >= 1
    t = np.array([1, 5, 10])
    x0 = jax.random.uniform(jax.random.PRNGKey(0), (3, 2, 2, 1), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)

    @jax.jit
    def both(t):
        xt = d.q_sample(cos20, x0, t, noise)
        return [d.vb_terms_bpd(cos20, noise, x0, xt, t, variance=v)
                for v in ("fixed_small", "fixed_large")]

    small, large = both(jnp.asarray(t))
    np.testing.assert_allclose(small, 0.0, atol=1e-4)
    ratio = pv[t - 1] / b[t]
    want = 0.5 * (-np.log(ratio) + ratio - 1) / LN2
    np.testing.assert_allclose(large, want, rtol=1e-3)
    assert np.all(want > 1e-3)


def test_input_perturbation_x_t_by_hand(cos20):
    """DDPM-IP: x_t = sqrt(abar) x0 + sqrt(1 - abar) (eps + gamma xi); the target stays eps
    (an exact eps gives mse 0); the vb term is the true posterior's at the perturbed x_t."""
    x0 = jnp.array([0.5, -0.25, 1.0, -1.0]).reshape(2, 1, 2, 1)
    noise = jnp.array([1.0, -2.0, 0.5, 0.0]).reshape(x0.shape)
    xi = jnp.array([2.0, 1.0, -1.0, 3.0]).reshape(x0.shape)
    t = jnp.array([3, 12])
    abar = np.cumprod(1 - d.cosine_betas(20))[[3, 12]][:, None, None, None]
    want = (np.sqrt(abar) * np.asarray(x0, np.float64)
            + np.sqrt(1 - abar) * (np.asarray(noise, np.float64) + 0.15 * np.asarray(xi)))
    # gamma 0: plain q_sample, bit for bit, and xi is not needed
    np.testing.assert_array_equal(d.perturbed_x_t(cos20, x0, t, noise, None, 0.0),
                                  d.q_sample(cos20, x0, t, noise))
    with pytest.raises(ValueError, match="xi"):
        d.perturbed_x_t(cos20, x0, t, noise, None, 0.15)

    @partial(jax.jit, static_argnums=0)
    def run(gamma):
        seen = {}

        def model(x_t, model_t):
            seen["x_t"] = x_t
            return jnp.concatenate([noise, jnp.full_like(x_t, 0.3)], -1)  # exact eps, v = 0.3

        losses = d.training_losses(cos20, model, x0, t, noise, variance="learned_range",
                                   input_perturbation=gamma, xi=xi)
        return d.perturbed_x_t(cos20, x0, t, noise, xi, gamma), seen["x_t"], losses

    x_t, seen_x_t, losses = run(0.15)
    np.testing.assert_allclose(x_t, want, rtol=1e-6)
    np.testing.assert_allclose(seen_x_t, want, rtol=1e-6)
    np.testing.assert_array_equal(losses["mse"], 0.0)
    want_vb = _independent_vb(np.asarray(x0, np.float64), want, np.asarray(t),
                              np.asarray(noise, np.float64), np.full(want.shape, 0.3))
    np.testing.assert_allclose(losses["vb"], want_vb, rtol=2e-3, atol=1e-4)
    assert not np.allclose(run(0.0)[2]["vb"], losses["vb"], rtol=1e-2)


def test_unknown_variance_is_refused(cos20):
    x = jnp.zeros((1, 2, 2, 1))
    for call in (lambda: d.p_mean_variance(cos20, x, x, jnp.array([1]), variance="learned",
                                           clip_denoised=True),
                 lambda: d.training_losses(cos20, lambda a, b: a, x, jnp.array([1]), x,
                                           variance="fixed")):
        with pytest.raises(ValueError, match="fixed_small"):
            call()


def test_config_check_variance_needs_matching_learn_sigma():
    from configs import fashion_mnist
    from dmz_jax.config_checks import ConfigError, check_config
    config = fashion_mnist.get_config("tiny")
    for variance, learn_sigma, says in [("learned_range", False, "set model.learn_sigma=True"),
                                        ("fixed_small", True, "set model.learn_sigma=False")]:
        config.diffusion.variance, config.model.learn_sigma = variance, learn_sigma
        with pytest.raises(ConfigError) as info:
            check_config(config, num_devices=1, process_count=1)
        assert [(p.key, p.kind) for p in info.value.problems] == [
            ("diffusion.variance", "choice")]
        assert says in info.value.problems[0].message
    for variance in ("fixed_small", "fixed_large"):
        config.diffusion.variance, config.model.learn_sigma = variance, False
        check_config(config, num_devices=1, process_count=1)
    config.diffusion.variance = "bogus"
    with pytest.raises(ConfigError, match="use one of"):
        check_config(config, num_devices=1, process_count=1)
    config.diffusion.variance, config.diffusion.input_perturbation = "fixed_large", -0.1
    with pytest.raises(ConfigError, match="diffusion.input_perturbation=-0.1: must be >= 0"):
        check_config(config, num_devices=1, process_count=1)


def test_clip_denoised_only_when_asked(cos20):
    x = jnp.full((1, 1, 1, 1), 3.0)
    eps = jnp.zeros_like(x)
    t = jnp.array([5])
    raw = d.p_mean_variance(cos20, eps, x, t, variance="fixed_large", clip_denoised=False)
    clipped = d.p_mean_variance(cos20, eps, x, t, variance="fixed_large", clip_denoised=True)
    abar = np.cumprod(1 - d.cosine_betas(20))[5]
    assert float(raw["pred_x0"][0, 0, 0, 0]) == pytest.approx(3.0 / math.sqrt(abar), rel=1e-5)
    assert float(clipped["pred_x0"][0, 0, 0, 0]) == 1.0
    m, _, _ = d.q_posterior_mean_variance(cos20, jnp.ones_like(x), x, t)
    np.testing.assert_allclose(clipped["mean"], m, rtol=1e-6)


def test_output_channel_checks(cos20):
    x = jnp.zeros((1, 2, 2, 3))
    with pytest.raises(ValueError):
        d.p_mean_variance(cos20, x, x, jnp.array([1]), variance="learned_range", clip_denoised=True)
    with pytest.raises(ValueError):
        d.p_mean_variance(cos20, jnp.zeros((1, 2, 2, 4)), x, jnp.array([1]), variance="fixed_large",
                          clip_denoised=True)


# ---------------------------------------------------------------------------------- likelihoods

def test_normal_kl_values():
    # KL(N(0,1) || N(1, e^2)) = log(e) + (1 + 1) / (2 e^2) - 1/2 = 1/2 + e^-2
    assert float(d.normal_kl(0.0, 0.0, 1.0, 2.0)) == pytest.approx(0.5 + math.exp(-2), rel=1e-6)
    # KL(N(2, 4) || N(0, 1)) = log(1/2) + (4 + 4)/2 - 1/2
    assert float(d.normal_kl(2.0, math.log(4.0), 0.0, 0.0)) == pytest.approx(
        math.log(0.5) + 4 - 0.5, rel=1e-6)
    m = jnp.array([-0.3, 0.0, 2.0])
    lv = jnp.array([-5.0, 0.0, 1.5])
    np.testing.assert_allclose(d.normal_kl(m, lv, m, lv), 0.0, atol=1e-7)


def test_approx_cdf_close_to_erf():
    xs = np.linspace(-4, 4, 81)
    got = np.asarray(d.approx_standard_normal_cdf(jnp.asarray(xs, jnp.float32)))
    np.testing.assert_allclose(got, [_phi(x) for x in xs], atol=2e-4)


@pytest.mark.parametrize("x,mean,log_scale", [
    (0.0, 0.01, math.log(0.05)),      # interior bin
    (50 / 255 * 2 - 1, -0.6, math.log(0.1)),
    (-1.0, -0.97, math.log(0.03)),    # left edge bin: (-inf, -1 + 1/255]
    (1.0, 0.99, math.log(0.02)),      # right edge bin: [1 - 1/255, inf)
])
def test_discretized_nll_vs_erf(x, mean, log_scale):
    s = math.exp(log_scale)
    hi = _phi((x + 1 / 255 - mean) / s) if x < 0.999 else 1.0
    lo = _phi((x - 1 / 255 - mean) / s) if x > -0.999 else 0.0
    got = float(d.discretized_gaussian_log_likelihood(jnp.float32(x), jnp.float32(mean),
                                                      jnp.float32(log_scale)))
    assert math.exp(got) == pytest.approx(hi - lo, abs=4e-4, rel=2e-2)


def test_discretized_probabilities_sum_to_one():
    levels = jnp.arange(256, dtype=jnp.float32) / 127.5 - 1.0
    for mean, ls in [(0.3, math.log(0.2)), (-0.95, math.log(0.01)), (0.0, 0.0)]:
        logp = d.discretized_gaussian_log_likelihood(levels, jnp.float32(mean), jnp.float32(ls))
        assert float(jnp.exp(logp).sum()) == pytest.approx(1.0, abs=1e-5)
    # I-DDPM's edge thresholds are +-0.999: -0.9995 already counts as the left edge bin.
    logp = d.discretized_gaussian_log_likelihood(jnp.float32(-0.9995), jnp.float32(-0.9995),
                                                 jnp.float32(math.log(0.1)))
    assert math.exp(float(logp)) == pytest.approx(_phi(1 / 255 / 0.1), abs=4e-4)
    # Far-away mean: probabilities are clamped at 1e-12, never -inf.
    logp = d.discretized_gaussian_log_likelihood(jnp.float32(-1.0), jnp.float32(1.0),
                                                 jnp.float32(math.log(1e-3)))
    assert float(logp) == pytest.approx(math.log(1e-12), rel=1e-5)


# ---------------------------------------------------------------------------------- losses

def _independent_vb(x0, xt, t, eps, v):
    """vb (bits/dim) for cosine T=20 computed from scratch in float64 numpy."""
    b = d.cosine_betas(20)
    abar = np.cumprod(1 - b)
    abar_prev = np.append(1.0, abar[:-1])
    pv = b * (1 - abar_prev) / (1 - abar)
    plv = np.log(np.append(pv[1], pv[1:]))
    c1 = b * np.sqrt(abar_prev) / (1 - abar)
    c2 = (1 - abar_prev) * np.sqrt(1 - b) / (1 - abar)
    out = []
    for i, ti in enumerate(t):
        px0 = (xt[i] - np.sqrt(1 - abar[ti]) * eps[i]) / np.sqrt(abar[ti])
        mean = c1[ti] * px0 + c2[ti] * xt[i]
        frac = (v[i] + 1) / 2
        logvar = frac * np.log(b[ti]) + (1 - frac) * plv[ti]
        if ti == 0:
            s = np.exp(0.5 * logvar)
            p = []
            for xv, mv, sv in zip(x0[i].ravel(), mean.ravel(), s.ravel()):
                hi = _phi((xv + 1 / 255 - mv) / sv) if xv < 0.999 else 1.0
                lo = _phi((xv - 1 / 255 - mv) / sv) if xv > -0.999 else 0.0
                p.append(hi - lo)
            out.append(-np.mean(np.log(p)) / LN2)
        else:
            tmean = c1[ti] * x0[i] + c2[ti] * xt[i]
            tvar = pv[ti]
            var = np.exp(logvar)
            kl = 0.5 * (np.log(var / tvar) + (tvar + (tmean - mean) ** 2) / var - 1)
            out.append(np.mean(kl) / LN2)
    return np.array(out)


def _fixed_output_model(output):
    return lambda x_t, model_t: output


@partial(jax.jit, static_argnames=("variance", "gamma"))
def _losses(diff, output, x0, t, noise, variance, gamma=0.0, xi=None):
    """training_losses for a model that returns the fixed `output` (jitted: fast tests)."""
    return d.training_losses(diff, _fixed_output_model(output), x0, t, noise,
                             variance=variance, input_perturbation=gamma, xi=xi)


def test_training_losses_true_noise_gives_zero_mse(cos20):
    x0 = jax.random.uniform(jax.random.PRNGKey(0), (3, 4, 4, 2), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
    t = jnp.array([0, 6, 19])
    for variance, out in [("fixed_large", noise), ("fixed_small", noise),
                          ("learned_range", jnp.concatenate([noise, jnp.zeros_like(noise)], -1))]:
        losses = _losses(cos20, out, x0, t, noise, variance=variance)
        np.testing.assert_allclose(losses["mse"], 0.0, atol=1e-12)
        assert losses["loss"].shape == (3,)
    plain = _losses(cos20, noise * 0.5, x0, t, noise, variance="fixed_large")
    np.testing.assert_allclose(plain["mse"], np.mean(np.asarray(noise * 0.5) ** 2,
                                                     axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_array_equal(plain["vb"], 0.0)
    np.testing.assert_array_equal(plain["loss"], plain["mse"])


def test_training_losses_model_sees_original_timesteps(cos1000):
    r = cos1000.respace(10)
    seen = {}

    def model(x_t, model_t):
        seen["t"] = model_t
        return jnp.zeros_like(x_t)

    x0 = jnp.zeros((2, 2, 2, 1))
    d.training_losses(r, model, x0, jnp.array([3, 9]), x0, variance="fixed_large")
    np.testing.assert_array_equal(np.asarray(seen["t"]), [333.0, 999.0])


def test_vb_matches_independent_computation(cos20):
    rng = np.random.default_rng(3)
    x0 = (rng.integers(0, 256, (4, 3, 3, 2)) / 127.5 - 1).astype(np.float32)  # 8-bit grid
    x0[0, 0, 0, 0], x0[0, 0, 0, 1] = -1.0, 1.0  # both edge bins at t = 0
    noise = rng.normal(size=x0.shape).astype(np.float32)
    eps = (noise + 0.3 * rng.normal(size=x0.shape)).astype(np.float32)
    v = rng.uniform(-1, 1, x0.shape).astype(np.float32)
    t = np.array([0, 1, 8, 19])
    out = jnp.concatenate([jnp.asarray(eps), jnp.asarray(v)], -1)
    losses = _losses(cos20, out, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise),
                     variance="learned_range")
    xt = np.asarray(d.q_sample(cos20, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise)),
                    np.float64)
    want = _independent_vb(x0.astype(np.float64), xt, t, eps.astype(np.float64),
                           v.astype(np.float64))
    np.testing.assert_allclose(np.asarray(losses["vb"]), want, rtol=2e-3, atol=1e-4)
    mse = np.mean((noise - eps) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(losses["mse"]), mse, rtol=1e-5)
    # RESCALED_MSE hybrid: loss = mse + vb * T / 1000.
    np.testing.assert_allclose(np.asarray(losses["loss"]), mse + want * 20 / 1000, rtol=1e-3)
    # The same vb from the public helper.
    vb = jax.jit(d.vb_terms_bpd)(cos20, out, jnp.asarray(x0), jnp.asarray(xt, jnp.float32),
                                 jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(vb), want, rtol=2e-3, atol=1e-4)


def test_vb_at_t0_is_decoder_nll(cos20):
    x0 = jnp.array([[[[0.2], [-1.0]], [[1.0], [-0.5]]]])  # [1, 2, 2, 1]
    noise = jnp.array([[[[0.3], [-0.7]], [[1.1], [0.05]]]])
    eps = noise * 0.8
    v = jnp.full_like(x0, 0.4)
    t = jnp.array([0])
    losses = _losses(cos20, jnp.concatenate([eps, v], -1), x0, t, noise, variance="learned_range")
    xt = d.q_sample(cos20, x0, t, noise)
    out = d.p_mean_variance(cos20, jnp.concatenate([eps, v], -1), xt, t, variance="learned_range",
                            clip_denoised=False)
    # At t = 0 the posterior mean is pred_x0 itself (coef1 = 1, coef2 = 0).
    np.testing.assert_allclose(out["mean"], out["pred_x0"], atol=1e-6)
    nll = -d.discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
    assert float(losses["vb"][0]) == pytest.approx(float(nll.mean()) / LN2, rel=1e-5)


def test_vb_gradient_only_trains_variance(cos20):
    x0 = jax.random.uniform(jax.random.PRNGKey(0), (2, 3, 3, 1), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
    t = jnp.array([0, 7])
    eps0 = noise + 0.2
    v0 = jnp.full_like(x0, 0.3)

    def term(params, name):
        out = jnp.concatenate([params["eps"], params["v"]], -1)
        return _losses(cos20, out, x0, t, noise, variance="learned_range")[name].sum()

    params = {"eps": eps0, "v": v0}
    g_vb = jax.jit(jax.grad(term), static_argnums=1)(params, "vb")
    assert float(jnp.abs(g_vb["eps"]).max()) == 0.0
    assert float(jnp.abs(g_vb["v"]).min()) > 0.0
    g_mse = jax.jit(jax.grad(term), static_argnums=1)(params, "mse")
    assert float(jnp.abs(g_mse["v"]).max()) == 0.0
    np.testing.assert_allclose(g_mse["eps"], -2 * (noise - eps0) / 9, rtol=1e-5)
    # Without the stop-gradient the vb term would move eps: check it really does depend on it.
    xt = d.q_sample(cos20, x0, t, noise)
    g_free = jax.jit(jax.grad(lambda e: d.vb_terms_bpd(
        cos20, jnp.concatenate([e, v0], -1), x0, xt, t).sum()))(eps0)
    assert float(jnp.abs(g_free).max()) > 0.0


def test_training_losses_jit(cos20):
    """Under jit, with a model that uses both x_t and model_t, against numpy."""
    x0 = jnp.zeros((2, 4, 4, 3))
    noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape)

    def model(x_t, model_t):
        return jnp.concatenate([x_t * 0.1, jnp.zeros_like(x_t) + model_t[:, None, None, None]
                                / 20], -1)

    f = jax.jit(lambda df, t: d.training_losses(df, model, x0, t, noise, variance="learned_range"))
    t = np.array([2, 11])
    out = f(cos20, jnp.asarray(t))
    xt = np.asarray(d.q_sample(cos20, x0, jnp.asarray(t), noise), np.float64)
    v = np.broadcast_to((t / 20.0)[:, None, None, None], xt.shape)
    want_vb = _independent_vb(np.zeros(xt.shape), xt, t, 0.1 * xt, v)
    want_mse = np.mean((np.asarray(noise) - 0.1 * xt) ** 2, axis=(1, 2, 3))
    for k in ("loss", "mse", "vb"):
        assert out[k].shape == (2,)
    np.testing.assert_allclose(out["vb"], want_vb, rtol=2e-3)
    np.testing.assert_allclose(out["mse"], want_mse, rtol=1e-5)
    np.testing.assert_allclose(out["loss"], want_mse + 0.02 * want_vb, rtol=1e-4)


# ---------------------------------------------------------------------------------- full NLL

def test_prior_bpd_closed_form():
    diff = d.Diffusion.create(np.full(5, 0.1))  # abar_T = 0.9^5: the prior term is not ~0
    abar = 0.9 ** 5
    x0 = jnp.stack([jnp.zeros((2, 2, 1)), jnp.full((2, 2, 1), 0.5)])
    got = np.asarray(d.prior_bpd(diff, x0))
    kl = lambda m: 0.5 * (-1 - np.log(1 - abar) + (1 - abar) + m ** 2)  # noqa: E731
    np.testing.assert_allclose(got, [kl(0.0) / LN2, kl(0.5 * np.sqrt(abar)) / LN2], rtol=1e-4)
    assert got[1] > got[0] > 0.05


def test_nll_bpd_with_oracle_model(cos20):
    """Single-point data x0 = c with an exact eps oracle and v = -1 (posterior variance): every
    KL term vanishes, so total = prior + decoder NLL at the clipped variance beta~_1."""
    b = d.cosine_betas(20)
    abar = np.cumprod(1 - b)
    c = jnp.array([[[[-1.0], [0.2]], [[1.0], [-0.4]]]])  # [1, 2, 2, 1] on the 8-bit grid-ish
    c = jnp.round((c + 1) * 127.5) / 127.5 - 1
    abar32 = jnp.asarray(abar, jnp.float32)

    def oracle(x_t, model_t):
        a = abar32[model_t.astype(jnp.int32)][:, None, None, None]
        eps = (x_t - jnp.sqrt(a) * c) / jnp.sqrt(1 - a)
        return jnp.concatenate([eps, -jnp.ones_like(x_t)], -1)

    res = jax.jit(lambda k: d.nll_bpd(cos20, oracle, c, k, variance="learned_range"))(
        jax.random.PRNGKey(0))
    assert res["vb"].shape == (1, 20) and res["mse"].shape == (1, 20)
    np.testing.assert_allclose(np.asarray(res["vb"][0, 1:]), 0.0, atol=2e-4)
    pv1 = b[1] * (1 - abar[0]) / (1 - abar[1])
    s = math.sqrt(pv1)
    p = []
    for xv in np.asarray(c).ravel():
        hi = _phi(1 / 255 / s) if xv < 0.999 else 1.0
        lo = _phi(-1 / 255 / s) if xv > -0.999 else 0.0
        p.append(hi - lo)
    dec = -np.mean(np.log(p)) / LN2
    assert float(res["vb"][0, 0]) == pytest.approx(dec, rel=2e-3)
    prior = float(d.prior_bpd(cos20, c)[0])
    assert float(res["prior_bpd"][0]) == pytest.approx(prior, rel=1e-6)
    assert float(res["total_bpd"][0]) == pytest.approx(
        float(res["vb"][0].sum()) + prior, rel=1e-5)
    np.testing.assert_allclose(np.asarray(res["xstart_mse"]), 0.0, atol=1e-6)
