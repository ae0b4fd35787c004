"""dmz_jax: DMZ, a diffusion autoencoder with a binary latent, in JAX/Flax."""

__version__ = "0.1.0"
