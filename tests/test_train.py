"""Training: a tiny end-to-end run, resume, save-restore equality, 8 devices vs 1, mock data."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import tiny_config, trained_steps
from dmz_jax import checkpointing, data, sharding, train
from dmz_jax import train_state as ts
from dmz_jax.model import DMZ, create_model, init_params


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step run of the tiny config: (workdir, summary, final state)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_config()
    run = train.Run(config, workdir)
    state, loss, preempted = train.train(run, run.initial_state())
    assert not preempted
    summary = {"train_loss": loss, **run.evaluate(state)}
    run.close()
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f)
    return workdir, summary, jax.device_get(state)


@pytest.mark.slow  # end-to-end training run
def test_end_to_end_writes_checkpoints_logs_samples_and_probe(finished_run):
    workdir, summary, state = finished_run
    assert summary["step"] == 4 and int(state.step) == 4
    assert np.isfinite(summary["train_loss"])
    # 4 steps cannot show training's gain (test_learning.py does, in 1,200); what holds here:
    # the centred encoder's 8 bits each split the images (measured means 0.22-0.54) and carry
    # the class well above chance (0.1; measured 0.28 and 0.26)
    assert summary["probe_accuracy"] > 0.18 and summary["probe_accuracy_at_init"] > 0.18
    assert all(0.15 < m < 0.85 for m in summary["bit_means"])
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    pngs = sorted(os.listdir(os.path.join(workdir, "samples")))
    assert pngs == ["step00000004_K2.png", "step00000004_K5.png"]
    with open(os.path.join(workdir, "samples", pngs[0]), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(summary["bit_means"]) == 8


@pytest.mark.slow  # end-to-end training run
def test_restore_gives_the_saved_state_exactly(finished_run):
    workdir, _, state = finished_run
    run = train.Run(tiny_config(), workdir)
    restored = jax.device_get(run.initial_state())
    run.close()
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(a, b)
    assert int(restored.step) == 4


@pytest.mark.slow  # end-to-end training run
def test_rerun_resumes_from_the_latest_checkpoint(finished_run, tmp_path, caplog):
    import shutil
    workdir = str(tmp_path / "resume")
    shutil.copytree(finished_run[0], workdir)
    os.remove(os.path.join(workdir, "summary.json"))
    config = tiny_config()
    config.training.num_steps = 6
    with caplog.at_level(logging.INFO):
        summary = train.train_and_evaluate(config, workdir)
    assert "Restored checkpoint at step 4" in caplog.text
    assert "Resuming training at step 4" in caplog.text
    assert summary["step"] == 6
    # checkpoint_every 2, keep_checkpoints 3: the copied 2 and 4, and the resumed run's 6
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]
    # a finished run is not redone
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = train.train_and_evaluate(config, workdir)
    assert "already finished at step 6" in caplog.text
    assert again["step"] == 6


@pytest.mark.slow  # end-to-end training run
def test_fine_tuning_at_64_starts_from_the_32_checkpoint(finished_run, tmp_path, caplog):
    """training.init_from: a 64x64 run of the same tiny widths starts from the 32x32 run's
    step-4 parameters (raw and EMA), with a fresh optimizer, and trains from step 0."""
    source, _, trained = finished_run
    config = tiny_config()
    config.data.image_size = 64
    config.model.attention_resolutions = (32,)  # the 32x32 run's (16,): the same level
    config.training.update(init_from=source, num_steps=2)
    config.eval.at_end = False
    run = train.Run(config, str(tmp_path / "hi_res"))
    start = jax.device_get(run.initial_state())
    for name in ("params", "ema_params"):
        for a, b in zip(jax.tree.leaves(getattr(trained, name)),
                        jax.tree.leaves(getattr(start, name))):
            np.testing.assert_array_equal(a, b)
    assert int(start.step) == 0
    assert all(np.all(x == 0) for x in jax.tree.leaves(start.opt_state) if x.ndim)  # moments
    with caplog.at_level(logging.INFO):
        state, loss, _ = train.train(run, start)
    run.close()
    assert int(state.step) == 2 and np.isfinite(loss)
    assert "Resuming" not in caplog.text
    # the 64x64 run now has its own checkpoint: a rerun resumes it, init_from is ignored
    config.training.num_steps = 3
    rerun = train.Run(config, str(tmp_path / "hi_res"))
    assert int(rerun.initial_state().step) == 2
    rerun.close()


@pytest.mark.slow  # needs the trained run
def test_init_from_refuses_what_does_not_fit_before_compiling(finished_run, tmp_path,
                                                              monkeypatch):
    """Other widths: every misfit parameter named, nothing compiled, nothing written."""
    monkeypatch.setattr(train, "compile_train_step", lambda *a, **k: pytest.fail("compiled"))
    config = tiny_config()
    config.model.model_channels = 32
    config.training.init_from = finished_run[0]
    with pytest.raises(checkpointing.ConfigMismatchError) as err:
        train.Run(config, str(tmp_path / "wide"))
    text = str(err.value)
    assert "do not fit this model" in text and "keep model_channels" in text
    assert "denoiser/down_0_0/in_conv/kernel: (3, 3, 16, 16) -> (3, 3, 32, 32)" in text
    assert trained_steps(str(tmp_path / "wide")) == []
    config.model.model_channels = 16
    config.training.init_from = str(tmp_path / "empty")
    with pytest.raises(checkpointing.ConfigMismatchError, match="holds no checkpoint"):
        train.Run(config, str(tmp_path / "other"))


def _steps_on_mesh(config, mesh, batches):
    model, diff = create_model(config), ts.make_diffusion(config)
    tx = ts.make_optimizer(config.training)
    init = lambda: ts.create_train_state(config, model, tx)  # noqa: E731
    state_sharding = sharding.state_shardings(jax.eval_shape(init), mesh)
    state = jax.jit(init, out_shardings=state_sharding)()
    step_fn = ts.compile_train_step(config, model, diff, tx, mesh, state_sharding)
    metrics = []
    for batch in batches:
        state, m = step_fn(state, sharding.global_batch(batch, mesh))
        metrics.append(jax.device_get(m["metrics"].compute()))
    return jax.device_get(state), metrics


@pytest.mark.slow  # two train-step compiles (1 device; 8 devices as data=2 x fsdp=4)
def test_data_fsdp_and_mixed_meshes_match_one_device():
    """The mixed mesh covers both axes at once: the batch split 8 ways, the parameters and
    optimizer state split 4 ways (fsdp) and replicated 2 ways (data). A pure data mesh (8, 1)
    was a third compile here; test_multiprocess covers 2 processes."""
    assert jax.device_count() == 8
    config = tiny_config()
    it = data.train_iterator(config.data, batch_size=8, seed=0)
    batches = [next(it) for _ in range(3)]
    state1, metrics1 = _steps_on_mesh(config, sharding.create_mesh(devices=jax.devices()[:1]),
                                      batches)
    mesh = sharding.create_mesh(2, 4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    fresh = jax.eval_shape(lambda: ts.create_train_state(
        config, create_model(config), ts.make_optimizer(config.training)))
    assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(
        sharding.state_shardings(fresh, mesh).params)), "no parameter is split over fsdp"
    state8, metrics8 = _steps_on_mesh(config, mesh, batches)
    for a, b in zip(jax.tree.leaves(state8.params), jax.tree.leaves(state1.params)):
        # atol: 1% of one Adam step (lr 1e-3): Adam divides by sqrt(v), so an element
        # whose gradient is at round-off level moves by up to lr either way (seen: 1 of
        # 9,216 elements 1.2e-6 apart on another CPU); a wrong shard moves many by ~lr
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for step in range(3):
        np.testing.assert_allclose(metrics8[step]["loss"], metrics1[step]["loss"],
                                   rtol=1e-5)
    # The zero-initialised output conv and cross-attention projections block the encoder's
    # gradient for two steps (each opens after one update); from step 3 on the
    # straight-through estimator must deliver a non-zero gradient.
    assert metrics1[0]["encoder_grad_norm"] == 0.0
    assert metrics1[2]["encoder_grad_norm"] > 0.0
    fresh = jax.jit(lambda: ts.create_train_state(  # jitted: eagerly, every op compiles
        config, create_model(config), ts.make_optimizer(config.training)))()
    assert not np.allclose(state1.params["encoder"]["to_logits"]["kernel"],
                           fresh.params["encoder"]["to_logits"]["kernel"])


@pytest.mark.slow  # a tfds pipeline and a train-step compile per dataset
@pytest.mark.parametrize("config_name,image_shape", [("cifar10", (32, 32, 3)),
                                                      ("celeba64", (64, 64, 3))])
def test_one_train_step_on_mock_data(config_name, image_shape, tmp_path, monkeypatch):
    import importlib
    from dmz_jax.data import tfds_source
    config = importlib.import_module(f"configs.{config_name}").get_config("tiny")
    config.data.data_dir = str(tmp_path)
    monkeypatch.setattr(tfds_source, "is_prepared", lambda builder: True)
    with tfds.testing.mock_data(num_examples=16):
        it = data.train_iterator(config.data, batch_size=8, seed=0)
        batch = next(it)
    assert batch["image"].shape == (8, *image_shape)
    # one device: the meshes are test_data_fsdp_and_mixed_meshes_match_one_device's
    state, metrics = _steps_on_mesh(config, sharding.create_mesh(devices=jax.devices()[:1]),
                                    [batch])
    assert int(state.step) == 1 and np.isfinite(metrics[0]["loss"])


def test_centering_makes_every_bit_split_the_images_evenly():
    config = tiny_config()
    model = create_model(config)
    params = jax.jit(lambda key: init_params(model, key, (32, 32, 1)))(jax.random.PRNGKey(0))
    images = data.load_split(config.data, "train", 64)["image"]
    encode = jax.jit(lambda p: model.apply({"params": p}, images, method=DMZ.encode))
    before = np.asarray(encode(params)).mean(0)
    centred = jax.jit(lambda p: ts.center_encoder_logits(model, p, images))(params)
    after = np.asarray(encode(centred)).mean(0)
    np.testing.assert_array_equal(after, np.full(8, 0.5))
    assert not np.array_equal(before, after)


def test_encoder_lr_scale_scales_only_the_encoder_update():
    config = tiny_config()
    model = create_model(config)
    params = jax.jit(lambda key: init_params(model, key, (32, 32, 1)))(jax.random.PRNGKey(0))
    grads = jax.tree.map(jnp.ones_like, params)
    updates = {}
    for scale in (1.0, 0.25):
        config.training.encoder_lr_scale = scale
        tx = ts.make_optimizer(config.training)
        # jitted: eagerly, every leaf's shape would compile each optimizer op
        updates[scale], _ = jax.jit(lambda g, p, tx=tx: tx.update(g, tx.init(p), p))(grads,
                                                                                    params)
    enc1, enc = updates[1.0]["encoder"]["to_logits"]["bias"], updates[0.25]["encoder"]["to_logits"]["bias"]
    np.testing.assert_allclose(enc, 0.25 * enc1, rtol=1e-6)
    np.testing.assert_array_equal(updates[0.25]["denoiser"]["out_conv"]["bias"],
                                  updates[1.0]["denoiser"]["out_conv"]["bias"])
