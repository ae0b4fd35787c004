"""The statistics of the ablation report: paired comparisons over seeds and the power analysis.

Every function takes measured values and returns numbers; nothing here reads or writes files.

Paired comparison: seed s trains every arm on the same data order from the same initialisation
of the shared modules and samples them from the same noise, so arm B's FD minus arm A's within
a seed removes what the seeds share. The test is the two-sided paired t-test on those
differences (scipy.stats.ttest_rel), at alpha = 0.05. Against a claimed effect size delta, the
one-sided paired t-test of "the mean difference is at least delta" (`effect_excluded`): a small
p says the data exclude an effect that large, whatever its sign.

Power: the number of seeds n at which a two-sided paired t-test at level alpha detects a true
mean difference delta with probability `power`, when the differences have standard deviation
sd: the smallest n with P(|T| > t_{1-alpha/2, n-1}) >= power, T ~ noncentral t(n-1,
sqrt(n) delta / sd).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

ALPHA = 0.05


def paired(a: dict, b: dict) -> Optional[dict]:
    """b - a over the seeds both have ({seed: value} each): n, mean, sd, t, p, the 95%
    confidence interval of the mean difference; None for fewer than 2 shared seeds."""
    from scipy import stats
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = np.array([b[s] - a[s] for s in seeds], np.float64)
    n, mean, sd = len(d), float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:
        t, p = (math.inf if mean else 0.0), (0.0 if mean else 1.0)
    else:
        t, p = (float(x) for x in stats.ttest_rel([b[s] for s in seeds],
                                                   [a[s] for s in seeds]))
    half = float(stats.t.ppf(1 - ALPHA / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "t": t, "p": p,
            "ci95": (mean - half, mean + half), "seeds": seeds}


def effect_excluded(a: dict, b: dict, delta: float) -> Optional[dict]:
    """The one-sided paired t-test of H0: mean(b - a) >= delta against mean(b - a) < delta,
    over the seeds both have: n, t = (mean - delta) / (sd / sqrt(n)), p = P(T_{n-1} <= t), and
    the one-sided 95% upper bound of the mean difference (below delta exactly when p < 0.05);
    None for fewer than 2 shared seeds."""
    from scipy import stats
    test = paired(a, b)
    if test is None:
        return None
    n, mean, sd = test["n"], test["mean"], test["sd"]
    if sd == 0.0:
        t, p = (-math.inf, 0.0) if mean < delta else (math.inf if mean > delta else 0.0, 1.0)
    else:
        t = (mean - delta) / (sd / math.sqrt(n))
        p = float(stats.t.cdf(t, n - 1))
    upper = mean + float(stats.t.ppf(1 - ALPHA, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "delta": delta, "t": t, "p": p, "upper95": upper}


def power_of(n: int, delta: float, sd: float, alpha: float = ALPHA) -> float:
    """P(the two-sided paired t-test on n differences rejects) when their mean is delta and
    their standard deviation sd."""
    from scipy import stats
    if n < 2:
        return 0.0
    if sd <= 0.0:
        return 1.0 if delta else alpha
    df, nc = n - 1, math.sqrt(n) * abs(delta) / sd
    crit = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def seeds_needed(delta: float, sd: float, power: float = 0.8, alpha: float = ALPHA,
                 at_most: int = 1000) -> Optional[int]:
    """The smallest n (>= 2) with power_of(n, delta, sd) >= power; None above at_most."""
    for n in range(2, at_most + 1):
        if power_of(n, delta, sd, alpha) >= power:
            return n
    return None


def pooled_sd(groups: list[list[float]]) -> Optional[float]:
    """The within-group standard deviation pooled over groups of repeated measurements
    (e.g. one run's FD from several noise seeds): sqrt(sum of squared deviations / sum of
    (size - 1)); None without a group of 2 or more."""
    ss = sum(float(np.sum((np.asarray(g) - np.mean(g)) ** 2)) for g in groups if len(g) > 1)
    df = sum(len(g) - 1 for g in groups if len(g) > 1)
    return math.sqrt(ss / df) if df else None
