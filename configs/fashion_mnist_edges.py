"""Fashion-MNIST edge maps (data.name "fashion_mnist_edges"): the source domain of the offline
image-to-image demo (edges -> garments through a code bridge, the paper's Edges2Handbags
experiment in small; dmz_jax/bridge.py).

    python -m dmz_jax.main --config=configs/fashion_mnist_edges.py \
        --workdir=runs/fashion_mnist_edges
    python -m dmz_jax.main --config=configs/fashion_mnist_edges.py:tiny ...   # tests

Every setting is configs/fashion_mnist.py's (its variant "tiny" too); only the data differ:
the same images, splits, order and labels, each garment replaced by its binary Sobel edge
map (dmz_jax/data/fashion_mnist_edges.py), so that row i pairs with row i of fashion_mnist.
"""

from typing import Optional

from configs import fashion_mnist


def get_config(arg: Optional[str] = None):
    if arg not in (None, "", "tiny"):
        raise ValueError(f"Unknown variant {arg!r} of configs/fashion_mnist_edges.py; use 'tiny'.")
    c = fashion_mnist.get_config(arg or None)
    c.data.name = "fashion_mnist_edges"
    return c
