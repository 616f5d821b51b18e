"""The summary on synthetic tables: prompt-pooled intervals, steered-layer rules, INCOMPLETE
verdicts, and the steering figure's layers."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from refusal_ray.analysis.report import steering_figure, write_report
from refusal_ray.stats import wilson
from refusal_ray.store import Store
from refusal_ray.analysis.summary import (nearest_steered, per_seed_arms, pooled_arms, steer_columns, summarize,
                                 write_summary)

RULE = {"control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25,
                           "addition_coefficient": 1.0, "ablation_alpha": 1.0},
        "steering_labels": {"strong": 0.5, "weak": 0.2}}
PROMPTS = [f"p{i}" for i in range(8)]


def arm(mode, layer=None, coefficient=0.0, alpha=0.0, control=False):
    return {"mode": mode, "layer": layer, "coefficient": coefficient, "alpha": alpha, "control": control}


def arms_for(layers, coefficients=(-1.0, 1.0), controls=(False, True), ablation=True):
    out = [arm("baseline")]
    out += [arm("addition", L, c, control=ctl) for L in layers for c in coefficients for ctl in controls]
    if ablation:
        out += [arm("ablation", alpha=1.0, control=ctl) for ctl in controls]
    return out


def default_refuses(a: dict, pset: str, prompt: str, seed: int) -> bool:
    """A model that refuses harmful prompts; direction arms flip behaviour, controls do nothing."""
    i = int(prompt[1:])
    harmful = pset == "harmful"
    if a["control"] or a["mode"] == "baseline":
        return harmful and i < 7                   # 7/8 harmful refusals, no harmless ones
    if a["mode"] == "ablation":
        return False
    return a["coefficient"] > 0 or (harmful and i < 1)


def tables(arm_list, seeds=(0, 1), prompts=None, refuses=default_refuses, model="m"):
    """(steering, completions) as the steer stage writes them (one row per cell x prompt set)."""
    steering, completions = [], []
    for seed, (j, a) in itertools.product(seeds, enumerate(arm_list)):
        cid = f"{model}-{seed}-{j}"
        for pset in ("harmful", "harmless"):
            ids = (prompts or {}).get(seed, PROMPTS)
            labels = [bool(refuses(a, pset, p, seed)) for p in ids]
            k, n = sum(labels), len(labels)
            lo, hi = wilson(k, n)
            steering.append({"model": model, "cell_id": cid, "seed": seed, **a, "prompt_set": pset, "n": n,
                             "refusals": k, "rate": k / n, "ci_low": lo, "ci_high": hi})
            completions += [{"model": model, "cell_id": cid, "seed": seed, "prompt_set": pset, "prompt_id": p,
                             "completion": "", "refusal": y, "correct": None} for p, y in zip(ids, labels)]
    return pd.DataFrame(steering), pd.DataFrame(completions)


def one(df: pd.DataFrame, **where) -> pd.Series:
    sel = df
    for k, v in where.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, where
    return sel.iloc[0]


# -- pooled intervals ------------------------------------------------------------------------

def test_identical_seeds_give_one_seeds_interval():
    steering, completions = tables(arms_for([1]), seeds=(0, 1))
    pooled = pooled_arms(steering, completions)
    base = one(pooled, mode="baseline", prompt_set="harmful")
    assert (base["n"], base["refusals"], base["seeds"]) == (16, 14, 2)        # summed counts kept
    assert (base["n_prompts"], base["k_prompts"], base["rate"]) == (8, 7.0, 7 / 8)
    assert (base["ci_low"], base["ci_high"]) == wilson(7, 8)                 # one seed's interval
    seed_row = one(per_seed_arms(steering), mode="baseline", prompt_set="harmful", seed=0)
    assert (seed_row["ci_low"], seed_row["ci_high"]) == (base["ci_low"], base["ci_high"])
    naive = wilson(14, 16)
    assert base["ci_high"] - base["ci_low"] > naive[1] - naive[0]
    assert (pooled["ci_basis"] == "prompts").all()
    assert len(pooled) == len(steering) // 2 and len(per_seed_arms(steering)) == len(steering)


def test_partly_shared_prompts_fractional_interval():
    """Seed 0 judges p0..p3, seed 1 judges p2..p5; the seeds disagree on p2."""
    prompts = {0: ["p0", "p1", "p2", "p3"], 1: ["p2", "p3", "p4", "p5"]}
    refusing = {(0, "p0"), (0, "p1"), (0, "p2"), (1, "p3"), (0, "p3"), (1, "p4")}

    def refuses(a, pset, p, seed):
        return (seed, p) in refusing

    steering, completions = tables([arm("baseline")], prompts=prompts, refuses=refuses)
    row = one(pooled_arms(steering, completions), mode="baseline", prompt_set="harmful")
    # per prompt: p0 1, p1 1, p2 1/2, p3 1, p4 1, p5 0 -> k = 4.5 over 6 distinct prompts
    assert (row["n_prompts"], row["k_prompts"], row["rate"]) == (6, 4.5, 0.75)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(wilson(4.5, 6))
    assert (row["n"], row["refusals"]) == (8, 6)


def test_without_completions_the_interval_is_one_seeds():
    steering, _ = tables(arms_for([1]), seeds=(0, 1, 2))
    pooled = pooled_arms(steering)
    base = one(pooled, mode="baseline", prompt_set="harmful")
    assert base["ci_basis"] == "largest-seed" and base["n_prompts"] == 8
    assert (base["ci_low"], base["ci_high"]) == pytest.approx(wilson(7, 8))
    assert pooled_arms(steering.iloc[:0]).empty


# -- steered layers and INCOMPLETE ------------------------------------------------------------

def pooled(arm_list, **kw):
    return pooled_arms(*tables(arm_list, **kw))


def test_nearest_steered():
    assert nearest_steered(13, [6, 12, 18, 24]) == 12
    assert nearest_steered(15, [6, 12, 18, 24]) == 12      # tie: the lower
    assert nearest_steered(16, [18, 12, 6]) == 18
    assert nearest_steered(12, [24, 12]) == 12
    assert nearest_steered(3, []) is None


def test_best_layer_steered_is_used():
    cols = steer_columns(pooled(arms_for([6, 12])), 12, RULE)
    assert (cols["label_layer"], cols["addition_layer"]) == (12, 12)
    assert cols["steer_induce_max"] == 1.0 and cols["steer_suppress_max"] == pytest.approx(6 / 8)
    assert cols["verdict_steering_labels"] == "works-fully"
    assert cols["verdict_control_margin"] == "SUPPORTED"


def test_best_layer_not_steered_uses_nearest_steered_layer():
    """Addition at 6/12/18/24, best layer 13: the curve at 12 is measured and recorded; it works
    at 12 and nowhere else, so reading any other layer would be wrong."""
    def refuses(a, pset, p, seed):
        if a["mode"] == "addition" and not a["control"] and a["layer"] != 12:
            return pset == "harmful"               # no effect away from layer 12
        return default_refuses(a, pset, p, seed)

    cols = steer_columns(pooled(arms_for([6, 12, 18, 24]), refuses=refuses), 13, RULE)
    assert (cols["label_layer"], cols["addition_layer"]) == (12, 12)
    assert cols["verdict_steering_labels"] == "works-fully"
    assert cols["verdict_control_margin"] == "SUPPORTED"
    assert cols["addition_harmless_refusal"] == 1.0


def test_no_negative_coefficients_is_incomplete():
    cols = steer_columns(pooled(arms_for([12], coefficients=(1.0, 2.0))), 12, RULE)
    assert cols["steer_induce_max"] == 1.0 and np.isnan(cols["steer_suppress_max"])
    assert cols["verdict_steering_labels"] == "INCOMPLETE"
    assert cols["verdict_control_margin"] == "SUPPORTED"    # its arms (c = 1, ablation) were measured


def test_no_positive_coefficients_is_incomplete():
    cols = steer_columns(pooled(arms_for([12], coefficients=(-1.0,))), 12, RULE)
    assert np.isnan(cols["steer_induce_max"]) and cols["steer_suppress_max"] == pytest.approx(6 / 8)
    assert cols["verdict_steering_labels"] == "INCOMPLETE"
    assert cols["addition_layer"] is None and np.isnan(cols["addition_harmless_refusal"])
    assert cols["verdict_control_margin"] == "INCOMPLETE"


def test_no_addition_arms_is_incomplete():
    cols = steer_columns(pooled(arms_for([])), 5, RULE)
    assert cols["label_layer"] is None and cols["addition_layer"] is None
    assert cols["verdict_steering_labels"] == "INCOMPLETE" and cols["verdict_control_margin"] == "INCOMPLETE"
    assert cols["ablation_suppression"] == pytest.approx(7 / 8)


def test_addition_layer_needs_the_rule_coefficient():
    """c = 1 steered only at layer 6: control_margin reads it there, the labels read layer 12."""
    arm_list = arms_for([12], coefficients=(-1.0, 2.0)) + arms_for([6], coefficients=(1.0,))[1:-2]
    cols = steer_columns(pooled(arm_list), 12, RULE)
    assert (cols["label_layer"], cols["addition_layer"]) == (12, 6)
    assert cols["verdict_control_margin"] == "SUPPORTED" and cols["verdict_steering_labels"] == "works-fully"


def test_missing_control_arm_is_incomplete():
    cols = steer_columns(pooled(arms_for([12], controls=(False,))), 12, RULE)
    assert cols["verdict_control_margin"] == "INCOMPLETE"
    assert cols["verdict_steering_labels"] == "works-fully"  # the labels need no control


# -- from a store: summarize, write_summary, report -------------------------------------------

def make_store(root, steered=(6, 12, 18, 24), best=13, seeds=(0, 1)):
    store = Store(root)
    store.write_json("manifest.json", {
        "decision_rule": RULE, "rule_hash": "abc", "models": {"m": {"params": 1000, "n_layers": 30}},
        "steer_position": -1, "spec": {"stages": {"steer": {}}}})
    dirs = [{"seed": s, "site": "resid_pre", "position": -1, "layer": L, "separation": 5.0 - abs(L - best) / 10,
             "vector": np.ones(4, np.float32)} for s in seeds for L in range(30)]
    store.write("directions", "m", dirs)
    steering, completions = tables(arms_for(steered), seeds=seeds)
    store.write("steering", "m", steering.drop(columns="model").to_dict("records"))
    store.write("completions", "m", completions.drop(columns="model").to_dict("records"))
    return store


def test_summarize_records_the_layers_used(tmp_path):
    make_store(tmp_path / "out")
    df = summarize(tmp_path / "out")
    r = df.iloc[0]
    assert (r["best_layer"], r["label_layer"], r["addition_layer"]) == (13, 12, 12)
    assert r["verdict_steering_labels"] == "works-fully" and r["verdict_control_margin"] == "SUPPORTED"
    assert r["baseline_harmful_refusal"] == 7 / 8 and r["rule_hash"] == "abc"
    written = write_summary(tmp_path / "out")
    assert {"label_layer", "addition_layer"} <= set(written.columns)


def test_report_plots_every_steered_layer(tmp_path):
    out = tmp_path / "out"
    make_store(out)
    write_report(out)
    assert (out / "figures" / "steering.png").stat().st_size > 1000
    summary = summarize(out)
    arms = pooled_arms(Store(out).read("steering"), Store(out).read("completions"))
    fig, plotted = steering_figure(arms, summary)
    assert plotted == {"m": [6, 12, 18, 24]}
    gids = {line.get_gid() for ax in fig.axes for line in ax.get_lines() if line.get_gid()}
    for pset in ("harmful", "harmless"):
        assert {g for g in gids if g.startswith(f"m|{pset}|") and g.endswith("direction")} == \
            {f"m|{pset}|{L}|direction" for L in (6, 12, 18, 24)}
        assert {g for g in gids if g.startswith(f"m|{pset}|") and g.endswith("control")} == {f"m|{pset}|12|control"}
    titles = " ".join(ax.get_title() for ax in fig.axes)
    assert "layer 12 (label layer)" in " ".join(t.get_text() for ax in fig.axes if ax.get_legend()
                                        for t in ax.get_legend().get_texts()) and "m: harmless" in titles


def test_figure_with_thirty_layers_and_two_models():
    steering, completions = tables(arms_for(range(30), controls=(False,)), seeds=(0,))
    s2, c2 = tables(arms_for([3, 7]), seeds=(0,), model="n")
    arms = pooled_arms(pd.concat([steering, s2]), pd.concat([completions, c2]))
    summary = pd.DataFrame([{"model": "m", "best_layer": 31, "label_layer": None},
                            {"model": "n", "best_layer": 5, "label_layer": 3},
                            {"model": "no-addition", "best_layer": 2, "label_layer": None}])
    fig, plotted = steering_figure(arms, summary)
    assert plotted == {"m": list(range(30)), "n": [3, 7]}
    lines = [line.get_gid() for ax in fig.axes for line in ax.get_lines() if line.get_gid()]
    assert sum(g.startswith("m|harmless|") for g in lines) == 30
    assert "m|harmful|29|direction" in lines                  # the nearest steered layer to 31 is highlighted
    assert len([ax for ax in fig.axes if ax.get_title()]) == 4   # two panels per model with addition arms


# -- fallback selection above the KL filter (issue 18 item 10) ---------------------------------

def selection_rows(seed: int, chosen: tuple[int, int], kl: float, by: str, passed: bool = False) -> list[dict]:
    """Candidate rows of one seed: layers 0-3 x positions -1, -2, with `chosen` (layer, position) selected."""
    out = []
    for layer, position in itertools.product(range(4), (-1, -2)):
        is_chosen = (layer, position) == chosen
        out.append({"cell_id": f"sel-{seed}", "seed": seed, "layer": layer, "position": position,
                    "bypass": -1.0 - layer, "induce": 0.5, "kl": kl if is_chosen else 20.0,
                    "passed": passed and is_chosen, "filter": None if passed and is_chosen else "kl>0.1",
                    "selected": is_chosen, "selected_by": by if is_chosen else None,
                    "baseline_harmful_score": 2.0, "baseline_harmless_score": -3.0})
    return out


def test_fallback_warnings_name_seed_direction_and_kl():
    from refusal_ray.analysis.summary import fallback_warnings

    sel = pd.DataFrame(selection_rows(0, (2, -1), 9.5612, "fallback:bypass")
                       + selection_rows(1, (1, -2), 0.05, "fallback:bypass")           # fallback within kl_max
                       + selection_rows(2, (3, -1), 0.1, "fallback:bypass")            # exactly kl_max: not above
                       + selection_rows(3, (0, -2), 0.02, "bypass", passed=True))
    assert fallback_warnings(sel, "qwen-s", 0.1) == [
        "warning: qwen-s seed 0: fallback selection L2/p-1 has first-token KL 9.56 > kl_max 0.1 "
        "(the direction may wreck the model)"]
    assert fallback_warnings(sel, "qwen-s", 0.01) == [
        "warning: qwen-s seed 0: fallback selection L2/p-1 has first-token KL 9.56 > kl_max 0.01 "
        "(the direction may wreck the model)",
        "warning: qwen-s seed 1: fallback selection L1/p-2 has first-token KL 0.05 > kl_max 0.01 "
        "(the direction may wreck the model)",
        "warning: qwen-s seed 2: fallback selection L3/p-1 has first-token KL 0.1 > kl_max 0.01 "
        "(the direction may wreck the model)"]                 # seed 3 passed the filters: no warning
    assert fallback_warnings(sel, "qwen-s", None) == [] and fallback_warnings(sel.iloc[:0], "m", 0.1) == []


def test_summary_and_report_warn_about_a_fallback_above_kl_max(tmp_path):
    from refusal_ray.analysis.summary import render

    out = tmp_path / "out"
    store = make_store(out, seeds=(0, 1))
    manifest = store.read_json("manifest.json")
    manifest["spec"]["stages"]["select"] = {"kl_max": 0.1, "fallback": "bypass"}
    store.write_json("manifest.json", manifest)
    store.write("selection", "m", selection_rows(0, (2, -1), 9.56, "fallback:bypass")
                + selection_rows(1, (1, -1), 0.03, "bypass", passed=True))
    warning = ("warning: m seed 0: fallback selection L2/p-1 has first-token KL 9.56 > kl_max 0.1 "
               "(the direction may wreck the model)")
    row = summarize(out).iloc[0]
    assert row["selection_warning"] == warning and row["selected_by"] == "bypass, fallback:bypass"
    wide = render(write_summary(out), wide=True).splitlines()
    table_end = next(i for i, line in enumerate(wide) if line.startswith("decision rule hash"))
    assert wide[table_end - 1] == warning and wide[table_end - 2].startswith("m ")   # right under the table
    text = render(write_summary(out)).splitlines()
    assert text.count(warning) == 1 and text[text.index(warning) - 1].startswith("m ")   # under the headline table
    write_report(out)
    report = (out / "report.md").read_text()
    assert report.count(warning) == 2                       # the summary block and the selection section
    assert f"**{warning}**" in report and f"**W{warning[1:]}.**" in report   # and the model's headline
    # within kl_max: no warning anywhere
    store.write("selection", "m", selection_rows(0, (2, -1), 0.09, "fallback:bypass"))
    assert summarize(out).iloc[0]["selection_warning"] is None
    write_report(out)
    assert "warning:" not in (out / "report.md").read_text().lower()
