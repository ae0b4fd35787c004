"""The learned autoregressive bit prior (dmz_jax/prior.py).

The trained-model tests share one prior fitted to a distribution of known entropy: n = 8 bits,
bit 0 ~ Bernoulli(0.5), bits 1..7 copy bit 0 except bit COIN ~ Bernoulli(0.9) independently,
so H = 1 + H(0.9) = 1.469 bits per code.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmz_jax import prior as prior_lib

N_BITS = 8
COIN = 5  # the independent Bernoulli(0.9) bit
P_COIN = 0.9
KWARGS = dict(width=32, num_heads=2, num_layers=2)


def h2(p):
    """Binary entropy in bits."""
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


TRUE_ENTROPY = 1.0 + h2(P_COIN)  # 1.469 bits per code


def draw_codes(rs, num):
    """[num, N_BITS] int codes of the known-entropy distribution."""
    codes = np.repeat(rs.randint(0, 2, num)[:, None], N_BITS, axis=1)
    codes[:, COIN] = rs.rand(num) < P_COIN
    return codes


@pytest.fixture(scope="module")
def data():
    rs = np.random.RandomState(0)
    return draw_codes(rs, 8192), draw_codes(rs, 4096)


@pytest.fixture(scope="module")
def trained(data):
    train, _ = data
    params = prior_lib.train_prior(train, steps=300, batch_size=128, learning_rate=1e-2,
                                   seed=0, model_kwargs=KWARGS)
    return params, prior_lib.make_model(N_BITS, KWARGS)


def randomised(params, seed, scale=0.5):
    """params with every leaf replaced by N(0, scale^2) noise (so the output layer is not 0)."""
    rs = np.random.RandomState(seed)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(scale * rs.randn(*x.shape), jnp.float32), params)


def test_untrained_prior_is_bernoulli_half():
    rs = np.random.RandomState(1)
    for n, kwargs in [(N_BITS, KWARGS), (13, dict(width=16, num_heads=1, num_layers=1))]:
        model = prior_lib.make_model(n, kwargs)
        params = prior_lib.init_prior(model, jax.random.PRNGKey(0))
        codes = rs.randint(0, 2, (64, n))
        assert prior_lib.bits_per_code(params, model, codes) == n
        assert prior_lib.bernoulli_bits_per_code(n) == n
        np.testing.assert_array_equal(
            prior_lib.log_prob_bits(params, model, codes.astype(np.float32)), -n)


def test_causality():
    """Flipping bit j leaves logits 0..j bit-identical and (random params) changes a later one."""
    model = prior_lib.make_model(N_BITS, KWARGS)
    params = randomised(prior_lib.init_prior(model, jax.random.PRNGKey(0)), seed=1)
    z = np.random.RandomState(2).randint(0, 2, (4, N_BITS)).astype(np.float32)
    apply = jax.jit(model.apply)
    base = np.asarray(apply(params, z))
    for j in range(N_BITS):
        flipped = z.copy()
        flipped[:, j] = 1 - flipped[:, j]
        logits = np.asarray(apply(params, flipped))
        np.testing.assert_array_equal(logits[:, :j + 1], base[:, :j + 1])
        if j < N_BITS - 1:
            assert np.all(np.abs(logits[:, j + 1:] - base[:, j + 1:]).max(axis=1) > 1e-4)


def test_int_and_float_codes_agree():
    model = prior_lib.make_model(N_BITS, KWARGS)
    params = randomised(prior_lib.init_prior(model, jax.random.PRNGKey(0)), seed=3)
    z = np.random.RandomState(4).randint(0, 2, (8, N_BITS))
    np.testing.assert_array_equal(prior_lib.log_prob_bits(params, model, z),
                                  prior_lib.log_prob_bits(params, model, z.astype(np.float32)))
    with pytest.raises(ValueError, match="num_bits"):
        model.apply(params, jnp.zeros((2, N_BITS + 1)))


def test_log_prob_normalises():
    """sum over all 2^n codes of p(z) = 1 for random params (n = 6)."""
    n = 6
    model = prior_lib.make_model(n, KWARGS)
    params = randomised(prior_lib.init_prior(model, jax.random.PRNGKey(0)), seed=5)
    all_codes = (np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1
    total = np.sum(2.0 ** np.asarray(prior_lib.log_prob_bits(params, model, all_codes),
                                     np.float64))
    assert abs(total - 1.0) < 1e-4


def test_empirical_prior_closed_form(data):
    train, test = data
    q = train.mean(axis=0)  # per-bit frequencies: q[0] = ... = q[7] except q[COIN]
    f = test.mean(axis=0)
    assert np.all(q[np.arange(N_BITS) != COIN] == q[0])

    def cross_entropy(f, q):  # bits, of Bernoulli(q) coding bits with frequency f
        return -(f * math.log2(q) + (1 - f) * math.log2(1 - q))

    closed = (N_BITS - 1) * cross_entropy(f[0], q[0]) + cross_entropy(f[COIN], q[COIN])
    got = prior_lib.empirical_bits_per_code(train, test)
    assert got == pytest.approx(closed, abs=1e-9)
    assert got == pytest.approx(N_BITS - 1 + h2(P_COIN), abs=0.02)  # 7.469
    # Clipping: an all-zero bit in train costs log2(1 / 1e-3) bits where test has a 1.
    zeros = np.zeros((10, 1))
    assert prior_lib.empirical_bits_per_code(zeros, np.ones((1, 1))) == pytest.approx(
        -math.log2(1e-3))


def test_trained_prior_reaches_entropy(data, trained):
    train, test = data
    params, model = trained
    bits = prior_lib.bits_per_code(params, model, test)
    empirical = prior_lib.empirical_bits_per_code(train, test)
    assert abs(bits - TRUE_ENTROPY) < 0.1, bits
    assert bits < empirical - 5.0
    assert bits < prior_lib.bernoulli_bits_per_code(N_BITS) - 6.0


def test_samples_reproduce_structure(trained):
    params, model = trained
    samples = np.asarray(prior_lib.sample(params, model, jax.random.PRNGKey(0), 2000))
    assert samples.shape == (2000, N_BITS) and samples.dtype == np.float32
    assert set(np.unique(samples)) <= {0.0, 1.0}
    copies = np.delete(samples, COIN, axis=1)
    assert np.mean(np.all(copies == copies[:, :1], axis=1)) > 0.95
    assert abs(samples[:, 0].mean() - 0.5) < 0.05
    assert abs(samples[:, COIN].mean() - P_COIN) < 0.04
    again = prior_lib.sample(params, model, jax.random.PRNGKey(0), 2000)
    np.testing.assert_array_equal(samples, again)


def test_cached_sampling_draws_what_full_recomputation_draws():
    """prior.sample caches keys and values; recomputing the whole prefix for every bit
    (the definition) must give the same logits and so the same bits from the same noise."""
    model = prior_lib.make_model(16, KWARGS)
    params = randomised(prior_lib.init_prior(model, jax.random.PRNGKey(0)), seed=3, scale=0.1)
    rng, num = jax.random.PRNGKey(7), 64

    def by_recomputation(i, z):
        logit = model.apply(params, z)[:, i]
        eps = jax.random.logistic(jax.random.fold_in(rng, i), (num,))
        return z.at[:, i].set((eps < logit).astype(jnp.float32))

    want = jax.lax.fori_loop(0, 16, by_recomputation, jnp.zeros((num, 16)))
    got = prior_lib.sample(params, model, rng, num)
    assert 0.2 < float(want.mean()) < 0.8  # not saturated: the bits carry information
    np.testing.assert_array_equal(got, want)


def test_save_load_round_trip(tmp_path, data, trained):
    _, test = data
    params, model = trained
    path = tmp_path / "prior"
    prior_lib.save_prior(str(path), params, KWARGS)
    loaded, loaded_model = prior_lib.load_prior(str(path))
    assert loaded_model == model
    np.testing.assert_array_equal(prior_lib.log_prob_bits(loaded, loaded_model, test[:256]),
                                  prior_lib.log_prob_bits(params, model, test[:256]))
    with pytest.raises(FileNotFoundError, match="--mode=train_prior"):
        prior_lib.load_prior(str(tmp_path / "missing"))


def test_training_is_deterministic_in_seed(data):
    train, _ = data
    # Same model and batch size as `trained`: the jitted step is reused, not recompiled.
    run = lambda seed: prior_lib.train_prior(train, steps=3, batch_size=128, learning_rate=1e-2,
                                             seed=seed, model_kwargs=KWARGS)
    a, b, c = run(0), run(0), run(1)
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda x, y: bool(jnp.array_equal(x, y)), a, b)))
    assert not all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda x, y: bool(jnp.array_equal(x, y)), a, c)))
