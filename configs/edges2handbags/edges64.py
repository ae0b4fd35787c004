"""Edges2Handbags 64x64, the edge maps: the source domain of the paper's image-to-image
experiment (a DMZ per domain and a code bridge between them, dmz_jax/bridge.py).

The whole experiment, from the repository root (SRC: the unpacked pix2pix `edges2handbags`
release, see tools/split_edges2handbags.py for where to get it):

    python tools/split_edges2handbags.py SRC data/edges2handbags64
    python -m dmz_jax.main --config=configs/edges2handbags/edges64.py --workdir=runs/e2h_edges64
    python -m dmz_jax.main --config=configs/edges2handbags/handbags64.py \
        --workdir=runs/e2h_handbags64
    python -m dmz_jax.main --config=configs/edges2handbags/handbags64.py \
        --workdir=runs/e2h_handbags64 --mode=train_bridge \
        --config.modes.bridge.source_workdir=runs/e2h_edges64
    python -m dmz_jax.main --config=configs/edges2handbags/handbags64.py \
        --workdir=runs/e2h_handbags64 --mode=translate \
        --config.eval.inception_weights=inception_fid.npz   # FID; without it FD is null

train_bridge writes runs/e2h_handbags64/bridge (the bridge) and train_bridge/metrics.json;
translate writes translate/{translations.npz, source_translation_target.png, metrics.json}.

Data: data.name "image_folder" on data/edges2handbags64/edges_train (one channel), the 138,567
training pairs' left halves at 64x64. 1% of them (1,386) are held out as the "test" split;
handbags64.py reads the photos with the same names and the same data.split_seed, so both
models hold out the same pairs and row i of one split pairs with row i of the other (the
bridge checks the file names). The authors test on the release's 200 validation pairs
(edges_val/, handbags_val/), which this split does not read.

Model: DMZ of our design, configs/celeba64.py's network and recipe (64 channels, (1, 2, 4, 8),
2 res blocks, attention at 16, encoder (1, 2, 4, 8, 8), T = 1000 linear betas, learned sigma,
AdamW 1e-4, batch 128, EMA 0.9999, flips), with |z| = 128 bits (celeba64: 64; the authors'
E2H models: 256) and 500,000 steps (the authors' count). Variant "tiny": tiny widths (tests).
"""

from typing import Optional

from configs import celeba64
from dmz_jax.config_base import tiny

DATA_ROOT = "data/edges2handbags64"  # what tools/split_edges2handbags.py writes


def get_config(arg: Optional[str] = None, half: str = "edges"):
    if arg not in (None, "", "tiny"):
        raise ValueError(f"Unknown variant {arg!r} of configs/edges2handbags/{half}64.py; "
                         "use 'tiny'.")
    c = celeba64.get_config()
    c.data.update(name="image_folder", image_dir=f"{DATA_ROOT}/{half}_train", image_size=64,
                  channels=1 if half == "edges" else 3, test_fraction=0.01, split_seed=0)
    c.model.latent_dim = 128
    c.training.num_steps = 500_000
    c.training.checkpoint_every = 10_000
    if arg == "tiny":
        tiny(c)
    return c
