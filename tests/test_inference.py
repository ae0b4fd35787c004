"""One sharded inference path (dmz_jax.inference): compiled once per function and shared by
copies, results that do not depend on the batch size, api.load reading only the parameters
it uses once per checkpoint, and one untrained baseline for summary.json and --mode=evaluate."""

import json
import os
import weakref

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import mode_config, saved_state
from dmz_jax import api, baseline, data, evaluate, inference, sharding, train


@pytest.fixture(scope="module")
def model(tiny_workdir):
    return api.load(tiny_workdir, config=mode_config())


@pytest.fixture
def restores(monkeypatch):
    """The states restored by every CheckpointManager.restore from now on (api.load's cache
    of live checkpoints emptied first)."""
    monkeypatch.setattr(api, "_RESTORED", weakref.WeakValueDictionary())
    calls, original = [], ocp.CheckpointManager.restore

    def spy(self, step, *args, **kwargs):
        restored = original(self, step, *args, **kwargs)
        calls.append((step, restored.state))
        return restored
    monkeypatch.setattr(ocp.CheckpointManager, "restore", spy)
    return calls


def _halved(params):
    return jax.tree.map(lambda a: a * 0.5, params)


@pytest.mark.slow  # uses the trained tiny workdir
def test_sample_grids_of_two_steps_compile_once(model, tmp_path):
    config = model.config
    s = config.sampling
    fns = [inference.decode_fn(model.spec, k, s.method, float(s.eta), False,
                               bool(s.clip_denoised)) for k in s.steps]
    grid = lambda params, step: evaluate.write_sample_grids(  # noqa: E731
        config, model.model, model.diff, params, step, str(tmp_path), mesh=model.mesh)
    first = grid(model.params, 1)
    compiled = [fn._cache_size() for fn in fns]
    second = grid(_halved(model.params), 2)  # other parameters, as at a later step
    assert [fn._cache_size() for fn in fns] == compiled  # nothing compiled again
    for a, b in zip(first, second):
        assert open(a, "rb").read() != open(b, "rb").read()  # the new parameters were used


@pytest.mark.slow
def test_with_params_reuses_the_compiled_function(model):
    other = model.with_params(_halved(model.params))
    fn = model._decode_fn(2, "ancestral", 0.0, False, True)
    assert other._decode_fn(2, "ancestral", 0.0, False, True) is fn
    z = model.prior_sample(8, seed=0)
    a = model.decode(z, steps=2, method="ancestral", clip=True, seed=1)
    size = fn._cache_size()
    b = other.decode(z, steps=2, method="ancestral", clip=True, seed=1)
    assert fn._cache_size() == size and not np.allclose(a, b)
    assert other.step == model.step and other.params is not model.params


@pytest.mark.slow
def test_samples_and_fd_statistics_do_not_depend_on_the_batch_size(model):
    wide = model.with_batch_size(16)
    a = model.sample(12, steps=3, seed=4)
    np.testing.assert_allclose(wide.sample(12, steps=3, seed=4), a, atol=1e-4)
    np.testing.assert_array_equal(model.sample(4, steps=3, seed=4, first=8), a[8:])
    assert not np.allclose(model.sample(12, steps=3, seed=5), a)  # the seed matters
    # FD chunks: 10 batches of 8 then 8 images, or one chunk of 88
    features = lambda x: x.reshape(len(x), -1)[:, ::64]  # noqa: E731
    small = evaluate.sample_statistics(model, features, 88, steps=2, seed=3)
    large = evaluate.sample_statistics(wide, features, 88, steps=2, seed=3)
    for x, y in zip(small.statistics(), large.statistics()):
        np.testing.assert_allclose(x, y, atol=1e-4)


@pytest.mark.slow
def test_the_public_reverse_chain_is_the_decoders_chain(model):
    z = model.prior_sample(8, seed=2)
    x0, states = model.reverse_chain(z, steps=3, record=(2, 0), seed=6, method="ancestral")
    assert states.shape == (2, 8, 32, 32, 1)
    np.testing.assert_array_equal(x0, model.decode(z, steps=3, method="ancestral", seed=6))
    # index 2 of a 3-step chain is x_T: decoding from it with the same seed is the same chain
    again = model.decode(z, states[0], steps=3, method="ancestral", seed=6)
    np.testing.assert_allclose(again, x0, atol=1e-5)
    assert not np.allclose(states[1], states[0])


@pytest.mark.slow
def test_load_restores_only_the_chosen_tree_once_per_checkpoint(tiny_workdir, restores):
    config = mode_config()
    ema = api.load(tiny_workdir, config=config)
    assert [(step, sorted(state)) for step, state in restores] == [(4, ["ema_params"])]
    again = api.load(tiny_workdir, config=config)  # the same checkpoint, while ema lives
    assert len(restores) == 1
    np.testing.assert_array_equal(*(np.asarray(m.params["encoder"]["to_logits"]["bias"])
                                    for m in (again, ema)))
    raw = api.load(tiny_workdir, config=config, ema=False)
    assert sorted(restores[-1][1]) == ["params"] and len(restores) == 2
    saved = saved_state(tiny_workdir, 4)
    for name, m in (("ema_params", ema), ("params", raw)):
        for a, b in zip(jax.tree.leaves(m.params), jax.tree.leaves(saved[name])):
            np.testing.assert_array_equal(np.asarray(a), b)
    # mesh.fsdp: the parameters stay split as in training
    fsdp = api.load(tiny_workdir, config=config, mesh=sharding.create_mesh(1, 8))
    kernel = fsdp.params["denoiser"]["out_conv"]["kernel"]
    assert kernel.sharding.spec == sharding.fsdp_spec(kernel.shape, 8)
    np.testing.assert_allclose(fsdp.sample(8, steps=2, seed=1), ema.sample(8, steps=2, seed=1),
                               atol=1e-4)


@pytest.mark.slow
def test_the_ablation_curve_loads_each_checkpoint_once(tiny_workdir, restores, monkeypatch):
    from experiments import ablations
    monkeypatch.setattr(ablations, "_fd", lambda *args, **kwargs: 0.0)
    config = mode_config()
    model = api.load(tiny_workdir, config=config)
    test = data.load_split(config.data, "test", 8)["image"]
    points = ablations.curve(model, config, tiny_workdir, None, 8, 2, test)
    assert [p["step"] for p in points] == [2, 4]
    assert [step for step, _ in restores] == [4, 2]  # the newest once, step 2 once
    assert points[1]["nll_bpd_given_z"] == pytest.approx(float(model.nll_bpd(test).mean()),
                                                         rel=1e-5)


@pytest.mark.slow  # trains 2 steps from the tiny workdir and evaluates them twice
def test_init_from_baseline_is_the_same_in_summary_and_evaluate(tiny_workdir, tmp_path):
    config = mode_config()
    config.training.update(init_from=tiny_workdir, num_steps=2, checkpoint_every=2)
    config.eval.update(fd_num_samples=8, classifier_steps=5, recon_examples=8)
    config.modes.steps = 2
    workdir = str(tmp_path / "fine_tuned")
    summary = train.train_and_evaluate(config, workdir)
    metrics = json.loads(open(os.path.join(evaluate.run_evaluation(config, workdir),
                                           "metrics.json")).read())
    assert metrics["probe_accuracy_at_init"] == summary["probe_accuracy_at_init"]
    # the baseline is the init_from checkpoint's raw parameters, not a random encoder
    m = api.load(workdir, config=config)
    params, _ = baseline.untrained(config, m.model, m.mesh)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(saved_state(tiny_workdir,
                                                                           4)["params"])):
        np.testing.assert_array_equal(np.asarray(a), b)
