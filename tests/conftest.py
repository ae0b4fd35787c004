"""Test session setup: 8 fake CPU devices, a persistent compile cache, tiny configs."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.path.dirname(os.path.dirname(__file__)), ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def tiny_config(name: str = "fashion_mnist"):
    """The offline default shrunk to a U-Net that compiles in seconds."""
    from configs import fashion_mnist  # noqa: F401  (configs/ is importable from the root)
    config = fashion_mnist.get_config()
    config.data.source = "bundled"
    config.model.latent_dim = 8
    config.model.token_dim = 16
    config.model.model_channels = 16
    config.model.channel_mult = (1, 2)
    config.model.attention_resolutions = (16,)
    config.model.num_heads = 2
    config.model.num_groups = 8
    config.model.dropout = 0.1
    config.model.encoder.model_channels = 16
    config.model.encoder.channel_mult = (1, 2)
    config.diffusion.num_timesteps = 50
    config.training.batch_size = 8
    config.training.num_steps = 4
    config.training.log_every = 2
    config.training.checkpoint_every = 2
    config.sampling.num_samples = 4
    config.sampling.steps = (2, 5)
    config.eval.probe_train_examples = 200
    config.eval.probe_test_examples = 100
    config.eval.encode_batch_size = 40
    return config


@pytest.fixture
def tiny():
    return tiny_config()
