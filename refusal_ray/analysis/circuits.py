"""Summaries of the circuit stages: recovery per site with intervals, the attribution screen's
agreement with exact patching, and scrubbing verdicts pooled over seeds.

- Recovery per (model, site, head): mean over pairs (pooled over seeds) with a 95% Student-t
  interval over pairs (statsmodels `DescrStatsW.tconfint_mean`).
- Attribution agreement: Spearman rank correlation (scipy) between the mean attribution estimate
  and the mean exact recovery, over the sites measured both ways.
- Scrubbing: faithfulness = exp(-mean KL) over every example of every seed, with the verdict
  against the stage's threshold.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

SITE_KEYS = ["model", "site", "kind", "layer", "head"]
COMPONENTS = ("attn_out", "mlp_out", "z")   # what a component writes (not the residual stream)


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


def scrub_verdicts(scrubbing: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, hypothesis): examples over all seeds, faithfulness, max KL, verdict."""
    cols = ["model", "hypothesis", "protected", "seeds", "examples", "mean_kl", "faithfulness", "max_kl",
            "corrupted_faithfulness", "threshold", "verdict"]
    if scrubbing.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for (model, hyp), g in scrubbing.groupby(["model", "hypothesis"], sort=False):
        kl = np.concatenate([np.asarray(v, float) for v in g["kl_per_example"]])
        weights = g["n_examples"].to_numpy(float)
        mean_kl = float(kl.mean())
        threshold = float(g["threshold"].iloc[0])
        faith = float(np.exp(-mean_kl))
        rows.append({"model": model, "hypothesis": hyp, "protected": ", ".join(json.loads(g["protected"].iloc[0])),
                     "seeds": int(g["seed"].nunique()), "examples": len(kl), "mean_kl": mean_kl,
                     "faithfulness": faith, "max_kl": float(g["max_kl"].max()),
                     "corrupted_faithfulness": float(np.exp(-np.average(g["corrupted_kl"], weights=weights))),
                     "threshold": threshold, "verdict": "FAITHFUL" if faith >= threshold else "UNFAITHFUL"})
    return pd.DataFrame(rows, columns=cols)


def circuit_columns(model: str, sites: pd.DataFrame, verdicts: pd.DataFrame) -> dict:
    """Summary-table columns of one model: the component (attention or MLP output, or a head) with
    the highest mean recovery, its interval, the screen's
    rank correlation, and each hypothesis' faithfulness and verdict."""
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
    for _, v in verdicts[verdicts["model"] == model].iterrows():
        out[f"faithfulness[{v['hypothesis']}]"] = v["faithfulness"]
        out[f"verdict[{v['hypothesis']}]"] = v["verdict"]
    return out
