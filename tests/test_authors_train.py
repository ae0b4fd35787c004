"""The authors' recipe trains and resumes exactly: Conv-BN statistics, the loss-second-moment
sampler's history and input perturbation are all in the checkpointed state."""

import jax
import numpy as np
import pytest

from dmz_jax import api, sharding, timestep_sampler, train


def _config(num_steps):
    from configs.authors import fashion_mnist
    c = fashion_mnist.get_config("tiny")
    # T = 4: the sampler's history (10 losses per t) fills within the run (8 steps of 8)
    c.diffusion.num_timesteps = 4
    c.sampling.steps = (2,)
    c.training.update(num_steps=num_steps, checkpoint_every=4)
    c.eval.at_end = False  # no sample grids or probe: the tests below compute what they check
    return c


def one_device():
    """A 1-device mesh: these tests check the recipe, not the sharding (test_train.py does),
    and one device compiles in a third of the time of 8."""
    return sharding.create_mesh(1, 1, jax.devices()[:1])


def _train(config, workdir):
    run = train.Run(config, workdir, mesh=one_device())
    state, _, preempted = train.train(run, run.initial_state())
    run.close()
    assert not preempted
    return jax.device_get(state)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The authors' tiny recipe trained 8 steps straight, and 4 then resumed to 8:
    (folder of both workdirs, straight state, resumed state)."""
    tmp_path = tmp_path_factory.mktemp("authors")
    straight = _train(_config(8), str(tmp_path / "straight"))
    _train(_config(4), str(tmp_path / "resumed"))
    resumed = _train(_config(8), str(tmp_path / "resumed"))  # restores step 4, trains to 8
    return tmp_path, straight, resumed


@pytest.mark.slow  # three short runs of the authors' tiny network (~1 min)
def test_authors_recipe_resumes_bit_exact_with_batch_stats_and_sampler_history(runs):
    tmp_path, straight, resumed = runs
    assert int(straight.step) == int(resumed.step) == 8
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    # the recipe's state is really there and moved
    fresh = train.Run(_config(8), str(tmp_path / "fresh"), mesh=one_device())
    start = jax.device_get(fresh.initial_state())
    fresh.close()
    assert timestep_sampler.warmed_up(straight.t_sampler)
    assert int(straight.t_sampler["count"].sum()) == 4 * 10  # capped at 10 losses per t
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(straight.batch_stats),
                                                    jax.tree.leaves(start.batch_stats))]
    assert all(moved)
    # api.load takes the statistics with the EMA parameters; eval-mode codes depend on them
    model = api.load(str(tmp_path / "straight"), mesh=one_device())
    for a, b in zip(jax.tree.leaves(model.batch_stats), jax.tree.leaves(straight.batch_stats)):
        np.testing.assert_array_equal(a, b)
    images = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 1)).astype(np.float32)
    p = model.encode_probabilities(images)
    p_start = model.with_params(model.params, start.batch_stats).encode_probabilities(images)
    assert p.shape == (8, 8) and not np.allclose(p, p_start)


@pytest.mark.slow  # the probe and the NLL of the trained tiny run (~20 s)
def test_probe_and_nll_under_the_authors_protocol(runs):
    """eval.protocol=authors: sklearn's plain logistic regression, 5-fold CV over train and
    test together, on the soft (off, on) pairs of one relaxed sample; NLL given soft z."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, cross_val_score

    from dmz_jax import data, evaluate

    workdir = str(runs[0] / "straight")
    config = _config(8)
    config.sampling.batch_size = 8
    config.eval.protocol = "authors"
    model = api.load(workdir, config=config, mesh=one_device())
    train, test = (data.load_split(config.data, s, n) for s, n in (("train", 100), ("test", 50)))
    m = evaluate._probes(config, model, train, test)
    codes = np.concatenate([model.soft_codes(x["image"], seed=config.sampling.seed)
                            for x in (train, test)])
    assert codes.shape == (150, 16) and 0 < codes.min() and codes.max() < 1
    np.testing.assert_allclose(codes[:, 0::2] + codes[:, 1::2], 1.0, rtol=1e-6)
    labels = np.concatenate([train["label"], test["label"]])
    expected = cross_val_score(LogisticRegression(), codes, labels,
                               cv=KFold(5, shuffle=True, random_state=0))
    assert m["probe_accuracy"] == pytest.approx(expected.mean(), abs=1e-9)
    assert m["probe_accuracy_std"] == pytest.approx(expected.std(), abs=1e-9)
    assert np.isfinite(m["probe_accuracy_at_init"])
    # the soft codes are a draw: another seed, other codes
    assert not np.allclose(codes[:100], model.soft_codes(train["image"], seed=1))
    x = test["image"][:8]
    soft = model.soft_bits(x, seed=0)
    assert 0 < soft.min() and soft.max() < 1
    nll_soft, nll_bits = model.nll_bpd(x, z=soft), model.nll_bpd(x)  # default z: a hard draw
    assert np.all(np.isfinite(nll_soft)) and not np.allclose(nll_soft, nll_bits)
