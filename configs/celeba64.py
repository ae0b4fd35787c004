"""CelebA 64x64 through tfds `celeb_a`.

Crop preset "diffae": the 128x128 box at rows 57..184, cols 25..152 of the 218x178 aligned
image (the DDIM / Diff-AE CelebA-64 crop), resized to 64x64. "center": the central 178x178
square, resized. U-Net as I-DDPM's 64x64 model: 128 channels, (1, 2, 3, 4), 3 res blocks,
attention at 16 and 8.
"""

from dmz_jax.config_base import base_config


def get_config():
    c = base_config()
    c.data.name = "celeb_a"
    c.data.image_size = 64
    c.data.channels = 3
    c.data.random_flip = True
    c.data.crop = "diffae"
    c.model.latent_dim = 64
    c.model.channel_mult = (1, 2, 3, 4)
    c.model.dropout = 0.1
    c.model.encoder.channel_mult = (1, 2, 2, 4, 4)
    c.training.batch_size = 128
    c.training.num_steps = 500_000
    c.eval.probe_train_examples = 20_000
    return c
