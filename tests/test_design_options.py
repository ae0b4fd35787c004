"""Every design option the README advertises is built, trained three steps and sampled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from dmz_jax import evaluate, sharding
from dmz_jax import train_state as ts
from dmz_jax.model import DMZ, create_model, parameter_groups

OPTIONS = {  # name -> config overrides of model
    "gaussian_latent": {"latent_type": "gaussian"},
    "no_latent": {"latent_type": "none"},
    "time_embedding": {"conditioning": "time_embedding"},
    "no_conditioning": {"conditioning": "none"},
    "token_mlp": {"token_mlp": True},
    "threshold_estimator": {"binary_estimator": "threshold"},
}


def _batch(config, seed=0):
    rng = np.random.default_rng(seed)
    shape = (config.training.batch_size, 32, 32, 1)
    return {"image": rng.uniform(-1, 1, shape).astype(np.float32)}


@pytest.mark.slow  # one train-step compile and one sampler compile per option (~25 s)
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_builds_trains_three_steps_and_samples(name):
    config = tiny_config()
    config.model.update(OPTIONS[name])
    mesh = sharding.create_mesh(devices=jax.devices()[:1])
    model, diff = create_model(config), ts.make_diffusion(config)
    tx = ts.make_optimizer(config.training)
    rep = sharding.replicated(mesh)
    state = jax.jit(lambda: ts.create_train_state(config, model, tx), out_shardings=rep)()
    groups = parameter_groups(state.params)

    step = ts.compile_train_step(config, model, diff, tx, mesh, rep)
    before = jax.device_get(state.params)
    # the zero-initialised output convs hold every other gradient at 0 in the first step (only
    # denoiser/out_conv moves); the z pathway is 2 of them deep and gets its gradient at step 3
    for i in range(3):
        state, out = step(state, sharding.global_batch(_batch(config, 10 + i), mesh))
        assert int(out["skipped_steps"]) == 0
        assert np.isfinite(float(out["metrics"].compute()["loss"]))
    assert int(state.step) == 3
    after = jax.device_get(state.params)
    leaf_names = lambda tree: ["/".join(k.key for k in path)  # noqa: E731
                               for path, _ in jax.tree_util.tree_leaves_with_path(tree)]
    moved = {n for n, a, b in zip(leaf_names(before), jax.tree.leaves(before),
                                  jax.tree.leaves(after))
             if not np.array_equal(a, b)}
    own = set(leaf_names(before))
    if model.uses_latent:  # the option's own parameters train: the z pathway, and the encoder
        own = {n for n in own if n.startswith(("z_tokens", "z_time")) or "cross_attn" in n}
    else:  # no z: the plain U-Net trains, every parameter of it
        assert "denoiser/in_conv/kernel" in own
    assert own and own <= moved, sorted(own - moved)
    assert any(n.startswith("encoder/") for n in moved) == model.uses_latent, \
        "the encoder trains (through the estimator) exactly when there is a z"

    config.sampling.num_samples = 2
    x = evaluate.make_sample_fn(config, model, diff, 2)(state.ema_params, jax.random.PRNGKey(0))
    assert x.shape == (2, 32, 32, 1) and bool(jnp.all(jnp.isfinite(x)))

    # the option is really in the network
    names = {"/".join(k.key for k in path) for path, _ in
             jax.tree_util.tree_leaves_with_path(state.params)}
    cross = any("cross_attn" in n for n in names)
    if name in ("no_latent", "no_conditioning"):
        assert not model.uses_latent and groups["encoder"] == groups["conditioning"] == 0
    elif name == "time_embedding":
        assert "z_time/kernel" in names and not cross
    else:
        assert model.uses_latent and cross and groups["conditioning"] > 0
    if name == "token_mlp":
        assert "z_tokens/mlp_in/kernel" in names
    if model.uses_latent:
        images = jnp.asarray(_batch(config, 1)["image"])
        encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=DMZ.encode))
        z = encode(state.params, images)  # jitted: eagerly, every op compiles on its own
        is_bits = set(np.unique(np.asarray(z)).tolist()) <= {0.0, 1.0}
        assert is_bits == (config.model.latent_type == "binary")
