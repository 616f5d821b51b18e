"""Figures and tables of stage select for the report (as Arditi et al. 2024, Fig. 10)."""

from __future__ import annotations

import pandas as pd

from refusal_ray.analysis.figures import _png, plt

SCORES = (("bypass", "bypass score (harmful, ablated)"), ("induce", "induce score (harmless, added)"),
          ("kl", "first-token KL (harmless, ablated)"))


def plot_selection(selection: pd.DataFrame) -> bytes:
    """Per model (first seed): bypass, induce and KL against layer, one line per position; the
    filtered-out candidates hollow, the selected one starred."""
    models = sorted(selection["model"].unique())
    fig, axes = plt.subplots(len(models), 3, figsize=(13, 2.9 * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        s = selection[selection["model"] == model]
        s = s[s["seed"] == s["seed"].min()]
        for ax, (col, label) in zip(row, SCORES):
            for pos, g in s.groupby("position"):
                g = g.sort_values("layer")
                line, = ax.plot(g["layer"], g[col], lw=1, label=f"pos {pos}")
                kept = g[g["passed"].astype(bool)]
                ax.scatter(kept["layer"], kept[col], color=line.get_color(), s=14, zorder=3)
                ax.scatter(g["layer"], g[col], facecolors="none", edgecolors=line.get_color(), s=14, zorder=2)
            chosen = s[s["selected"].astype(bool)]
            ax.scatter(chosen["layer"], chosen[col], marker="*", s=160, color="black", zorder=4, label="selected")
            if col == "bypass":
                ax.axhline(float(s["baseline_harmful_score"].iloc[0]), color="grey", ls="--", lw=0.8)
            elif col == "induce":
                ax.axhline(float(s["baseline_harmless_score"].iloc[0]), color="grey", ls="--", lw=0.8)
            ax.set_xlabel("layer")
            ax.set_title(f"{model}: {label}", fontsize=8)
        row[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return _png(fig)


def selection_table(selection: pd.DataFrame) -> list[str]:
    """Markdown rows: per (model, seed) the selected candidate and its scores, or why none was."""
    lines = ["| model | seed | selected | by | bypass | induce | KL | passed filters |", "|---|---|---|---|---|---|---|---|"]
    for (model, seed), g in selection.groupby(["model", "seed"]):
        chosen = g[g["selected"].astype(bool)]
        n_pass = int(g["passed"].astype(bool).sum())
        if chosen.empty:
            reasons = g["filter"].dropna().str.split(",").explode().value_counts()
            why = ", ".join(f"{k}: {v}" for k, v in reasons.items())
            lines.append(f"| {model} | {seed} | NONE | - | - | - | - | 0/{len(g)} ({why}) |")
            continue
        r = chosen.iloc[0]
        lines.append(f"| {model} | {seed} | L{int(r['layer'])}/p{int(r['position'])} | {r['selected_by']} | "
                     f"{r['bypass']:.2f} | {r['induce']:.2f} | {r['kl']:.3f} | {n_pass}/{len(g)} |")
    return lines
