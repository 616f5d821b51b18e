"""Figures (PNG) and the compiled Markdown report of a store (sections in `refusal_ray.analysis.report_stages`)."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd

from refusal_ray.analysis.figures import _png, plt
from refusal_ray.stats import cosine_matrix
from refusal_ray.store import Store
from refusal_ray.analysis.summary import (judge_tables, nearest_steered, pooled_arms, render, render_judges,
                                          warning_lines, write_summary)


def _grid(n: int):
    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def steering_figure(arms: pd.DataFrame, summary: pd.DataFrame):
    """Refusal rate vs addition coefficient at every steered layer: (figure, {model: layers plotted}).

    One row of panels per model with addition arms: harmless prompts (induction) and harmful
    prompts (suppression). Each steered layer is a line coloured by layer (colour bar); the layer
    the steering label was read at (`label_layer`, else the steered layer nearest the best one)
    is drawn in black with 95% intervals and its random control (dotted; with `controls: K`, draw 0). c = 0 is the baseline.
    With at most 4 steered layers every line has intervals.
    """
    addition = arms[(arms["mode"] == "addition") & ~arms["control"].astype(bool)]
    rows = [(s, sorted(int(x) for x in addition.loc[addition["model"] == s["model"], "layer"].unique()))
            for _, s in summary.iterrows()]
    rows = [(s, layers) for s, layers in rows if layers]
    fig, axes = plt.subplots(max(1, len(rows)), 2, figsize=(10, 3.4 * max(1, len(rows))), squeeze=False)
    plotted: dict[str, list[int]] = {}
    for (ax_safe, ax_harm), (s, layers) in zip(axes, rows):
        model = s["model"]
        a = arms[arms["model"] == model]
        best = s.get("best_layer")
        label = s.get("label_layer")
        if label is None or pd.isna(label):
            label = nearest_steered(int(best), layers) if best is not None and not pd.isna(best) else None
        cmap = plt.get_cmap("viridis")
        norm = matplotlib.colors.Normalize(min(layers), max(layers) if max(layers) > min(layers) else min(layers) + 1)
        for ax, pset in ((ax_safe, "harmless"), (ax_harm, "harmful")):
            b = a[(a["mode"] == "baseline") & (a["prompt_set"] == pset)].assign(coefficient=0.0)
            for layer in layers:
                for control in (False, True):
                    highlight = layer == label
                    if control and not highlight:
                        continue
                    c = a[(a["mode"] == "addition") & (a["layer"] == layer) &
                          (a["control"].astype(bool) == control) & (a["prompt_set"] == pset)]
                    if "control_draw" in c.columns:   # controls: K draws the first draw's line
                        c = c[c["control_draw"] == 0]
                    if c.empty:
                        continue
                    c = pd.concat([c, b]).sort_values("coefficient")
                    color = ("0.5" if control else "k") if highlight else cmap(norm(layer))
                    err = np.clip([c["rate"] - c["ci_low"], c["ci_high"] - c["rate"]], 0, None) \
                        if highlight or len(layers) <= 4 else None
                    name = f"layer {layer}" + (" random control" if control else " (label layer)" if highlight else "")
                    drawn = ax.errorbar(c["coefficient"], c["rate"], yerr=err, color=color,
                                        linestyle=":" if control else "-", marker="o", ms=3 if highlight else 2,
                                        lw=1.8 if highlight else 0.9, capsize=2, zorder=3 if highlight else 2,
                                        label=name if highlight or len(layers) <= 4 else f"_{name}")
                    drawn.lines[0].set_gid(f"{model}|{pset}|{layer}|{'control' if control else 'direction'}")
            ax.set_title(f"{model}: {pset} prompts ({'induce' if pset == 'harmless' else 'suppress'}; "
                         f"best layer {'?' if best is None or pd.isna(best) else int(best)})", fontsize=9)
            ax.set_xlabel("addition coefficient c")
            ax.set_ylabel("refusal rate (95% Wilson)")
            ax.set_ylim(-0.05, 1.05)
            ax.legend(fontsize=7)
        if len(layers) > 1:
            bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax_harm, label="steered layer")
            bar.ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        plotted[model] = layers
    if not rows:
        axes[0, 0].text(0.5, 0.5, "no addition arms were steered", ha="center", va="center")
        for ax in axes.flat:
            ax.set_axis_off()
    return fig, plotted


def plot_steering_curves(arms: pd.DataFrame, summary: pd.DataFrame) -> bytes:
    """PNG of `steering_figure`."""
    return _png(steering_figure(arms, summary)[0])


def plot_separation(dirs: pd.DataFrame, models: list[str]) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in models:
        d = dirs[(dirs["model"] == m) & (dirs["site"] == "resid_pre")]
        d = d[d["position"] == d["position"].max()]          # the last template token
        g = d.groupby("layer")["separation"].agg(["mean", "min", "max"])
        x = g.index / max(1, g.index.max())
        ax.plot(x, g["mean"], marker="o", label=m)
        ax.fill_between(x, g["min"], g["max"], alpha=0.2)
    ax.set_xlabel("relative layer depth")
    ax.set_ylabel("separation (Cohen's d, val)")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_cosines(dirs: pd.DataFrame, models: list[str]) -> bytes:
    """Cross-layer cosine similarity of the directions (first seed, resid_pre, last position)."""
    fig, axes = _grid(len(models))
    for ax, m in zip(axes, models):
        d = dirs[(dirs["model"] == m) & (dirs["site"] == "resid_pre")]
        d = d[(d["seed"] == d["seed"].min()) & (d["position"] == d["position"].max())].sort_values("layer")
        cos = cosine_matrix(np.stack(d["vector"].to_numpy()))
        im = ax.imshow(cos, vmin=-1, vmax=1, cmap="RdBu_r")
        ticks = range(0, len(cos), max(1, len(cos) // 8))
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.set_title(m)
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _png(fig)


def plot_scale_trend(summary: pd.DataFrame) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 4))
    for col, label in (("separation", "separation (d) / 10"), ("ablation_suppression", "ablation suppression"),
                       ("addition_induction", "addition induction")):
        if col in summary.columns:
            y = summary[col] / (10 if col == "separation" else 1)
            ax.plot(summary["params"], y, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("effect")
    ax.legend(fontsize=8)
    return _png(fig)


def _integral(t: pd.DataFrame) -> pd.DataFrame:
    """Float columns whose values are all whole numbers (an operator's integer arm keys, floats in the pooled
    table because other operators' rows hold NaN there) as integers, so a layer prints as 1, not 1.000."""
    out = t.copy()
    for c in out.columns:
        v = out[c]
        if v.dtype.kind == "f" and v.notna().all() and len(v) and (v == v.round()).all() and c not in (
                "rate", "ci_low", "ci_high", "coefficient", "alpha", "theta", "threshold"):
            out[c] = v.astype(int)
    return out


def write_report(out_dir, judge: str | None = None) -> str:
    """Write summary files, figures/*.png and report.md into the store; returns the report's path.
    `judge`: the judge whose labels the verdicts read (default: `summary.verdict_judge`).

    report.md is the compiled report of the sweep: provenance, a headline per model under the
    decision rule, the summary table (with its warning lines, e.g. a fallback selection above the KL
    filter, repeated in the selection section) and the scale trend, then each stage reader's section
    (`Reader.report`, in reader `order`: directions, selection, steering with controls and one section
    per other operator, capability cost, activation patching, causal scrubbing), each saying so when its
    stage did not run, with the Judges section at VERDICT_ORDER. Stage sections read the inline judge's
    labels (their steering figure always did); the verdicts in the summary read `judge`'s."""
    from refusal_ray.analysis import report_stages as st
    from refusal_ray.analysis.summary import VERDICT_ORDER, read_context, readers
    from refusal_ray.judges.config import INLINE

    store = Store(out_dir)
    summary = write_summary(out_dir, judge)
    ctx = read_context(store, INLINE)
    ctx.summary = summary
    manifest = ctx.manifest
    scale = ctx.figure("scale_trend.png", plot_scale_trend(summary)) \
        if not summary.empty and "separation" in summary.columns else []
    rule = ctx.rule
    lines = [f"# refusal-ray report: {manifest.get('sweep', store.uri)}", "",
             f"Decision rule hash `{manifest.get('rule_hash')}`, spec hash `{manifest.get('spec_hash')}`, "
             f"code `{manifest.get('git_sha')}`"
             + (f"; verdicts under judge `{summary['judge'].iloc[0]}`" if "judge" in summary.columns else "") + ".",
             "", "## Headlines", ""]
    lines += [f"- {st.headline(row, rule)}" for _, row in summary.iterrows()] or ["(no models finished)"]
    lines += ["", "## Summary", "", "```", render(summary), "```", "", *scale]
    sections = [(r.order, i, r.report) for i, (_, r) in enumerate(readers())]
    sections.append((VERDICT_ORDER, -1, lambda ctx: judges_section(out_dir)))
    for _, _, section in sorted(sections, key=lambda s: (s[0], s[1])):
        lines += section(ctx)
    return store.write_file("report.md", ("\n".join(lines) + "\n").encode())


def judges_section(out_dir) -> list[str]:
    """The Judges section: rates and verdicts per judge and their agreement, as `write_summary` wrote them."""
    lines = ["## Judges", ""]
    judges_text = render_judges(*judge_tables(out_dir))
    return lines + (["Verdicts above read the judge named in the provenance line; the steering figure uses the "
                     "inline substring judge.", "", "```", judges_text, "```", ""] if judges_text else
                    ["One judge (the inline substring judge); no agreement to report.", ""])
