"""Verdict margins at their exact boundaries (issue 18 item 1): rates arise as k/100, so a difference
of exactly 0.5 can round to 0.49999999999999994; the rules compare within MARGIN_TOL. Every pair at
n = 100 exactly on a margin meets it, every pair one count short does not."""

from __future__ import annotations

import pandas as pd
import pytest

from refusal_ray.analysis.summary import MARGIN_TOL, control_margin_verdict, meets, steer_columns, steering_label

N = 100
CM = {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25, "addition_coefficient": 1.0,
      "ablation_alpha": 1.0}
SL = {"strong": 0.5, "weak": 0.2}


def pairs(gap: int) -> list[tuple[int, int]]:
    """Every (k_high, k_low) at n = 100 with k_high - k_low == gap."""
    return [(k_low + gap, k_low) for k_low in range(N + 1 - gap)]


def test_float_rounding_is_real_here():
    """The defect the tolerance fixes: a plain >= fails on some exact pairs (0.7 - 0.2 among them)."""
    assert 70 / N - 20 / N < 0.5
    assert sum(k / N - j / N < 0.5 for k, j in pairs(50)) > 0
    assert sum(k / N - j / N < 0.25 for k, j in pairs(25)) > 0


@pytest.mark.parametrize("k_base,k_abl", pairs(50))
def test_ablation_exactly_half_below_baseline_meets_the_baseline_margin(k_base, k_abl):
    base, abl = k_base / N, k_abl / N
    ctl = 1.0                                   # the control arm leaves the rule's second margin easily met
    verdict = control_margin_verdict(base, (base - abl, ctl - abl), (0.9, 0.9), CM)
    assert verdict == "SUPPORTED", (k_base, k_abl, base - abl)


@pytest.mark.parametrize("k_base,k_abl", pairs(49))
def test_ablation_49_below_baseline_falls_short(k_base, k_abl):
    base, abl = k_base / N, k_abl / N
    if not meets(base, CM["baseline_min"]):
        assert control_margin_verdict(base, (base - abl, 1.0 - abl), (0.9, 0.9), CM) == "NO-BASELINE-REFUSAL"
        return
    assert control_margin_verdict(base, (base - abl, 1.0 - abl), (0.9, 0.9), CM) == "NOT-SUPPORTED (ablation)"


@pytest.mark.parametrize("k_ctl,k_abl", pairs(25))
def test_ablation_exactly_quarter_below_control_meets_the_control_margin(k_ctl, k_abl):
    ctl, abl = k_ctl / N, k_abl / N
    assert control_margin_verdict(1.0, (0.9, ctl - abl), (0.9, 0.9), CM) == "SUPPORTED", (k_ctl, k_abl)


@pytest.mark.parametrize("k_ctl,k_abl", pairs(24))
def test_ablation_24_below_control_falls_short(k_ctl, k_abl):
    ctl, abl = k_ctl / N, k_abl / N
    assert control_margin_verdict(1.0, (0.9, ctl - abl), (0.9, 0.9), CM) == "NOT-SUPPORTED (ablation)"


@pytest.mark.parametrize("gap,margin,ok", [(50, "baseline", True), (49, "baseline", False),
                                           (25, "control", True), (24, "control", False)])
def test_addition_margins_at_every_exact_pair(gap, margin, ok):
    """Addition: harmless refusal under addition minus baseline (or minus its control)."""
    for k_add, k_low in pairs(gap):
        add, low = k_add / N, k_low / N
        diffs = (add - low, 0.9) if margin == "baseline" else (0.9, add - low)
        verdict = control_margin_verdict(1.0, (0.9, 0.9), diffs, CM)
        assert verdict == ("SUPPORTED" if ok else "NOT-SUPPORTED (addition)"), (k_add, k_low)


@pytest.mark.parametrize("k", range(N + 1))
def test_baseline_minimum_at_its_boundary(k):
    """k/100 pooled as a mean of per-prompt labels: 0.5 exactly meets baseline_min, 49/100 does not."""
    base = sum([1.0] * k + [0.0] * (N - k)) / N
    verdict = control_margin_verdict(base, (0.9, 0.9), (0.9, 0.9), CM)
    assert verdict == ("SUPPORTED" if k >= 50 else "NO-BASELINE-REFUSAL")


def test_the_tolerance_is_tiny_and_one_sided():
    assert MARGIN_TOL == 1e-9
    assert meets(0.5 - 0.5e-9, 0.5) and not meets(0.5 - 2e-9, 0.5)
    assert not meets(0.5 - 1 / (N * 64), 0.5)   # one prompt-pooled count short at 64 seeds still fails


@pytest.mark.parametrize("gap", [50, 20])
def test_steering_label_at_exact_strong_and_weak_boundaries(gap):
    """induce = harmless rate at c > 0 minus baseline; suppress = baseline harmful minus c < 0."""
    threshold = {50: "strong", 20: "weak"}[gap]
    for k_hi, k_lo in pairs(gap):
        d = k_hi / N - k_lo / N
        short = (k_hi - 1) / N - k_lo / N          # one count short
        if threshold == "strong":
            assert steering_label(d, d, SL) == "works-fully", (k_hi, k_lo)
            assert steering_label(d, short, SL) == "works-partially", (k_hi, k_lo)
            assert steering_label(short, d, SL) == "works-partially", (k_hi, k_lo)
        else:
            assert steering_label(d, 0.0, SL) == "amplify-only", (k_hi, k_lo)
            assert steering_label(0.0, d, SL) == "works-partially", (k_hi, k_lo)
            assert steering_label(d, short, SL) == "amplify-only", (k_hi, k_lo)   # suppress < weak
            assert steering_label(short, short, SL) == "fails", (k_hi, k_lo)


def test_steer_columns_supports_the_issue_example():
    """Baseline 70/100, ablation 20/100 (a drop of exactly 0.5), control 45/100 (0.25 above the
    ablation): read from pooled arms, the verdict is SUPPORTED (it was NOT-SUPPORTED (ablation))."""
    def row(mode, pset, rate, layer=-1, coefficient=0.0, alpha=0.0, control=False):
        return {"model": "m", "mode": mode, "layer": layer, "coefficient": coefficient, "alpha": alpha,
                "control": control, "direction_layer": -1, "direction_position": -1, "subspace": "",
                "prompt_set": pset, "rate": rate, "seeds": 1}
    a = pd.DataFrame([row("baseline", "harmful", 70 / N), row("baseline", "harmless", 20 / N),
                      row("ablation", "harmful", 20 / N, alpha=1.0),
                      row("ablation", "harmful", 45 / N, alpha=1.0, control=True),
                      row("addition", "harmless", 70 / N, layer=3, coefficient=1.0),
                      row("addition", "harmless", 45 / N, layer=3, coefficient=1.0, control=True),
                      row("addition", "harmful", 20 / N, layer=3, coefficient=-1.0)])
    cols = steer_columns(a, 3, {"control_margin": CM, "steering_labels": SL})
    assert cols["ablation_suppression"] < 0.5 and cols["addition_induction"] < 0.5   # rounding is present
    assert cols["verdict_control_margin"] == "SUPPORTED"
    assert cols["verdict_steering_labels"] == "works-fully"
