"""Intervals and effect sizes shared by stages and the summary.

Refusal rates pooled over seeds (`prompt_pooled_rate`) count each distinct prompt once: seeds
draw their test prompts from one pool, so two seeds often judge the same prompt (and the
baseline arm, greedy and unsteered, gives the same completion for it under every seed). Summing
n over seeds would count such a prompt once per seed and give an interval that is too narrow.

References: E. B. Wilson (1927), Probable inference, the law of succession, and statistical
inference, JASA 22:209-212. L. Kish (1965), Survey Sampling, Wiley (design effect). J. N. K. Rao
and A. J. Scott (1992), A simple method for the analysis of clustered binary data, Biometrics
48:577-585.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


def wilson(k: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (Wilson 1927). (nan, nan) when n = 0.

    Implemented from the closed form, so k may be fractional (`prompt_pooled_rate` passes a sum
    of per-prompt means): with p = k/n and z the two-sided normal quantile,
    centre = (p + z^2/2n) / (1 + z^2/n), half = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
    For integer k it equals statsmodels' `proportion_confint(method="wilson")`.
    """
    if n == 0:
        return float("nan"), float("nan")
    if not -1e-9 <= k <= n + 1e-9:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p, z2 = min(1.0, max(0.0, k / n)), z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))  # p inside despite rounding


@dataclass(frozen=True)
class PooledRate:
    """A refusal rate over distinct prompts: see `prompt_pooled_rate`."""

    rate: float         # mean over distinct prompts of each prompt's mean label over seeds
    ci_low: float
    ci_high: float
    n_prompts: int      # distinct prompts: the interval's n
    k_prompts: float    # sum of the per-prompt means: the interval's (fractional) k
    n_labels: int       # labels pooled (prompt x seed), what summing n over seeds would count


def prompt_pooled_rate(prompt_ids: Iterable, labels: Iterable, confidence: float = 0.95) -> PooledRate:
    """Rate and Wilson interval of one arm pooled over seeds, each distinct prompt counted once.

    Definition: with m distinct prompts j, S_j the seeds that judged prompt j and y_js in {0, 1}
    its refusal label under seed s, ybar_j = mean over s in S_j of y_js; rate = (1/m) sum_j ybar_j;
    interval = Wilson (1927) score interval with n = m and k = sum_j ybar_j (fractional k).

    Why: the prompt, not the (prompt, seed) pair, is the sampling unit. Labels of one prompt
    under different seeds are correlated (identical for the baseline arm), so summing n over s
    seeds inflates n by the design effect 1 + (s - 1) rho <= s (Kish 1965). When every prompt
    was judged by s seeds, this definition is Rao & Scott's (1992) adjustment for clustered
    binary data (divide n and k by the design effect) with the design effect at its upper bound
    s: n/s = m and k/s = sum_j ybar_j; prompts judged by fewer seeds weigh the same in the rate.
    It is conservative rather than exact: each ybar_j lies in [0, 1], so its variance is at most
    p(1 - p), the binomial variance the Wilson interval assumes, with equality when the seeds
    agree on every prompt (as on the baseline arm). When the seeds judge disjoint prompts it is
    the Wilson interval of the summed counts.
    """
    ids = list(prompt_ids)
    y = np.asarray(list(labels), dtype=np.float64)
    if len(ids) != len(y):
        raise ValueError(f"prompt_pooled_rate: {len(ids)} prompt ids but {len(y)} labels")
    if not len(y):
        return PooledRate(float("nan"), float("nan"), float("nan"), 0, 0.0, 0)
    codes, uniques = _factorize(ids)
    m = len(uniques)
    means = np.bincount(codes, weights=y, minlength=m) / np.bincount(codes, minlength=m)
    k = float(means.sum())
    lo, hi = wilson(k, m, confidence)
    return PooledRate(k / m, lo, hi, m, k, len(y))


def _factorize(values: list) -> tuple[np.ndarray, list]:
    index: dict = {}
    codes = np.fromiter((index.setdefault(v, len(index)) for v in values), dtype=np.int64, count=len(values))
    return codes, list(index)


def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    """(mean(a) - mean(b)) / pooled standard deviation (ddof=1). 0.0 when both are constant."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = len(a), len(b)
    pooled = np.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2))
    diff = a.mean() - b.mean()
    if pooled == 0:
        return 0.0 if diff == 0 else float(np.sign(diff) * np.inf)
    return float(diff / pooled)


@dataclass(frozen=True)
class Agreement:
    """Two judges' binary labels on the same items: Cohen's kappa with a 95% interval, and counts."""

    n: int                # items both judges labelled (malformed / failed items are left out)
    agree: float          # observed agreement p_o
    kappa: float          # (p_o - p_e) / (1 - p_e); nan when p_e = 1 (both judges constant and equal)
    ci_low: float
    ci_high: float
    both: int             # a True, b True
    a_only: int           # a True, b False
    b_only: int           # a False, b True
    neither: int          # a False, b False


def cohen_kappa(a: Iterable, b: Iterable, confidence: float = 0.95) -> Agreement:
    """Cohen's kappa (Cohen 1960) of two binary label sequences, pairs with a None/nan dropped.

    The interval is kappa +- z * ASE, the large-sample standard error of Fleiss, Cohen and Everitt
    (1969) as statsmodels' `cohens_kappa` computes it (`std_kappa`; its own kappa_low/upp at 95%).
    The interval assumes independent items; completions of one prompt under several arms and seeds
    are not, so read it as a lower bound on the uncertainty. No interval (nan) when the standard
    error is 0. Raises ValueError if the sequences differ in length.
    """
    from statsmodels.stats.inter_rater import cohens_kappa as _sm_kappa

    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa: label sequences differ in length ({len(a)} vs {len(b)})")

    def missing(x) -> bool:
        return x is None or (isinstance(x, float) and math.isnan(x))

    pairs = [(bool(x), bool(y)) for x, y in zip(a, b) if not missing(x) and not missing(y)]
    t = np.zeros((2, 2))
    for x, y in pairs:
        t[int(not x), int(not y)] += 1            # row/column 0 = True
    n = len(pairs)
    nan = float("nan")
    if n == 0:
        return Agreement(0, nan, nan, nan, nan, 0, 0, 0, 0)
    p_o = float(np.trace(t)) / n
    p_e = float((t.sum(1) / n) @ (t.sum(0) / n))
    if p_e >= 1.0 - 1e-12:
        kappa, lo, hi = nan, nan, nan
    else:
        r = _sm_kappa(t)
        z = NormalDist().inv_cdf(0.5 + confidence / 2)
        kappa, se = float(r.kappa), float(r.std_kappa)
        # a zero standard error (one judge constant, or perfect agreement) gives no interval, not a point
        lo, hi = (kappa - z * se, kappa + z * se) if se > 0 else (nan, nan)
    return Agreement(n, p_o, kappa, lo, hi, int(t[0, 0]), int(t[0, 1]), int(t[1, 0]), int(t[1, 1]))


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """Cosine similarity between directions: [n_layers, d_model] -> [n_layers, n_layers] (0 for zero vectors)."""
    v = np.asarray(vectors, np.float64)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    u = np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)
    return u @ u.T


def principal_angles(a, b) -> np.ndarray:
    """Principal angles in degrees between span(rows of a) [k, d] and span(rows of b) [m, d], ascending
    (min(k, m) of them; Bjorck & Golub 1973: arccos of the singular values of Qa^T Qb, Q from QR in float64)."""
    qa, _ = np.linalg.qr(np.asarray(a, np.float64).T)
    qb, _ = np.linalg.qr(np.asarray(b, np.float64).T)
    s = np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), -1.0, 1.0)
    return np.sort(np.degrees(np.arccos(s)))
