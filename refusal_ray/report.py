"""Figures (PNG) and a Markdown report from a store."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from refusal_ray.stages.directions import cosine_matrix  # noqa: E402
from refusal_ray.store import Store  # noqa: E402
from refusal_ray.summary import pooled_arms, render, write_summary  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _grid(n: int):
    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def plot_steering_curves(arms: pd.DataFrame, summary: pd.DataFrame, path: Path) -> None:
    """Refusal rate vs addition coefficient at each model's best layer, with intervals and control."""
    fig, axes = _grid(len(summary))
    for ax, (_, s) in zip(axes, summary.iterrows()):
        a = arms[(arms["model"] == s["model"])]
        base = a[a["mode"] == "baseline"]
        for pset, color in (("harmful", "tab:red"), ("harmless", "tab:blue")):
            for control, style in ((False, "-"), (True, ":")):
                c = a[(a["mode"] == "addition") & (a["layer"] == s.get("best_layer", -1)) &
                      (a["control"].astype(bool) == control) & (a["prompt_set"] == pset)]
                b = base[base["prompt_set"] == pset]
                c = pd.concat([c, b.assign(coefficient=0.0)]).sort_values("coefficient")
                if c.empty:
                    continue
                err = [c["rate"] - c["ci_low"], c["ci_high"] - c["rate"]]
                ax.errorbar(c["coefficient"], c["rate"], yerr=err, color=color, linestyle=style, marker="o",
                            ms=3, capsize=2, label=f"{pset}{' (random control)' if control else ''}")
        ax.set_title(f"{s['model']} (layer {s.get('best_layer', '?')})")
        ax.set_xlabel("addition coefficient c")
        ax.set_ylabel("refusal rate (95% Wilson)")
        ax.set_ylim(-0.05, 1.05)
    axes[0].legend(fontsize=7)
    _save(fig, path)


def plot_separation(dirs: pd.DataFrame, models: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in models:
        d = dirs[(dirs["model"] == m) & (dirs["site"] == "resid_pre")]
        g = d.groupby("layer")["separation"].agg(["mean", "min", "max"])
        x = g.index / max(1, g.index.max())
        ax.plot(x, g["mean"], marker="o", label=m)
        ax.fill_between(x, g["min"], g["max"], alpha=0.2)
    ax.set_xlabel("relative layer depth")
    ax.set_ylabel("separation (Cohen's d, val)")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_cosines(dirs: pd.DataFrame, models: list[str], path: Path) -> None:
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
    _save(fig, path)


def plot_scale_trend(summary: pd.DataFrame, path: Path) -> None:
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
    _save(fig, path)


def write_report(out_dir) -> Path:
    """Write summary files, figures/*.png and report.md; returns the report path."""
    out = Path(out_dir)
    store = Store(out)
    summary = write_summary(out)
    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    dirs, steering = store.read("directions"), store.read("steering")
    models = list(summary["model"]) if not summary.empty else []
    made = []
    if not steering.empty and "best_layer" in summary.columns:
        plot_steering_curves(pooled_arms(steering), summary.dropna(subset=["best_layer"]), figs / "steering.png")
        made.append("steering.png")
    with_dirs = [m for m in models if not dirs.empty and (dirs["model"] == m).any()]  # failed models have none
    if with_dirs:
        plot_separation(dirs, with_dirs, figs / "separation.png")
        plot_cosines(dirs, with_dirs, figs / "cosines.png")
        made += ["separation.png", "cosines.png"]
    if not summary.empty and "separation" in summary.columns:
        plot_scale_trend(summary, figs / "scale_trend.png")
        made.append("scale_trend.png")
    manifest = store.read_json("manifest.json") or {}
    lines = [f"# refusal-ray report: {manifest.get('sweep', out.name)}", "",
             f"Decision rule hash `{manifest.get('rule_hash')}`, spec hash `{manifest.get('spec_hash')}`, "
             f"code `{manifest.get('git_sha')}`.", "", "```", render(summary), "```", ""]
    lines += [f"![{f}](figures/{f})" for f in made]
    path = out / "report.md"
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path
