"""Stage `optimise`, the read side (pandas / numpy / matplotlib, no torch): its summary columns (per model:
the final loss of the largest set, time and peak memory), and its report section: the loss curves figure,
a table per (model, seed, dim) of losses, steps, why it stopped, seconds and peak memory, and the principal
angles between each optimised set and the stage-directions difference-of-means direction at its layer and
position (Bjorck & Golub 1973)."""

from __future__ import annotations

import io

import numpy as np

from refusal_ray.stages.base import Reader
from refusal_ray.stats import principal_angles


def _rows(ctx, model: str | None = None):
    df = ctx.tables["optimised"]
    if df is None or df.empty or "cell_id" not in df:
        return None
    cells = ctx.tables["cells"]
    if model is not None and not cells.empty and "model" in cells:
        ids = set(cells.loc[cells["model"] == model, "cell_id"])
        df = df[df["cell_id"].isin(ids)]
    return None if df.empty else df


def _model_of(ctx) -> dict:
    cells = ctx.tables["cells"]
    return {} if cells.empty or "model" not in cells else dict(zip(cells["cell_id"], cells["model"]))


def summary(ctx, model, row) -> dict:
    df = _rows(ctx, model)
    if df is None:
        return {}
    top = df[df["dim"] == df["dim"].max()]
    return {"optimise_dim": int(top["dim"].iloc[0]), "optimise_loss_initial": float(top["loss_initial"].mean()),
            "optimise_loss_final": float(top["loss_final"].mean()),
            "optimise_seconds": float(df.drop_duplicates("cell_id")["seconds"].sum()),
            "optimise_peak_mb": float(df["peak_memory_mb"].max())}


def display():
    # "{:.0f}", not "{:d}": a column with a skipped model (NaN) is float in the summary frame (2.0)
    return [("optimise_dim", "opt k", "{:.0f}"), ("optimise_loss_final", "opt loss", "{:.3g}"),
            ("optimise_seconds", "opt s", "{:.0f}"), ("optimise_peak_mb", "opt MB", "{:.0f}")]


def dim_angles(ctx, cell_rows) -> float | None:
    """The principal angle (degrees) between one set and the stage-directions DIM direction at its layer and
    position of the same model and seed; None without that direction."""
    dirs = ctx.tables["directions"]
    if dirs is None or dirs.empty:
        return None
    r0 = cell_rows.iloc[0]
    model = _model_of(ctx).get(r0["cell_id"])
    cells = ctx.tables["cells"]
    ids = set(cells.loc[(cells["model"] == model) & (cells["seed"] == r0["seed"]), "cell_id"]) if model else set()
    m = dirs[(dirs["cell_id"].isin(ids)) & (dirs["site"] == "resid_pre") & (dirs["layer"] == r0["layer"])
             & (dirs["position"] == r0["position"])]
    if m.empty:
        return None
    vecs = np.stack([np.asarray(v, np.float64) for v in cell_rows.sort_values("index")["vector"]])
    return float(principal_angles(vecs, np.asarray(m["vector"].iloc[0], np.float64)[None])[0])


def _figure(df, models: dict) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for cid, g in df.groupby("cell_id", sort=False):
        r = g.iloc[0]
        ax.plot(np.asarray(r["losses"], float), label=f"{models.get(cid, '?')} s{r['seed']} k={r['dim']}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("symlog")
    ax.legend(fontsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def report(ctx) -> list[str]:
    from refusal_ray.core.render import not_run

    lines = ["## Optimised directions", ""]
    df = _rows(ctx)
    if df is None:
        return lines + not_run("optimise", ctx.stages)
    models = _model_of(ctx)
    lines += ["Gradient-optimised sets (RDO-style, Wollschlaeger et al. 2025; first-token refusal-score losses, "
              "see refusal_ray/stages/optimise/run.py for where this differs from the paper). Angle: the "
              "principal angle between the set and the difference-of-means direction at its layer.", ""]
    lines += ctx.figure("optimise_losses.png", _figure(df, models))
    lines += ["| model | seed | k | kind | layer | loss initial | loss final | steps | stopped | seconds | peak MB "
              "| angle to DIM (deg) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cid, g in df.groupby("cell_id", sort=False):
        r = g.iloc[0]
        ang = dim_angles(ctx, g)
        lines.append(f"| {models.get(cid, '?')} | {r['seed']} | {r['dim']} | {r['kind']} | {r['layer']} | "
                     f"{r['loss_initial']:.4g} | {r['loss_final']:.4g} | {r['steps']} | {r['stopped']} | "
                     f"{r['seconds']:.1f} | {r['peak_memory_mb']:.0f} | {'-' if ang is None else f'{ang:.1f}'} |")
    return lines + [""]


READER = Reader(summary=summary, display=display, report=report, order=75, title="Optimised directions",
                tables=("optimised", "directions", "cells"))
