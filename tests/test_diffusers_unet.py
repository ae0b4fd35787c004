"""The authors' networks in Flax against diffusers 0.32.0 / PyTorch outputs, and the converters.

Fixtures: tests/fixtures/diffusers/*.npz, written by tools/make_diffusers_fixtures.py (torch and
diffusers 0.32.0 in a separate venv): tiny U-Nets of each recipe's layout with random weights,
their inputs and outputs. Each forward is compiled with XLA's cheapest CPU settings (the
networks are tiny; compile time dominates).
"""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmz_jax.convert import diffusers as convert
from dmz_jax.networks.conv_bn import BatchNorm, ConvBNEncoder, conv_bn_widths
from dmz_jax.networks.diffusers_unet import DiffusersUNet

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "diffusers")
UNET_FIXTURES = ("cifar_like", "celeba_like", "e2h_like", "hq_like", "hq_unet2d",
                 "uncond_attention_mid")
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TOL = 1e-4


def load_fixture(name):
    """(arrays, state dict, config) of tests/fixtures/diffusers/NAME.npz."""
    with np.load(os.path.join(FIXTURES, f"{name}.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    values = arrays.pop("sd_values")
    index = json.loads(bytes(arrays.pop("sd_index")).decode())
    sd = {k: values[o:o + int(np.prod(shape))].reshape(shape) for k, shape, o in index}
    config = json.loads(bytes(arrays.pop("config")).decode())
    return arrays, sd, config


def unet_forward(module, params, arrays):
    fn = jax.jit(module.apply, compiler_options=FAST_COMPILE)
    return np.asarray(fn({"params": params}, arrays["x"], arrays["t"], arrays.get("ehs"),
                         arrays.get("class_labels")))


@pytest.mark.parametrize("name", UNET_FIXTURES)
def test_unet_matches_diffusers(name):
    arrays, sd, config = load_fixture(name)
    module = DiffusersUNet(**config["ours"])
    params = convert.unet_params_from_diffusers(sd, module, arrays["x"].shape[1:])
    out = unet_forward(module, params, arrays)
    assert out.dtype == np.float32 and out.shape == arrays["out"].shape
    assert np.abs(arrays["out"]).max() > 0.5  # the reference is not trivially small
    np.testing.assert_allclose(out, arrays["out"], rtol=0, atol=TOL)


def test_diffdecoder_encoder_and_unet_match_pytorch():
    arrays, sd, config = load_fixture("diffdecoder")
    unet = DiffusersUNet(**config["ours"])
    encoder = ConvBNEncoder(**config["encoder"])
    variables = convert.diffdecoder_from_authors(sd, unet, encoder, arrays["x"].shape[1:])
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["params"]) == {"denoiser", "encoder"}
    enc_vars = {"params": variables["params"]["encoder"],
                "batch_stats": variables["batch_stats"]["encoder"]}
    b = arrays["enc_x"].shape[0]

    # eval mode: BatchNorm running statistics
    pairs = encoder.apply(enc_vars, arrays["enc_x"], return_pairs=True)
    np.testing.assert_allclose(np.asarray(pairs).reshape(b, -1), arrays["enc_out"], atol=TOL)
    logits = encoder.apply(enc_vars, arrays["enc_x"])
    ref = arrays["enc_out"].reshape(b, -1, 2)
    np.testing.assert_allclose(logits, ref[..., 1] - ref[..., 0], atol=TOL)

    # train mode: batch statistics, running statistics updated as torch does
    pairs, updates = encoder.apply(enc_vars, arrays["enc_x"], train=True, return_pairs=True,
                                   mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(pairs).reshape(b, -1), arrays["enc_train_out"],
                               atol=TOL)
    stats = updates["batch_stats"]
    for i in range(len(config["encoder"]["widths"])):
        for ours, theirs in (("mean", "running_mean"), ("var", "running_var")):
            np.testing.assert_allclose(stats[f"layers_{i}"]["bn"][ours],
                                       arrays[f"train_stats/layers.{i}.1.{theirs}"], atol=1e-5)

    out = unet_forward(unet, variables["params"]["denoiser"], arrays)
    np.testing.assert_allclose(out, arrays["out"], rtol=0, atol=TOL)


def test_parameter_names_follow_diffusers_and_group_the_conditioning():
    arrays, sd, config = load_fixture("cifar_like")
    module = DiffusersUNet(**config["ours"])
    params = convert.unet_params_from_diffusers(sd, module, arrays["x"].shape[1:])
    block = params["down_blocks_1"]["attentions_0"]["transformer_blocks_0"]
    assert set(block["cross_attn"]) == {"norm2", "attn2"}
    assert set(block["cross_attn"]["attn2"]) == {"to_q", "to_k", "to_v", "to_out_0"}
    assert "class_embedding" in params and "time_embedding" in params
    assert set(params["down_blocks_0"]["resnets_0"]) == {
        "norm1", "conv1", "time_emb_proj", "norm2", "conv2"}
    # the mapping back: every parameter has a state-dict name, one to one
    names = {convert.torch_name(p) for p in convert._flatten(params)}
    assert names == set(sd)


def test_state_dict_of_another_layout_is_refused_with_the_shapes_before_compiling(caplog):
    arrays, sd, config = load_fixture("cifar_like")
    other = dict(config["ours"], block_out_channels=[4, 8, 8, 16])
    with jax.log_compiles(), caplog.at_level(logging.DEBUG):
        with pytest.raises(ValueError) as err:
            convert.unet_params_from_diffusers(sd, DiffusersUNet(**other), (8, 8, 3))
    msg = str(err.value)
    assert "block_out_channels=(4, 8, 8, 16)" in msg and "CrossAttnDownBlock2D" in msg
    assert "2 missing" in msg and "down_blocks.3.resnets.0.conv_shortcut.weight" in msg
    assert "down_blocks.3.resnets.0.conv1.weight: (8, 8, 3, 3) vs (16, 8, 3, 3)" in msg
    assert "more" in msg  # long lists are cut
    assert not [r for r in caplog.records if "compil" in r.getMessage().lower()]

    # a UNet2DModel state dict in the UNet2DConditionModel layout: names differ too
    _, sd2, _ = load_fixture("hq_unet2d")
    hq = load_fixture("hq_like")[2]["ours"]
    with pytest.raises(ValueError, match="unexpected") as err:
        convert.unet_params_from_diffusers(sd2, DiffusersUNet(**hq), (8, 8, 3))
    assert "down_blocks.2.attentions.0.to_q.weight" in str(err.value)


def test_hf_unet2d_checkpoint_into_the_conditional_layout_like_strict_false():
    """The HQ recipe: an HF UNet2DModel checkpoint, old attention names, loaded into the
    UNet2DConditionModel layout with strict=False: the attention weights start fresh."""
    arrays, sd2, _ = load_fixture("hq_unet2d")
    legacy = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
              .replace("to_out.0.", "proj_attn."): v for k, v in sd2.items()}
    assert any(".proj_attn." in k for k in legacy)
    config = load_fixture("hq_like")[2]["ours"]
    module = DiffusersUNet(**config)
    x, t, ehs = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)), jnp.zeros((1, 1, 8))
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x, t, ehs)  # cheaper than init
    rng = np.random.default_rng(0)
    init = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    params, report = convert.unet_params_from_diffusers(legacy, module, (8, 8, 3),
                                                        strict=False, init_params=init)
    assert "down_blocks.2.attentions.0.proj_in.weight" in report["not_loaded"]
    assert "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight" in report["not_loaded"]
    assert all(".attentions." in k for k in report["not_loaded"])
    assert "down_blocks.2.attentions.0.to_q.weight" in report["unexpected"]  # renamed
    assert "mid_block.attentions.0.group_norm.weight" in report["unexpected"]
    assert not report["shape_mismatch"]
    assert "down_blocks.2.resnets.1.conv1.weight" in report["loaded"]
    np.testing.assert_array_equal(params["conv_in"]["kernel"],
                                  sd2["conv_in.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        params["mid_block"]["resnets_1"]["time_emb_proj"]["kernel"],
        sd2["mid_block.resnets.1.time_emb_proj.weight"].T)
    kept = params["down_blocks_2"]["attentions_0"]["proj_in"]["kernel"]
    np.testing.assert_array_equal(kept, init["params"]["down_blocks_2"]["attentions_0"]
                                  ["proj_in"]["kernel"])
    # the old names load strictly into the UNet2DModel layout as well
    strict = convert.unet_params_from_diffusers(
        legacy, DiffusersUNet(**load_fixture("hq_unet2d")[2]["ours"]), (8, 8, 3))
    np.testing.assert_array_equal(strict["mid_block"]["attentions_0"]["to_out_0"]["kernel"],
                                  sd2["mid_block.attentions.0.to_out.0.weight"].T)
    with pytest.raises(ValueError, match="init_params"):
        convert.unet_params_from_diffusers(legacy, module, (8, 8, 3), strict=False)


def test_remat_and_dot_product_attention_compute_the_same_function():
    arrays, sd, config = load_fixture("e2h_like")
    module = DiffusersUNet(**config["ours"], remat=True, attention_impl="dot_product_attention")
    params = convert.unet_params_from_diffusers(sd, module, arrays["x"].shape[1:])
    np.testing.assert_allclose(unet_forward(module, params, arrays), arrays["out"], atol=TOL)


def test_bfloat16_compute_is_close_and_returns_float32():
    arrays, sd, config = load_fixture("uncond_attention_mid")
    module = DiffusersUNet(**config["ours"], dtype=jnp.bfloat16)
    params = convert.unet_params_from_diffusers(sd, module, arrays["x"].shape[1:])
    out = unet_forward(module, params, arrays)
    assert out.dtype == np.float32
    scale = np.abs(arrays["out"]).max()
    assert np.abs(out - arrays["out"]).max() < 0.1 * scale


def test_configurations_diffusers_would_not_build_are_refused():
    base = dict(block_out_channels=(8, 16), layers_per_block=1, out_channels=3)
    DiffusersUNet(**base, attention_levels=(1,), cross_attention_levels=(1,)).check()
    for bad, match in ((dict(attention_levels=(0,), cross_attention_levels=(1,)), "subset|not in"),
                       (dict(attention_levels=(2,)), "outside"),
                       (dict(mid_block="spatial"), "mid_block"),
                       (dict(class_embed="add"), "class_embed_input_dim"),
                       (dict(resnet_time_scale_shift="spatial"), "resnet_time_scale_shift"),
                       (dict(attention_impl="flash"), "attention_impl")):
        with pytest.raises(ValueError, match=match):
            DiffusersUNet(**base, **bad).check()
    module = DiffusersUNet(**base, mid_block="resnet")
    with pytest.raises(ValueError, match="not divisible"):
        jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 3)),
                       jnp.zeros((1,)))


def test_batchnorm_training_update_uses_the_unbiased_batch_variance():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=(3, 2, 2, 4)).astype(np.float32)
    bn = BatchNorm()
    variables = bn.init(jax.random.PRNGKey(0), x, train=True)
    assert np.all(variables["batch_stats"]["mean"] == 0)  # init does not update
    assert np.all(variables["batch_stats"]["var"] == 1)
    variables = {"params": {"scale": np.full(4, 2.0, np.float32),
                            "bias": np.full(4, 0.5, np.float32)},
                 "batch_stats": {"mean": np.full(4, 0.3, np.float32),
                                 "var": np.full(4, 1.5, np.float32)}}
    y, upd = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    flat = x.reshape(-1, 4)
    mean, var = flat.mean(0), flat.var(0)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5) * 2.0 + 0.5, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.9 * 0.3 + 0.1 * mean, atol=1e-6)
    n = flat.shape[0]
    np.testing.assert_allclose(upd["batch_stats"]["var"],
                               0.9 * 1.5 + 0.1 * var * n / (n - 1), atol=1e-6)
    y_eval = bn.apply(variables, x)  # eval: the running statistics
    np.testing.assert_allclose(y_eval, (x - 0.3) / np.sqrt(1.5 + 1e-5) * 2.0 + 0.5, atol=1e-5)


def test_conv_bn_widths():
    assert conv_bn_widths(32, 32) == (32, 64, 128, 256)
    assert conv_bn_widths(64, 32) == (32, 64, 128, 256, 512)
    assert conv_bn_widths(256, 32) == (32, 64, 128, 256, 512, 1024, 2048)
    assert conv_bn_widths(4, 8) == (8,)
    for bad in (28, 2, 0, 48.0, "32"):
        with pytest.raises(ValueError, match="power of two"):
            conv_bn_widths(bad, 32)


def test_encoder_converter_refuses_a_wrong_state_dict():
    _, sd, config = load_fixture("diffdecoder")
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    module = ConvBNEncoder(**dict(config["encoder"], widths=[4, 8, 32]))
    wrong = r"layers\.2\.0\.weight: \(16, 8, 3, 3\) vs \(32, 8, 3, 3\)"
    with pytest.raises(ValueError, match=wrong):
        convert.encoder_from_authors(enc, module, (16, 16, 3))
    module = ConvBNEncoder(**config["encoder"])
    with pytest.raises(ValueError, match=r"proj\.weight: \(8, 64\) vs \(8, 16\)"):
        convert.encoder_from_authors(enc, module, (8, 8, 3))  # a 1x1 final map
    params, stats = convert.encoder_from_authors(enc, module)  # no image: shapes from sd
    assert params["proj"]["kernel"].shape == (64, 8) and "mean" in stats["layers_0"]["bn"]
    with pytest.raises(ValueError, match="only unet"):
        convert.diffdecoder_from_authors(dict(sd, extra=np.zeros(1)), None, None, (16, 16, 3))


def _write_safetensors(path, tensors):
    """A minimal safetensors writer: 8-byte header length, JSON header, raw data."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (kind, raw, shape) in tensors.items():
        header[name] = {"dtype": kind, "shape": list(shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def test_load_state_dict_reads_safetensors_and_npz(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    bf16 = (np.array([1.5, -2.25, 3e-3], np.float32).view(np.uint32) >> 16).astype("<u2")
    path = str(tmp_path / "w.safetensors")
    _write_safetensors(path, {
        "a.weight": ("F32", a.astype("<f4").tobytes(), a.shape),
        "b.weight": ("F16", a.astype("<f2").tobytes(), a.shape),
        "c.bias": ("BF16", bf16.tobytes(), (3,)),
        "n": ("I64", np.array([7], "<i8").tobytes(), (1,))})
    sd = convert.load_state_dict(path)
    assert set(sd) == {"a.weight", "b.weight", "c.bias", "n"}
    np.testing.assert_array_equal(sd["a.weight"], a)
    assert sd["b.weight"].dtype == np.float32
    np.testing.assert_allclose(sd["b.weight"], a, atol=1e-3)
    expected = (bf16.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(sd["c.bias"], expected)
    np.testing.assert_allclose(sd["c.bias"], [1.5, -2.25, 3e-3], rtol=1e-2)
    assert sd["n"].tolist() == [7]

    npz = str(tmp_path / "w.npz")
    np.savez(npz, **{"sd/x.weight": a.astype(np.float64), "other": a})
    assert set(convert.load_state_dict(npz)) == {"sd/x.weight", "other"}
    only = convert.load_state_dict(npz, prefix="sd/")
    assert list(only) == ["x.weight"] and only["x.weight"].dtype == np.float32
    with pytest.raises(ValueError, match="tools/torch_to_npz.py"):
        convert.load_state_dict(str(tmp_path / "model.pt"))
