"""The authors' DMZ on Edges2Handbags' edge maps, 64x64 (their README, "Edges-64 and Handbags-64"):

    mpiexec -n 2 python ddpm_train.py --data_dir data/edges2handbags/edges64_train --input_pertub 0.1
        --image_size 64 --use_fp16 True --num_channels 192 --attention_head_dim 64
        --layers_per_block 3 --variance_type learned_range --learn_sigma True --dropout 0.1
        --diffusion_steps 1000 --noise_schedule cosine --rescale_learned_sigmas True
        --schedule_sampler loss-second-moment --lr 1e-4 --batch_size 128
        --encoder_type bernoulli --latent_dim 256 --z_via_cross_att True --cross_attention True
        --one_cross_attention 2

    python -m dmz_jax.main --config=configs/authors/edges64.py --workdir=runs/authors_edges64 \
        --config.data.image_dir=data/edges2handbags64/edges_train

U-Net 192 x (1, 2, 3, 4), blocks [Down, Attn, CrossAttn, Attn]: self-attention only at 32 and
8 pixels (heads of width 64), cross-attention to z only at 16 (`--one_cross_attention 2`, 64
heads) and in the mid block; |z| = 256 (one 512-wide token); one channel (edges as grey).
Data: a folder of 64x64 edge images (data.name=image_folder, channels 1): each 256x512 pair
of the Edges2Handbags release split into its halves and resized, by
`python tools/split_edges2handbags.py SRC data/edges2handbags64` (the release itself cannot
be downloaded here; the script's docstring says where to get it). 1% of the training pairs
are held out here (the same pairs for edges and handbags: same names, same split_seed); the
authors test on the release's 200 validation pairs (written to edges_val/, handbags_val/).
Deviations: those in configs/authors/recipe.py; the split; 500,000 steps.
Variant "tiny": the same options at tiny widths (tests).
"""

from typing import Optional

from configs.authors.recipe import authors_dmz, tiny_authors
from dmz_jax.config_base import base_config


def get_config(arg: Optional[str] = None, half: str = "edges"):
    c = base_config()
    c.data.update(name="image_folder", image_dir=f"data/edges2handbags64/{half}_train",
                  image_size=64, channels=1 if half == "edges" else 3, test_fraction=0.01)
    authors_dmz(c, num_channels=192, channel_mult=(1, 2, 3, 4), layers_per_block=3,
                attention_head_dim=64, dropout=0.1, latent_dim=256, input_perturbation=0.1,
                attention_resolutions=(32, 16, 8))
    c.model.cross_attention_resolutions = (16,)
    c.training.num_steps = 500_000
    if arg == "tiny":
        tiny_authors(c)
        c.model.update(channel_mult=(1, 2, 2), attention_resolutions=(32, 16))
        c.model.cross_attention_resolutions = (32,)
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of configs/authors/{half}64.py; use 'tiny'.")
    return c
