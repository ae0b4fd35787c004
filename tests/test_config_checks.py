"""check_config: shipped configs pass; each kind of problem names its key; all come at once."""

import importlib

import jax
import ml_collections
import pytest

from dmz_jax.config_base import base_config
from dmz_jax.config_checks import KINDS, ConfigError, Problem, check_config

SHIPPED = [(name, variant) for name in ("fashion_mnist", "cifar10", "celeba64")
           for variant in (None, "tiny")]


def shipped(name: str = "fashion_mnist", variant=None) -> ml_collections.ConfigDict:
    return importlib.import_module(f"configs.{name}").get_config(variant)


def net_config() -> ml_collections.ConfigDict:
    """Fashion-MNIST (32x32) with the networks spelled out here, so the widths stay put:
    denoiser levels 32, 16, 8 px of widths 32, 64, 64; the encoder the same."""
    config = shipped()
    m = config.model
    m.model_channels, m.channel_mult, m.num_groups, m.num_heads = 32, (1, 2, 2), 8, 2
    m.attention_resolutions, m.cross_attention_resolutions = (8,), None
    m.encoder.model_channels, m.encoder.channel_mult = 32, (1, 2, 2)
    m.encoder.attention_resolutions = ()
    return config


def problems(config, num_devices=1, process_count=1) -> list[Problem]:
    """The problems check_config reports (it must report at least one)."""
    with pytest.raises(ConfigError) as info:
        check_config(config, num_devices=num_devices, process_count=process_count)
    found = info.value.problems
    assert str(info.value).count("\n  - ") == len(found)
    assert all(p.kind in KINDS and p.message.startswith(p.key + "=") for p in found)
    return found


def only(config, num_devices=1, process_count=1) -> tuple[str, str]:
    """(key, kind) of the single problem reported."""
    found = problems(config, num_devices, process_count)
    assert len(found) == 1, found
    return found[0].key, found[0].kind


# ---------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("name, variant", SHIPPED)
@pytest.mark.parametrize("num_devices", [1, 8])
def test_shipped_configs_pass(name, variant, num_devices):
    check_config(shipped(name, variant), num_devices=num_devices, process_count=1)


def test_describe_skips_device_checks_and_asks_jax_nothing(monkeypatch):
    def refuse():
        raise AssertionError("check_config asked JAX about devices")

    monkeypatch.setattr(jax, "device_count", refuse)
    monkeypatch.setattr(jax, "process_count", refuse)
    config = shipped()
    config.training.batch_size, config.mesh.data = 12, 3  # wrong on 8 devices
    check_config(config)
    assert {p.key for p in problems(config, num_devices=8)} == {"training.batch_size",
                                                                "mesh.data"}


# ---------------------------------------------------------------------------- the locked config


def test_locked_config_refuses_unknown_key():
    config = shipped()
    with pytest.raises(AttributeError, match="latent_dim"):  # "did you mean latent_dim"
        config.model.latnet_dim = 3


def test_type_safe_config_refuses_wrong_type():
    with pytest.raises(TypeError):
        base_config().training.batch_size = "12"


def test_none_in_a_non_placeholder_field():
    config = shipped()
    config.model.latent_dim = None  # ml_collections lets None through
    config.model.cross_attention_resolutions = None  # a placeholder: fine
    assert only(config) == ("model.latent_dim", "type")


def test_non_int_tuple_item_is_reported_once():
    config = shipped()
    config.model.channel_mult = (1, "2", 2)
    assert only(config) == ("model.channel_mult", "type")


# ---------------------------------------------------------------------------- enums


@pytest.mark.parametrize("key", ["data.name", "data.source", "data.crop", "data.bad_images",
                                 "data.wrong_size", "model.latent_type", "model.conditioning",
                                 "model.binary_estimator", "diffusion.schedule",
                                 "sampling.method"])
def test_choice(key):
    config = shipped()
    section, field = key.split(".")
    config[section][field] = "bogus"
    found = problems(config)
    assert [(p.key, p.kind) for p in found] == [(key, "choice")]
    assert "use one of [" in found[0].message


# ---------------------------------------------------------------------------- data


@pytest.mark.parametrize("name, wrong", [("fashion_mnist", 3), ("cifar10", 1), ("celeba64", 1)])
def test_channels_match_dataset(name, wrong):
    config = shipped(name)
    config.data.channels = wrong
    assert only(config) == ("data.channels", "dataset")


def test_image_folder_takes_one_or_three_channels():
    config = shipped("cifar10")
    config.data.name, config.data.image_dir = "image_folder", "/data/faces"
    check_config(config, num_devices=1, process_count=1)
    config.data.channels = 2
    assert only(config) == ("data.channels", "dataset")


def test_fashion_mnist_is_never_cropped():
    config = net_config()
    config.data.image_size = 16
    config.model.attention_resolutions = (4,)
    assert only(config) == ("data.image_size", "dataset")


def test_image_size_minimum():
    config = shipped("cifar10")
    config.data.image_size = 4
    config.model.channel_mult = config.model.encoder.channel_mult = (1, 2)
    config.model.attention_resolutions = (4,)
    assert only(config) == ("data.image_size", "dataset")


# ---------------------------------------------------------------------------- networks


@pytest.mark.parametrize("key", ["model.channel_mult", "model.encoder.channel_mult"])
def test_image_size_vs_levels(key):
    config = net_config()
    target = config.model.encoder if "encoder" in key else config.model
    target.channel_mult = (1, 1, 1, 1, 1, 1, 1)  # downsamples by 64, which does not divide 32
    assert only(config) == (key, "downsampling")


def test_unbuilt_encoder_is_not_checked():
    config = net_config()
    config.model.latent_type = "none"
    config.model.encoder.channel_mult = (1, 1, 1, 1, 1, 1, 1)
    config.model.latent_dim = 0
    check_config(config, num_devices=1, process_count=1)


@pytest.mark.parametrize("key", ["model.attention_resolutions",
                                 "model.cross_attention_resolutions",
                                 "model.encoder.attention_resolutions"])
def test_attention_resolution_that_does_not_exist(key):
    config = net_config()
    target = config.model.encoder if "encoder" in key else config.model
    target[key.rsplit(".", 1)[1]] = (8, 4)  # 4 px is below the 8 px bottom level
    assert only(config) == (key, "resolution")


@pytest.mark.parametrize("num_groups, encoder_channels, network", [
    (24, 48, "denoiser"),  # denoiser widths 32, 64; encoder 48, 96
    (16, 40, "encoder"),  # denoiser widths 32, 64; encoder 40, 80
])
def test_num_groups_divides_every_width(num_groups, encoder_channels, network):
    config = net_config()
    config.model.num_groups, config.model.encoder.model_channels = num_groups, encoder_channels
    assert only(config) == ("model.num_groups", "divisible")
    assert f"the {network}'s channel widths" in problems(config)[0].message


def test_num_heads_divides_attention_widths():
    config = net_config()
    config.model.num_heads = 3
    assert only(config) == ("model.num_heads", "divisible")


def test_middle_block_counts_as_attention_level():
    config = net_config()
    config.model.attention_resolutions, config.model.conditioning = (), "time_embedding"
    config.model.num_heads = 3  # the middle block's width is 64
    assert only(config) == ("model.num_heads", "divisible")


def test_cross_attention_levels_count_only_with_cross_attention():
    config = net_config()
    config.model.num_heads = 64  # divides 64 (8 px and the middle) but not 32 (32 px)
    config.model.cross_attention_resolutions = (32,)
    assert only(config) == ("model.num_heads", "divisible")
    config.model.conditioning = "time_embedding"
    check_config(config, num_devices=1, process_count=1)


def test_heads_checked_at_encoder_attention():
    config = net_config()
    config.model.num_heads = 64  # the denoiser attends at width 64 only
    config.model.cross_attention_resolutions = (8,)
    config.model.encoder.attention_resolutions = (32,)  # width 32
    found = problems(config)
    assert [(p.key, p.kind) for p in found] == [("model.num_heads", "divisible")]
    assert "encoder's" in found[0].message


# ---------------------------------------------------------------------------- ranges


@pytest.mark.parametrize("key, value", [
    ("training.batch_size", 0), ("training.num_steps", 0), ("training.log_every", 0),
    ("training.checkpoint_every", 0), ("training.keep_checkpoints", 0),
    ("training.learning_rate", 0.0), ("training.grad_clip", -1.0), ("training.ema_decay", 1.0),
    ("training.ema_decay", -0.5), ("model.dropout", 1.0), ("model.encoder.dropout", 1.5),
    ("model.latent_dim", 0), ("model.token_dim", 0), ("diffusion.vlb_weight", -0.1),
    ("sampling.num_samples", 0), ("mesh.data", 0), ("model.channel_mult", ()),
])
def test_range(key, value):
    config = shipped()
    *sections, field = key.split(".")
    target = config
    for section in sections:
        target = target[section]
    target[field] = value
    found = problems(config)
    assert (key, "range") in [(p.key, p.kind) for p in found]
    assert found[0].message.startswith(f"{key}={value!r}: ")


def test_grad_clip_zero_means_no_clipping():
    config = shipped()
    config.training.grad_clip = 0.0
    check_config(config, num_devices=8, process_count=1)


def test_latent_dim_ignored_without_conditioning():
    config = shipped()
    config.model.conditioning, config.model.latent_dim = "none", 0
    check_config(config, num_devices=1, process_count=1)


def test_sampling_steps_within_num_timesteps():
    config = shipped()
    config.sampling.steps = (0, 10, 2000)
    assert only(config) == ("sampling.steps", "range")
    config.sampling.steps, config.diffusion.num_timesteps = (10, 100), 1
    assert {(p.key, p.kind) for p in problems(config)} == {
        ("diffusion.num_timesteps", "range"), ("sampling.steps", "range")}


# ---------------------------------------------------------------------------- devices


@pytest.mark.parametrize("key, value, num_devices, process_count, fix", [
    ("training.batch_size", 12, 8, 1, "e.g. 16"), ("training.batch_size", 12, 1, 8, "e.g. 16"),
    ("eval.encode_batch_size", 500, 8, 1, "e.g. 504")])
def test_batch_divisible(key, value, num_devices, process_count, fix):
    config = shipped()
    section, field = key.split(".")
    config[section][field] = value
    assert only(config, num_devices, process_count) == (key, "divisible")
    assert problems(config, num_devices, process_count)[0].message.endswith(fix)


def test_mesh_covers_the_devices():
    config = shipped()
    config.mesh.data, config.mesh.fsdp = 3, 2
    assert only(config, num_devices=8) == ("mesh.data", "mesh")
    config.mesh.data, config.mesh.fsdp = -1, 3
    assert only(config, num_devices=8) == ("mesh.fsdp", "divisible")
    config.mesh.data, config.mesh.fsdp = 4, 2
    check_config(config, num_devices=8, process_count=1)


# ---------------------------------------------------------------------------- all at once


def test_every_problem_at_once():
    config = shipped()
    config.data.channels = 3
    config.model.num_heads = 3
    config.training.batch_size = 12
    config.sampling.method = "bogus"
    with pytest.raises(ConfigError) as info:
        check_config(config, num_devices=8, process_count=1)
    assert isinstance(info.value, ValueError)
    assert {(p.key, p.kind) for p in info.value.problems} == {
        ("data.channels", "dataset"), ("model.num_heads", "divisible"),
        ("training.batch_size", "divisible"), ("sampling.method", "choice")}
    lines = str(info.value).splitlines()
    assert lines[0] == "Invalid config (4 problem(s)):" and len(lines) == 5
    assert "training.batch_size=12: not divisible by the 8 devices" in str(info.value)


def test_image_folder_needs_its_folder_and_a_test_fraction_below_one():
    config = importlib.import_module("configs.fashion_mnist").get_config()
    config.data.name, config.data.test_fraction = "image_folder", 1.0
    with pytest.raises(ConfigError) as info:
        check_config(config)
    found = {(p.key, p.kind) for p in info.value.problems}
    assert found == {("data.image_dir", "dataset"), ("data.test_fraction", "range")}
