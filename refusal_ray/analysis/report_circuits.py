"""Figures and tables of the circuit stages for the report: recovery maps and scrubbing verdicts."""

from __future__ import annotations

import numpy as np
import pandas as pd

from refusal_ray.analysis.figures import _png, plt

KIND_ORDER = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"]


def plot_recovery(sites: pd.DataFrame, models: list[str]) -> bytes:
    """Per model: mean recovery by (site kind x layer), and by (head x layer) for z."""
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 2.8 * len(models)), squeeze=False)
    for (ax_sites, ax_heads), model in zip(axes, models):
        s = sites[sites["model"] == model]
        for ax, part, rows_key in ((ax_sites, s[s["head"].isna()], "kind"), (ax_heads, s[s["head"].notna()], "head")):
            if part.empty:
                ax.set_visible(False)
                continue
            grid = part.pivot_table(index=rows_key, columns="layer", values="recovery", aggfunc="mean")
            if rows_key == "kind":
                grid = grid.reindex([k for k in KIND_ORDER if k in grid.index])
            im = ax.imshow(grid.to_numpy(float), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
            ax.set_xticks(range(grid.shape[1]), grid.columns)
            ax.set_yticks(range(grid.shape[0]), [str(i) for i in grid.index])
            ax.set_xlabel("layer")
            ax.set_title(f"{model}: {'sites' if rows_key == 'kind' else 'heads (z)'}", fontsize=9)
            fig.colorbar(im, ax=ax, label="recovery")
    return _png(fig)


def plot_faithfulness(verdicts: pd.DataFrame) -> bytes:
    """Faithfulness per hypothesis and model, with each stage threshold as a line."""
    hyps = list(dict.fromkeys(verdicts["hypothesis"]))
    models = list(dict.fromkeys(verdicts["model"]))
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(hyps) * len(models) ** 0.5), 3.2))
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        v = verdicts[verdicts["model"] == model].set_index("hypothesis").reindex(hyps)
        ax.bar(np.arange(len(hyps)) + i * width, v["faithfulness"], width, label=model)
    ax.axhline(float(verdicts["threshold"].iloc[0]), color="k", ls="--", lw=1, label="threshold")
    ax.set_xticks(np.arange(len(hyps)) + width * (len(models) - 1) / 2, hyps, rotation=20, fontsize=8)
    ax.set_ylabel("faithfulness exp(-mean KL)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    return _png(fig)


def top_sites_table(sites: pd.DataFrame, k: int = 8) -> list[str]:
    """Markdown: the k components with the highest mean recovery per model, with 95% intervals."""
    lines = ["| model | site | head | pairs | recovery | 95% CI | attribution |", "|---|---|---|---|---|---|---|"]
    comp = sites[sites["kind"].isin(["attn_out", "mlp_out", "z"])]
    for model, g in comp.groupby("model", sort=False):
        for _, r in g.head(k).iterrows():
            head = "" if pd.isna(r["head"]) else int(r["head"])
            lines.append(f"| {model} | {r['site']} | {head} | {r['pairs']} | {r['recovery']:.3f} | "
                         f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {r['attribution']:.3f} |")
    return lines
