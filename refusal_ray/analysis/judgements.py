"""Labels per judge and agreement between judges, from the store.

Every completion has the inline substring judge's label (`completions.refusal`, judge
"substring"); named judges add rows to `judgements`. `judge_labels` puts them in one long table;
`steering_under` recomputes the steering table's counts, rates and Wilson intervals from one
judge's labels (completions it could not label, malformed or failed, are left out of n and
counted in `unjudged`); `agreement` gives Cohen's kappa with its interval and the confusion
counts for every pair of judges on the completions both labelled.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd

from refusal_ray.judges.config import INLINE
from refusal_ray.stats import cohen_kappa, wilson

KEY = ["model", "cell_id", "prompt_set", "prompt_id"]
LABEL_COLUMNS = [*KEY, "seed", "judge", "refusal", "compliance", "coherence", "malformed", "error"]
AGREEMENT_COLUMNS = ["model", "judge_a", "judge_b", "n", "agree", "kappa", "kappa_ci_low", "kappa_ci_high",
                     "both_refuse", "a_only", "b_only", "neither"]


def judge_labels(completions: pd.DataFrame, judgements: pd.DataFrame) -> pd.DataFrame:
    """One row per (completion, judge): refusal as float (1, 0, or nan when unlabelled)."""
    frames = []
    if not completions.empty:
        c = completions[[*KEY, "seed", "refusal"]].copy()
        c["judge"], c["compliance"], c["coherence"], c["malformed"], c["error"] = INLINE, np.nan, np.nan, False, None
        frames.append(c)
    if not judgements.empty:
        frames.append(judgements[LABEL_COLUMNS].copy())
    if not frames:
        return pd.DataFrame(columns=LABEL_COLUMNS)
    df = pd.concat(frames, ignore_index=True)[LABEL_COLUMNS]
    df["prompt_id"] = df["prompt_id"].astype(str)
    df["refusal"] = pd.to_numeric(df["refusal"].map(lambda x: np.nan if x is None else float(x)), errors="coerce")
    return df


def judges_in(labels: pd.DataFrame) -> list[str]:
    """Judge names present, the inline one first."""
    names = sorted(set(labels["judge"])) if not labels.empty else []
    return sorted(names, key=lambda n: (n != INLINE, n))


def steering_under(steering: pd.DataFrame, completions: pd.DataFrame, labels: pd.DataFrame,
                   judge: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(steering rows with n, refusals, rate, ci from `judge`'s labels; that judge's labelled
    completions as a completions-like frame with `refusal`). Arms the judge labelled nothing of are
    dropped (their verdicts become INCOMPLETE); `unjudged` counts, per arm, the completions left out:
    malformed, failed, or never judged."""
    mine = labels[labels["judge"] == judge]
    if steering.empty or mine.empty:
        return steering.iloc[0:0], mine
    ok = mine[mine["refusal"].notna()]
    arm = ["model", "cell_id", "prompt_set"]
    g = ok.groupby(arm).agg(n=("refusal", "size"), refusals=("refusal", "sum"))
    total = completions.groupby(arm).size().rename("stored")
    g = g.join(total, how="outer").fillna({"n": 0, "refusals": 0, "stored": 0}).reset_index()
    g["unjudged"] = (g["stored"] - g["n"]).astype(int)
    out = steering.drop(columns=["n", "refusals", "rate", "ci_low", "ci_high"]).merge(
        g.drop(columns=["stored"]), on=arm)
    out = out[out["n"] > 0].copy()
    out["n"], out["refusals"] = out["n"].astype(int), out["refusals"].astype(int)
    out["rate"] = out["refusals"] / out["n"]
    ci = [wilson(k, n) for k, n in zip(out["refusals"], out["n"])]
    out["ci_low"], out["ci_high"] = [c[0] for c in ci], [c[1] for c in ci]
    return out.reset_index(drop=True), ok.assign(refusal=ok["refusal"].astype(bool))


def agreement(labels: pd.DataFrame) -> pd.DataFrame:
    """Cohen's kappa per model and pair of judges (and model "ALL"), on the completions both judges
    labelled (malformed and failed left out)."""
    rows = []
    names = judges_in(labels)
    if len(names) < 2:
        return pd.DataFrame(columns=AGREEMENT_COLUMNS)
    wide = labels.drop_duplicates([*KEY, "judge"]).set_index([*KEY, "judge"])["refusal"].unstack("judge")
    for model in [*sorted(set(labels["model"])), "ALL"]:
        sub = wide if model == "ALL" else wide.xs(model, level="model", drop_level=False)
        for a, b in combinations(names, 2):
            if a not in sub.columns or b not in sub.columns:
                continue
            k = cohen_kappa(sub[a].tolist(), sub[b].tolist())
            rows.append({"model": model, "judge_a": a, "judge_b": b, "n": k.n, "agree": k.agree, "kappa": k.kappa,
                         "kappa_ci_low": k.ci_low, "kappa_ci_high": k.ci_high, "both_refuse": k.both,
                         "a_only": k.a_only, "b_only": k.b_only, "neither": k.neither})
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)


def render_agreement(df: pd.DataFrame) -> str:
    """Agreement lines: 'model  a ~ b  kappa 0.62 [0.41, 0.83]  agree 0.85  n 64  (both 20, a only 3, ...)'."""
    if df.empty:
        return ""
    lines = ["judge agreement (Cohen's kappa, 95% interval; refusal labels, completions both judges labelled):"]
    for _, r in df.iterrows():
        kappa = "   nan" if np.isnan(r["kappa"]) else (
            f"{r['kappa']:+.2f} [{r['kappa_ci_low']:+.2f}, {r['kappa_ci_high']:+.2f}]")
        lines.append(f"  {r['model']:<12} {r['judge_a']} ~ {r['judge_b']}: kappa {kappa}  agree {r['agree']:.2f}  "
                     f"n {r['n']}  (both refuse {r['both_refuse']}, {r['judge_a']} only {r['a_only']}, "
                     f"{r['judge_b']} only {r['b_only']}, neither {r['neither']})")
    return "\n".join(lines)
