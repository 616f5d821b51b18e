"""Scale-trend summary: one row per model, sorted by parameter count, with both verdicts.

Counts are pooled over seeds before rates and Wilson intervals are taken. The best layer is the
one with the highest mean separation (Cohen's d on val) over seeds. Rules (DESIGN.md):

control_margin: NO-BASELINE-REFUSAL if baseline harmful refusal < baseline_min; SUPPORTED if
  ablation (alpha = ablation_alpha, best direction) lowers harmful refusal by >= baseline_margin
  from baseline and >= control_margin from its random control, and addition (c =
  addition_coefficient at the best layer) raises harmless refusal by the same two margins;
  otherwise NOT-SUPPORTED naming the arm(s) that fell short.
steering_labels, from the addition curve at the best layer: induce = max over c > 0 of the
  rise in harmless refusal over baseline; suppress = max over c < 0 of the drop in harmful
  refusal. works-fully: both >= strong; amplify-only: induce >= weak, suppress < weak;
  works-partially: either >= weak otherwise; fails: neither.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from refusal_ray.circuits import circuit_columns, scrub_verdicts, site_recovery
from refusal_ray.stats import wilson
from refusal_ray.store import Store

ARM_KEYS = ["mode", "layer", "coefficient", "alpha", "control", "prompt_set"]


def pooled_arms(steering: pd.DataFrame) -> pd.DataFrame:
    """Steering rows pooled over seeds: one row per (model, arm, prompt set) with rate and interval."""
    df = steering.copy()
    df["layer"] = df["layer"].fillna(-1).astype(int)
    g = df.groupby(["model", *ARM_KEYS], dropna=False).agg(
        n=("n", "sum"), refusals=("refusals", "sum"), seeds=("seed", "nunique")).reset_index()
    g["rate"] = g["refusals"] / g["n"]
    ci = [wilson(int(k), int(n)) for k, n in zip(g["refusals"], g["n"])]
    g["ci_low"], g["ci_high"] = [c[0] for c in ci], [c[1] for c in ci]
    return g


def _rate(arms: pd.DataFrame, **where) -> float:
    sel = arms
    for k, v in where.items():
        sel = sel[np.isclose(sel[k], v)] if isinstance(v, float) else sel[sel[k] == v]
    return float(sel["rate"].iloc[0]) if len(sel) else float("nan")


def control_margin_verdict(base_harm: float, abl: tuple[float, float], add: tuple[float, float], rule: dict) -> str:
    """abl = (suppression vs baseline, vs control); add = (induction vs baseline, vs control)."""
    if np.isnan(base_harm):
        return "INCOMPLETE"
    if base_harm < rule["baseline_min"]:
        return "NO-BASELINE-REFUSAL"
    if any(np.isnan(x) for x in (*abl, *add)):
        return "INCOMPLETE"
    short = [name for name, (vs_base, vs_ctl) in (("ablation", abl), ("addition", add))
             if not (vs_base >= rule["baseline_margin"] and vs_ctl >= rule["control_margin"])]
    return "SUPPORTED" if not short else f"NOT-SUPPORTED ({', '.join(short)})"


def steering_label(induce: float, suppress: float, rule: dict) -> str:
    induce, suppress = np.nan_to_num(induce, nan=0.0), np.nan_to_num(suppress, nan=0.0)
    if induce >= rule["strong"] and suppress >= rule["strong"]:
        return "works-fully"
    if induce >= rule["weak"] and suppress < rule["weak"]:
        return "amplify-only"
    if induce >= rule["weak"] or suppress >= rule["weak"]:
        return "works-partially"
    return "fails"


def summarize(out_dir) -> pd.DataFrame:
    """Build the summary table from a store (manifest, directions, steering)."""
    store = Store(out_dir)
    manifest = store.read_json("manifest.json") or {}
    rule = manifest.get("decision_rule", {})
    models = manifest.get("models", {})
    position = manifest.get("steer_position", -1)
    has_steer = (manifest.get("spec") or {}).get("stages", {}).get("steer") is not None
    dirs = store.read("directions")
    steering = store.read("steering")
    arms = pooled_arms(steering) if not steering.empty else pd.DataFrame(columns=["model", *ARM_KEYS, "rate"])
    sites, verdicts = site_recovery(store.read("patching")), scrub_verdicts(store.read("scrubbing"))
    rows = []
    for name, info in models.items():
        row = {"model": name, "params": info.get("params"), "layers": info.get("n_layers")}
        circuit = circuit_columns(name, sites, verdicts)
        d = dirs[(dirs["model"] == name) & (dirs["site"] == "resid_pre") & (dirs["position"] == position)] \
            if not dirs.empty else dirs
        if d.empty:
            rows.append(row | circuit)
            continue
        sep = d.groupby("layer")["separation"].mean()
        best = int(sep.idxmax())
        row |= {"best_layer": best, "separation": float(sep[best]), "seeds": int(d["seed"].nunique())}
        a = arms[arms["model"] == name]
        cm, sl = rule.get("control_margin", {}), rule.get("steering_labels", {})
        base_harm = _rate(a, mode="baseline", prompt_set="harmful")
        base_safe = _rate(a, mode="baseline", prompt_set="harmless")
        alpha, coef = float(cm.get("ablation_alpha", 1.0)), float(cm.get("addition_coefficient", 1.0))
        abl = _rate(a, mode="ablation", alpha=alpha, control=False, prompt_set="harmful")
        abl_ctl = _rate(a, mode="ablation", alpha=alpha, control=True, prompt_set="harmful")
        add = _rate(a, mode="addition", layer=best, coefficient=coef, control=False, prompt_set="harmless")
        add_ctl = _rate(a, mode="addition", layer=best, coefficient=coef, control=True, prompt_set="harmless")
        curve = a[(a["mode"] == "addition") & (a["layer"] == best) & (~a["control"].astype(bool))]
        pos = curve[(curve["coefficient"] > 0) & (curve["prompt_set"] == "harmless")]["rate"]
        neg = curve[(curve["coefficient"] < 0) & (curve["prompt_set"] == "harmful")]["rate"]
        induce = float(pos.max() - base_safe) if len(pos) else float("nan")
        suppress = float(base_harm - neg.min()) if len(neg) else float("nan")
        row |= {
            "baseline_harmful_refusal": base_harm, "baseline_harmless_refusal": base_safe,
            "ablation_harmful_refusal": abl, "ablation_suppression": base_harm - abl,
            "ablation_suppression_vs_control": abl_ctl - abl,
            "addition_harmless_refusal": add, "addition_induction": add - base_safe,
            "addition_induction_vs_control": add - add_ctl,
            "steer_induce_max": induce, "steer_suppress_max": suppress,
            "verdict_control_margin": control_margin_verdict(
                base_harm, (base_harm - abl, abl_ctl - abl), (add - base_safe, add - add_ctl), cm) if cm else None,
            "verdict_steering_labels": steering_label(induce, suppress, sl) if sl else None,
        } if has_steer else {}
        rows.append(row | circuit)
    df = pd.DataFrame(rows)
    if not df.empty:
        df["rule_hash"] = manifest.get("rule_hash")
        df = df.sort_values("params", kind="stable").reset_index(drop=True)
    return df


def write_summary(out_dir) -> pd.DataFrame:
    """Compute the summary and write summary.parquet and summary.csv into the store."""
    store = Store(out_dir)
    df = summarize(out_dir)
    store.write_frame("summary.parquet", df)
    store.write_file("summary.csv", df.to_csv(index=False).encode())
    return df


DISPLAY = [("model", "model", "{}"), ("params", "params", "{:,.0f}"), ("layers", "L", "{:.0f}"),
           ("best_layer", "best", "{:.0f}"), ("separation", "sep(d)", "{:.2f}"),
           ("baseline_harmful_refusal", "base", "{:.2f}"), ("ablation_suppression", "abl-base", "{:+.2f}"),
           ("ablation_suppression_vs_control", "abl-ctl", "{:+.2f}"), ("addition_induction", "add-base", "{:+.2f}"),
           ("addition_induction_vs_control", "add-ctl", "{:+.2f}"),
           ("verdict_control_margin", "control_margin", "{}"), ("verdict_steering_labels", "steering_labels", "{}"),
           ("top_component", "top component", "{}"), ("top_recovery", "recovery", "{:.2f}"),
           ("attribution_spearman", "AtP rho", "{:.2f}")]


def render(df: pd.DataFrame) -> str:
    """The summary as a fixed-width text table (also used in the Markdown report)."""
    if df.empty:
        return "(no results)"
    cols = [(k, h, f) for k, h, f in DISPLAY if k in df.columns]
    cols += [(k, k.replace("faithfulness", "faith"), "{:.2f}") for k in df.columns if k.startswith("faithfulness[")]
    cols += [(k, k, "{}") for k in df.columns if k.startswith("verdict[")]
    cells = [[h for _, h, _ in cols]]
    for _, r in df.iterrows():
        cells.append(["-" if (v := r[k]) is None or (isinstance(v, float) and np.isnan(v)) else f.format(v)
                      for k, _, f in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if "rule_hash" in df.columns:
        lines.append(f"decision rule hash: {df['rule_hash'].iloc[0]}")
    return "\n".join(lines)
