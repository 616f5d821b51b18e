"""Sections of the compiled report (`refusal-ray report DIR`): a headline per model, then one section per
stage, each present whether or not the stage ran (a stage that did not run says so), as the audit's
compiled report did. Every number is read from the store's tables and the summary; nothing here
recomputes a measurement.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from refusal_ray.core.render import has, markdown_table, not_run, num, plt  # noqa: F401 (re-exported)


_num, _has = num, has   # the old private names


def headline(row: pd.Series, rule: dict) -> str:
    """One paragraph per model: verdicts first, then the numbers they rest on (rates are pooled over
    seeds; costs are arm minus baseline)."""
    parts = [f"**{row['model']}** ({_num(row.get('params'), '{:,.0f}')} parameters, "
             f"{_num(row.get('layers'), '{:.0f}')} layers):"]
    verdicts = [f"control_margin **{row['verdict_control_margin']}**" if _has(row, "verdict_control_margin") else None,
                f"steering_labels **{row['verdict_steering_labels']}**" if _has(row, "verdict_steering_labels") else None]
    verdicts = [v for v in verdicts if v]
    parts.append(("; ".join(verdicts) + ".") if verdicts else "no verdict (steering not run).")
    if _has(row, "separation"):
        parts.append(f"Separation peaks at layer {_num(row['best_layer'], '{:.0f}')} (Cohen's d "
                     f"{_num(row['separation'])}).")
    from refusal_ray.ops import OPS

    parts += [text for op in OPS.by_report_order() if (text := op.headline(row, rule))]
    costs = [(arm, row.get(f"cost_ce[{arm}]"), row.get(f"cost_kl[{arm}]"), row.get(f"cost_setting[{arm}]"))
             for op in OPS.by_apply_order() for arm in (op.name, op.weight_arm)
             if arm and _has(row, f"cost_ce[{arm}]")]
    if costs:
        parts.append("Capability cost: " + "; ".join(
            f"{arm} ({setting}) {_num(ce, '{:+.3f}')} nats CE, KL {_num(kl, '{:.3f}')}"
            for arm, ce, kl, setting in costs) + ".")
    if _has(row, "top_component"):
        parts.append(f"Top patched component {row['top_component']} (recovery {_num(row.get('top_recovery'))}).")
    if _has(row, "selection_warning"):   # a fallback selection above the KL filter (summary.fallback_warnings)
        parts.append(" ".join(f"**{w[0].upper()}{w[1:]}.**" for w in str(row["selection_warning"]).splitlines()))
    return " ".join(parts)


def directions_diagnostics(dirs: pd.DataFrame) -> list[str]:
    """Extraction diagnostics of the Qwen-1.8B study: per model and layer, the mean cosine of the
    sequential refit to the batched fit (when `compare_sequential` ran) and the pairing used."""
    if dirs.empty:
        return ["(no directions stored)"]
    d = dirs[dirs["site"] == "resid_pre"]
    d = d[d["position"] == d["position"].max()]
    means = {c: (c, "mean") for c in ("separation", "norm") if c in d.columns}
    out = d.groupby(["model", "layer"]).agg(**means).reset_index() if means else \
        d[["model", "layer"]].drop_duplicates()
    if "sequential_cosine" in d.columns and d["sequential_cosine"].notna().any():
        out = out.merge(d.groupby(["model", "layer"])["sequential_cosine"].min().rename("sequential_cosine_min")
                        .reset_index(), on=["model", "layer"])
    pairing = sorted({str(p) for p in d.get("pairing", pd.Series(dtype=object)).dropna().unique()})
    lines = [f"Difference of means at resid_pre, last template position; mean over seeds"
             + (f"; pairing: {', '.join(pairing)}" if pairing else "") + ".", ""]
    return lines + markdown_table(out)


def steering_arms_table(arms: pd.DataFrame, summary: pd.DataFrame) -> list[str]:
    """Pooled rates of the steering arms (baseline and each operator's `report_mask`: addition at the rule's
    layer, every ablation arm, ...) beside their random controls, per model and prompt set."""
    from refusal_ray.ops import OPS

    if arms.empty:
        return ["(no steering arms stored)"]
    rows = []
    for _, s in summary.iterrows():
        a = arms[arms["model"] == s["model"]]
        layer = s.get("addition_layer")
        keep = a["mode"] == "baseline"
        for op in OPS:
            keep |= op.report_mask(a, s)
        rows.append(a[keep])
    if not rows:
        return ["(no steering arms stored)"]
    t = pd.concat(rows)
    draw = t["control_draw"] if "control_draw" in t.columns else pd.Series(0, index=t.index)
    ctl_name = [f" (control {int(d)})" if d else " (control)" for d in draw.fillna(0)]   # controls: K draws
    t = t.assign(arm=np.where(t["control"].astype(bool), t["mode"] + pd.Series(ctl_name, index=t.index), t["mode"]),
                 layer=pd.Series([int(x) if x >= 0 else None for x in t["layer"]], index=t.index, dtype=object),
                 direction=[_direction_text(r) for _, r in t.iterrows()])
    cols = [c for c in ["model", "arm", "layer", "coefficient", "alpha", "direction", "prompt_set", "rate", "ci_low",
                        "ci_high", "n_prompts"] if c in t.columns]
    return markdown_table(t[cols].sort_values(["model", "prompt_set", "arm"], kind="stable"))


def _direction_text(r: pd.Series) -> str:
    """An arm's direction in the steering table: its operator's `direction_key` column when it has one (a
    subspace's stacked directions), else L<layer>/p<position> ('' where none)."""
    from refusal_ray.ops.base import owner

    op = owner(r["mode"])
    if op is not None and op.direction_key and op.direction_key in r.index:
        return r[op.direction_key]
    return f"L{int(r['direction_layer'])}/p{int(r['direction_position'])}" if r["direction_layer"] >= 0 else ""


def plot_capability(cost: pd.DataFrame):
    """Refusal change against capability cost: per model, harmful-refusal change (y) against CE change
    (x), one point per arm setting, controls hollow. Returns a figure, or None without capability rows."""
    if cost.empty:
        return None
    from refusal_ray.analysis.cost import cost_table

    wide = cost_table(cost)
    if not {"ce_loss", "refusal_harmful"} <= set(wide.columns):
        return None
    models = list(dict.fromkeys(wide["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    from refusal_ray.ops import OPS

    colors = {"baseline": "0.4", **{op.name: op.color for op in OPS},
              **{op.weight_arm: op.weight_color for op in OPS if op.weight_arm}}
    weights = {op.weight_arm for op in OPS if op.weight_arm}
    for ax, m in zip(axes[0], models):
        w = wide[wide["model"] == m]
        for arm, g in w.groupby("arm", sort=False):
            for control, h in g.groupby("control"):
                ax.scatter(h["ce_loss"], h["refusal_harmful"], s=30, label=f"{arm}{' control' if control else ''}",
                           facecolors="none" if control else colors.get(arm, "k"), edgecolors=colors.get(arm, "k"),
                           marker="s" if arm in weights else "o")
        ax.axhline(0, color="0.8", lw=0.8)
        ax.axvline(0, color="0.8", lw=0.8)
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("CE change (nats/token)")
        ax.set_ylabel("harmful refusal change")
        ax.legend(fontsize=6)
    return fig
