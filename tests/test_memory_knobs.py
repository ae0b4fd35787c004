"""Memory and precision knobs against the default path: model.attention_impl, model.remat,
model.dtype (bfloat16 compute) and training.grad_accum_steps, on the tiny config.

Compiles are few: one jit per function and model; the default model's parameters and
outputs are shared by the module.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from dmz_jax import sharding
from dmz_jax import train_state as ts
from dmz_jax.config_checks import ConfigError, check_config
from dmz_jax.model import DMZ, create_model, init_params
from dmz_jax.networks import layers

SHAPE = (32, 32, 1)  # the tiny config's images


def _config(**model):
    config = tiny_config()
    config.model.update(model)
    return config


@pytest.fixture(scope="module")
def setup():
    """The default path: opened parameters (the zero-initialised output convs and attention
    projections shifted by 0.05, so every block, z and the encoder reach the loss), a batch of
    4 with its t/noise/rng draws, the denoiser's output, the loss and its gradient."""
    config = _config()
    params = jax.jit(lambda key: init_params(create_model(config), key, SHAPE))(
        jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf + 0.05 if "out_conv" in str(path) or "proj_out" in str(path)
        else leaf, params)
    keys = jax.random.split(jax.random.PRNGKey(1), 6)
    x0 = jax.random.uniform(keys[0], (4, *SHAPE), minval=-1.0, maxval=1.0)
    rngs = dict(zip(("t", "noise", "dropout", "latent"), keys[2:]))
    t, noise = ts._draw_t_noise(rngs, x0, config.diffusion.num_timesteps)
    z = jax.random.bernoulli(keys[1], 0.5, (4, config.model.latent_dim)).astype(jnp.float32)
    batch = dict(x0=x0, t=t, noise=noise, rngs=rngs, z=z)
    grads, aux = _grad_fn(config)(params, batch)
    return dict(config=config, params=params, batch=batch, out=_denoise(config, params, batch),
                grads=grads, aux=aux)


def _denoise(config, params, batch):
    """The denoiser's output [B, 32, 32, 2] on x0 at t (the network timestep) with code z."""
    model = create_model(config)
    return jax.jit(lambda p: model.apply({"params": p}, batch["x0"], batch["t"].astype(
        jnp.float32), batch["z"], method=DMZ.denoise))(params)


def _grad_fn(config):
    """Jitted params, batch -> (gradient, aux) of the training loss of `config`'s model."""
    return jax.jit(jax.grad(_loss_fn(config), has_aux=True))


def _loss_fn(config):
    """params, batch -> (loss, aux): the training loss of `config`'s model."""
    model, diff = create_model(config), ts.make_diffusion(config)
    loss = functools.partial(ts._loss_fn, model=model, diff=diff, config=config)
    return lambda p, b: loss(p, b["x0"], b["t"], b["noise"], b["rngs"])


def test_config_checks_report_the_knobs():
    config = _config(dtype="float16", attention_impl="flash")
    config.training.grad_accum_steps = 3  # batch 8
    with pytest.raises(ConfigError) as info:
        check_config(config, num_devices=1, process_count=1)
    assert [(p.key, p.kind) for p in info.value.problems] == [
        ("model.dtype", "choice"), ("model.attention_impl", "choice"),
        ("training.grad_accum_steps", "divisible")]
    config = _config(dtype="bfloat16", attention_impl="dot_product_attention", remat=True)
    config.training.grad_accum_steps = 2
    check_config(config, num_devices=1, process_count=1)
    with pytest.raises(ConfigError, match="training.grad_accum_steps=2: .* over 8 device"):
        check_config(config, num_devices=8, process_count=1)  # microbatches of 4 on 8 devices
    config.training.grad_accum_steps = 0
    with pytest.raises(ConfigError, match=r"grad_accum_steps=0: must be >= 1"):
        check_config(config)


def test_dot_product_attention_matches_xla_in_self_and_cross_attention(setup):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 16))
    tokens = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 12))
    for block, args in ((layers.AttentionBlock, (x,)), (layers.CrossAttention, (x, tokens))):
        # jitted: eagerly, every op of a block compiles on its own
        variables = jax.jit(block(num_heads=2, num_groups=8).init)(jax.random.PRNGKey(2), *args)
        variables = jax.tree.map(lambda v: v + 0.1, variables)  # non-zero output projection
        out = {impl: jax.jit(block(2, 8, attention_impl=impl).apply)(variables, *args)
               for impl in layers.ATTENTION_IMPLS}
        assert not np.allclose(out["xla"], x)
        np.testing.assert_allclose(out["dot_product_attention"], out["xla"], rtol=1e-5, atol=1e-6)
    # the whole denoiser: self-, cross- and middle-block attention
    got = _denoise(_config(attention_impl="dot_product_attention"), setup["params"],
                   setup["batch"])
    np.testing.assert_allclose(got, setup["out"], rtol=1e-5, atol=1e-5)


def test_remat_gives_the_same_loss_and_gradients(setup):
    # tiny: dropout 0.1 and Bernoulli bits, drawn from the same keys with and without remat
    g0, aux0 = setup["grads"], setup["aux"]
    g1, aux1 = _grad_fn(_config(remat=True))(setup["params"], setup["batch"])
    assert aux0["z_mean"] == aux1["z_mean"] and np.isfinite(aux0["loss"])
    np.testing.assert_allclose(aux1["loss"], aux0["loss"], rtol=1e-6)
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    scale = max(float(np.abs(a).max()) for a in jax.tree.leaves(g0))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):  # float32 summation order
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * scale)
    assert optax.tree.norm(g0["encoder"]) > 0  # the straight-through gradient is compared too


def test_bfloat16_computes_in_bfloat16_with_float32_parameters(setup):
    params, batch = setup["params"], setup["batch"]
    bf16 = _config(dtype="bfloat16")
    model = create_model(bf16)
    # the same parameter tree, all float32 (traced only: nothing compiles)
    abstract = jax.eval_shape(lambda key: init_params(model, key, SHAPE), jax.random.PRNGKey(0))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(
        lambda a: (a.shape, a.dtype), params)
    # activations: every module's output is bfloat16 but GroupNorm's statistics (inside
    # GroupNorm32, whose output is cast back), the z tokens and the denoiser's output
    _, state = jax.eval_shape(lambda p: model.apply(
        {"params": p}, batch["x0"], batch["t"].astype(jnp.float32), batch["z"],
        method=DMZ.denoise, capture_intermediates=True, mutable=["intermediates"]), params)
    dtypes = {"/".join(path): leaf[0].dtype for path, leaf in _flat(state["intermediates"])}
    norms = {k for k in dtypes if k.endswith("/GroupNorm_0/__call__")}
    assert {k for k, d in dtypes.items() if d != jnp.bfloat16} == norms | {
        "denoiser/__call__", "z_tokens/__call__"}
    assert {dtypes[k] for k in norms | {"denoiser/__call__"}} == {jnp.dtype(jnp.float32)}
    assert len(dtypes) - len(norms) > 50 and "denoiser/mid_cross_attn/__call__" in dtypes
    # the loss (float32, from the float32-cast output) stays close to float32 compute's
    loss, _ = jax.jit(_loss_fn(bf16))(params, batch)
    assert loss.dtype == jnp.float32 and np.isfinite(loss)
    np.testing.assert_allclose(loss, setup["aux"]["loss"], rtol=2e-2)  # measured 2.8e-3
    # the train step's state stays float32: params, EMA, optimizer state (traced only)
    tx = ts.make_optimizer(bf16.training)
    state = jax.eval_shape(lambda: ts.create_train_state(bf16, model, tx))
    new_state, _ = jax.eval_shape(functools.partial(
        ts.train_step, model=model, diff=ts.make_diffusion(bf16), tx=tx, config=bf16),
        state, {"image": batch["x0"]})
    floats = [a.dtype for a in jax.tree.leaves((new_state.params, new_state.ema_params,
                                                 new_state.opt_state))
              if jnp.issubdtype(a.dtype, jnp.floating)]
    assert floats and set(floats) == {jnp.dtype(jnp.float32)}


def _flat(tree, prefix=()):
    """(path tuple, leaf) of a nested dict whose leaves are tuples of arrays."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, prefix + (key,))
        else:
            yield prefix + (key,), value


@pytest.mark.slow  # two train-step compiles
def test_grad_accumulation_gives_the_same_step_as_one_batch(setup):
    """One train step on 16 images: on 1 device in one batch, and on 8 devices with
    grad_accum_steps 2 (a lax.scan over 2 microbatches of 8, one image per device each).
    Deterministic given t and noise: no dropout, threshold bits. The optimizer is SGD
    (learning rate 1), so the step moves each parameter by minus its mean gradient; AdamW's
    first step, lr * g / (|g| + 1e-8), would blow gradients of float32 round-off size up to
    the learning rate."""
    config = _config(dropout=0.0, binary_estimator="threshold")
    model, diff, tx = create_model(config), ts.make_diffusion(config), optax.sgd(1.0)
    params, zero = setup["params"], jnp.zeros((), jnp.int32)
    state0 = ts.TrainState(step=zero, params=params, ema_params=params, opt_state=tx.init(params),
                           rng=jax.random.PRNGKey(2), nonfinite_streak=zero, skipped_steps=zero)
    images = jax.random.uniform(jax.random.PRNGKey(3), (16, *SHAPE), minval=-1.0, maxval=1.0)
    results = {}
    for steps, devices in ((1, 1), (2, 8)):
        config.training.batch_size, config.training.grad_accum_steps = 16, steps
        check_config(config, num_devices=devices, process_count=1)
        mesh = sharding.create_mesh(devices=jax.devices()[:devices])
        step = ts.compile_train_step(config, model, diff, tx, mesh, sharding.replicated(mesh))
        state, out = step(jax.tree.map(jnp.copy, state0),
                          sharding.global_batch({"image": np.asarray(images)}, mesh))
        results[steps] = jax.device_get((state.params, out["metrics"].compute()))
    (p1, m1), (p2, m2) = results[1], results[2]
    for key in ("loss", "mse", "vb", "grad_norm", "encoder_grad_norm", "z_mean"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-4, err_msg=key)  # vb: 2.6e-5
    assert m1["encoder_grad_norm"] > 0 and m1["grad_norm"] > 0
    steps1 = [a - b for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params))]
    steps2 = [a - b for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(params))]
    scale = max(float(np.abs(d).max()) for d in steps1)
    for d1, d2 in zip(steps1, steps2):  # float32 sums in another order: measured <= 5e-5
        tol = 2e-4 * max(float(np.abs(d1).max()), 1e-3 * scale)  # of each parameter's largest
        np.testing.assert_allclose(d2, d1, rtol=0, atol=tol)
