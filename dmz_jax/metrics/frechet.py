"""Frechet distance between Gaussians fitted to features (FID when the features are Inception's).

Everything is float64 numpy. The trace of the matrix square root is computed from symmetric
eigendecompositions, not scipy.linalg.sqrtm: for PSD s1, s2 the eigenvalues of s1 s2 are those
of the PSD matrix s1^1/2 s2 s1^1/2, so Tr sqrtm(s1 s2) = sum_i sqrt(lambda_i) with every lambda_i
real and non-negative up to round-off. This needs no complex-part check and no eps*I
retry for singular products (e.g. fewer samples than feature dimensions), which pytorch-fid's
sqrtm path needs; for well-conditioned inputs both agree to round-off.
"""

from __future__ import annotations

import numpy as np


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (np.cov, rowvar=False) of features [N, D], N >= 2."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"Expected features [N >= 2, D], got shape {features.shape}.")
    return features.mean(0), np.cov(features, rowvar=False)


def _sqrt_eigenvalues(eigvals: np.ndarray) -> np.ndarray:
    """sqrt of a PSD matrix's eigenvalues; those below the round-off level (D eps max|lambda|,
    as in np.linalg.pinv) are zero: their square roots would add up to ~D 1e-8 of noise."""
    tol = eigvals.size * np.finfo(np.float64).eps * np.abs(eigvals).max(initial=0.0)
    return np.sqrt(np.where(eigvals > tol, eigvals, 0.0))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix."""
    eigvals, eigvecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigvecs * _sqrt_eigenvalues(eigvals)) @ eigvecs.T


def trace_sqrt_product(sigma1, sigma2) -> float:
    """Tr sqrtm(sigma1 @ sigma2) for symmetric PSD [D, D] matrices."""
    root1 = _psd_sqrt(np.asarray(sigma1, np.float64))
    inner = root1 @ np.asarray(sigma2, np.float64) @ root1
    return float(_sqrt_eigenvalues(np.linalg.eigvalsh((inner + inner.T) / 2)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)); means [D], covariances
    [D, D]. In squared feature units; FID is this on Inception pool3 statistics."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"Mismatched statistics: {mu1.shape} vs {mu2.shape}, "
                         f"{sigma1.shape} vs {sigma2.shape}.")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * trace_sqrt_product(sigma1, sigma2))


class RunningStatistics:
    """Mean and covariance accumulated over batches in float64; memory O(D^2), not O(N D).

    Sums are taken around a shift (the first batch's mean), which keeps the covariance
    sum(x x^T) - N mu mu^T free of cancellation when features have a large common offset.
    """

    def __init__(self, dim: int):
        self.count = 0
        self.shift = None
        self.sum = np.zeros(dim, np.float64)
        self.sum_outer = np.zeros((dim, dim), np.float64)

    def update(self, features) -> None:
        """Adds a batch of features [B, D]."""
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or features.shape[1] != self.sum.shape[0]:
            raise ValueError(f"Expected features [B, {self.sum.shape[0]}], got {features.shape}.")
        if self.shift is None:
            self.shift = features.mean(0)
        centred = features - self.shift
        self.count += features.shape[0]
        self.sum += centred.sum(0)
        self.sum_outer += centred.T @ centred

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]), equal to feature_statistics of all batches concatenated."""
        if self.count < 2:
            raise ValueError(f"Need at least 2 samples, have {self.count}.")
        mean = self.sum / self.count
        sigma = (self.sum_outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return self.shift + mean, sigma
