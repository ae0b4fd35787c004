"""The authors' options of the model: Gumbel-softmax bits, one (off, on) token, their configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from dmz_jax.model import DMZ, create_model, init_params, parameter_groups
from dmz_jax.networks import latent
from dmz_jax.networks.latent import Encoding

LOGITS = jnp.array([[-2.0, -0.5, 0.0, 0.7, 3.0]])


def test_gumbel_soft_sample_is_soft_and_its_hard_form_is_bernoulli_of_sigmoid():
    n = 20_000
    logits = jnp.tile(LOGITS, (n, 1))
    z = latent.binary_from_logits(logits, jax.random.PRNGKey(0), Encoding.TRAIN,
                                  "gumbel_softmax", temperature=1.0)
    z = np.asarray(z)
    assert 0 < z.min() and z.max() < 1 and len(np.unique(z)) > n  # soft: no straight-through
    # argmax of the pair = 1[z > 0.5] is a Bernoulli(sigmoid(l)) draw (the Gumbel-max trick)
    p = np.asarray(jax.nn.sigmoid(LOGITS))[0]
    np.testing.assert_allclose((z > 0.5).mean(0), p, atol=0.012)  # 4 sigma at n = 20k
    hard = np.asarray(latent.binary_from_logits(logits, jax.random.PRNGKey(1), Encoding.SAMPLE,
                                                "gumbel_softmax"))
    assert set(np.unique(hard)) == {0.0, 1.0}
    np.testing.assert_allclose(hard.mean(0), p, atol=0.012)
    # temperature: a colder sample is harder, with the same draw's ordering
    cold = np.asarray(latent.binary_from_logits(logits, jax.random.PRNGKey(0), Encoding.TRAIN,
                                                "gumbel_softmax", temperature=0.1))
    assert np.mean(np.abs(cold - 0.5)) > np.mean(np.abs(z - 0.5)) + 0.1
    np.testing.assert_array_equal(cold > 0.5, z > 0.5)


def test_gumbel_soft_sample_gradient_is_the_relaxation_s():
    """d z / d l = z (1 - z) / tau for the same noise (a sigmoid of (l + noise) / tau)."""
    key, tau = jax.random.PRNGKey(3), 0.5

    def total(logits):
        return latent.binary_from_logits(logits, key, Encoding.TRAIN, "gumbel_softmax",
                                         temperature=tau).sum()
    z = latent.binary_from_logits(LOGITS, key, Encoding.TRAIN, "gumbel_softmax", temperature=tau)
    np.testing.assert_allclose(jax.grad(total)(LOGITS), z * (1 - z) / tau, rtol=1e-5)


def test_one_hot_pairs_layout_is_off_on_per_bit():
    z = jnp.array([[1.0, 0.0, 0.25]])
    np.testing.assert_array_equal(latent.one_hot_pairs(z), [[0, 1, 1, 0, 0.75, 0.25]])


def _authors_tiny(**model):
    c = tiny_config()
    c.model.update(binary_estimator="gumbel_softmax", z_tokens="one_hot_single", **model)
    return c


def test_one_hot_single_is_one_token_without_token_parameters():
    c = _authors_tiny()
    model = create_model(c)
    params = jax.eval_shape(lambda k: init_params(model, k, (32, 32, 1)), jax.random.PRNGKey(0))
    assert "z_tokens" not in params
    # the cross-attention keys read the 2|z|-wide token
    k = params["denoiser"]["mid_cross_attn"]["k"]["kernel"]
    assert k.shape[0] == 2 * c.model.latent_dim
    per_bit = jax.eval_shape(lambda k: init_params(create_model(tiny_config()), k, (32, 32, 1)),
                             jax.random.PRNGKey(0))
    groups, ours = parameter_groups(params), parameter_groups(per_bit)
    assert groups["encoder"] == ours["encoder"] and groups["denoiser"] == ours["denoiser"]
    assert groups["conditioning"] < ours["conditioning"]


def test_gumbel_eval_sample_draws_and_argmax_thresholds():
    model = create_model(_authors_tiny(gumbel_eval="argmax"))
    sampler = create_model(_authors_tiny(gumbel_eval="sample"))
    x = jax.random.uniform(jax.random.PRNGKey(1), (16, 32, 32, 1), minval=-1, maxval=1)
    params = jax.jit(lambda k: model.init(k, x, method=DMZ.encode_logits))(
        jax.random.PRNGKey(0))["params"]  # the encoder's: encode needs nothing else

    @jax.jit
    def encodings(params, key):
        logits = model.apply({"params": params}, x, method=DMZ.encode_logits)
        z = model.apply({"params": params}, x, method=DMZ.encode)
        draws = [sampler.apply({"params": params}, x, method=DMZ.encode,
                               rngs={"latent": jax.random.fold_in(key, s)}) for s in range(2)]
        no_rng = sampler.apply({"params": params}, x, method=DMZ.encode)
        return logits, z, draws, no_rng

    logits, z, draws, no_rng = encodings(params, jax.random.PRNGKey(2))
    np.testing.assert_array_equal(z, (logits > 0).astype(np.float32))
    assert set(np.unique(np.asarray(draws))) <= {0.0, 1.0}
    assert not np.array_equal(draws[0], draws[1])  # a random draw, as the authors evaluate
    # without a "latent" rng the draw is reproducible (key 0)
    _, _, _, again = encodings(params, jax.random.PRNGKey(3))
    np.testing.assert_array_equal(no_rng, again)


AUTHORS_CONFIGS = ("cifar10", "celeba64", "edges64", "handbags64", "celebahq256", "fashion_mnist")


@pytest.mark.parametrize("name", AUTHORS_CONFIGS)
def test_describe_counts_equal_the_authors_models_built_with_diffusers(name):
    """tools/authors_param_counts.json: tools/count_authors_params.py's counts of the authors'
    models (diffusers 0.32.0 UNet2DConditionModel + their encoder) from their README's
    arguments. Shapes only (jax.eval_shape): nothing is allocated or compiled."""
    import importlib
    import json
    import os

    from conftest import ROOT
    from dmz_jax import describe

    theirs = json.load(open(os.path.join(ROOT, "tools", "authors_param_counts.json")))
    theirs = theirs["models"][name]
    config = importlib.import_module(f"configs.authors.{name}").get_config()
    params = describe.abstract_params(config)
    groups = parameter_groups(params)
    assert describe.unet_params(params) == theirs["unet"]
    assert groups["conditioning"] == theirs["cross_attn"]
    assert groups["encoder"] == theirs["encoder"]
    assert groups["total"] == theirs["total"]


def test_the_dataset_prior_replays_training_codes():
    from dmz_jax import api, sharding
    from dmz_jax.train_state import make_diffusion
    config = tiny_config()
    mesh = sharding.create_mesh(devices=jax.devices()[:1])
    m = api.Model(config, create_model(config), make_diffusion(config), None, 0, None, mesh)
    codes = np.random.default_rng(0).integers(0, 2, (50, 8)).astype(np.float32)
    m.training_codes = lambda: codes
    z = m.prior_sample(200, "dataset", seed=1)
    rows = {tuple(r) for r in codes}
    assert z.shape == (200, 8) and all(tuple(r) in rows for r in z)
    assert len({tuple(r) for r in z}) > 30  # draws over the training images, not one
    assert not np.array_equal(z, m.prior_sample(200, "dataset", seed=2))


@pytest.mark.parametrize("overrides,key,words", [
    ({"model.conditioning": "z_concat"}, "model.conditioning", "diffusers_unet"),
    ({"model.backbone": "diffusers_unet", "model.conditioning": "time_embedding"},
     "model.conditioning", "z_with_t"),
    ({"model.z_tokens": "one_hot_single", "model.latent_type": "gaussian"}, "model.z_tokens",
     "binary"),
    ({"model.encoder.type": "conv_bn", "model.encoder.center_examples": 0, "data.image_size": 48,
      "model.attention_resolutions": (24,), "model.cross_attention_resolutions": (24,)},
     "model.encoder.type", "power of two"),
    ({"model.encoder.type": "conv_bn", "model.encoder.center_examples": 64},
     "model.encoder.center_examples", "0"),
    ({"model.backbone": "diffusers_unet", "model.cross_attention_resolutions": (32,)},
     "model.cross_attention_resolutions", "attention_resolutions"),
    ({"model.backbone": "diffusers_unet", "model.diffusers.attention_head_dim": 3},
     "model.diffusers.attention_head_dim", "divide"),
    ({"model.gumbel_eval": "mode"}, "model.gumbel_eval", "argmax"),
])
def test_option_combinations_the_networks_lack_are_refused(overrides, key, words):
    from dmz_jax import config_checks
    config = tiny_config()  # 32 px, attention at 16
    config.update_from_flattened_dict(overrides)
    with pytest.raises(config_checks.ConfigError) as error:
        config_checks.check_config(config)
    assert [p.key for p in error.value.problems] == [key]
    assert words in error.value.problems[0].message
