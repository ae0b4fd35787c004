"""infodiffusion_probe: InfoDiffusion's k-fold standardised logistic probe."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from sklearn.preprocessing import StandardScaler

from dmz_jax.metrics.probes import infodiffusion_probe


def _reference(codes, labels, folds=5, seed=0, leak=False):
    """The authors' loop written out: scaler per training fold (or, leak=True, on all rows)."""
    accuracies = []
    for train, test in KFold(n_splits=folds, shuffle=True, random_state=seed).split(codes):
        scaler = StandardScaler().fit(codes if leak else codes[train])
        clf = LogisticRegression().fit(scaler.transform(codes[train]), labels[train])
        accuracies.append(np.mean(clf.predict(scaler.transform(codes[test])) == labels[test]))
    return float(np.mean(accuracies)), float(np.std(accuracies))


def _gaussian_codes(n=2000, d=16, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    codes = rng.normal(size=(n, d))
    return codes, np.argmax(codes @ rng.normal(size=(d, classes)), axis=1), rng


def test_separable_codes_are_probed_well_and_random_labels_at_chance():
    # labels = argmax of a fixed linear map of Gaussian codes, keeping rows whose top two class
    # scores differ by > 0.5 (a margin: with none, C = 1 and lbfgs's 100 steps reach ~0.935).
    rng = np.random.default_rng(0)
    codes = rng.normal(size=(4000, 16))
    scores = codes @ rng.normal(size=(16, 10))
    top_two = np.sort(scores, axis=1)[:, -2:]
    keep = np.flatnonzero(top_two[:, 1] - top_two[:, 0] > 0.5)[:2000]
    codes, labels = codes[keep], np.argmax(scores[keep], axis=1)
    assert len(labels) == 2000 and len(np.unique(labels)) == 10
    mean, std = infodiffusion_probe(codes, labels)
    assert mean > 0.95 and 0 <= std < 0.05
    mean_random, _ = infodiffusion_probe(codes, rng.integers(0, 10, size=len(codes)))
    assert abs(mean_random - 0.1) < 0.05


def test_invariant_to_per_column_scale_and_shift():
    codes, labels, rng = _gaussian_codes(n=500, d=8, classes=4)
    scale = 1000.0 * rng.uniform(0.5, 2.0, size=codes.shape[1])
    shift = rng.uniform(-1e4, 1e4, size=codes.shape[1])
    assert infodiffusion_probe(codes * scale + shift, labels) == pytest.approx(
        infodiffusion_probe(codes, labels), abs=1e-9)
    # Without standardisation the L2 penalty (C = 1) acts differently on the rescaled columns:
    # check the inputs are such that a probe lacking the scaler would fail the test above.
    unscaled = codes * 1e-3  # a column 1000x smaller needs a 1000x larger, penalised, weight
    train, test = next(KFold(5, shuffle=True, random_state=0).split(codes))
    clf = LogisticRegression().fit(unscaled[train], labels[train])
    raw = clf.score(unscaled[test], labels[test])
    assert raw < infodiffusion_probe(unscaled, labels)[0] - 0.1


def test_constant_column_gives_no_nan():
    codes, labels, _ = _gaussian_codes(n=500, d=8, classes=4)
    with_constant = np.concatenate([codes, np.full((len(codes), 1), 3.0),
                                    np.zeros((len(codes), 1))], axis=1)
    mean, std = infodiffusion_probe(with_constant, labels)
    assert np.isfinite(mean) and np.isfinite(std)
    assert mean == pytest.approx(infodiffusion_probe(codes, labels)[0], abs=1e-9)
    bits = (codes > 0).astype(np.float32)  # 0/1 bits, float32 like saved codes
    bits[:, 0] = 1.0
    assert np.isfinite(infodiffusion_probe(bits, labels)).all()


def test_tiny_hand_checked_case():
    # 1-D codes, label = sign: every fold's probe is perfect: mean 1, std 0.
    codes = np.array([-5, -4, -3, -2, -1, 1, 2, 3, 4, 5], np.float64)[:, None]
    assert infodiffusion_probe(codes, (codes[:, 0] > 0).astype(int)) == (1.0, 0.0)
    # One positive among 5 rows: the fold that holds it out trains on one class, and sklearn's
    # LogisticRegression raises, as it would in the authors' loop (no fold is skipped).
    with pytest.raises(ValueError):
        infodiffusion_probe(codes[:5], np.array([0, 0, 0, 0, 1]), folds=5)


def test_matches_explicit_per_fold_sklearn_reference():
    rng = np.random.default_rng(3)
    codes = rng.normal(size=(60, 4)) * [1.0, 10.0, 0.1, 5.0] + [0.0, 3.0, -2.0, 100.0]
    labels = np.argmax(codes[:, :3] / [1.0, 10.0, 0.1] + rng.normal(size=(60, 3)), axis=1)
    for folds, seed in ((5, 0), (3, 7)):
        got = infodiffusion_probe(codes, labels, folds=folds, seed=seed)
        want = _reference(codes, labels, folds, seed)
        assert got == pytest.approx(want, abs=1e-12)
    assert infodiffusion_probe(codes, labels) != infodiffusion_probe(codes, labels, seed=1)


def test_scaler_is_fitted_on_training_folds_only():
    # One informative column; one outlier row (1e6). In the fold where the outlier is a test
    # row, a scaler fitted on all rows divides the column by ~1e5 and the L2 penalty then keeps
    # its weight near 0 (majority-class guesses); fitted on the training fold it is intact.
    rng = np.random.default_rng(0)
    x = rng.normal(size=100)
    labels = (x > 0).astype(int)
    x[0] = 1e6
    labels[0] = 1
    codes = x[:, None]
    honest, leaky = _reference(codes, labels), _reference(codes, labels, leak=True)
    assert leaky[0] < honest[0] - 0.05  # the two protocols do differ on this case
    assert infodiffusion_probe(codes, labels) == pytest.approx(honest, abs=1e-12)


def test_probe_is_sklearn_default_logistic_regression(monkeypatch):
    # The authors' PredMetric("Linear") passes no parameters: C = 1, lbfgs, max_iter = 100. On
    # standardised codes lbfgs converges well inside 100 steps, so outputs cannot tell 100 from
    # 1000 here: record the fitted estimators' parameters instead.
    import sklearn.linear_model

    fitted = []

    class Recording(LogisticRegression):
        def fit(self, x, y, *args, **kwargs):
            fitted.append(self.get_params())
            return super().fit(x, y, *args, **kwargs)

    monkeypatch.setattr(sklearn.linear_model, "LogisticRegression", Recording)
    rng = np.random.default_rng(0)
    infodiffusion_probe(rng.normal(size=(50, 3)), rng.integers(0, 3, size=50), folds=4)
    assert len(fitted) == 4
    defaults = LogisticRegression().get_params()
    assert all(params == defaults for params in fitted)
    assert (defaults["C"], defaults["solver"], defaults["max_iter"]) == (1.0, "lbfgs", 100)
