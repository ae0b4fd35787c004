"""The offline default shrunk to a U-Net that compiles in seconds (tests and subprocesses).

    python -m dmz_jax.main --config=tests/tiny_config.py --workdir=/tmp/tiny
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import fashion_mnist  # noqa: E402


def get_config():
    config = fashion_mnist.get_config()
    config.data.source = "bundled"
    config.model.latent_dim = 8
    config.model.token_dim = 16
    config.model.model_channels = 16
    config.model.channel_mult = (1, 2)
    config.model.attention_resolutions = (16,)
    config.model.cross_attention_resolutions = None  # same as attention_resolutions
    config.model.binary_estimator = "bernoulli"  # the paper configs' default
    config.model.encoder.center_examples = 64
    config.model.num_heads = 2
    config.model.num_groups = 8
    config.model.dropout = 0.1
    config.model.encoder.model_channels = 16
    config.model.encoder.channel_mult = (1, 2)
    config.diffusion.num_timesteps = 50
    config.training.batch_size = 8
    config.training.warmup_steps = 0  # updates from the first step
    config.training.num_steps = 4
    config.training.log_every = 2
    config.training.checkpoint_every = 2
    config.sampling.num_samples = 4
    config.sampling.steps = (2, 5)
    config.eval.probe_train_examples = 200
    config.eval.probe_test_examples = 100
    config.eval.encode_batch_size = 40
    return config
