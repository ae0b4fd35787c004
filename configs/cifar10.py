"""CIFAR-10 32x32, the paper's generation model: |z| = 16 bits on I-DDPM's CIFAR-10 recipe.

I-DDPM (Nichol & Dhariwal 2021, improved-diffusion's CIFAR-10 flags), kept as published:
  U-Net 128 channels, multipliers (1, 2, 2, 2), 3 res blocks, attention at 16 and 8, 4 heads,
  dropout 0.3, learned sigma (52.5M parameters); hybrid loss (lambda = 0.001); T = 4000
  cosine steps with timesteps rescaled to [0, 1000) for the network (improved-diffusion's
  default); AdamW lr 1e-4, no weight decay, no gradient clipping, no warmup; batch 128;
  EMA 0.9999 without warm-up; no random flips; 500k steps.
DMZ's additions, not in I-DDPM: the encoder (64 channels, (1, 2, 2, 2), 2 res blocks), |z| =
16 binary bits (the paper's CIFAR-10 generation setting), z tokens of width 128 and
cross-attention at every attention level and the middle block.
Variant "tiny": the same data with a U-Net that compiles in seconds (tests).
"""

from typing import Optional

from dmz_jax.config_base import base_config, tiny


def get_config(arg: Optional[str] = None):
    c = base_config()
    c.data.name = "cifar10"
    c.data.image_size = 32
    c.data.channels = 3
    c.data.random_flip = False
    c.model.latent_dim = 16
    c.model.dropout = 0.3
    c.diffusion.schedule = "cosine"
    c.diffusion.num_timesteps = 4000
    c.diffusion.rescale_timesteps = True
    c.training.batch_size = 128
    c.training.num_steps = 500_000
    c.training.learning_rate = 1e-4
    c.training.grad_clip = 0.0
    c.training.ema_decay = 0.9999
    c.training.ema_warmup = False
    c.eval.probe_train_examples = 50_000
    if arg == "tiny":
        tiny(c)
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of configs/cifar10.py; use 'tiny'.")
    return c
