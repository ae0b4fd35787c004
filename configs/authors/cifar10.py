"""The authors' DMZ on CIFAR-10 (their README, "Training / CIFAR-10"):

    mpiexec -n 1 python ddpm_train.py --data_dir data/cifar10/cifar10_train --input_pertub 0.15
        --image_size 32 --use_fp16 True --num_channels 128 --attention_head_dim 32
        --layers_per_block 3 --variance_type learned_range --learn_sigma True --dropout 0.3
        --diffusion_steps 1000 --noise_schedule cosine --rescale_learned_sigmas True
        --schedule_sampler loss-second-moment --lr 1e-4 --batch_size 128
        --encoder_type bernoulli --latent_dim 16 --z_via_cross_att True --cross_attention True

    python -m dmz_jax.main --config=configs/authors/cifar10.py --workdir=runs/authors_cifar10

U-Net 128 x (1, 2, 2, 2), blocks [Down, CrossAttn, CrossAttn, Down], 32 heads of width 8 at
16x16 and 8x8 and in the mid block; |z| = 16 (one 32-wide token); encoder widths 32..256.
Deviations: those listed in configs/authors/recipe.py, and the length: the authors' code
never stops (lr_anneal_steps=0) and the paper does not say; 500,000 steps here, as ours.
Data: tfds cifar10 (train 50,000 / test 10,000; their PNG export of the same split).
Variant "tiny": the same options at tiny widths (tests).
"""

from typing import Optional

from configs.authors.recipe import authors_dmz, tiny_authors
from dmz_jax.config_base import base_config


def get_config(arg: Optional[str] = None):
    c = base_config()
    c.data.update(name="cifar10", image_size=32, channels=3)
    authors_dmz(c, num_channels=128, channel_mult=(1, 2, 2, 2), layers_per_block=3,
                attention_head_dim=32, dropout=0.3, latent_dim=16, input_perturbation=0.15,
                attention_resolutions=(16, 8))
    c.training.num_steps = 500_000
    c.eval.probe_train_examples = 50_000
    if arg == "tiny":
        tiny_authors(c)
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of configs/authors/cifar10.py; use 'tiny'.")
    return c

