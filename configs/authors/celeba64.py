"""The authors' DMZ on CelebA-64 (their README, "Training / CelebA-64"):

    mpiexec -n 2 python ddpm_train.py --data_dir data/celeba/celeba64_train --input_pertub 0.1
        --image_size 64 --use_fp16 True --num_channels 192 --attention_head_dim 64
        --layers_per_block 3 --variance_type learned_range --learn_sigma True --dropout 0.1
        --diffusion_steps 1000 --noise_schedule cosine --rescale_learned_sigmas True
        --schedule_sampler loss-second-moment --lr 1e-4 --batch_size 128
        --encoder_type bernoulli --latent_dim 64 --z_via_cross_att True --cross_attention True

    python -m dmz_jax.main --config=configs/authors/celeba64.py --workdir=runs/authors_celeba64

U-Net 192 x (1, 2, 3, 4), blocks [Down, CrossAttn, CrossAttn, CrossAttn] (64 heads at 32, 16
and 8 pixels and in the mid block); |z| = 64 (one 128-wide token); encoder widths 32..512.
Data: tfds celeb_a, the full 218x178 frame squashed to 64x64 (data.crop=resize), as their
datasets/celeba64_npz.py; train = the first 162,770 images, as theirs.
Deviations: those in configs/authors/recipe.py; our resize antialiases (theirs: OpenCV
bilinear, which does not); their run saw only half the training files (two unsynchronised
replicas, rank 0 saved), ours all; 500,000 steps (their code never stops).
Variant "tiny": the same options at tiny widths (tests).
"""

from typing import Optional

from configs.authors.recipe import authors_dmz, tiny_authors
from dmz_jax.config_base import base_config


def get_config(arg: Optional[str] = None):
    c = base_config()
    c.data.update(name="celeb_a", image_size=64, channels=3, crop="resize")
    authors_dmz(c, num_channels=192, channel_mult=(1, 2, 3, 4), layers_per_block=3,
                attention_head_dim=64, dropout=0.1, latent_dim=64, input_perturbation=0.1,
                attention_resolutions=(32, 16, 8))
    c.training.num_steps = 500_000
    c.eval.probe_train_examples = 162_770
    c.eval.probe_test_examples = 19_962
    if arg == "tiny":
        tiny_authors(c)
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of configs/authors/celeba64.py; use 'tiny'.")
    return c
