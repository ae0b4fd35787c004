"""Fashion-MNIST padded to 32x32: the offline default, sized to train on 2 CPU cores in ~10 min.

    python -m dmz_jax.main --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist
    python -m dmz_jax.main --config=configs/fashion_mnist.py:tiny ...   # tests: compiles in s

Data comes from (in this order) a prepared tfds `fashion_mnist`, Debian's
`dataset-fashion-mnist` files, or the 10k-image subset shipped inside the package.

Model: |z| = 64 bits; a small U-Net (16 channels, (1, 2, 2), self-attention at 8,
cross-attention to z at 16 and 8 and in the middle block, 8 GroupNorm groups) and encoder
(16 channels, (1, 2, 4, 8)): about 0.35 s per batch of 32 on 2 CPU cores.

Short-budget choices (the paper configs keep the defaults), because in 1,500 steps the
encoder otherwise collapses to a few hundred distinct codes before the denoiser learns to
use z (measured: linear probe 0.25-0.37 with the defaults):
  - model.binary_estimator = "threshold": deterministic straight-through bits in training;
  - model.encoder.center_examples = 1024: every bit starts by splitting the data evenly;
  - training.encoder_lr_scale = 0.1: the encoder moves slower than the denoiser;
  - learning rate 1e-3 with 100 warmup steps, EMA 0.999: a short run needs larger steps.
summary.json reports `probe_accuracy_at_init` beside `probe_accuracy`, so the share of the
probe that training added is visible.

Variant "tiny": the same pipeline with a U-Net that compiles in seconds (tests, smoke runs).
"""

from typing import Optional

from dmz_jax.config_base import base_config, tiny


def get_config(arg: Optional[str] = None):
    c = base_config()
    c.data.name = "fashion_mnist"
    c.data.image_size = 32
    c.data.channels = 1
    c.model.latent_dim = 64
    c.model.token_dim = 64
    c.model.binary_estimator = "threshold"
    c.model.model_channels = 16
    c.model.num_groups = 8
    c.model.channel_mult = (1, 2, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (8,)
    c.model.cross_attention_resolutions = (16, 8)
    c.model.num_heads = 2
    c.model.dropout = 0.0
    c.model.encoder.model_channels = 16
    c.model.encoder.channel_mult = (1, 2, 4, 8)
    c.model.encoder.num_res_blocks = 1
    c.model.encoder.center_examples = 1024
    c.training.batch_size = 32
    c.training.num_steps = 1_500
    c.training.learning_rate = 1e-3
    c.training.warmup_steps = 100
    c.training.encoder_lr_scale = 0.1
    c.training.ema_decay = 0.999
    c.training.log_every = 50
    c.training.checkpoint_every = 500
    c.training.sample_every = 1_000_000  # grids at the end only
    c.sampling.num_samples = 64
    c.eval.probe_train_examples = 10_000
    c.eval.probe_test_examples = 2_000
    # --mode=evaluate sized for 2 CPU cores (~25 min): 500 samples per Frechet distance (in
    # the features of a classifier trained here: no Inception offline), the full VLB of 64
    # test images, reconstructions of 256
    c.eval.update(fd_num_samples=500, nll_examples=64, recon_examples=256)
    if arg == "tiny":
        _tiny(c)
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of configs/fashion_mnist.py; use 'tiny'.")
    return c


def _tiny(c) -> None:
    """config_base.tiny on the bundled subset, with the paper configs' estimator and dropout."""
    tiny(c)
    c.data.source = "bundled"
    c.model.update(binary_estimator="bernoulli", dropout=0.1)
    c.model.encoder.center_examples = 64
