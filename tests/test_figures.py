"""The report's figures show the stored rows: each figure `write_report` writes is captured as a
matplotlib figure (its PNG encoder replaced) and its drawn data compared with an independent
recomputation from the rows of a synthetic store (two models, two seeds whose labels differ):

- steering: per layer and prompt set, line x = the coefficients with the baseline at c = 0, y = the
  prompt-pooled rate recomputed from the completions, error bars = the Wilson interval with n = distinct
  prompts (statsmodels), axis labels;
- separation: y = mean Cohen's d over seeds at the last position, x = relative depth; cosines: the image
  is the cosine matrix of the stored vectors (first seed);
- scale trend: y = the summary columns against parameters;
- selection: per position, x = layers, y = the first seed's bypass / induce / KL; filled points = passed,
  the star = the selected row; the baseline score lines;
- capability: per arm, the point (CE cost, harmful-refusal cost) recomputed by hand;
- scrubbing: bar height = exp(-mean KL over every example of every seed); the threshold line;
- patching: the map = mean recovery per (site kind, layer).
No model is loaded.
"""

from __future__ import annotations

import itertools
import json

import matplotlib
import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.proportion import proportion_confint

from refusal_ray.store import Store

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from test_capability import cost_by_hand  # noqa: E402

RULE = {"control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25,
                           "addition_coefficient": 1.0, "ablation_alpha": 1.0},
        "steering_labels": {"strong": 0.5, "weak": 0.2}}
MODELS = {"a": {"params": 1000, "n_layers": 4}, "b": {"params": 5000, "n_layers": 5}}
SEEDS = (0, 1)
COEFS = (-2.0, -1.0, 1.0, 2.0)
PROMPTS = [f"p{i}" for i in range(8)]
POSITIONS = (-2, -1)


def _refuses(rng, mode: str, pset: str, coefficient: float) -> np.ndarray:
    """Random labels whose rate moves with the coefficient (a different draw per seed)."""
    p = {"harmful": 0.8, "harmless": 0.1}[pset]
    if mode == "addition":
        p = float(np.clip(p + 0.2 * coefficient, 0.05, 0.95))
    elif mode == "ablation":
        p = 0.2
    return rng.random(len(PROMPTS)) < p


def _write_store(root) -> Store:
    rng = np.random.default_rng(7)
    store = Store(root)
    store.write_json("manifest.json", {
        "decision_rule": RULE, "rule_hash": "abc", "models": MODELS, "steer_position": -1,
        "spec": {"stages": {"steer": {}, "select": {}, "capability": {}, "patch": {}, "scrub": {}}}})
    for model, info in MODELS.items():
        L = info["n_layers"]
        dirs = [{"seed": s, "site": "resid_pre", "position": p, "layer": layer,
                 "separation": float(rng.uniform(0, 5)), "vector": rng.normal(size=6).astype(np.float32)}
                for s in SEEDS for p in POSITIONS for layer in range(L)]
        store.write("directions", model, dirs)
        arms = [("baseline", None, 0.0, 0.0, False)]
        arms += [("addition", layer, c, 0.0, ctl) for layer in (1, 2) for c in COEFS for ctl in (False, True)]
        arms += [("ablation", None, 0.0, 1.0, ctl) for ctl in (False, True)]
        steering, completions = [], []
        for seed, (j, (mode, layer, c, alpha, ctl)) in itertools.product(SEEDS, enumerate(arms)):
            cid = f"{model}-{seed}-{j}"
            for pset in ("harmful", "harmless"):
                y = _refuses(rng, mode, pset, c)
                lo, hi = proportion_confint(int(y.sum()), len(y), method="wilson")
                steering.append({"cell_id": cid, "seed": seed, "mode": mode, "layer": layer, "coefficient": c,
                                 "alpha": alpha, "control": ctl, "prompt_set": pset, "n": len(y),
                                 "refusals": int(y.sum()), "rate": float(y.mean()), "ci_low": lo, "ci_high": hi})
                completions += [{"cell_id": cid, "seed": seed, "prompt_set": pset, "prompt_id": p, "completion": "",
                                 "refusal": bool(v), "correct": None} for p, v in zip(PROMPTS, y)]
        store.write("steering", model, steering)
        store.write("completions", model, completions)
        sel = []
        for seed in SEEDS:
            rows = [{"seed": seed, "layer": layer, "position": p, "bypass": float(rng.normal(-2, 2)),
                     "induce": float(rng.normal(0, 2)), "kl": float(rng.uniform(0, 0.3))}
                    for layer in range(L) for p in POSITIONS]
            for r in rows:
                r["passed"] = bool(r["kl"] <= 0.2)
                r["filter"] = None if r["passed"] else "kl>0.2"
            best = min((r for r in rows if r["passed"]), key=lambda r: r["bypass"])
            for r in rows:
                r |= {"selected": r is best, "selected_by": "bypass" if r is best else None,
                      "baseline_harmful_score": 3.0 + seed, "baseline_harmless_score": -4.0 - seed}
            sel += rows
        store.write("selection", model, sel)
        cap = []
        for seed in SEEDS:
            for metric in ("ce_loss", "first_token_kl", "refusal_harmful"):
                base = 0.0 if metric == "first_token_kl" else float(rng.uniform(1, 2))
                cap.append({"seed": seed, "arm": "baseline", "control": False, "coefficient": 0.0, "alpha": 0.0,
                            "direction": None, "metric": metric, "value": base, "n": 10})
                for arm, c, alpha, ctl in (("addition", 1.0, 0.0, False), ("ablation", 0.0, 1.0, False),
                                           ("ablation", 0.0, 1.0, True), ("orthogonalized", 0.0, 1.0, False)):
                    cap.append({"seed": seed, "arm": arm, "control": ctl, "coefficient": c, "alpha": alpha,
                                "direction": "selected", "metric": metric, "value": base + float(rng.normal(0, 1)),
                                "n": 10})
        store.write("capability", model, cap)
        scrub = [{"seed": seed, "cell_id": f"{model}-scrub-{seed}-{h}", "hypothesis": h,
                  "protected": json.dumps([f"blocks.{L - 1}.hook_mlp_out"]), "n_examples": 3,
                  "kl_per_example": rng.uniform(0, 2, 3).tolist(), "max_kl": 2.0, "corrupted_kl": 3.0,
                  "threshold": 0.5}
                 for seed in SEEDS for h in ("late-mlp", "nothing")]
        for r in scrub:
            r["mean_kl"] = float(np.mean(r["kl_per_example"]))
        store.write("scrubbing", model, scrub)
        patch = [{"seed": seed, "pair": i, "site": f"blocks.{layer}.hook_{kind}", "kind": kind, "layer": layer,
                  "head": None, "recovery": float(rng.uniform(-1, 1)), "attribution": float(rng.uniform(-1, 1))}
                 for seed in SEEDS for i in range(3) for layer in range(L) for kind in ("attn_out", "mlp_out")]
        store.write("patching", model, patch)
    return store


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """(store, {figure file name: the matplotlib figure write_report encoded into it})."""
    import importlib

    from refusal_ray.analysis import report as rp
    from refusal_ray.stages import STAGES

    root = tmp_path_factory.mktemp("figures") / "out"
    store = _write_store(root)
    drawn = []

    def capture(fig) -> bytes:
        drawn.append(fig)
        return f"figure {len(drawn) - 1}".encode()

    with pytest.MonkeyPatch.context() as mp:
        for module in (rp, *(importlib.import_module(s.read) for s in STAGES if s.read)):   # the stages' figures
            for name in ("_png", "png"):
                if hasattr(module, name):
                    mp.setattr(module, name, capture)
        rp.write_report(root)
    figures = {}
    for f in sorted((root / "figures").iterdir()):
        figures[f.name] = drawn[int(f.read_bytes().decode().split()[1])]
    yield store, figures
    for fig in drawn:
        plt.close(fig)


def _pooled(store: Store, model: str, **arm) -> tuple[float, float, float]:
    """(rate, Wilson low, Wilson high) of one arm pooled over seeds, recomputed from the completions:
    per prompt the mean label over seeds, rate = mean over prompts, interval n = distinct prompts."""
    s, c = store.read("steering"), store.read("completions")
    s = s[s["model"] == model]
    for k, v in arm.items():
        s = s[s[k].isna()] if v is None else s[s[k] == v]
    cells = set(s["cell_id"])
    assert len(cells) == len(SEEDS), arm
    labels = c[(c["model"] == model) & c["cell_id"].isin(cells) & (c["prompt_set"] == arm["prompt_set"])]
    per_prompt = labels.groupby("prompt_id")["refusal"].mean()
    k, n = float(per_prompt.sum()), len(per_prompt)
    lo, hi = proportion_confint(k, n, method="wilson")
    return k / n, lo, hi


def test_report_draws_every_figure(report):
    _, figures = report
    assert set(figures) == {"steering.png", "separation.png", "cosines.png", "scale_trend.png", "selection.png",
                            "capability.png", "scrubbing.png", "patching.png"}


def test_steering_lines_and_error_bars_are_the_pooled_rates_and_wilson_intervals(report):
    store, figures = report
    fig = figures["steering.png"]
    containers = {c.lines[0].get_gid(): c for ax in fig.axes for c in ax.containers if c.lines[0].get_gid()}
    want_gids = {f"{m}|{pset}|{layer}|direction" for m in MODELS for pset in ("harmful", "harmless")
                 for layer in (1, 2)}
    assert want_gids <= set(containers)
    checked = 0
    for gid, cont in containers.items():
        model, pset, layer, kind = gid.split("|")
        control = kind == "control"
        x, y = (np.asarray(v, float) for v in cont.lines[0].get_data())
        assert x.tolist() == [-2.0, -1.0, 0.0, 1.0, 2.0], gid
        want = [_pooled(store, model, mode="baseline", prompt_set=pset) if c == 0 else
                _pooled(store, model, mode="addition", layer=int(layer), coefficient=c, control=control,
                        prompt_set=pset) for c in x]
        np.testing.assert_allclose(y, [w[0] for w in want], rtol=0, atol=1e-12, err_msg=gid)
        bars = cont.lines[2]
        assert len(bars) == 1, gid                           # every line has intervals (2 steered layers)
        segments = bars[0].get_segments()
        np.testing.assert_allclose([s[:, 0] for s in segments], np.repeat(x[:, None], 2, axis=1), atol=0)
        np.testing.assert_allclose([sorted(s[:, 1]) for s in segments], [[w[1], w[2]] for w in want],
                                   rtol=0, atol=1e-9, err_msg=gid)
        checked += 1
    assert checked >= len(want_gids) + 2                     # and each model's highlighted control line
    for ax in (a for a in fig.axes if a.get_title()):
        if ax.get_xlabel():
            assert ax.get_xlabel() == "addition coefficient c" and ax.get_ylabel() == "refusal rate (95% Wilson)"
    titles = sorted(a.get_title().split(" (")[0] for a in fig.axes if a.get_title())
    assert titles == sorted(f"{m}: {p} prompts" for m in MODELS for p in ("harmful", "harmless"))


def test_separation_and_cosine_figures_show_the_directions(report):
    store, figures = report
    dirs = store.read("directions")
    ax = figures["separation.png"].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == set(MODELS)
    for model, info in MODELS.items():
        d = dirs[(dirs["model"] == model) & (dirs["position"] == max(POSITIONS))]
        mean = d.groupby("layer")["separation"].mean().sort_index()
        x, y = lines[model].get_data()
        np.testing.assert_allclose(x, np.arange(info["n_layers"]) / (info["n_layers"] - 1), atol=1e-12)
        np.testing.assert_allclose(y, mean.to_numpy(), atol=1e-12)
    assert ax.get_xlabel() == "relative layer depth" and ax.get_ylabel() == "separation (Cohen's d, val)"
    images = [a for a in figures["cosines.png"].axes if a.get_images()]
    assert [a.get_title() for a in images] == list(MODELS)
    for ax, model in zip(images, MODELS):
        d = dirs[(dirs["model"] == model) & (dirs["seed"] == 0) & (dirs["position"] == max(POSITIONS))]
        v = np.stack(d.sort_values("layer")["vector"].to_numpy()).astype(np.float64)
        u = v / np.linalg.norm(v, axis=1, keepdims=True)
        np.testing.assert_allclose(ax.get_images()[0].get_array(), u @ u.T, atol=1e-6)
        assert ax.get_images()[0].get_clim() == (-1, 1)


def test_scale_trend_plots_the_summary_columns(report):
    from refusal_ray.analysis.summary import summarize

    store, figures = report
    summary = summarize(store.uri)
    ax = figures["scale_trend.png"].axes[0]
    lines = {line.get_label(): line.get_data() for line in ax.get_lines()}
    for col, label, scale in (("separation", "separation (d) / 10", 10), ("ablation_suppression",
                                                                         "ablation suppression", 1),
                              ("addition_induction", "addition induction", 1)):
        x, y = lines[label]
        assert list(x) == [1000, 5000]
        np.testing.assert_allclose(y, summary[col].to_numpy(float) / scale, atol=1e-12)
    # the separation point is the best layer's mean over seeds, recomputed from the directions
    dirs = store.read("directions")
    d = dirs[(dirs["model"] == "a") & (dirs["position"] == -1)].groupby("layer")["separation"].mean()
    assert lines["separation (d) / 10"][1][0] == pytest.approx(d.max() / 10, abs=1e-12)
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "parameters"


def test_selection_figure_shows_the_first_seeds_rows(report):
    store, figures = report
    sel = store.read("selection")
    axes = figures["selection.png"].axes
    assert len(axes) == 3 * len(MODELS)
    for row, model in zip(np.reshape(axes, (len(MODELS), 3)), sorted(MODELS)):
        s = sel[(sel["model"] == model) & (sel["seed"] == 0)]
        for ax, col in zip(row, ("bypass", "induce", "kl")):
            assert ax.get_title().startswith(f"{model}: ") and ax.get_xlabel() == "layer"
            lines = {line.get_label(): line.get_data() for line in ax.get_lines() if line.get_label().startswith("pos")}
            assert set(lines) == {f"pos {p}" for p in POSITIONS}
            for p in POSITIONS:
                g = s[s["position"] == p].sort_values("layer")
                np.testing.assert_allclose(lines[f"pos {p}"][0], g["layer"].to_numpy(float), atol=0)
                np.testing.assert_allclose(lines[f"pos {p}"][1], g[col].to_numpy(float), atol=1e-12)
            points = [c.get_offsets() for c in ax.collections]
            star = [c for c in ax.collections if c.get_label() == "selected"]
            assert len(star) == 1
            chosen = s[s["selected"].astype(bool)]
            np.testing.assert_allclose(star[0].get_offsets(), chosen[["layer", col]].to_numpy(float), atol=1e-12)
            filled = np.concatenate([o for o, c in zip(points, ax.collections)
                                     if c.get_label() != "selected" and c.get_facecolors().size
                                     and c.get_facecolors()[0, 3] > 0])
            passed = s[s["passed"].astype(bool)]
            assert sorted(map(tuple, filled)) == sorted(map(tuple, passed[["layer", col]].to_numpy(float)))
            if col != "kl":
                base = s[f"baseline_{'harmful' if col == 'bypass' else 'harmless'}_score"].iloc[0]
                flat = [line.get_ydata()[0] for line in ax.get_lines() if not line.get_label().startswith("pos")]
                assert flat == [base]


def test_capability_figure_points_are_the_costs_by_hand(report):
    store, figures = report
    cost = cost_by_hand(store.read("capability")).reset_index()
    ax_of = {ax.get_title(): ax for ax in figures["capability.png"].axes if ax.get_title()}
    assert set(ax_of) == set(MODELS)
    for model, ax in ax_of.items():
        assert ax.get_xlabel() == "CE change (nats/token)" and ax.get_ylabel() == "harmful refusal change"
        drawn = {c.get_label(): c for c in ax.collections}
        mine = cost[cost["model"] == model]
        want = {}
        for (arm, control), g in mine.groupby(["arm", "control"]):
            ce = g[g["metric"] == "ce_loss"]["cost"].iloc[0]
            harm = g[g["metric"] == "refusal_harmful"]["cost"].iloc[0]
            want[f"{arm}{' control' if control else ''}"] = (ce, harm)
        assert set(drawn) == set(want)
        for label, point in want.items():
            np.testing.assert_allclose(drawn[label].get_offsets(), [point], atol=1e-12, err_msg=label)
            hollow = drawn[label].get_facecolors().size == 0 or drawn[label].get_facecolors()[0, 3] == 0
            assert hollow == label.endswith(" control"), label
        assert abs(want["ablation"][0]) > 0 and want["baseline"] == (0.0, 0.0)


def test_scrubbing_bars_are_the_faithfulness_recomputed_from_the_kls(report):
    store, figures = report
    rows = store.read("scrubbing")
    ax = figures["scrubbing.png"].axes[0]
    hyps = ["late-mlp", "nothing"]
    bars = {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers}
    assert set(bars) == set(MODELS)
    for model in MODELS:
        want = [float(np.exp(-np.mean(np.concatenate(rows[(rows["model"] == model) & (rows["hypothesis"] == h)]
                                                     ["kl_per_example"].map(np.asarray).to_list()))))
                for h in hyps]
        np.testing.assert_allclose(bars[model], want, rtol=0, atol=1e-12)
    threshold = [line for line in ax.get_lines() if line.get_label() == "threshold"]
    assert len(threshold) == 1 and threshold[0].get_ydata()[0] == 0.5
    assert [t.get_text() for t in ax.get_xticklabels()] == hyps
    assert ax.get_ylabel() == "faithfulness exp(-mean KL)"


def test_patching_map_is_the_mean_recovery_per_site_and_layer(report):
    store, figures = report
    rows = store.read("patching")
    images = [ax for ax in figures["patching.png"].axes if ax.get_images()]
    assert [ax.get_title() for ax in images] == [f"{m}: sites" for m in MODELS]
    for ax, model in zip(images, MODELS):
        want = rows[rows["model"] == model].groupby(["kind", "layer"])["recovery"].mean().unstack("layer")
        want = want.reindex(["attn_out", "mlp_out"])
        np.testing.assert_allclose(ax.get_images()[0].get_array(), want.to_numpy(float), atol=1e-12)
        assert [t.get_text() for t in ax.get_yticklabels()] == ["attn_out", "mlp_out"]
