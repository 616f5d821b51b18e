"""Stage `scrub`, the read side (pandas / numpy / matplotlib, no torch): scrubbing verdicts pooled
over seeds, the summary's per-hypothesis columns and the report's section with its figure.

Faithfulness = exp(-mean KL) over every example of every seed (KL(full || scrubbed) per example,
`run.summarize_kl`), with the verdict against the stage's threshold: FAITHFUL at or above it.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from refusal_ray.core.render import Column, not_run, plt, png
from refusal_ray.stages.base import Reader

TITLE = "Causal scrubbing (resample ablation of each hypothesis' complement)"
SCRUBBING = "causal scrubbing per hypothesis (not part of the verdicts)"   # its compact table
VERDICT_COLUMNS = ["model", "hypothesis", "protected", "seeds", "examples", "mean_kl", "faithfulness", "max_kl",
                   "corrupted_faithfulness", "threshold", "verdict"]


def scrub_verdicts(scrubbing: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, hypothesis): examples over all seeds, faithfulness, max KL, verdict."""
    cols = VERDICT_COLUMNS
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


def scrub_columns(model: str, verdicts: pd.DataFrame) -> dict:
    """Summary-table columns of one model from `scrub_verdicts`' table: `faithfulness[<hypothesis>]` and
    `verdict[<hypothesis>]` per hypothesis (in the table's order); {} without scrubbing rows."""
    out: dict = {}
    for _, v in verdicts[verdicts["model"] == model].iterrows():
        out[f"faithfulness[{v['hypothesis']}]"] = v["faithfulness"]
        out[f"verdict[{v['hypothesis']}]"] = v["verdict"]
    return out


# -- report figure -------------------------------------------------------------------------------
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
    return png(fig)


# -- the reader ----------------------------------------------------------------------------------
def _verdicts(ctx) -> pd.DataFrame:
    return scrub_verdicts(ctx.tables["scrubbing"])


def _summary(ctx, model: str, row: dict) -> dict:
    return scrub_columns(model, ctx.provided("scrub_verdicts"))


def _display() -> list[Column]:
    """The per-hypothesis columns, as patterns (`[*]`: every hypothesis the summary has, in its column order)."""
    return [Column("faithfulness[*]", "faith[*]", "{:.2f}", SCRUBBING,
                   legend="exp(-mean KL(full || scrubbed)) of the hypothesis, over every example of every seed"),
            Column("verdict[*]", "verdict[*]", "{}", SCRUBBING,
                   legend="FAITHFUL when its faithfulness reaches the stage's threshold")]


def _report(ctx) -> list[str]:
    """The section: the verdicts table and the faithfulness bars (`scrubbing.png`), or why none."""
    lines = [f"## {TITLE}", ""]
    verdicts = ctx.provided("scrub_verdicts")
    if verdicts.empty:
        return lines + not_run("scrub", ctx.stages)
    return lines + ["```", verdicts.to_string(index=False, float_format=lambda x: f"{x:.3f}"), "```", "",
                    *ctx.figure("scrubbing.png", plot_faithfulness(verdicts))]


READER = Reader(summary=_summary, display=_display, report=_report, order=70, title=TITLE, tables=("scrubbing",),
                provides={"scrub_verdicts": _verdicts})
