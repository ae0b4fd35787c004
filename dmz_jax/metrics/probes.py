"""Probes on latent codes: how much of a label or an attribute a code carries (numpy, sklearn).

Codes: [N, n_bits] (0/1 or real). Features are standardised with the training statistics
(constant bits are left at zero). scikit-learn is imported only when a probe is fitted.
"""

from __future__ import annotations

import numpy as np


def _standardise(train_codes, test_codes) -> tuple[np.ndarray, np.ndarray]:
    train_codes = np.asarray(train_codes, np.float64)
    mean, std = train_codes.mean(0), train_codes.std(0)
    std = np.where(std > 0, std, 1.0)
    return (train_codes - mean) / std, (np.asarray(test_codes, np.float64) - mean) / std


def auroc(scores, labels) -> float:
    """Area under the ROC curve of scores [N] for binary labels [N] in {0, 1}.

    The Mann-Whitney statistic: the probability that a random positive outscores a random
    negative, ties counted one half (average ranks). Raises ValueError if a class is absent.
    """
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes; got {n_pos} positives, {n_neg} negatives.")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based mean rank of each tie group
    rank_sum = average_rank[inverse][labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def attribute_probe_auroc(train_codes, train_attrs, test_codes, test_attrs,
                          max_iter: int = 1000) -> tuple[float, np.ndarray]:
    """One logistic regression per binary attribute on standardised codes.

    Args:
      train_codes, test_codes: [N, n_bits] and [M, n_bits].
      train_attrs, test_attrs: [N, A] and [M, A] in {0, 1} (e.g. CelebA's 40 attributes).
    Returns:
      (mean test AUROC over the scored attributes, per-attribute AUROC [A]); an attribute
      constant in the train or the test split is not scored: NaN, left out of the mean.
    """
    from sklearn.linear_model import LogisticRegression  # heavy import, only when probing

    train_x, test_x = _standardise(train_codes, test_codes)
    train_attrs, test_attrs = np.asarray(train_attrs), np.asarray(test_attrs)
    per_attribute = np.full(train_attrs.shape[1], np.nan)
    for k in range(train_attrs.shape[1]):
        if len(np.unique(train_attrs[:, k])) < 2 or len(np.unique(test_attrs[:, k])) < 2:
            continue
        clf = LogisticRegression(max_iter=max_iter).fit(train_x, train_attrs[:, k])
        per_attribute[k] = auroc(clf.decision_function(test_x), test_attrs[:, k])
    scored = per_attribute[~np.isnan(per_attribute)]
    return (float(scored.mean()) if scored.size else float("nan")), per_attribute


def linear_probe_accuracy(train_codes: np.ndarray, train_labels: np.ndarray,
                          test_codes: np.ndarray, test_labels: np.ndarray,
                          max_iter: int = 2000) -> float:
    """Test accuracy of a multinomial logistic regression fit on the training codes.

    Labels: [N] ints.
    """
    from sklearn.linear_model import LogisticRegression  # heavy import, only when probing

    train_x, test_x = _standardise(train_codes, test_codes)
    clf = LogisticRegression(max_iter=max_iter)
    clf.fit(train_x, train_labels)
    return float(clf.score(test_x, test_labels))


def cross_validated_probe(codes, targets, *, attributes: bool = False, folds: int = 5,
                          seed: int = 0) -> tuple[float, float, np.ndarray]:
    """The authors' probe (exlab-research/dmz downstream_task_eval.py, logistic regression).

    Plain `LogisticRegression()` (C = 1, lbfgs, 100 iterations), NO standardisation, scored by
    `folds`-fold cross-validation (shuffled, random_state `seed`) over all of `codes` — the
    authors pass train and test codes together, so the caller concatenates them.
    Args:
      codes: [N, D] features (the authors: the soft 2|z| Gumbel-softmax vector).
      targets: [N] class labels (accuracy), or [N, A] binary attributes (attributes=True: ROC AUC of
        predict_proba[:, 1] per attribute).
    Returns:
      (mean over folds, std over folds, per-target scores [A, folds]) of the per-fold mean over
      targets: their "AVG: mean+std".
    """
    from sklearn.linear_model import LogisticRegression  # heavy imports, only when probing
    from sklearn.model_selection import KFold

    x = np.asarray(codes, np.float64)
    y = np.asarray(targets)
    y = y[:, None] if y.ndim == 1 else y
    scores = np.zeros((y.shape[1], folds))
    for f, (train, test) in enumerate(KFold(folds, shuffle=True, random_state=seed).split(x)):
        for k in range(y.shape[1]):
            if len(np.unique(y[train, k])) < 2 or (attributes and len(np.unique(y[test, k])) < 2):
                scores[k, f] = np.nan  # a constant attribute in this fold: not scored
                continue
            clf = LogisticRegression().fit(x[train], y[train, k])
            scores[k, f] = (auroc(clf.predict_proba(x[test])[:, 1], y[test, k]) if attributes
                            else clf.score(x[test], y[test, k]))
    per_fold = np.nanmean(scores, axis=0)
    return float(per_fold.mean()), float(per_fold.std()), scores

