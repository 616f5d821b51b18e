"""Stage `directions`, read side (pandas / numpy / matplotlib, no torch): the best layer and its separation
per model (summary columns), the extraction diagnostics table and the separation and cross-layer cosine
figures (report section). Arditi et al. 2024, Sec. 2.1: difference of means; separation is Cohen's d of
held-out projections (`refusal_ray.stats.cohens_d`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from refusal_ray.core.render import DIRECTIONS, Column, grid, has, markdown_table, num, plt, png
from refusal_ray.stages.base import Reader
from refusal_ray.stats import cosine_matrix

TITLE = "Directions (difference of means, Arditi et al. 2024 Sec. 2.1)"


def summary(ctx, model: str, row: dict) -> dict:
    """`best_layer` (highest mean separation over seeds at resid_pre, the steering position of the manifest,
    ties: the earliest layer), its `separation` (Cohen's d) and `seeds`; {} for a model without such rows."""
    dirs = ctx.tables["directions"]
    position = ctx.manifest.get("steer_position", -1)
    d = dirs[(dirs["model"] == model) & (dirs["site"] == "resid_pre") & (dirs["position"] == position)] \
        if not dirs.empty else dirs
    if d.empty:
        return {}
    sep = d.groupby("layer")["separation"].mean()
    best = int(sep.idxmax())
    return {"best_layer": best, "separation": float(sep[best]), "seeds": int(d["seed"].nunique())}


def display() -> list[Column]:
    """The best layer and its separation, in the compact layout's directions table."""
    return [Column("best_layer", "best", "{:.0f}", DIRECTIONS, "best layer",
                   "the layer whose direction separates harmful from harmless prompts most (mean over seeds)"),
            Column("separation", "sep(d)", "{:.2f}", DIRECTIONS, "separation",
                   "Cohen's d of the val prompts' projections on the best layer's direction, harmful vs harmless")]


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


def plot_separation(dirs: pd.DataFrame, models: list[str]) -> bytes:
    """PNG: separation (Cohen's d, val) against relative layer depth per model (resid_pre, last template
    token), the mean over seeds with the seeds' range shaded."""
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
    return png(fig)


def plot_cosines(dirs: pd.DataFrame, models: list[str]) -> bytes:
    """Cross-layer cosine similarity of the directions (first seed, resid_pre, last position)."""
    fig, axes = grid(len(models))
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
    return png(fig)


def report(ctx) -> list[str]:
    """The section: the diagnostics table, then the separation and cosine figures of the summary's models
    that have directions (a failed model has none)."""
    dirs = ctx.tables["directions"]
    models = list(ctx.summary["model"]) if ctx.summary is not None and not ctx.summary.empty else []
    with_dirs = [m for m in models if not dirs.empty and (dirs["model"] == m).any()]
    lines = [f"## {TITLE}", "", *directions_diagnostics(dirs), ""]
    if with_dirs:
        lines += [*ctx.figure("separation.png", plot_separation(dirs, with_dirs)),
                  *ctx.figure("cosines.png", plot_cosines(dirs, with_dirs))]
    return lines


def headline(row, rule=None) -> str | None:
    """The model's headline sentence on its directions: where separation peaks (None without directions)."""
    if not has(row, "separation"):
        return None
    return f"Separation peaks at layer {num(row['best_layer'], '{:.0f}')} (Cohen's d {num(row['separation'])})."


READER = Reader(summary=summary, display=display, report=report, order=10, title=TITLE, tables=("directions",),
                headline=headline)
