"""Networks: hand-computed layer values, I-DDPM's layout details, shapes and parameter counts."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from dmz_jax import describe, model as model_lib
from dmz_jax.networks import latent, layers


def test_timestep_embedding_layout_is_cos_then_sin():
    emb = np.asarray(layers.timestep_embedding(jnp.array([1.0, 0.0]), 4))
    # half = 2, frequencies 1 and 10000^(-1/2) = 0.01
    np.testing.assert_allclose(emb[0], [math.cos(1), math.cos(0.01), math.sin(1), math.sin(0.01)],
                               rtol=1e-6)
    np.testing.assert_allclose(emb[1], [1, 1, 0, 0])
    assert layers.timestep_embedding(jnp.ones(3), 5).shape == (3, 5)


def test_downsample_pads_one_pixel_on_every_side_like_pytorch():
    x = jnp.ones((1, 8, 8, 1))
    down = layers.Downsample(use_conv=True)
    params = down.init(jax.random.PRNGKey(0), x)
    params = jax.tree.map(jnp.ones_like, params)  # all-ones 3x3 kernel, bias 1
    y = np.asarray(down.apply(params, x))
    assert y.shape == (1, 4, 4, 1)
    # top-left output sees rows/cols -1..1 with zero padding: 4 ones, + bias; "SAME" gives 9+1
    assert y[0, 0, 0, 0] == 5.0
    assert y[0, 1, 1, 0] == 10.0
    assert y[0, 3, 3, 0] == 10.0  # rows 5..7, fully inside


def _torch_style_attention(x, w_qkv, b_qkv, heads):
    """numpy reference of I-DDPM's QKVAttention on channel-first layout (b, 3C, T)."""
    b, h, w, c = x.shape
    qkv = (x.reshape(b, h * w, c) @ w_qkv + b_qkv).transpose(0, 2, 1)  # (b, 3C, T)
    qkv = qkv.reshape(b * heads, 3 * c // heads, h * w)
    ch = c // heads
    q, k, v = qkv[:, :ch], qkv[:, ch:2 * ch], qkv[:, 2 * ch:]
    s = 1 / math.sqrt(math.sqrt(ch))
    wts = np.einsum("bct,bcs->bts", q * s, k * s)
    wts = np.exp(wts - wts.max(-1, keepdims=True))
    wts /= wts.sum(-1, keepdims=True)
    a = np.einsum("bts,bcs->bct", wts, v).reshape(b, c, h * w)
    return a.transpose(0, 2, 1).reshape(b, h, w, c)


def test_attention_splits_heads_as_contiguous_qkv_blocks():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 4, 8)).astype(np.float32)
    block = layers.AttentionBlock(num_heads=2, num_groups=4)
    params = block.init(jax.random.PRNGKey(0), x)["params"]
    params["proj_out"]["kernel"] = jnp.eye(8)  # identity projection exposes the attention
    y = np.asarray(block.apply({"params": params}, x))
    normed = np.asarray(layers.GroupNorm32(4).apply(
        {"params": params["norm"]}, x))
    want = x + _torch_style_attention(normed, np.asarray(params["qkv"]["kernel"]),
                                      np.asarray(params["qkv"]["bias"]), heads=2)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def test_resblock_parameter_count_by_hand():
    block = layers.ResBlock(out_channels=64, num_groups=32)
    x, emb = jnp.zeros((1, 8, 8, 32)), jnp.zeros((1, 128))
    params = block.init(jax.random.PRNGKey(0), x, emb, False)["params"]
    count = sum(p.size for p in jax.tree.leaves(params))
    want = (2 * 32 + 9 * 32 * 64 + 64  # in_norm, in_conv
            + 128 * 128 + 128  # emb_proj to scale and shift
            + 2 * 64 + 9 * 64 * 64 + 64  # out_norm, out_conv
            + 32 * 64 + 64)  # 1x1 skip
    assert count == want


def test_cifar10_denoiser_matches_iddpm_parameter_count():
    from configs import cifar10
    counts = model_lib.parameter_groups(describe.abstract_params(cifar10.get_config()))
    # I-DDPM's CIFAR-10 UNetModel with learned sigma has 52.5M parameters.
    assert abs(counts["denoiser"] - 52.5e6) / 52.5e6 < 0.03
    assert counts["denoiser"] == 52_546_438
    assert 0 < counts["conditioning"] < 5e6 and counts["encoder"] > 0
    assert counts["total"] == sum(counts[k] for k in ("encoder", "conditioning", "denoiser"))


def test_binary_latent_encode_is_exact_bits_and_train_passes_gradients():
    logits = jnp.array([[-3.0, -0.1, 0.2, 4.0]])
    z = latent.binary_from_logits(logits, None, latent.Encoding.DETERMINISTIC)
    np.testing.assert_array_equal(z, [[0, 0, 1, 1]])
    rng = jax.random.PRNGKey(1)
    train = latent.Encoding.TRAIN
    z_train = latent.binary_from_logits(jnp.tile(logits, (64, 1)), rng, train)
    assert set(np.unique(np.asarray(z_train)).tolist()) == {0.0, 1.0}
    # straight-through: d z / d logits = sigmoid'(logits), whatever was sampled
    p = jax.nn.sigmoid(logits)
    for estimator in ("bernoulli", "threshold"):
        grad = jax.grad(lambda l: jnp.sum(latent.binary_from_logits(l, rng, train, estimator)))(
            logits)
        np.testing.assert_allclose(grad, p * (1 - p), rtol=1e-6)
    # the threshold estimator's value is the deterministic code
    np.testing.assert_array_equal(latent.binary_from_logits(logits, None, train, "threshold"), z)
    prior = latent.binary_prior(rng, 1000, 16)
    assert set(np.unique(np.asarray(prior)).tolist()) == {0.0, 1.0}
    assert abs(float(prior.mean()) - 0.5) < 0.02


def test_cross_attention_is_the_identity_at_initialisation():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 16))
    tokens = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 12))
    layer = layers.CrossAttention(num_heads=2, num_groups=8)
    variables = layer.init(jax.random.PRNGKey(2), x, tokens)
    np.testing.assert_array_equal(layer.apply(variables, x, tokens), x)
    # not trivially: with a non-zero output projection the tokens change the output
    out = variables["params"]["proj_out"]
    moved = {"params": {**variables["params"],
                        "proj_out": {**out, "kernel": out["kernel"] + 0.1}}}
    assert not np.allclose(layer.apply(moved, x, tokens), x)


def test_unet_shapes_and_z_enters_only_through_cross_attention(tiny):
    model = model_lib.create_model(tiny)
    params = jax.jit(lambda key: model_lib.init_params(model, key, (32, 32, 1)))(
        jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 32, 32, 1))
    t = jnp.array([0.0, 10.0, 49.0])
    z0, z1 = jnp.zeros((3, 8)), jnp.ones((3, 8))

    @jax.jit
    def denoise(p, z):
        return model.apply({"params": p}, x, t, z, method=model_lib.DMZ.denoise)

    assert denoise(params, z0).shape == (3, 32, 32, 2)  # eps and v

    def shifted(p, name):
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: leaf + 0.05 if name in str(path) else leaf, p)

    # the output conv starts at zero: open it, and the output depends on x but not on z,
    # because every cross-attention starts as the identity
    opened = shifted(params, "out_conv")
    out = denoise(opened, z0)
    assert np.abs(out).max() > 0
    np.testing.assert_array_equal(out, denoise(opened, z1))
    # open the cross-attention output projections too: now z changes the output
    opened = shifted(opened, "proj_out")
    assert not np.allclose(denoise(opened, z0), denoise(opened, z1))
    names = {"/".join(k.key for k in path) for path, _ in
             jax.tree_util.tree_leaves_with_path(params)}
    assert any("mid_cross_attn" in n for n in names)
    assert any("down_1_0_cross_attn" in n for n in names)  # resolution 16 = level 1
    assert not any("down_0_0_cross_attn" in n for n in names)


def test_celebahq256_fits_a_celeba64_checkpoint_and_scratch_does_not():
    """The fine-tuning config has celeba64's parameter shapes (dmz_jax/warm_start.py); the
    from-scratch variant (Diff-AE's FFHQ-256 size) does not, and the check says where."""
    from configs import celeba64, celebahq256
    from dmz_jax import warm_start
    low = describe.abstract_params(celeba64.get_config())
    assert warm_start.mismatches(low, describe.abstract_params(celebahq256.get_config())) == []
    scratch = describe.abstract_params(celebahq256.get_config("scratch"))
    lines = warm_start.mismatches(low, scratch)
    assert "  denoiser/down_0_0/in_conv/kernel: (3, 3, 64, 64) -> (3, 3, 128, 128)" in lines
    groups = model_lib.parameter_groups
    assert groups(scratch)["total"] > 1.5 * groups(low)["total"]  # 162M vs 85M
