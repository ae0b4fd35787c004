"""The loss-second-moment timestep sampler: its pure functions against hand-computed numbers
and a sequential reference, and inside the train step (history update, skipped steps,
exact resume) on a minimal network that compiles in seconds."""

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from dmz_jax import checkpointing, sharding
from dmz_jax import timestep_sampler as tsam
from dmz_jax import train_state as ts
from dmz_jax.config_checks import ConfigError, check_config

H = tsam.HISTORY


def _state(history, count):
    return {"history": jnp.asarray(history, jnp.float32), "count": jnp.asarray(count, jnp.int32)}


def _filled():
    """T = 4, every row full: rows of 1s, 2s, alternating 3 and 4, zeros."""
    history = np.zeros((4, H))
    history[0], history[1], history[2] = 1.0, 2.0, [3.0, 4.0] * (H // 2)
    return _state(history, [H] * 4)


_sample = jax.jit(tsam.sample, static_argnums=(2, 3))
_update = jax.jit(tsam.update)


def test_probabilities_and_weights_by_hand():
    # sqrt(mean(loss^2)) per row: 1, 2, sqrt((9 + 16) / 2), 0
    w = np.array([1.0, 2.0, np.sqrt(12.5), 0.0])
    p = 0.999 * w / w.sum() + 0.001 / 4
    state = _filled()
    assert bool(tsam.warmed_up(state))
    np.testing.assert_allclose(tsam.probabilities(state), p, rtol=1e-6)
    t, weights = _sample(state, jax.random.PRNGKey(0), 64, 4)
    t, weights = np.asarray(t), np.asarray(weights)
    assert t.dtype == np.int32 and weights.dtype == np.float32
    np.testing.assert_allclose(weights, 1.0 / (4 * p[t]), rtol=1e-6)
    assert set(t) == {0, 1, 2}  # row 3 has probability 0.00025
    # p = 0.999 w / 6.53553 + 0.00025 = (0.15311, 0.30596, 0.54068, 0.00025): row 2 is
    # weighted 1 / (4 p) = 0.46238, row 0 1.63285
    np.testing.assert_allclose(weights[t == 2][0], 0.46238, rtol=1e-4)
    np.testing.assert_allclose(weights[t == 0][0], 1.63285, rtol=1e-4)


def test_draws_follow_the_probabilities():
    state = _filled()
    t, _ = _sample(state, jax.random.PRNGKey(1), 40_000, 4)
    freq = np.bincount(np.asarray(t), minlength=4) / 40_000
    p = np.asarray(tsam.probabilities(state))
    assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / 40_000) + 1e-4), (freq, p)


def test_uniform_until_every_row_is_full():
    state = _filled()
    history, count = np.asarray(state["history"]), np.array([H, H, H - 1, H])
    warm = _state(history, count)
    assert not bool(tsam.warmed_up(warm))
    np.testing.assert_array_equal(tsam.probabilities(warm), np.full(4, 0.25, np.float32))
    key = jax.random.PRNGKey(2)
    t, weights = _sample(warm, key, 256, 4)
    # the uniform sampler's draw exactly, weighted 1
    np.testing.assert_array_equal(t, jax.random.randint(key, (256,), 0, 4))
    np.testing.assert_array_equal(weights, np.ones(256, np.float32))
    assert tsam.sample(None, key, 256, 4)[1] is None
    np.testing.assert_array_equal(tsam.sample(None, key, 256, 4)[0], t)
    # one more loss at t = 2 completes the warm-up
    full = _update(warm, jnp.array([2]), jnp.array([5.0]))
    assert bool(tsam.warmed_up(full))
    assert not np.allclose(tsam.probabilities(full), 0.25)


def _sequential(history, count, ts_, losses):
    """I-DDPM's update_with_all_losses, one pair at a time (the reference)."""
    history, count = np.array(history, np.float64), np.array(count)
    for t, loss in zip(ts_, losses):
        if count[t] == H:
            history[t, :-1] = history[t, 1:]
            history[t, -1] = loss
        else:
            history[t, count[t]] = loss
            count[t] += 1
    return history, count


def test_history_update_in_batch_order_with_repeated_t():
    history = np.zeros((3, H))
    history[0, :9] = np.arange(1, 10)  # 9 losses: room for one
    history[1] = np.arange(10, 20)  # full
    state = _state(history, [9, H, 0])
    new = _update(state, jnp.array([0, 2, 0, 1, 0, 2]),
                  jnp.array([100.0, 200.0, 101.0, 300.0, 102.0, 201.0]))
    got_h, got_c = np.asarray(new["history"]), np.asarray(new["count"])
    # row 0: 1..9, 100 fills it, then 101 and 102 shift out 1 and 2
    np.testing.assert_array_equal(got_h[0], [3, 4, 5, 6, 7, 8, 9, 100, 101, 102])
    np.testing.assert_array_equal(got_h[1], [11, 12, 13, 14, 15, 16, 17, 18, 19, 300])
    np.testing.assert_array_equal(got_h[2], [200, 201] + [0] * (H - 2))
    np.testing.assert_array_equal(got_c, [H, H, 2])
    # random batches (many repeats, 25 > H at t = 0 once) against the sequential reference
    rng = np.random.default_rng(0)
    h, c = np.zeros((5, H)), np.zeros(5, int)
    state = _state(h, c)
    for i in range(4):
        t = rng.integers(0, 5, 32) if i != 2 else np.r_[np.zeros(25, int), rng.integers(0, 5, 7)]
        losses = rng.uniform(0, 2, 32).astype(np.float32)
        h, c = _sequential(h, c, t, losses)
        state = _update(state, jnp.asarray(t), jnp.asarray(losses))
        np.testing.assert_array_equal(state["count"], c)
        np.testing.assert_allclose(state["history"], h, rtol=1e-7)
    assert tsam.update(None, jnp.array([1]), jnp.array([1.0])) is None


def test_init_and_config_choice():
    assert tsam.init("uniform", 50) is None
    state = tsam.init("loss_second_moment", 50)
    assert state["history"].shape == (50, H) and state["history"].dtype == jnp.float32
    assert state["count"].shape == (50,) and state["count"].dtype == jnp.int32
    with pytest.raises(ValueError, match="loss_second_moment"):
        tsam.init("loss-second-moment", 50)
    config = tiny_config()
    config.training.timestep_sampler = "importance"
    with pytest.raises(ConfigError, match="training.timestep_sampler='importance': unknown"):
        check_config(config, num_devices=1, process_count=1)


def test_microbatched_example_losses_come_back_in_batch_order():
    """mean_grads with 2 microbatches returns the per-example losses (and gradients) of one
    batch: draws are made once per batch, so t and the loss weights do not depend on it."""
    def loss_fn(params, x0, t, noise, rngs, weights=None, xi=None, batch_stats=None):
        per = params * jnp.mean(x0, axis=(1, 2, 3)) + t + noise[:, 0, 0, 0]
        return jnp.mean(per * weights), {"loss": jnp.mean(per * weights), "example_loss": per}

    x0 = jax.random.normal(jax.random.PRNGKey(0), (6, 2, 2, 1))
    draws = {"t": jnp.arange(6.0), "noise": jax.random.normal(jax.random.PRNGKey(1), x0.shape),
             "weights": jnp.linspace(0.5, 1.5, 6)}
    rngs = {"dropout": jax.random.PRNGKey(2)}
    one = jax.jit(lambda p: ts.mean_grads(loss_fn, p, x0, rngs, draws, 1))(2.0)
    two = jax.jit(lambda p: ts.mean_grads(loss_fn, p, x0, rngs, draws, 2))(2.0)
    np.testing.assert_allclose(two[1]["example_loss"], one[1]["example_loss"], rtol=1e-6)
    np.testing.assert_allclose(two[0], one[0], rtol=1e-6)
    np.testing.assert_allclose(two[1]["loss"], one[1]["loss"], rtol=1e-6)


# ---------------------------------------------------------------------------- in the train step


class _AffineDenoiser:
    """Stands in for DMZ in the train step (what `train_state._loss_fn` uses of it:
    uses_latent, and apply(..., method=DMZ.denoise) -> eps and v): per-channel affine maps of
    x_t and the timestep, so that the step compiles in a second, not a U-Net's 15 (cold)."""

    uses_latent = False

    def apply(self, variables, x_t, model_t, z, **kwargs):
        p = variables["params"]["denoiser"]
        h = x_t * p["a"] + model_t[:, None, None, None] * p["b"] / 50
        return jnp.concatenate([h, jnp.tanh(h * p["v"])], axis=-1)


@pytest.fixture(scope="module")
def minimal():
    """The loss-second-moment sampler and input perturbation (T = 50, batch 8 of 8x8 images,
    the tiny config's optimizer and EMA) with `_AffineDenoiser`: its jitted train step on one
    device and a fresh state."""
    config = tiny_config()
    config.data.image_size = 8
    config.training.timestep_sampler = "loss_second_moment"
    config.diffusion.input_perturbation = 0.1
    mesh = sharding.create_mesh(devices=jax.devices()[:1])
    model, diff = _AffineDenoiser(), ts.make_diffusion(config)
    tx = ts.make_optimizer(config.training)
    params = {"denoiser": {k: jnp.full((1,), v, jnp.float32)  # not weak: one compile
                           for k, v in (("a", 0.5), ("b", 0.1), ("v", 0.3))}}
    zero = jnp.zeros((), jnp.int32)
    state = ts.TrainState(step=zero, params=params, ema_params=params, opt_state=tx.init(params),
                          rng=jax.random.PRNGKey(3), nonfinite_streak=zero, skipped_steps=zero,
                          t_sampler=tsam.init("loss_second_moment", 50))
    abstract = jax.eval_shape(lambda: state)
    shardings = sharding.state_shardings(abstract, mesh)
    step = ts.compile_train_step(config, model, diff, tx, mesh, shardings)
    images = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (8, 8, 8, 1), minval=-1,
                                           maxval=1))
    return dict(config=config, mesh=mesh, model=model, diff=diff, abstract=abstract,
                shardings=shardings, state=jax.device_put(state, shardings),
                run=lambda s, x: step(s, sharding.global_batch({"image": x}, mesh)),
                images=images)


def _host(state):
    return jax.device_get(state)


def _step_draws(minimal, state):
    """(rngs, draws) of the train step of `state`, recomputed outside it: t and the loss
    weights from the "t" key, noise, and DDPM-IP's xi from the step's fifth key."""
    if "draw" not in minimal:
        minimal["draw"] = jax.jit(lambda rngs, x, sampler: ts.draw_inputs(
            rngs, x, 50, minimal["config"], sampler))
    step_key = jax.random.fold_in(state.rng, state.step)
    rngs = dict(zip(("t", "noise", "dropout", "latent"), jax.random.split(step_key, 4)),
                xi=jax.random.fold_in(step_key, 4))
    draws = jax.device_get(minimal["draw"](rngs, minimal["images"], state.t_sampler))
    return rngs, draws


def _recorded(history, t, full):
    """The losses a step appended, in batch order: example i is the r-th of the batch at its
    t, found at slot r of an empty row, or at slot H - n + r of a full row (n at that t)."""
    t = list(t)
    rank = [t[:i].count(ti) for i, ti in enumerate(t)]
    return np.array([history[ti, (H - t.count(ti) if full else 0) + r]
                     for ti, r in zip(t, rank)])


def test_train_step_records_the_unweighted_losses_and_skips_non_finite_steps(minimal):
    config, state, images = minimal["config"], minimal["state"], minimal["images"]
    assert state.t_sampler["history"].shape == (50, H)
    before = _host(state)
    new, out = minimal["run"](jax.tree.map(jnp.copy, state), images)
    after = _host(new)
    rngs, draws = _step_draws(minimal, before)
    assert set(draws) == {"t", "noise", "weights", "xi"}
    t = draws["t"]
    np.testing.assert_array_equal(draws["weights"], 1.0)  # still uniform
    np.testing.assert_array_equal(after.t_sampler["count"], np.bincount(t, minlength=50))
    recorded = _recorded(after.t_sampler["history"], t, full=False)
    # they are the per-example losses of this step's draws, recomputed outside the step
    loss_fn = functools.partial(ts._loss_fn, model=minimal["model"], diff=minimal["diff"],
                                config=config)
    _, aux = jax.jit(loss_fn)(before.params, images, draws["t"], draws["noise"], rngs,
                              draws["weights"], draws["xi"])
    np.testing.assert_allclose(aux["example_loss"], recorded, rtol=1e-5)
    # before the warm-up every weight is 1: the logged loss is the mean recorded loss
    np.testing.assert_allclose(out["metrics"].compute()["loss"], recorded.mean(), rtol=1e-5)
    # a non-finite step leaves the history (and everything else but the counters) unchanged
    skipped, out = minimal["run"](new, np.full_like(images, np.nan))
    skipped = _host(skipped)
    assert int(skipped.skipped_steps) == 1
    for a, b in zip(jax.tree.leaves(after.t_sampler), jax.tree.leaves(skipped.t_sampler)):
        np.testing.assert_array_equal(a, b)


def test_resume_with_a_warm_history_is_bit_exact(minimal, tmp_path):
    """Past the warm-up (a filled history): 2 steps in a row equal 1 step, a checkpoint
    save and restore (orbax, onto the shardings), and 1 more step."""
    config, images = minimal["config"], minimal["images"]
    rng = np.random.default_rng(0)
    history = rng.uniform(0.05, 3.0, (50, H)).astype(np.float32)
    history[7] *= 40  # t = 7 is drawn often
    warm = minimal["state"].replace(t_sampler=jax.device_put(
        _state(history, [H] * 50), minimal["shardings"].t_sampler))
    straight = minimal["run"](minimal["run"](jax.tree.map(jnp.copy, warm), images)[0],
                              images[::-1].copy())[0]
    _, draws = _step_draws(minimal, _host(warm))
    t, weights = draws["t"], draws["weights"]
    assert np.any(weights != 1.0) and np.sum(t == 7) >= 2  # importance sampling is on
    once, out = minimal["run"](jax.tree.map(jnp.copy, warm), images)
    # the history records the unweighted losses; the loss logged (and differentiated) is the
    # mean of the weighted ones
    recorded = _recorded(_host(once.t_sampler["history"]), t, full=True)
    np.testing.assert_allclose(out["metrics"].compute()["loss"], np.mean(weights * recorded),
                               rtol=1e-5)
    assert not np.isclose(np.mean(recorded), np.mean(weights * recorded), rtol=1e-3)
    with checkpointing.create_manager(str(tmp_path), 2) as manager:
        checkpointing.save(manager, 1, once, config)
        manager.wait_until_finished()
        restored = checkpointing.restore_latest(
            manager, checkpointing.placed(minimal["abstract"], minimal["shardings"]), config)
    resumed = minimal["run"](restored, images[::-1].copy())[0]
    straight, resumed = _host(straight), _host(resumed)
    assert jax.tree.structure(straight) == jax.tree.structure(resumed)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    assert int(resumed.step) == 2
    assert resumed.t_sampler["history"][7, -1] != history[7, -1]


@flax.struct.dataclass
class _OldTrainState:
    """The train state before t_sampler existed."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_streak: jax.Array
    skipped_steps: jax.Array


def test_a_checkpoint_written_before_the_sampler_existed_restores(tmp_path, tiny):
    """A uniform-sampler state has no t_sampler node at all: the tree of the train state
    before this field existed, so those checkpoints restore (orbax refuses extra nodes)."""
    fields = {"step": jnp.int32(3), "params": {"w": jnp.ones((2, 3))},
              "ema_params": {"w": jnp.full((2, 3), 2.0)}, "opt_state": (jnp.zeros(3),),
              "rng": jax.random.PRNGKey(1), "nonfinite_streak": jnp.int32(0),
              "skipped_steps": jnp.int32(1)}
    with checkpointing.create_manager(str(tmp_path), 2) as manager:
        checkpointing.save(manager, 3, _OldTrainState(**fields), tiny)
        manager.wait_until_finished()
        target = jax.eval_shape(lambda: ts.TrainState(**fields))
        assert target.t_sampler is None and len(jax.tree.leaves(target)) == 7
        restored = checkpointing.restore_latest(
            manager, checkpointing.placed(target, jax.sharding.SingleDeviceSharding(
                jax.devices()[0])), tiny)
    assert isinstance(restored, ts.TrainState) and restored.t_sampler is None
    np.testing.assert_array_equal(restored.ema_params["w"], 2.0)
    assert int(restored.skipped_steps) == 1
