"""Linear probes on latent codes: how much of the label a code carries."""

from __future__ import annotations

import numpy as np


def linear_probe_accuracy(train_codes: np.ndarray, train_labels: np.ndarray,
                          test_codes: np.ndarray, test_labels: np.ndarray,
                          max_iter: int = 2000) -> float:
    """Test accuracy of a multinomial logistic regression fit on the training codes.

    Codes: [N, n_bits] (0/1 or real); labels: [N] ints. Features are standardised with the
    training statistics (constant bits are left at zero).
    """
    from sklearn.linear_model import LogisticRegression  # heavy import, only when probing

    mean = train_codes.mean(0)
    std = train_codes.std(0)
    std = np.where(std > 0, std, 1.0)
    clf = LogisticRegression(max_iter=max_iter)
    clf.fit((train_codes - mean) / std, train_labels)
    return float(clf.score((test_codes - mean) / std, test_labels))
