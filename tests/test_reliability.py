"""Reliability: corrupt checkpoints, config mismatches, non-finite steps, and a deterministic
step-indexed data stream.

Killing and signalling training processes: tests/test_preemption.py.
"""

import glob
import logging
import os

import jax
import numpy as np
import pytest

from conftest import saved_state, tiny_config, trained_steps
from dmz_jax import checkpointing, data, sharding, train
from dmz_jax import train_state as ts
from dmz_jax.model import create_model


# ---------------------------------------------------------------------------- data order


def test_data_stream_is_indexed_by_step():
    config = tiny_config()
    config.data.random_flip = True
    full = data.train_iterator(config.data, batch_size=8, seed=3)
    batches = [next(full) for _ in range(1300)]  # past the end of the first epoch (1250)
    for start in (1, 7, 1249, 1299):
        resumed = next(data.train_iterator(config.data, batch_size=8, seed=3,
                                                     start_step=start))
        np.testing.assert_array_equal(resumed["image"], batches[start]["image"])
        np.testing.assert_array_equal(resumed["label"], batches[start]["label"])


# ---------------------------------------------------------------------------- non-finite


def _one_device_step(config):
    mesh = sharding.create_mesh(devices=jax.devices()[:1])
    model, diff = create_model(config), ts.make_diffusion(config)
    tx = ts.make_optimizer(config.training)
    rep = sharding.replicated(mesh)
    state = jax.jit(lambda: ts.create_train_state(config, model, tx), out_shardings=rep)()
    step_fn = ts.compile_train_step(config, model, diff, tx, mesh, rep)
    return state, lambda s, b: step_fn(s, sharding.global_batch(b, mesh))


def test_nonfinite_step_is_skipped_and_counted():
    config = tiny_config()
    state, step = _one_device_step(config)
    batch = next(data.train_iterator(config.data, batch_size=8, seed=0))
    bad = dict(batch, image=np.full_like(batch["image"], np.nan))
    before = jax.device_get(state)
    state, metrics = step(state, bad)
    after = jax.device_get(state)
    for a, b in zip(jax.tree.leaves((before.params, before.ema_params, before.opt_state)),
                    jax.tree.leaves((after.params, after.ema_params, after.opt_state))):
        np.testing.assert_array_equal(a, b)
    assert int(after.step) == 1 and int(after.skipped_steps) == 1
    assert int(metrics["nonfinite_streak"]) == 1
    assert int(metrics["metrics"].loss.count) == 0  # masked out of the window's mean
    state, metrics = step(state, batch)
    assert int(metrics["nonfinite_streak"]) == 0 and int(state.skipped_steps) == 1
    assert not np.array_equal(jax.device_get(state.params)["denoiser"]["out_conv"]["kernel"],
                              after.params["denoiser"]["out_conv"]["kernel"])


@pytest.mark.slow  # end-to-end training run
def test_nonfinite_streak_stops_the_run_naming_the_steps(tmp_path, monkeypatch, caplog):
    config = tiny_config()
    config.training.num_steps, config.training.max_nonfinite_steps = 6, 3
    config.training.checkpoint_every = 1
    real = data.train_iterator

    def poisoned(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i >= 1:  # step 1 is good, steps 2.. are NaN
                batch = dict(batch, image=np.full_like(batch["image"], np.nan))
            yield batch

    monkeypatch.setattr(data, "train_iterator", poisoned)
    with pytest.raises(train.NonFiniteError, match=r"3 steps in a row \(steps 2\.\.4\)") as err:
        train.train_and_evaluate(config, str(tmp_path))
    assert "lower --config.training.learning_rate" in str(err.value)
    assert "no --fresh needed" in str(err.value)
    # the newest checkpoint holds the step-1 parameters (nothing non-finite was applied)
    steps = trained_steps(str(tmp_path))
    assert max(steps) <= 3
    restored, first = saved_state(str(tmp_path), max(steps)), saved_state(str(tmp_path), 1)
    np.testing.assert_array_equal(restored["params"]["denoiser"]["out_conv"]["kernel"],
                                  first["params"]["denoiser"]["out_conv"]["kernel"])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored["params"]))
    # following the advice works: the same workdir resumes with half the learning rate
    config.training.learning_rate /= 2
    with caplog.at_level(logging.INFO):
        run = train.Run(config, str(tmp_path))
    assert int(run.initial_state().step) == max(steps)
    run.close()
    assert "Resuming with training.learning_rate 0.001 -> 0.0005" in caplog.text


# ---------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A workdir with checkpoints at steps 1 and 2 of the tiny config (no evaluation)."""
    workdir = str(tmp_path_factory.mktemp("ckpt"))
    config = tiny_config()
    config.training.num_steps, config.training.checkpoint_every = 2, 1
    config.eval.at_end = False
    train.train_and_evaluate(config, workdir)
    return workdir, config


def _copy(src, tmp_path):
    import shutil
    dest = str(tmp_path / "work")
    shutil.copytree(src, dest)
    return dest


@pytest.mark.slow  # end-to-end training run
def test_corrupt_checkpoint_is_skipped_with_a_warning(two_checkpoints, tmp_path, caplog):
    workdir, config = two_checkpoints
    workdir = _copy(workdir, tmp_path)
    for path in glob.glob(os.path.join(workdir, "checkpoints", "2", "state", "**", "*"),
                          recursive=True):
        if os.path.isfile(path):
            with open(path, "r+b") as f:
                f.truncate(max(0, os.path.getsize(path) // 3))
    with caplog.at_level(logging.INFO):
        run = train.Run(config, workdir)
    assert "Checkpoint at step 2 cannot be loaded" in caplog.text
    assert "Restored checkpoint at step 1" in caplog.text
    assert int(run.initial_state().step) == 1
    run.close()
    moved = os.listdir(os.path.join(workdir, "checkpoints_corrupt"))
    assert len(moved) == 1 and moved[0].startswith("2-")


@pytest.mark.slow  # end-to-end training run
def test_checkpoint_of_another_model_is_refused_with_a_diff(two_checkpoints, tmp_path):
    workdir, config = two_checkpoints
    workdir = _copy(workdir, tmp_path)
    changed = tiny_config()
    changed.model.latent_dim = 16
    changed.training.ema_decay = 0.99
    changed.training.num_steps, changed.training.learning_rate = 50, 5e-3  # may change
    with pytest.raises(checkpointing.ConfigMismatchError) as err:
        train.Run(changed, workdir)
    message = str(err.value)
    assert "model.latent_dim: 8 -> 16" in message
    assert "training.ema_decay: 0.999 -> 0.99" in message
    assert "num_steps" not in message and "learning_rate" not in message
    assert "--fresh" in message
    # --fresh moves the old checkpoints aside (nothing is deleted) and starts over
    run = train.Run(changed, workdir, fresh=True)
    assert int(run.initial_state().step) == 0
    run.close()
    old = glob.glob(os.path.join(workdir, "checkpoints.old-*"))
    assert len(old) == 1 and sorted(os.listdir(old[0])) == ["1", "2", "summary.json"]
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
