"""MINE (dmz_jax/mutual_information.py): the estimator on Gaussians of known MI, its gradient,
the mode on a tiny workdir, and bad options."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import mode_config
from dmz_jax import modes
from dmz_jax import mutual_information as mi


def _gaussian_pairs(n, rho, d, rng):
    """x, z [n, d] float32: per dimension standard normals with correlation rho."""
    x = rng.standard_normal((n, d))
    z = rho * x + math.sqrt(1.0 - rho ** 2) * rng.standard_normal((n, d))
    return x.astype(np.float32), z.astype(np.float32)


# A small, fast critic: 500 steps of 256 pairs (32 passes over 4,000), ~0.3 s per run at -O0.
FAST = dict(steps=500, batch_size=256, width=64, learning_rate=3e-3, ema_rate=0.01)


def test_dv_bound_and_the_bias_corrected_gradient():
    assert float(mi.dv_bound(jnp.array([1.0, 2.0]), jnp.zeros(3))) == pytest.approx(1.5)
    assert float(mi.dv_bound(jnp.zeros(2), jnp.log(jnp.array([1.0, 3.0])))) == pytest.approx(
        -math.log(2.0), abs=1e-6)
    # MINE's gradient divides by the moving average (updated with this batch first), not by
    # the batch's own mean: d/dT_m = -exp(T_m) / (M ema), ema = 0.9 * 4 + 0.1 * mean exp T_m
    t_m = jnp.log(jnp.array([1.0, 2.0, 3.0]))
    grad = jax.grad(lambda t: mi._mine_objective(jnp.zeros(2), t, jnp.log(4.0), 0.1)[0])(t_m)
    ema = 0.9 * 4.0 + 0.1 * 2.0
    np.testing.assert_allclose(grad, -np.array([1.0, 2.0, 3.0]) / (3 * ema), rtol=1e-5)
    value, log_ema = mi._mine_objective(jnp.zeros(2), t_m, jnp.log(4.0), 0.1)
    assert float(value) == pytest.approx(-math.log(2.0), abs=1e-6)  # the value is the DV bound
    assert float(log_ema) == pytest.approx(math.log(ema), abs=1e-6)


def test_mine_recovers_the_mi_of_correlated_gaussians_and_zero_for_independent_pairs():
    """rho = 0.8 over d = 2 dimensions: I = -d/2 log(1 - rho^2) = 1.0217 nats. Over 20 seeds
    of this very setup the held-out bound was 0.945 .. 1.017 nats (mean 0.977, std 0.021: a
    lower bound, slightly under the truth); the tolerance, 12% (0.123 nats), is 3.7 std below
    that mean. Independent pairs (z shuffled): |bound| <= 0.019 nats over the same 20 seeds;
    the tolerance is 0.05 nats, 5% of the dependent pairs' MI."""
    rho, d = 0.8, 2
    true = -d / 2 * math.log(1.0 - rho ** 2)
    rng = np.random.default_rng(0)
    x, z = _gaussian_pairs(4000, rho, d, rng)
    x_test, z_test = _gaussian_pairs(2000, rho, d, rng)
    got = mi.train_critic(x, z, x_test, z_test, seed=0, **FAST)
    assert got["test_bound_nats"] == pytest.approx(true, rel=0.12)
    assert got["test_bound_bits"] == pytest.approx(got["test_bound_nats"] / math.log(2.0))
    assert got["train_bound_nats"] == pytest.approx(true, rel=0.15)
    independent = mi.train_critic(x, rng.permutation(z), x_test, rng.permutation(z_test),
                                  seed=0, **FAST)
    assert abs(independent["test_bound_nats"]) < 0.05
    again = mi.train_critic(x, z, x_test, z_test, seed=0, **FAST)
    assert again["test_bound_nats"] == pytest.approx(got["test_bound_nats"], abs=1e-5)


def test_time_grids():
    assert mi.forward_timesteps((0.0, 0.5, 0.9, 1.0), 50) == [0, 25, 44, 49]
    spaced = mode_config()  # T = 50; K = 3 keeps the original steps 0, 24, 49
    from dmz_jax.train_state import make_diffusion
    diff = make_diffusion(spaced).respace(3)
    assert list(diff.timestep_map.value) == [0, 24, 49]
    assert mi.reverse_indices([0, 25, 36, 37, 49], diff) == [0, 1, 1, 2, 2]


@pytest.mark.parametrize("option, value, message", [
    ("t_fractions", (0.0, 1.5), "t_fractions"),
    ("t_fractions", (), "t_fractions"),
    ("chains", ("forward", "backward"), "chains"),
    ("reverse_steps", 0, "reverse_steps"),
    ("reverse_steps", 51, "reverse_steps"),
    ("ema_rate", 0.0, "ema_rate"),
    ("train_examples", 4, "train_examples"),
])
def test_bad_options_fail_before_any_model_is_loaded(tmp_path, option, value, message):
    """tmp_path has no checkpoints: loading first would raise NoCheckpointError instead."""
    config = mode_config()
    config.modes.mi.reverse_steps = 5  # the default, 100, is more than the tiny T = 50
    config.modes.mi[option] = value
    with pytest.raises(modes.ModeError, match=message):
        modes.mutual_information(config, str(tmp_path))
    assert not os.listdir(tmp_path)


@pytest.mark.slow  # uses the trained tiny workdir
def test_mode_writes_the_bound_along_both_chains(tiny_workdir):
    config = mode_config()  # T = 50, |z| = 8, sampling.batch_size = 8
    config.modes.mi.update(t_fractions=(0.0, 0.5, 1.0), chains=("forward", "reverse"),
                           reverse_steps=3, train_examples=32, test_examples=16, steps=20,
                           batch_size=8, width=16, seeds=2)
    out = modes.mutual_information(config, tiny_workdir)
    assert os.path.basename(out) == "mutual_information"
    metrics = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert set(metrics["chains"]) == {"forward", "reverse"}
    assert metrics["num_timesteps"] == 50 and metrics["latent_dim"] == 8
    assert metrics["ceiling_bits"] == 8 and metrics["ceiling_nats"] == pytest.approx(
        8 * math.log(2.0))
    assert 1 <= metrics["distinct_codes_train"] <= 32
    assert metrics["train_examples"] == 32 and metrics["test_examples"] == 16
    assert metrics["options"]["reverse_steps"] == 3
    expected_t = {"forward": [0, 25, 49], "reverse": [0, 24, 49]}  # K=3 keeps 0, 24, 49
    for chain, rows in metrics["chains"].items():
        assert [r["t_fraction"] for r in rows] == [0.0, 0.5, 1.0]
        assert [r["t"] for r in rows] == expected_t[chain]
        for r in rows:
            assert r["t_over_T"] == pytest.approx(r["t"] / 50)
            assert len(r["mi_nats_per_seed"]) == 2 and np.all(np.isfinite(r["mi_nats_per_seed"]))
            assert r["mi_nats_mean"] == pytest.approx(np.mean(r["mi_nats_per_seed"]))
            assert r["mi_nats_std"] == pytest.approx(np.std(r["mi_nats_per_seed"], ddof=1))
            assert r["mi_bits_mean"] == pytest.approx(r["mi_nats_mean"] / math.log(2.0))
            assert np.isfinite(r["mi_nats_std"]) and r["mi_nats_std"] >= 0
    arrays = np.load(os.path.join(out, "mi.npz"))
    assert arrays["reverse_nats"].shape == (3, 2)
    np.testing.assert_array_equal(arrays["forward_t"], expected_t["forward"])
    assert os.path.getsize(os.path.join(out, "mi_vs_t.png")) > 1000
    assert "checkpoint_step" in json.loads(open(os.path.join(out, "config.json")).read())
    # a second run gets its own folder
    config.modes.mi.update(chains=("forward",), t_fractions=(1.0,), seeds=1)
    second = modes.mutual_information(config, tiny_workdir)
    assert os.path.basename(second) == "mutual_information.1"
    assert list(json.loads(open(os.path.join(second, "metrics.json")).read())["chains"]) == [
        "forward"]
