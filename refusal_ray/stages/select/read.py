"""Stage `select`, the read side (pandas / matplotlib, no torch): the choice per seed for the summary
(`selection_columns`), the warnings for a fallback choice above the KL filter (`fallback_warnings`),
and the report's section with its table and figure (as Arditi et al. 2024, Fig. 10).

The decision rule's NO-SELECTION verdict reads `selected` ("NONE" when no seed selected anything)
from the summary row; the rule itself is in `refusal_ray.analysis.summary`.
"""

from __future__ import annotations

import pandas as pd

from refusal_ray.core.render import DIRECTIONS, Column, has, not_run, plt, png
from refusal_ray.stages.base import Reader

TITLE = "Direction selection (Arditi et al. 2024, Sec. 2.3 and App. C)"
SCORES = (("bypass", "bypass score (harmful, ablated)"), ("induce", "induce score (harmless, added)"),
          ("kl", "first-token KL (harmless, ablated)"))
KL_TOL = 1e-9   # a fallback's KL within this of kl_max does not exceed it (the summary's MARGIN_TOL: rounding)


def direction_name(layer: int, position: int) -> str:
    """A direction as the summary names it: "L3/p-2" (layer 3, position -2)."""
    return f"L{layer}/p{position}"


def selection_columns(sel: pd.DataFrame) -> dict:
    """Stage select's choice per seed: `selected` ("L3/p-2 (s0), L1/p-4 (s1)", "NONE" when no seed
    selected anything), `selected_by` (the criterion, or "fallback:<c>"), and the candidates that
    passed the filters per seed (`select_passed`)."""
    if sel.empty:
        return {}
    parts, by, passed = [], set(), []
    for seed, grp in sel.groupby("seed"):
        chosen = grp[grp["selected"].astype(bool)]
        passed.append(f"{int(grp['passed'].astype(bool).sum())}/{len(grp)} (s{seed})")
        if len(chosen):
            r = chosen.iloc[0]
            parts.append(f"{direction_name(int(r['layer']), int(r['position']))} (s{seed})")
            by.add(str(r["selected_by"]))
    return {"selected": ", ".join(parts) if parts else "NONE", "selected_by": ", ".join(sorted(by)) or None,
            "select_passed": ", ".join(passed)}


def fallback_warnings(sel: pd.DataFrame, model: str, kl_max: float | None) -> list[str]:
    """Warning lines for one model's selection rows `sel`: per seed whose choice is a fallback
    (`selected_by` "fallback:<c>", nothing passed the filters) with first-token KL (nats, harmless
    val prompts, the row's `kl`) above the spec's `stages.select.kl_max`, e.g. "warning: qwen-s seed 0:
    fallback selection L2/p-1 has first-token KL 9.56 > kl_max 0.1 (the direction may wreck the model)".
    None for kl_max (no KL filter): nothing to exceed. Arditi et al. 2024, App. C: the KL filter keeps
    directions that leave harmless behaviour intact."""
    if sel.empty or kl_max is None:
        return []
    lines = []
    chosen = sel[sel["selected"].astype(bool) & sel["selected_by"].astype(str).str.startswith("fallback:")]
    for _, r in chosen.sort_values("seed").iterrows():
        kl = float(r["kl"])
        if kl > float(kl_max) + KL_TOL:
            lines.append(f"warning: {model} seed {int(r['seed'])}: fallback selection "
                         f"{direction_name(int(r['layer']), int(r['position']))} has first-token KL {kl:.3g} > "
                         f"kl_max {float(kl_max):g} (the direction may wreck the model)")
    return lines


def warning_lines(summary: pd.DataFrame) -> list[str]:
    """The summary's warning lines (column `selection_warning`: `fallback_warnings`), model by model."""
    if summary is None or "selection_warning" not in summary.columns:
        return []
    return [line for w in summary["selection_warning"] if isinstance(w, str) for line in w.splitlines()]


def headline(row: pd.Series, rule: dict | None = None) -> str | None:
    """The model's headline sentence on selection (`row`: its summary row): its fallback warnings in bold
    (`selection_warning`), or None without any."""
    if not has(row, "selection_warning"):
        return None
    return " ".join(f"**{w[0].upper()}{w[1:]}.**" for w in str(row["selection_warning"]).splitlines())


# -- report figure and table ---------------------------------------------------------------------
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
    return png(fig)


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


# -- the reader ----------------------------------------------------------------------------------
def _summary(ctx, model: str, row: dict) -> dict:
    """`selection_columns` of the model's rows and, with a `stages.select` block, `selection_warning`
    (`fallback_warnings` joined by newlines, None without any). A model without directions rows
    (no `best_layer` in `row`: it failed before select could run) gets none."""
    if "best_layer" not in row:
        return {}
    selection = ctx.tables["selection"]
    mine = selection[selection["model"] == model] if not selection.empty else selection
    out = selection_columns(mine)
    block = ctx.stages.get("select")
    if block is not None:
        warn = fallback_warnings(mine, model, block.get("kl_max"))
        out["selection_warning"] = "\n".join(warn) if warn else None
    return out


def _display() -> list[Column]:
    return [Column("selected", "selected", "{}", DIRECTIONS, "selected per seed",
                   "stage select's choice for each seed s0, s1, ...: layer L / position p; NONE: nothing passed "
                   "its filters")]


def _report(ctx) -> list[str]:
    """The section: the choice per (model, seed), the fallback warnings, the scores figure (`selection.png`)."""
    lines = [f"## {TITLE}", ""]
    selection = ctx.tables["selection"]
    if selection.empty:
        return lines + not_run("select", ctx.stages)
    warn = warning_lines(ctx.summary)
    return lines + [*selection_table(selection), "", *[f"**{w}**" for w in warn], *([""] if warn else []),
                    *ctx.figure("selection.png", plot_selection(selection))]


READER = Reader(summary=_summary, display=_display, report=_report, order=20, title=TITLE, tables=("selection",),
                headline=headline, headline_order=90)   # its fallback warnings close the paragraph
