"""CelebA-HQ 256x256: the DMZ paper's high-resolution setting, fine-tuned from a celeba64 run.

    python -m dmz_jax.main --config=configs/celebahq256.py --mode=describe
    python -m dmz_jax.main --config=configs/celebahq256.py --workdir=runs/celebahq256 \
        --config.training.init_from=runs/celeba64 --config.data.image_dir=PATH

Data: the 30,000 CelebA-HQ images at 256x256 as image files in one folder (data.name
"image_folder"; the folder, default data/celeba_hq_256, holds e.g. the 256x256 PNGs of the
CelebA-HQ release, or the 1024x1024 ones, which are resized). 10% are held out for evaluation.

The paper fine-tunes its CelebA-64 model at 256x256 for 40K iterations. This config therefore
keeps configs/celeba64.py's model unchanged, so that the 64x64 checkpoint fits it
(training.init_from, dmz_jax/warm_start.py): 64 channels, multipliers (1, 2, 4, 8), 2 res
blocks, 1 head, |z| = 64, encoder (1, 2, 4, 8, 8); its attention stays at the same level,
which is 64x64 pixels here (16x16 at 64x64). AdamW lr 1e-4, clipping at 1, EMA 0.9999 without
warm-up, T = 1000 linear betas, flips: celeba64's recipe.
Deviations, with reasons:
  - 40,000 steps (the paper's fine-tuning length), batch 64 (celeba64: 128): an image has 16x
    the pixels; what fits a given GPU is not measured here, lower it or raise
    training.grad_accum_steps;
  - the memory knobs on (README "Memory and precision knobs"): bf16 compute with float32
    master parameters, rematerialised blocks, and jax.nn.dot_product_attention (a fused
    kernel where JAX picks one; in jax 0.10.2 it takes the XLA path, which holds the
    4096 x 4096 attention logits of the 64x64 level);
  - sampling and encoding in batches of 16.

Variant "scratch": a 256x256 model sized as Diff-AE's FFHQ-256 autoencoder (128 channels,
multipliers (1, 1, 2, 2, 4, 4), 2 res blocks, attention at 16, encoder (1, 1, 2, 2, 4, 4, 4)),
trained from scratch; its shapes do not fit a celeba64 checkpoint.
Variant "tiny": the fine-tuning config at tiny widths (tests).
"""

from typing import Optional

from configs import celeba64
from dmz_jax.config_base import tiny


def get_config(arg: Optional[str] = None):
    c = celeba64.get_config()
    c.data.name = "image_folder"
    c.data.image_dir = "data/celeba_hq_256"
    c.data.image_size = 256
    c.data.test_fraction = 0.1
    c.model.attention_resolutions = (64,)  # celeba64's (16,): the same level of the U-Net
    c.model.update(dtype="bfloat16", remat=True, attention_impl="dot_product_attention")
    c.training.batch_size = 64
    c.training.num_steps = 40_000
    c.training.checkpoint_every = 2_000
    c.training.sample_every = 5_000
    c.sampling.update(batch_size=16, num_samples=16)
    c.eval.encode_batch_size = 64
    if arg == "scratch":
        c.model.update(model_channels=128, channel_mult=(1, 1, 2, 2, 4, 4),
                       attention_resolutions=(16,))
        c.model.encoder.update(model_channels=128, channel_mult=(1, 1, 2, 2, 4, 4, 4))
        c.training.num_steps = 500_000
    elif arg == "tiny":
        tiny(c)
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of configs/celebahq256.py; use 'scratch' "
                         "or 'tiny'.")
    return c
