"""Evaluation metrics: Frechet distance, image quality, latent probes, feature networks.

Import the submodule you need; this package imports nothing heavy:
  frechet        feature statistics and the Frechet distance (numpy, float64)
  inception      the standard FID InceptionV3 in Flax and its locally converted weights
  classifier     a small Fashion-MNIST CNN for an offline, non-standard Frechet distance
  image_quality  MSE, PSNR, SSIM (jax.numpy)
  probes         AUROC, attribute and class probes on latent codes (scikit-learn)
"""
