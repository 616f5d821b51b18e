"""Stage `patch`, the read side (pandas / numpy / matplotlib, no torch): recovery per site with
intervals, the attribution screen's agreement with exact patching, the summary's columns and the
report's section with its figure.

- Recovery per (model, site, head): mean over pairs (pooled over seeds) with a 95% Student-t
  interval over pairs (statsmodels `DescrStatsW.tconfint_mean`).
- Attribution agreement: Spearman rank correlation (scipy) between the mean attribution estimate
  and the mean exact recovery, over the sites measured both ways.
- Summary columns (`patch_columns`): the component (attention or MLP output, or a head) with the
  highest mean recovery, its interval, and the screen's rank correlation.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from refusal_ray.core.render import Column, has, not_run, num, plt, png
from refusal_ray.stages.base import Reader

SITE_KEYS = ["model", "site", "kind", "layer", "head"]
COMPONENTS = ("attn_out", "mlp_out", "z")   # what a component writes (not the residual stream)
KIND_ORDER = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"]
TITLE = "Activation patching: top components"
PATCHING = "activation patching (not part of the verdicts)"   # its compact table


def _tinterval(x: np.ndarray) -> tuple[float, float]:
    from statsmodels.stats.weightstats import DescrStatsW

    x = x[np.isfinite(x)]
    if len(x) < 2:
        return float("nan"), float("nan")
    if np.ptp(x) == 0:
        return float(x[0]), float(x[0])
    lo, hi = DescrStatsW(x).tconfint_mean(alpha=0.05)
    return float(lo), float(hi)


def site_recovery(patching: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, site, head): pairs, mean recovery with its 95% t interval over pairs,
    mean attribution estimate; sorted by model then mean recovery (descending)."""
    if patching.empty:
        return pd.DataFrame(columns=[*SITE_KEYS, "pairs", "recovery", "ci_low", "ci_high", "attribution"])
    df = patching.copy()
    df["head"] = df["head"].fillna(-1).astype(int)
    rows = []
    for key, g in df.groupby(SITE_KEYS, sort=False):
        rec = g["recovery"].to_numpy(dtype=float)
        att = g["attribution"].to_numpy(dtype=float)
        lo, hi = _tinterval(rec)
        rows.append({**dict(zip(SITE_KEYS, key)), "pairs": int(np.isfinite(rec).sum()),
                     "recovery": float(np.nanmean(rec)) if np.isfinite(rec).any() else float("nan"),
                     "ci_low": lo, "ci_high": hi,
                     "attribution": float(np.nanmean(att)) if np.isfinite(att).any() else float("nan")})
    out = pd.DataFrame(rows)
    out["head"] = out["head"].replace(-1, pd.NA).astype("Int64")
    return out.sort_values(["model", "recovery"], ascending=[True, False], kind="stable").reset_index(drop=True)


def attribution_agreement(sites: pd.DataFrame) -> float:
    """Spearman rank correlation of mean attribution vs mean exact recovery (NaN if < 3 sites)."""
    from scipy.stats import spearmanr

    both = sites[np.isfinite(sites["recovery"].astype(float)) & np.isfinite(sites["attribution"].astype(float))]
    if len(both) < 3:
        return float("nan")
    return float(spearmanr(both["attribution"], both["recovery"]).statistic)


def patch_columns(model: str, sites: pd.DataFrame) -> dict:
    """Summary-table columns of one model from `site_recovery`'s table: the component (attention or MLP
    output, or a head) with the highest mean recovery (`top_component`, `top_recovery`, its interval
    `top_ci_low` / `top_ci_high`) and the screen's rank correlation (`attribution_spearman`); {} when
    the model has no patching rows."""
    out: dict = {}
    s = sites[sites["model"] == model]
    comp = s[s["kind"].isin(COMPONENTS) & np.isfinite(s["recovery"].astype(float))]
    if not comp.empty:  # the residual stream at the last layer recovers everything by construction
        top = comp.iloc[0]
        out |= {"top_component": top["site"] + ("" if pd.isna(top["head"]) else f"[{int(top['head'])}]"),
                "top_recovery": float(top["recovery"]), "top_ci_low": float(top["ci_low"]),
                "top_ci_high": float(top["ci_high"])}
    if not s.empty:
        out["attribution_spearman"] = attribution_agreement(s)
    return out


# -- report figures and tables -------------------------------------------------------------------
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
    return png(fig)


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


def headline(row: pd.Series, rule: dict | None = None) -> str | None:
    """The model's headline sentence on patching (`row`: its summary row), or None without a top component."""
    if not has(row, "top_component"):
        return None
    return f"Top patched component {row['top_component']} (recovery {num(row.get('top_recovery'))})."


# -- the reader ----------------------------------------------------------------------------------
def _sites(ctx) -> pd.DataFrame:
    return site_recovery(ctx.tables["patching"])


def _summary(ctx, model: str, row: dict) -> dict:
    return patch_columns(model, ctx.provided("site_recovery"))


def _display() -> list[Column]:
    """The top component, its recovery and the screen's rank correlation, in the compact layout's patching table."""
    return [Column("top_component", "top component", "{}", PATCHING,
                   legend="the component (attention or MLP output, or a head) with the highest mean recovery"),
            Column("top_recovery", "recovery", "{:.2f}", PATCHING,
                   legend="its mean recovery over pairs (pooled over seeds) under exact activation patching"),
            Column("attribution_spearman", "AtP rho", "{:.2f}", PATCHING, "attribution rho",
                   legend="Spearman rank correlation of the attribution-patching screen with the exact recovery")]


def _report(ctx) -> list[str]:
    """The section: the top components' table and the recovery maps (`patching.png`), or why none."""
    lines = [f"## {TITLE}", ""]
    sites = ctx.provided("site_recovery")
    if sites.empty:
        return lines + not_run("patch", ctx.stages)
    models = list(ctx.summary["model"]) if ctx.summary is not None and not ctx.summary.empty else []
    figure = plot_recovery(sites, [m for m in models if (sites["model"] == m).any()])
    return lines + [*top_sites_table(sites), "", *ctx.figure("patching.png", figure)]


READER = Reader(summary=_summary, display=_display, report=_report, order=60, title=TITLE, tables=("patching",),
                provides={"site_recovery": _sites}, headline=headline)
