"""Intervals, effect sizes and verdicts against reference values (the judge: tests/test_judges.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from statsmodels.stats.proportion import proportion_confint

from refusal_ray.stats import cohens_d, prompt_pooled_rate, wilson
from refusal_ray.analysis.summary import control_margin_verdict, steering_label


def test_wilson_reference_values():
    # Wilson (1927) score interval; 7/10 at 95% is the textbook example (0.3968, 0.8922)
    lo, hi = wilson(7, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.3968, 0.8922)
    lo, hi = wilson(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and round(hi, 4) == 0.2775
    assert all(math.isnan(x) for x in wilson(0, 0))


def test_wilson_matches_closed_form():
    z = 1.959963984540054
    for k, n in [(1, 3), (13, 40), (39, 40)]:
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        assert wilson(k, n) == pytest.approx((centre - half, centre + half), abs=1e-9)


def test_wilson_matches_statsmodels_and_takes_fractional_k():
    for k, n in [(0, 5), (3, 8), (8, 8), (17, 200)]:
        assert wilson(k, n) == pytest.approx(proportion_confint(k, n, method="wilson"), abs=1e-12)
    assert wilson(7, 10, confidence=0.9) == pytest.approx(proportion_confint(7, 10, alpha=0.1, method="wilson"))
    # fractional k: the same closed form, continuous in k
    z = 1.959963984540054
    k, n = 13 / 6, 4
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson(k, n) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert wilson(k, n) == pytest.approx(proportion_confint(k, n, method="wilson"), abs=1e-12)
    lo, hi = wilson(2.5, 5)
    assert lo < 0.5 < hi and lo + hi == pytest.approx(1.0)
    with pytest.raises(ValueError):
        wilson(6, 5)


def test_prompt_pooled_rate_counts_each_prompt_once():
    """Two seeds judging the same prompts with the same labels: exactly one seed's interval."""
    ids = ["a", "b", "c", "d", "e", "f", "g", "h"]
    labels = [1, 1, 1, 0, 0, 0, 0, 0]
    r = prompt_pooled_rate(ids + ids, labels + labels)
    assert (r.rate, r.n_prompts, r.k_prompts, r.n_labels) == (3 / 8, 8, 3.0, 16)
    assert (r.ci_low, r.ci_high) == wilson(3, 8)
    naive = wilson(6, 16)                       # summing n over seeds: too narrow
    assert naive[1] - naive[0] < r.ci_high - r.ci_low
    # disjoint prompts: the same as summing the counts
    d = prompt_pooled_rate(ids + [i + "2" for i in ids], labels + labels)
    assert (d.n_prompts, d.k_prompts, (d.ci_low, d.ci_high)) == (16, 6.0, naive)
    empty = prompt_pooled_rate([], [])
    assert empty.n_prompts == 0 and math.isnan(empty.rate) and math.isnan(empty.ci_low)


def test_prompt_pooled_rate_fractional_by_hand():
    # prompt a: seeds (1, 1, 0) -> 2/3; b: one seed (1) -> 1; c: (0, 0) -> 0; d: (1, 0) -> 1/2
    ids = ["a", "a", "a", "b", "c", "c", "d", "d"]
    labels = [True, True, False, True, False, False, True, False]
    r = prompt_pooled_rate(ids, labels)
    k = 2 / 3 + 1 + 0 + 1 / 2                    # 13/6, over n = 4 distinct prompts
    assert r.n_prompts == 4 and r.k_prompts == pytest.approx(k) and r.rate == pytest.approx(k / 4)
    assert (r.ci_low, r.ci_high) == pytest.approx(wilson(k, 4))
    # by hand: p = 13/24, z = 1.96: centre (p + z^2/8) / (1 + z^2/4) = 0.52125, half 0.34934
    assert (round(r.ci_low, 4), round(r.ci_high, 4)) == (0.1719, 0.8706)
    with pytest.raises(ValueError):
        prompt_pooled_rate(["a"], [1, 0])


def test_cohens_d():
    a, b = np.array([2.0, 4.0, 6.0]), np.array([1.0, 2.0, 3.0])
    pooled = math.sqrt((2 * 4.0 + 2 * 1.0) / 4)
    assert cohens_d(a, b) == pytest.approx(2.0 / pooled)
    assert cohens_d(np.ones(3), np.ones(3)) == 0.0


RULE = {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25}


@pytest.mark.parametrize("base,abl,add,verdict", [
    (0.3, (0.3, 0.3), (0.9, 0.9), "NO-BASELINE-REFUSAL"),
    (1.0, (0.9, 0.8), (0.7, 0.6), "SUPPORTED"),
    (1.0, (0.9, 0.1), (0.7, 0.6), "NOT-SUPPORTED (ablation)"),
    (1.0, (0.9, 0.8), (0.4, 0.4), "NOT-SUPPORTED (addition)"),
    (1.0, (0.2, 0.2), (0.1, 0.0), "NOT-SUPPORTED (ablation, addition)"),
    (float("nan"), (0.0, 0.0), (0.0, 0.0), "INCOMPLETE"),
])
def test_control_margin_rule(base, abl, add, verdict):
    assert control_margin_verdict(base, abl, add, RULE) == verdict


@pytest.mark.parametrize("induce,suppress,label", [
    (0.8, 0.6, "works-fully"), (0.6, 0.1, "amplify-only"), (0.3, 0.25, "works-partially"),
    (0.1, 0.4, "works-partially"), (0.1, 0.1, "fails"), (0.0, 0.0, "fails"),
    (float("nan"), float("nan"), "INCOMPLETE"), (0.8, float("nan"), "INCOMPLETE"), (float("nan"), 0.8, "INCOMPLETE"),
])
def test_steering_labels_rule(induce, suppress, label):
    assert steering_label(induce, suppress, {"strong": 0.5, "weak": 0.2}) == label
