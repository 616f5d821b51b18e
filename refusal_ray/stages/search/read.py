"""Stage `search`, the read side (pandas / numpy / matplotlib, no torch): the studies' counts, the Pareto front
beside its held-out re-run (so the selection effect is visible: val objective and test result side by side), and
the Pareto-front figure (`search_pareto.png`).

The issue-21 criterion per Pareto trial (`meets_criterion`, computed by the study): held-out harmful refusal
<= 0.1, its norm-matched random control's harmful refusal within 0.1 of the baseline's, and held-out first-token KL
no higher than plain ablation (Arditi's, every layer and site) of the same direction.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from refusal_ray.core.render import Column, not_run, plt, png
from refusal_ray.stages.base import Reader

TITLE = "Search (Optuna: refusal vs first-token KL, Pareto front and held-out re-run)"
SEARCH = "search studies (val objectives; held-out re-run of the Pareto trials)"


def max_concurrent(intervals) -> int:
    """The most intervals [start, end) open at one instant (an end at the same instant as a start closes first)."""
    intervals = list(intervals)
    events = sorted([(float(s), 1) for s, _ in intervals] + [(float(e), -1) for _, e in intervals],
                    key=lambda ev: (ev[0], ev[1]))
    best = cur = 0
    for _, step in events:
        cur += step
        best = max(best, cur)
    return best


def studies(trials: pd.DataFrame, pareto: pd.DataFrame) -> pd.DataFrame:
    """One row per study: model, seed, trials (finished), complete, pruned, failed, pareto, max_concurrent (worker
    calls overlapping in time), trials_per_call, workers, best held-out harmful refusal and the criterion."""
    cols = ["model", "seed", "trials", "complete", "pruned", "failed", "pareto", "max_concurrent", "workers",
            "best_heldout_refusal", "meets_criterion"]
    if trials.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for (model, seed), g in trials.groupby(["model", "seed"], sort=True):
        calls = g.dropna(subset=["t_start"]).drop_duplicates(["worker", "t_start"])
        p = pareto[(pareto["model"] == model) & (pareto["seed"] == seed)] if not pareto.empty else pareto
        held = p[p["held_out"]] if not p.empty else p
        rows.append({"model": model, "seed": int(seed), "trials": int(g["state"].isin(["complete", "pruned"]).sum()),
                     "complete": int((g["state"] == "complete").sum()), "pruned": int((g["state"] == "pruned").sum()),
                     "failed": int((g["state"] == "failed").sum()), "pareto": len(p),
                     "max_concurrent": max_concurrent(zip(calls["t_start"], calls["t_end"])),
                     "workers": int(g["worker"].nunique()),
                     "best_heldout_refusal": float(held["trial_harmful_rate"].min()) if len(held) else None,
                     "meets_criterion": bool(held["meets_criterion"].fillna(False).any()) if len(held) else False})
    return pd.DataFrame(rows, columns=cols)


def plot_pareto(trials: pd.DataFrame, pareto: pd.DataFrame) -> bytes:
    """Per study: every trial's val (KL, refusal) in grey, the Pareto front in red (a step line), each held-out
    trial's test (KL, refusal) as a black cross joined to its val point, and plain ablation's test point."""
    keys = sorted(set(zip(trials["model"], trials["seed"])))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, (model, seed) in zip(axes[0], keys):
        t = trials[(trials["model"] == model) & (trials["seed"] == seed) & (trials["state"] == "complete")]
        ax.scatter(t["kl"], t["refusal_rate"], s=10, c="0.6", label="trials (val)")
        p = pareto[(pareto["model"] == model) & (pareto["seed"] == seed)].sort_values("val_kl")
        if len(p):
            ax.step(p["val_kl"], p["val_refusal"], where="post", c="tab:red", lw=1)
            ax.scatter(p["val_kl"], p["val_refusal"], s=18, c="tab:red", label="Pareto front (val)")
            h = p[p["held_out"]]
            if len(h):
                for _, r in h.iterrows():
                    ax.plot([r["val_kl"], r["trial_kl"]], [r["val_refusal"], r["trial_harmful_rate"]], c="k",
                            lw=0.5, alpha=0.5)
                ax.scatter(h["trial_kl"], h["trial_harmful_rate"], marker="x", c="k", label="held-out (test)")
                ax.scatter(h["plain_kl"], h["plain_harmful_rate"], marker="^", c="tab:blue", s=14,
                           label="plain ablation (test)")
                ax.axhline(float(h["baseline_harmful_rate"].iloc[0]), c="k", ls=":", lw=1, label="baseline (test)")
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_xlim(left=0)
        ax.set_xlabel("first-token KL on harmless (nats)")
        ax.set_ylabel("harmful refusal rate")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{model} seed {seed}", fontsize=9)
        ax.legend(fontsize=6)
    return png(fig)


def _studies(ctx) -> pd.DataFrame:
    return studies(ctx.tables["trials"], ctx.tables["pareto"])


def _summary(ctx, model: str, row: dict) -> dict:
    s = ctx.provided("search_studies")
    s = s[s["model"] == model]
    if s.empty:
        return {}
    best = s["best_heldout_refusal"].dropna()
    return {"search_trials": int(s["trials"].sum()), "search_pruned": int(s["pruned"].sum()),
            "search_pareto": int(s["pareto"].sum()),
            "search_heldout_refusal": float(best.min()) if len(best) else None,
            "search_criterion": bool(s["meets_criterion"].any())}


def _display() -> list[Column]:
    return [Column("search_trials", "trials", "{}", SEARCH, legend="finished trials (complete or pruned), all seeds"),
            Column("search_pruned", "pruned", "{}", SEARCH, legend="trials whose val KL exceeded kl_bound"),
            Column("search_pareto", "front", "{}", SEARCH, legend="trials on the val Pareto front"),
            Column("search_heldout_refusal", "test_ref", "{:.2f}", SEARCH,
                   legend="lowest held-out harmful refusal among the re-run Pareto trials"),
            Column("search_criterion", "crit", "{}", SEARCH,
                   legend="a Pareto trial meets issue 21's criterion (test refusal <= 0.1, control within 0.1 of "
                          "baseline, KL <= plain ablation's)")]


PARETO_COLUMNS = [("number", "trial"), ("val_refusal", "val_ref"), ("val_kl", "val_kl"),
                  ("trial_harmful_rate", "test_ref"), ("trial_harmful_ci_low", "lo"), ("trial_harmful_ci_high", "hi"),
                  ("control_harmful_rate", "ctrl_ref"), ("baseline_harmful_rate", "base_ref"),
                  ("plain_harmful_rate", "plain_ref"), ("trial_kl", "test_kl"), ("plain_kl", "plain_kl"),
                  ("trial_harmless_rate", "test_harmless_ref"), ("meets_criterion", "criterion")]


def _report(ctx) -> list[str]:
    lines = [f"## {TITLE}", ""]
    s = ctx.provided("search_studies")
    if s.empty:
        return lines + not_run("search", ctx.stages)
    lines += ["Studies (trials finished, pruned by kl_bound, failed; the most worker calls overlapping in time):", "",
              "```", s.to_string(index=False, float_format=lambda x: f"{x:.3f}"), "```", ""]
    pareto = ctx.tables["pareto"]
    for (model, seed), p in pareto.groupby(["model", "seed"], sort=True):
        have = [(c, h) for c, h in PARETO_COLUMNS if c in p.columns]
        view = p[[c for c, _ in have]].rename(columns=dict(have))
        lines += [f"Pareto front of {model} seed {seed}: val objectives (the search's) beside the test split's re-run "
                  f"(Wilson 95% interval lo..hi; control: norm-matched random directions, same weights):", "",
                  "```", view.to_string(index=False, float_format=lambda x: f"{x:.3f}"), "```", ""]
    return lines + ctx.figure("search_pareto.png", plot_pareto(ctx.tables["trials"], pareto))


READER = Reader(summary=_summary, display=_display, report=_report, order=80, title=TITLE,
                tables=("trials", "pareto"), provides={"search_studies": _studies})
