"""python -m dmz_jax.convert: a diffusers / the authors' weights file -> a workdir that
training.init_from reads (dmz_jax/convert/workdir.py).

The weights: tests/fixtures/diffusers/hq_unet2d.npz, a tiny diffusers UNet2DModel in the layout
of google/ddpm-ema-celebahq-256 (random weights), written with that checkpoint's old attention
names (query, key, value, proj_attn); the config: configs/authors/celebahq256.py:tiny at that layout, so the file
loads as the authors load it (strict=False): resnets, convs, norms and the time embedding from
the file; the attention blocks (Transformer2D here), the Conv-BN encoder and its BatchNorm
statistics as a new run of the config starts.
"""

import functools
import hashlib
import json
import logging
import os
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from conftest import ROOT, subprocess_env
from configs.authors import celebahq256
from dmz_jax import checkpointing, warm_start
from dmz_jax import train_state as ts
from dmz_jax.convert import diffusers as dconv
from dmz_jax.convert.workdir import REPORT, convert_to_workdir
from dmz_jax.model import create_model, image_shape

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "diffusers", "hq_unet2d.npz")
# configs/authors/celebahq256.py:tiny at the fixture's layout (its "config" entry)
LAYOUT = {"data.image_size": 8, "model.model_channels": 4, "model.channel_mult": (1, 1, 2, 2),
          "model.num_res_blocks": 2, "model.attention_resolutions": (2,),
          "model.num_groups": 4, "model.latent_dim": 4, "model.diffusers.attention_head_dim": 8}


ONE_DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def hq_tiny():
    config = celebahq256.get_config("tiny")
    config.update_from_flattened_dict(LAYOUT)
    return config


def fixture_state_dict():
    """The fixture's {diffusers name: array} (stored packed: sd_values + sd_index)."""
    with np.load(FIXTURE) as z:
        values, index = z["sd_values"], json.loads(bytes(z["sd_index"]).decode())
    return {k: values[o:o + int(np.prod(shape))].reshape(shape) for k, shape, o in index}


def legacy(name):
    """diffusers' current attention name -> the old one of the HF DDPM checkpoints."""
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                     ("to_out\\.0", "proj_attn")):
        name = re.sub(r"(attentions\.\d+)\.%s\." % new, r"\1.%s." % old, name)
    return name


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The fixture's state dict as a plain .npz, as tools/torch_to_npz.py writes one."""
    path = str(tmp_path_factory.mktemp("weights") / "ddpm_unet2d.npz")
    np.savez(path, **{legacy(k): v for k, v in fixture_state_dict().items()})
    return path


def files(folder):
    """{relative path: (size, mtime_ns)} of every file under `folder`."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            st = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), folder)] = (st.st_size, st.st_mtime_ns)
    return out


def new_run(config):
    """The train state a new run of `config` starts from (config.seed), computed by the
    function train.Run compiles."""
    init = functools.partial(ts.create_train_state, config, create_model(config),
                             ts.make_optimizer(config.training))
    return jax.device_get(jax.jit(init)())


def shapes(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def restore(workdir, abstract_params):
    """(params, ema_params) as training.init_from=WORKDIR reads them (warm_start)."""
    state_dir = warm_start.check(workdir, abstract_params)
    return state_dir, jax.device_get(
        warm_start.load(state_dir, checkpointing.placed(abstract_params, ONE_DEVICE)))


def read_saved(workdir, names):
    """{name: values} of the items `names` of WORKDIR's step-0 state, as they are stored."""
    state_dir = os.path.join(workdir, "checkpoints", "0", "state")
    saved = ocp.StandardCheckpointer().metadata(state_dir).item_metadata
    target = {n: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                             sharding=ONE_DEVICE), saved[n])
              for n in names}
    return jax.device_get(ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))


def torch_layout(value):
    value = np.asarray(value)
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T if value.ndim == 2 \
        else value


@pytest.fixture(scope="module")
def converted(weights, tmp_path_factory):
    """The fixture's UNet2DModel converted (strict=False) into a new workdir: (config, the
    workdir, the report, the train state a new run of config starts from)."""
    config, out = hq_tiny(), str(tmp_path_factory.mktemp("converted") / "workdir")
    report = convert_to_workdir(config, weights, "unet", out, strict=False)
    return config, out, report, new_run(config)


def test_unet2d_checkpoint_becomes_an_init_from_workdir_like_strict_false(weights, converted):
    config, out, report, start = converted

    # the report: what the authors' load_state_dict(strict=False) loads and leaves
    with open(os.path.join(out, REPORT)) as f:
        assert json.load(f) == json.loads(json.dumps(report))
    with open(weights, "rb") as f:
        assert report["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert "down_blocks.2.resnets.1.conv1.weight" in report["loaded"]
    assert "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight" in report["not_loaded"]
    assert all(".attentions." in k for k in report["not_loaded"])
    assert "down_blocks.2.attentions.0.query.weight" in report["unexpected"]  # the file's
    assert "mid_block.attentions.0.proj_attn.bias" in report["unexpected"]
    assert not report["shape_mismatch"]
    assert "encoder/proj/kernel" in report["fresh"]
    assert "denoiser/down_blocks_2/attentions_0/proj_in/kernel" in report["fresh"]
    assert "encoder/layers_0/bn/mean" in report["fresh_batch_stats"]
    assert report["loaded_parameters"] > 0 and report["fresh_parameters"] > 0

    # what training.init_from reads: every path and shape checked, then params and EMA params
    state_dir, (params, ema_params) = restore(out, shapes(start.params))
    assert checkpointing.config_diff(checkpointing.read_config(state_dir.parent), config) == []
    sd = fixture_state_dict()
    loaded = set(report["loaded"])  # here no attention tensor: the same names old and new
    flat, init = (traverse_util.flatten_dict(p) for p in (params, start.params))
    assert set(flat) == set(init)
    for path, value in flat.items():
        name = dconv.torch_name(path[1:])
        if path[0] == "denoiser" and name in loaded:
            np.testing.assert_array_equal(torch_layout(value), sd[name], err_msg=name)
        else:  # as a new run of the config starts
            np.testing.assert_array_equal(value, init[path], err_msg="/".join(path))
    assert len(loaded) == sum(1 for p in flat if p[0] == "denoiser") - len(report["not_loaded"])
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ema_params)):
        np.testing.assert_array_equal(a, b)
    saved = read_saved(out, ["step", "batch_stats"])
    assert int(saved["step"]) == 0
    for path, value in traverse_util.flatten_dict(saved["batch_stats"]).items():
        np.testing.assert_array_equal(value, {"mean": 0.0, "var": 1.0}[path[-1]])  # BN's init

    # a second conversion into the same workdir is refused; nothing changes
    before = files(out)
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        convert_to_workdir(config, weights, "unet", out, strict=False)
    assert files(out) == before


def test_what_does_not_fit_is_refused_before_compiling_or_writing(weights, tmp_path, caplog):
    out = str(tmp_path / "never")
    config = hq_tiny()
    with jax.log_compiles(), caplog.at_level(logging.DEBUG):
        # strict: the UNet2DModel's attention does not fit the UNet2DConditionModel layout
        with pytest.raises(ValueError, match="does not match the expected layout") as err:
            convert_to_workdir(config, weights, "unet", out, strict=True)
        assert "down_blocks.2.attentions.0.to_q.weight" in str(err.value)  # renamed
        # strict=False still refuses other shapes (as torch does) ...
        config.model.model_channels = 8
        with pytest.raises(ValueError, match="other shapes") as err:
            convert_to_workdir(config, weights, "unet", out, strict=False)
        assert "conv_in.weight: (4, 3, 3, 3) vs (8, 3, 3, 3)" in str(err.value)
        # ... a whole DiffDecoder is strict, and a missing file is named
        with pytest.raises(ValueError, match="only unet"):
            convert_to_workdir(hq_tiny(), weights, "diffdecoder", out, strict=True)
        with pytest.raises(FileNotFoundError, match="no weights file"):
            convert_to_workdir(hq_tiny(), weights + ".missing", "unet", out, strict=False)
    assert not [r for r in caplog.records if "compil" in r.getMessage().lower()]
    assert not os.path.exists(out)


def authors_state_dict(config, seed=0):
    """A DiffDecoder state dict ("unet.*", "encoder.*") of random values for `config`'s model
    in PyTorch's names and layouts, and {our path ("params"/"batch_stats", ...): its name}."""
    model = create_model(config)
    x = jax.ShapeDtypeStruct((1, *image_shape(config)), np.float32)
    t = jax.ShapeDtypeStruct((1,), np.float32)
    abstract = jax.eval_shape(lambda x, t: model.init(jax.random.PRNGKey(0), x, x, t), x, t)
    flat, names = traverse_util.flatten_dict(abstract), {}
    for path in flat:
        if path[1] == "denoiser":
            names[path] = "unet." + dconv.torch_name(path[2:])
        else:  # encoder/layers_{i}/{conv, bn}/leaf or encoder/proj/leaf
            i, leaf = path[2].split("_")[-1], path[-1]
            module = {"conv": f"layers.{i}.0", "bn": f"layers.{i}.1"}.get(path[3], path[2])
            leaf = {"kernel": "weight", "scale": "weight", "mean": "running_mean",
                    "var": "running_var"}.get(leaf, leaf)
            names[path] = f"encoder.{module}.{leaf}"
    rng = np.random.default_rng(seed)
    sd = {name: torch_layout(rng.uniform(0.5, 1.5, flat[p].shape).astype(np.float32))
          for p, name in names.items()}
    sd["encoder.layers.0.1.num_batches_tracked"] = np.array(7)
    return sd, names


def test_authors_diffdecoder_converts_whole_with_its_batchnorm_statistics(tmp_path):
    config = hq_tiny()  # smaller than the fixture's layout: quicker
    config.update_from_flattened_dict({"model.channel_mult": (1, 2), "model.num_res_blocks": 1,
                                       "model.attention_resolutions": (4,)})
    sd, names = authors_state_dict(config)
    path = str(tmp_path / "diffdecoder.npz")
    np.savez(path, **sd)
    out = str(tmp_path / "converted")
    report = convert_to_workdir(config, path, "diffdecoder", out)
    assert report["fresh"] == [] and report["fresh_batch_stats"] == []
    assert report["unexpected"] == ["encoder.layers.0.1.num_batches_tracked"]
    assert sorted(report["loaded"]) == sorted(names.values())
    saved = read_saved(out, ["params", "ema_params", "batch_stats"])
    for path, name in names.items():
        for item in ("params", "ema_params") if path[0] == "params" else ("batch_stats",):
            value = traverse_util.flatten_dict(saved[item])[path[1:]]
            np.testing.assert_array_equal(torch_layout(value), sd[name], err_msg=name)
    # training.init_from takes the statistics too (warm_start.load_batch_stats)
    stats = warm_start.load_batch_stats(warm_start.newest_state_dir(out), saved["batch_stats"])
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(saved["batch_stats"])):
        np.testing.assert_array_equal(a, b)
    assert warm_start.load_batch_stats(warm_start.newest_state_dir(out), None) is None


@pytest.mark.slow  # a subprocess
def test_command_line_reads_config_overrides_and_refuses_with_exit_code_2(weights, tmp_path):
    out = str(tmp_path / "cli")
    overrides = [f"--config.{k}={v}" for k, v in LAYOUT.items()]
    cmd = [sys.executable, "-m", "dmz_jax.convert",
           f"--config={ROOT}/configs/authors/celebahq256.py:tiny", *overrides,
           f"--weights={weights}", "--kind=unet", f"--workdir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(tmp_path / "cache"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "ERROR: the state dict does not match the expected layout" in proc.stderr
    assert "block_out_channels=(4, 4, 8, 8)" in proc.stderr  # the overrides reached the model
    assert not os.path.exists(out)


@pytest.mark.slow  # a training run's set-up (TensorFlow, an image folder, its own compile)
def test_a_run_with_init_from_starts_from_the_converted_weights(converted, tmp_path):
    import tensorflow as tf
    from dmz_jax import sharding, train
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        (images / f"{i}.png").write_bytes(
            tf.io.encode_png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).numpy())
    _, out, report, new = converted  # new: as a run from scratch starts
    config = hq_tiny()
    config.data.image_dir = str(images)
    config.eval.at_end = False
    one_device = sharding.create_mesh(1, 1, jax.devices()[:1])
    config.training.init_from = out
    run = train.Run(config, str(tmp_path / "tuned"), mesh=one_device)
    start = jax.device_get(run.initial_state())
    run.close()
    saved = read_saved(out, ["params", "ema_params"])
    fresh = set(report["fresh"])
    for name in ("params", "ema_params"):
        flat = traverse_util.flatten_dict(getattr(start, name), sep="/")
        ours = traverse_util.flatten_dict(saved[name], sep="/")
        scratch_flat = traverse_util.flatten_dict(getattr(new, name), sep="/")
        assert set(flat) == set(ours)
        for path, value in flat.items():
            np.testing.assert_array_equal(value, ours[path], err_msg=path)
            if path in fresh:  # as the run from scratch starts
                np.testing.assert_array_equal(value, scratch_flat[path], err_msg=path)
    assert int(start.step) == 0
