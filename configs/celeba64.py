"""CelebA 64x64 through tfds `celeb_a`, on Diff-AE's CelebA-64 recipe (its peer setting).

Diff-AE (Preechakul et al. 2022, `celeba64d2c_autoenc`), kept as published:
  the "d2c" crop (the 128x128 box at rows 57..184, cols 25..152 of the aligned 218x178
  image, resized to 64x64; preset "diffae"; "center" takes the central square instead);
  random horizontal flips; U-Net 64 channels, multipliers (1, 2, 4, 8), 2 res blocks,
  attention at 16 with 1 head, dropout 0.1; encoder multipliers (1, 2, 4, 8, 8); T = 1000
  linear betas; AdamW lr 1e-4, no warmup, gradient clipping at 1; batch 128; EMA 0.9999
  without warm-up; 72M images seen (562,500 steps).
Deviations, with reasons:
  - learned sigma and I-DDPM's hybrid loss instead of Diff-AE's fixed variance and eps MSE:
    DMZ is built on I-DDPM, and the learned variance is what makes few-step sampling work;
  - z is |z| = 64 bits through cross-attention, not Diff-AE's 512-d real vector through AdaGN
    (the DMZ design).
Variant "tiny": the same data with a U-Net that compiles in seconds (tests).
"""

from typing import Optional

from dmz_jax.config_base import base_config, tiny


def get_config(arg: Optional[str] = None):
    c = base_config()
    c.data.name = "celeb_a"
    c.data.image_size = 64
    c.data.channels = 3
    c.data.random_flip = True
    c.data.crop = "diffae"
    c.model.latent_dim = 64
    c.model.model_channels = 64
    c.model.channel_mult = (1, 2, 4, 8)
    c.model.num_res_blocks = 2
    c.model.attention_resolutions = (16,)
    c.model.num_heads = 1
    c.model.dropout = 0.1
    c.model.encoder.model_channels = 64
    c.model.encoder.channel_mult = (1, 2, 4, 8, 8)
    c.diffusion.schedule = "linear"
    c.diffusion.num_timesteps = 1000
    c.training.batch_size = 128
    c.training.num_steps = 562_500
    c.training.learning_rate = 1e-4
    c.training.grad_clip = 1.0
    c.training.ema_decay = 0.9999
    c.training.ema_warmup = False
    c.eval.probe_train_examples = 20_000
    if arg == "tiny":
        tiny(c)
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of configs/celeba64.py; use 'tiny'.")
    return c
