"""dmz_jax: DMZ, a diffusion autoencoder with a binary latent, in JAX/Flax.

`dmz_jax.load(workdir)` gives a trained model (see dmz_jax/api.py).
"""

__version__ = "0.1.0"


def load(workdir: str, **kwargs):
    """A trained DMZ from WORKDIR's checkpoints; see dmz_jax.api.load."""
    from dmz_jax import api
    return api.load(workdir, **kwargs)
