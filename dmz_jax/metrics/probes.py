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


def infodiffusion_probe(codes, labels, *, folds: int = 5, seed: int = 0) -> tuple[float, float]:
    """InfoDiffusion's latent-quality probe (Wang et al. 2023): k-fold logistic-regression accuracy.

    Read from isjakewong/InfoDiffusion `eval_disentanglement.py` (commit 43c8728, `__main__`;
    README "Latent classification": run.py --mode save_latent, then eval_disentanglement.py):
      - codes: run.py `save_latent` encodes the Fashion-MNIST TRAIN split only (data.py
        `get_fmnist`: FashionMNIST(train=True), RandomHorizontalFlip on, unshuffled,
        drop_last=True: 59,968 of 60,000 at the default batch 64); the code is the encoder's `a`
        (its mean `mu` when kld_weight != 0). All saved rows go into the cross-validation; there
        is no test split. (Their `__main__` hard-codes `dataset = "celeba"`; the "fmnist" branch
        -- y_names ["Class"], output_type "c", y = all_attr[:, None] -- needs that line edited.)
      - folds: `KFold(n_splits=5, shuffle=True, random_state=0)`: shuffled, NOT stratified; the
        random state is 0 whatever the run's --r_seed.
      - per fold: `StandardScaler()` fitted on the training fold only, applied to both folds;
        then `PredMetric("Linear", "c")`: `LogisticRegression()` with sklearn defaults (params
        {}: C=1.0, L2, lbfgs, max_iter=100, multinomial for > 2 classes), fitted on the
        standardised training fold.
      - metric: `accuracy_score(test_y, predict(test_x))` per fold; printed as
        "Avg Acc (Linear), mean \\pm std" with np.mean / np.std (ddof 0) over the 5 folds.
    Here the same, `folds` and `seed` giving n_splits and random_state (defaults: theirs).
    Constant columns are scaled by 1 (StandardScaler's zero-variance rule): no NaN. The codes'
    dtype is kept (float32 codes are standardised in float32, as their torch-saved codes were);
    max_iter stays at 100, so sklearn may warn that lbfgs did not converge, as it would for them.

    Args:
      codes: [N, D] latent codes (real or 0/1), all rows to cross-validate over.
      labels: [N] integer class labels.
    Returns:
      (mean test accuracy over the folds, std over the folds).
    """
    from sklearn.linear_model import LogisticRegression  # heavy imports, only when probing
    from sklearn.model_selection import KFold
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(codes)
    y = np.asarray(labels).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"codes must be [N, D] and labels [N]; got {x.shape} and {y.shape}.")
    accuracies = []
    for train, test in KFold(n_splits=folds, shuffle=True, random_state=seed).split(x):
        scaler = StandardScaler().fit(x[train])
        clf = LogisticRegression().fit(scaler.transform(x[train]), y[train])
        accuracies.append(float(np.mean(clf.predict(scaler.transform(x[test])) == y[test])))
    accuracies = np.asarray(accuracies)
    return float(accuracies.mean()), float(accuracies.std())
