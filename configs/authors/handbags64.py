"""The authors' DMZ on Edges2Handbags' photos, 64x64: the command of configs/authors/edges64.py
with `--data_dir data/edges2handbags/handbags64_train` (three channels).

    python -m dmz_jax.main --config=configs/authors/handbags64.py --workdir=runs/authors_handbags64 \
        --config.data.image_dir=data/edges2handbags64/handbags_train

Everything else, deviations included, as configs/authors/edges64.py.
"""

from typing import Optional

from configs.authors import edges64


def get_config(arg: Optional[str] = None):
    return edges64.get_config(arg, half="handbags")
