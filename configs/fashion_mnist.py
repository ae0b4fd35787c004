"""Fashion-MNIST padded to 32x32: the offline default, sized to train usefully on 2 CPU cores.

Data comes from (in this order) a prepared tfds `fashion_mnist`, Debian's
`dataset-fashion-mnist` files, or the 10k-image subset shipped inside the package.
|z| = 32 bits; a small U-Net (16 channels, (1, 2, 2), attention at 8, 8 GroupNorm groups)
and encoder (16 channels): about 0.35 s per batch of 32 on 2 CPU cores.
"""

from dmz_jax.config_base import base_config


def get_config():
    c = base_config()
    c.data.name = "fashion_mnist"
    c.data.image_size = 32
    c.data.channels = 1
    c.model.latent_dim = 32
    c.model.token_dim = 64
    c.model.model_channels = 16
    c.model.num_groups = 8
    c.model.channel_mult = (1, 2, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (8,)
    c.model.num_heads = 2
    c.model.dropout = 0.0
    c.model.encoder.model_channels = 16
    c.model.encoder.channel_mult = (1, 2, 2)
    c.model.encoder.num_res_blocks = 1
    c.training.batch_size = 32
    c.training.num_steps = 1_500
    c.training.learning_rate = 2e-4
    c.training.ema_decay = 0.999
    c.training.log_every = 50
    c.training.checkpoint_every = 500
    c.training.sample_every = 1_000_000  # grids at the end only
    c.sampling.num_samples = 64
    c.eval.probe_train_examples = 10_000
    c.eval.probe_test_examples = 2_000
    return c
