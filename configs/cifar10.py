"""CIFAR-10 32x32, the paper's generation model: |z| = 16 bits, I-DDPM's CIFAR-10 U-Net.

U-Net: 128 channels, multipliers (1, 2, 2, 2), 3 res blocks, attention at 16 and 8, 4 heads,
dropout 0.3, learned sigma (52.5M parameters in I-DDPM). I-DDPM uses T=4000 cosine; the paper
leaves T open, we default to T=1000 (set config.diffusion.num_timesteps=4000 for I-DDPM's).
"""

from dmz_jax.config_base import base_config


def get_config():
    c = base_config()
    c.data.name = "cifar10"
    c.data.image_size = 32
    c.data.channels = 3
    c.data.random_flip = True
    c.model.latent_dim = 16
    c.training.batch_size = 128
    c.training.num_steps = 500_000
    c.eval.probe_train_examples = 50_000
    return c
