"""validate_config: shipped configs pass; each kind of mistake gives its own line and hint."""

import importlib

import ml_collections
import pytest

from dmz_jax.config_validation import ConfigError, validate_config

SHIPPED = ("fashion_mnist", "cifar10", "celeba64")


def shipped(name: str = "fashion_mnist") -> ml_collections.ConfigDict:
    return importlib.import_module(f"configs.{name}").get_config()


def net_config() -> ml_collections.ConfigDict:
    """Fashion-MNIST with the network spelled out here, so the expected widths stay put."""
    config = shipped()
    m = config.model
    m.model_channels, m.channel_mult, m.num_groups, m.num_heads = 32, (1, 2, 2), 8, 2
    m.attention_resolutions, m.cross_attention_resolutions = (8,), None
    m.encoder.model_channels, m.encoder.channel_mult = 32, (1, 2, 2)
    m.encoder.attention_resolutions = ()
    return config


def problems(config, num_devices: int = 1, process_count: int = 1) -> list[str]:
    """The problem lines validate_config reports (it must report at least one)."""
    with pytest.raises(ConfigError) as info:
        validate_config(config, num_devices=num_devices, process_count=process_count)
    lines = info.value.problems
    assert str(info.value).count("\n  - ") == len(lines)
    return lines


def only_problem(config, num_devices: int = 1, process_count: int = 1) -> str:
    lines = problems(config, num_devices, process_count)
    assert len(lines) == 1, lines
    return lines[0]


def has_line(lines: list[str], *parts: str) -> bool:
    """Whether one line contains every one of `parts`."""
    return any(all(p in line for p in parts) for line in lines)


def retyped(config, section: str, key: str, value) -> ml_collections.ConfigDict:
    """A copy with a value of the wrong type (a type-safe ConfigDict refuses the assignment)."""
    d = config.to_dict()
    d[section][key] = value
    return ml_collections.ConfigDict(d)


# ---------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_valid_on_one_device(name):
    validate_config(shipped(name), num_devices=1, process_count=1)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_valid_on_eight_devices(name):
    validate_config(shipped(name), num_devices=8, process_count=1)


def test_defaults_come_from_jax():
    validate_config(shipped())  # conftest gives 8 CPU devices


# ---------------------------------------------------------------------------- keys and types


def test_unknown_key_suggests_the_close_one():
    config = shipped()
    config.model.latnet_dim = 3
    line = only_problem(config)
    assert "model.latnet_dim=3" in line
    assert "unknown key" in line and "did you mean model.latent_dim?" in line


def test_unknown_section_key():
    config = shipped()
    config.trainig = ml_collections.ConfigDict({"batch_size": 8})
    assert "did you mean training?" in only_problem(config)


def test_wrong_type():
    config = retyped(shipped(), "training", "batch_size", "12")
    line = only_problem(config)
    assert "training.batch_size='12'" in line and "expected int, got str" in line


def test_wrong_element_type_in_tuple():
    config = retyped(shipped(), "model", "channel_mult", (1, "2", 2))
    line = only_problem(config)
    assert "model.channel_mult=" in line and "expected tuple of int" in line


def test_missing_key():
    d = shipped().to_dict()
    del d["model"]["token_dim"]
    line = only_problem(ml_collections.ConfigDict(d))
    assert "model.token_dim=None: missing" in line and "base_config()" in line


def test_many_wrong_types_do_not_crash_the_other_checks():
    config = retyped(shipped(), "data", "image_size", "32")
    config = retyped(config, "model", "model_channels", 3.5)
    config = retyped(config, "model", "channel_mult", "122")
    lines = problems(config)
    assert len(lines) == 3
    assert has_line(lines, "data.image_size='32'", "expected int")


# ---------------------------------------------------------------------------- enums


@pytest.mark.parametrize("path, valid", [
    ("data.name", "'cifar10'"),
    ("data.source", "'bundled'"),
    ("data.crop", "'diffae'"),
    ("model.latent_type", "'gaussian'"),
    ("model.conditioning", "'time_embedding'"),
    ("diffusion.schedule", "'linear'"),
    ("sampling.method", "'ddim'"),
])
def test_enum(path, valid):
    config = shipped()
    section, key = path.split(".")
    config[section][key] = "bogus"
    line = only_problem(config)
    assert f"{path}='bogus'" in line and "use one of [" in line and valid in line


# ---------------------------------------------------------------------------- networks


def test_image_size_vs_denoiser_levels():
    config = net_config()
    config.model.channel_mult = (1, 1, 1, 1, 1, 1, 1)  # /64 > 32
    line = only_problem(config)
    assert "model.channel_mult=(1, 1, 1, 1, 1, 1, 1)" in line
    assert "denoiser's 7 levels downsample by 64" in line and "multiple of 64" in line


def test_image_size_vs_encoder_levels():
    config = net_config()
    config.model.encoder.channel_mult = (1, 1, 1, 1, 1, 1, 1)
    line = only_problem(config)
    assert "model.encoder.channel_mult=" in line and "encoder's 7 levels" in line


def test_encoder_unused_is_not_checked():
    config = net_config()
    config.model.latent_type = "none"
    config.model.encoder.channel_mult = (1, 1, 1, 1, 1, 1, 1)
    validate_config(config, num_devices=1, process_count=1)


@pytest.mark.parametrize("path", ["model.attention_resolutions",
                                  "model.cross_attention_resolutions"])
def test_denoiser_attention_resolution_missing(path):
    config = net_config()
    section, key = path.split(".")
    config[section][key] = (8, 4)
    line = only_problem(config)
    assert f"{path}=(8, 4)" in line
    assert "[4] not among the denoiser's resolutions [32, 16, 8]" in line


def test_encoder_attention_resolution_missing():
    config = net_config()
    config.model.encoder.attention_resolutions = (64,)
    line = only_problem(config)
    assert "model.encoder.attention_resolutions=(64,)" in line
    assert "encoder's resolutions [32, 16, 8]" in line


def test_num_groups_must_divide_denoiser_widths():
    config = net_config()
    config.model.num_groups = 24
    config.model.encoder.model_channels = 48  # widths 48, 96: fine for 24 groups
    line = only_problem(config)
    assert "model.num_groups=24" in line and "denoiser's channel widths [32, 64]" in line
    assert "use a divisor of 32, e.g. 16" in line


def test_num_groups_must_divide_encoder_widths():
    config = net_config()
    config.model.num_groups = 16
    config.model.encoder.model_channels = 40  # widths 40, 80
    line = only_problem(config)
    assert "model.num_groups=16" in line and "encoder's channel widths [40]" in line


def test_num_heads_must_divide_attention_widths():
    config = net_config()
    config.model.num_heads = 3
    line = only_problem(config)
    assert "model.num_heads=3" in line and "denoiser's channel widths [64]" in line
    assert "use a divisor of 64, e.g. 2" in line


def test_num_heads_checked_at_encoder_attention():
    config = net_config()
    config.model.num_heads = 64  # the denoiser attends at width 64 only; fine
    config.model.encoder.attention_resolutions = (32,)  # width 32
    line = only_problem(config)
    assert "model.num_heads=64" in line and "encoder's channel widths [32]" in line


# ---------------------------------------------------------------------------- latent


def test_latent_dim_must_be_positive():
    config = shipped()
    config.model.latent_dim = 0
    line = only_problem(config)
    assert "model.latent_dim=0: must be >= 1" in line


def test_latent_dim_ignored_without_latent():
    config = shipped()
    config.model.conditioning = "none"
    config.model.latent_dim = 0
    validate_config(config, num_devices=1, process_count=1)


def test_binary_latent_dim_sanity_bound():
    config = shipped()
    config.model.latent_dim = 5000
    assert "model.latent_dim=5000" in only_problem(config)


def test_token_dim_positive():
    config = shipped()
    config.model.token_dim = 0
    assert "model.token_dim=0: must be >= 1" in only_problem(config)


# ---------------------------------------------------------------------------- training


def test_batch_size_vs_devices():
    config = shipped()
    config.training.batch_size = 12
    config.eval.encode_batch_size = 64
    line = only_problem(config, num_devices=8)
    assert line == ("training.batch_size=12: not divisible by the 8 devices; "
                    "use a multiple of 8, e.g. 16")


def test_batch_size_vs_processes():
    config = shipped()
    config.training.batch_size = 12
    line = only_problem(config, num_devices=1, process_count=8)
    assert "training.batch_size=12" in line and "8 processes" in line and "e.g. 16" in line


@pytest.mark.parametrize("key, value, hint", [
    ("batch_size", 0, "must be >= 1"),
    ("num_steps", 0, "must be >= 1"),
    ("checkpoint_every", 0, "must be >= 1"),
    ("log_every", 0, "must be >= 1"),
    ("keep_checkpoints", 0, "must be >= 1"),
    ("learning_rate", 0.0, "must be > 0"),
    ("grad_clip", -1.0, "must be > 0"),
    ("ema_decay", 1.0, "must be in [0, 1)"),
    ("ema_decay", -0.5, "must be in [0, 1)"),
])
def test_training_scalars(key, value, hint):
    config = shipped()
    config.training[key] = value
    line = only_problem(config)
    assert f"training.{key}={value!r}" in line and hint in line


# ---------------------------------------------------------------------------- sampling, eval


def test_sampling_steps_within_num_timesteps():
    config = shipped()
    config.sampling.steps = (0, 10, 2000)
    line = only_problem(config)
    assert "sampling.steps=(0, 10, 2000)" in line and "[0, 2000] outside" in line
    assert "between 1 and 1000" in line


def test_num_samples_positive():
    config = shipped()
    config.sampling.num_samples = 0
    assert "sampling.num_samples=0: must be >= 1" in only_problem(config)


def test_encode_batch_size_vs_devices():
    config = shipped()
    config.eval.encode_batch_size = 500
    line = only_problem(config, num_devices=8)
    assert line == ("eval.encode_batch_size=500: not divisible by the 8 devices; "
                    "use a multiple of 8, e.g. 504")


# ---------------------------------------------------------------------------- diffusion


def test_num_timesteps_at_least_two():
    config = shipped()
    config.diffusion.num_timesteps = 1
    lines = problems(config)
    assert has_line(lines, "diffusion.num_timesteps=1: must be >= 2")
    assert has_line(lines, "sampling.steps=(10, 100)", "between 1 and 1")


def test_vlb_weight_non_negative():
    config = shipped()
    config.diffusion.vlb_weight = -0.1
    assert "diffusion.vlb_weight=-0.1: must be >= 0" in only_problem(config)


# ---------------------------------------------------------------------------- mesh


def test_mesh_product_must_match_devices():
    config = shipped()
    config.eval.encode_batch_size = 64
    config.mesh.data, config.mesh.fsdp = 3, 2
    line = only_problem(config, num_devices=8)
    assert "mesh.data=3" in line and "3 x 2 = 6" in line and "8 devices" in line
    assert "mesh.data=-1" in line


def test_mesh_fsdp_must_divide_devices():
    config = shipped()
    config.eval.encode_batch_size = 64
    config.mesh.fsdp = 3
    line = only_problem(config, num_devices=8)
    assert "mesh.fsdp=3" in line and "use one of [1, 2, 4, 8]" in line


# ---------------------------------------------------------------------------- data


def test_image_size_minimum():
    config = shipped("cifar10")
    config.data.image_size = 4
    config.model.channel_mult = config.model.encoder.channel_mult = (1, 2)
    config.model.attention_resolutions = (4,)
    assert "data.image_size=4: must be >= 8" in only_problem(config)


def test_fashion_mnist_is_never_cropped():
    config = net_config()
    config.data.image_size = 16
    config.model.attention_resolutions = (4,)
    line = only_problem(config)
    assert "data.image_size=16" in line and "use >= 28" in line


def test_channels_one_or_three():
    config = shipped()
    config.data.channels = 2
    assert "data.channels=2: must be 1 (grayscale) or 3 (RGB)" in only_problem(config)


@pytest.mark.parametrize("name, wrong, right", [
    ("fashion_mnist", 3, 1), ("cifar10", 1, 3), ("celeba64", 1, 3)])
def test_channels_match_dataset(name, wrong, right):
    config = shipped(name)
    config.data.channels = wrong
    line = only_problem(config)
    assert f"data.channels={wrong}" in line and f"set data.channels={right}" in line


# ---------------------------------------------------------------------------- all at once


def test_three_problems_three_lines():
    config = shipped()
    config.model.latnet_dim = 3
    config.training.batch_size = 12
    config.sampling.method = "bogus"
    config.eval.encode_batch_size = 64
    with pytest.raises(ConfigError) as info:
        validate_config(config, num_devices=8, process_count=1)
    message = str(info.value)
    lines = message.splitlines()
    assert lines[0] == "Invalid config (3 problems):"
    assert len(lines) == 4 and all(line.startswith("  - ") for line in lines[1:])
    assert has_line(lines, "model.latnet_dim=3", "did you mean model.latent_dim?")
    assert has_line(lines, "training.batch_size=12", "use a multiple of 8, e.g. 16")
    assert has_line(lines, "sampling.method='bogus'", "'ancestral', 'ddim'")
    assert isinstance(info.value, ValueError)
