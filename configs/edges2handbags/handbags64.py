"""Edges2Handbags 64x64, the photos: the target domain of the image-to-image experiment; the
command sequence is in configs/edges2handbags/edges64.py.

    python -m dmz_jax.main --config=configs/edges2handbags/handbags64.py \
        --workdir=runs/e2h_handbags64

data/edges2handbags64/handbags_train (three channels): the right halves of the pairs whose
left halves edges64.py reads, the same names and the same held-out 1%. Everything else as
configs/edges2handbags/edges64.py.
"""

from typing import Optional

from configs.edges2handbags import edges64


def get_config(arg: Optional[str] = None):
    return edges64.get_config(arg, half="handbags")
