"""Stage `steer`, read side (pandas / numpy / matplotlib, no torch): the steering arms pooled over seeds
(`pooled_arms`, provided to the decision rule and the other readers as `ctx.arms`), each operator's summary
columns, the steering section (the rule's arms beside their random controls, the addition curves) and one
section per operator with its own.

Rates pooled over seeds count each distinct test prompt once (`pooled_arms`, with
`refusal_ray.stats.prompt_pooled_rate`): per prompt, the mean refusal label over the seeds that judged it;
the rate is the mean over prompts, and the Wilson interval takes n = distinct prompts. Per-seed rates and
intervals are the steering table's own rows (`per_seed_arms`). The decision rule that reads these arms
(control_margin, steering_labels) is `refusal_ray.analysis.summary`'s, pre-registered.
"""

from __future__ import annotations

from collections.abc import Iterable

import matplotlib
import numpy as np
import pandas as pd

from refusal_ray.core.render import Column, column, integral, markdown_table, not_run, plt, png
from refusal_ray.stages.base import Reader
from refusal_ray.stats import prompt_pooled_rate, wilson

TITLE = "Steering: activation addition and directional ablation, with random controls"


# the direction (layer, position) is part of an arm: pooled rows never mix arms that used different
# directions (ablation of stage select's choice may differ between seeds); -1 where none. Each operator adds
# its own keys (`Operator.arm_keys`, e.g. subspace ablation's stacked directions "L7,L8/p-1"; "" on other arms)
BASE_ARM_KEYS = ["mode", "layer", "coefficient", "alpha", "control", "control_draw", "direction_layer",
                 "direction_position"]


def arm_keys() -> list[str]:
    """The pooled arms' keys: BASE_ARM_KEYS, the registered operators' `arm_keys` (OPS order), prompt_set."""
    from refusal_ray.ops import OPS

    extra = [c for op in OPS for c in op.arm_keys]
    return [*BASE_ARM_KEYS, *dict.fromkeys(extra), "prompt_set"]


def pooled_columns() -> list[str]:
    return ["model", *arm_keys(), "n", "refusals", "seeds", "n_prompts", "k_prompts", "rate", "ci_low", "ci_high",
            "ci_basis"]


ARM_KEYS = arm_keys()               # as of import (the built-in operators); functions call arm_keys()
POOLED_COLUMNS = pooled_columns()


def _arms(steering: pd.DataFrame) -> pd.DataFrame:
    """Steering rows with groupable arm keys: layer -1 where none (baseline, ablation), bool control,
    `control_draw` (0 where absent), and each operator's `arm_keys` (`Operator.arm_key_values`: e.g. `subspace`,
    the stacked directions of a subspace arm, "" on other arms)."""
    df = steering.copy()
    for col in ("layer", "direction_layer", "direction_position"):
        df[col] = (df[col] if col in df.columns else pd.Series(-1, index=df.index)).fillna(-1).astype(int)
    df["control"] = df["control"].astype(bool)
    # `controls: K`: draws 1..K-1 carry their index; draw 0 (and every K = 1 store) has no column
    draw = df["control_draw"] if "control_draw" in df.columns else pd.Series(0, index=df.index)
    df["control_draw"] = draw.fillna(0).astype(int)
    from refusal_ray.ops import OPS

    for op in OPS:
        for col, values in op.arm_key_values(df).items():
            df[col] = values
    return df


def per_seed_arms(steering: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, seed, arm, prompt set): that seed's n, refusals, rate and Wilson interval
    (the steering table's own rows, with the arm keys of `pooled_arms`)."""
    if steering.empty:
        return pd.DataFrame(columns=["model", "seed", *arm_keys(), "n", "refusals", "rate", "ci_low", "ci_high"])
    df = _arms(steering)
    cols = ["model", "seed", *arm_keys(), "n", "refusals", "rate", "ci_low", "ci_high"]
    return df[cols].sort_values(["model", *arm_keys(), "seed"], kind="stable").reset_index(drop=True)


def pooled_arms(steering: pd.DataFrame, completions: pd.DataFrame | None = None) -> pd.DataFrame:
    """Arms pooled over seeds: one row per (model, arm, prompt set) with rate and 95% interval.

    With the completions table (per-prompt labels, joined to their arm through model, cell_id
    and prompt_set), each distinct prompt counts once: `prompt_pooled_rate` (ci_basis
    "prompts"). An arm without completion rows falls back to the steering counts, assuming
    every seed judged the same prompts (n = the largest seed's n, k = pooled rate x n; ci_basis
    "largest-seed"): conservative, never narrower than one seed's interval. n, refusals and seeds
    are the summed steering counts either way; n_prompts and k_prompts are the interval's n and k.
    """
    if steering.empty:
        return pd.DataFrame(columns=pooled_columns())
    df = _arms(steering)
    keys = ["model", *arm_keys()]
    g = df.groupby(keys, dropna=False).agg(n=("n", "sum"), refusals=("refusals", "sum"), seeds=("seed", "nunique"),
                                           n_max=("n", "max")).reset_index()
    rows = []
    if completions is not None and not completions.empty:
        labels = completions[["model", "cell_id", "prompt_set", "prompt_id", "refusal"]].merge(
            df[["model", "cell_id", *arm_keys()]], on=["model", "cell_id", "prompt_set"])
        for key, grp in labels.groupby(keys, dropna=False, sort=False):
            r = prompt_pooled_rate(grp["prompt_id"], grp["refusal"].astype(float))
            rows.append(dict(zip(keys, key)) | {"n_prompts": r.n_prompts, "k_prompts": r.k_prompts, "rate": r.rate,
                                                 "ci_low": r.ci_low, "ci_high": r.ci_high})
    if rows:
        g = g.merge(pd.DataFrame(rows), on=keys, how="left")
    else:
        g[["n_prompts", "k_prompts", "rate", "ci_low", "ci_high"]] = np.nan
    g["ci_basis"] = np.where(g["n_prompts"].notna(), "prompts", "largest-seed")
    missing = g["n_prompts"].isna()
    if missing.any():
        rate = g.loc[missing, "refusals"] / g.loc[missing, "n"]
        ci = [wilson(r * m, m) for r, m in zip(rate, g.loc[missing, "n_max"])]
        g.loc[missing, "rate"] = rate
        g.loc[missing, "n_prompts"] = g.loc[missing, "n_max"]
        g.loc[missing, "k_prompts"] = rate * g.loc[missing, "n_max"]
        g.loc[missing, "ci_low"], g.loc[missing, "ci_high"] = [c[0] for c in ci], [c[1] for c in ci]
    g["n_prompts"] = g["n_prompts"].astype(int)
    g[["k_prompts", "rate", "ci_low", "ci_high"]] = g[["k_prompts", "rate", "ci_low", "ci_high"]].astype(float)
    return g[pooled_columns()]


def nearest_steered(best: int, layers: Iterable[int]) -> int | None:
    """`best` if it is among the steered `layers`, else the nearest of them (ties: the lower); None if none."""
    layers = sorted({int(x) for x in layers})
    return min(layers, key=lambda x: (abs(x - best), x)) if layers else None


def _direction_name(layer: int, position: int) -> str:
    return f"L{layer}/p{position}"


def ablation_direction(a: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """Keep the ablation arms of one direction: the (layer, position) most seeds ablated (ties: the
    lower layer, then the later position). Returns (arms without the other directions' ablation rows, "L3/p-2 (2 of 2 seeds)")."""
    abl = a[(a["mode"] == "ablation") & ~a["control"].astype(bool)]
    if abl.empty:
        return a, None
    seeds = abl.groupby(["direction_layer", "direction_position"])["seeds"].max().reset_index()
    seeds = seeds.sort_values(["seeds", "direction_layer", "direction_position"], ascending=[False, True, False])
    layer, position, k = (int(x) for x in seeds.iloc[0][["direction_layer", "direction_position", "seeds"]])
    total = int(a[a["mode"] == "baseline"]["seeds"].max()) if (a["mode"] == "baseline").any() else k
    keep = (a["mode"] != "ablation") | ((a["direction_layer"] == layer) & (a["direction_position"] == position))
    return a[keep], f"{_direction_name(layer, position)} ({k} of {total} seeds)"


def steering_arms_table(arms: pd.DataFrame, summary: pd.DataFrame) -> list[str]:
    """Pooled rates of the steering arms (baseline and each operator's `report_mask`: addition at the rule's
    layer, every ablation arm, ...) beside their random controls, per model and prompt set."""
    from refusal_ray.ops import OPS

    if arms.empty:
        return ["(no steering arms stored)"]
    rows = []
    for _, s in summary.iterrows():
        a = arms[arms["model"] == s["model"]]
        layer = s.get("addition_layer")
        keep = a["mode"] == "baseline"
        for op in OPS:
            keep |= op.report_mask(a, s)
        rows.append(a[keep])
    if not rows:
        return ["(no steering arms stored)"]
    t = pd.concat(rows)
    draw = t["control_draw"] if "control_draw" in t.columns else pd.Series(0, index=t.index)
    ctl_name = [f" (control {int(d)})" if d else " (control)" for d in draw.fillna(0)]   # controls: K draws
    t = t.assign(arm=np.where(t["control"].astype(bool), t["mode"] + pd.Series(ctl_name, index=t.index), t["mode"]),
                 layer=pd.Series([int(x) if x >= 0 else None for x in t["layer"]], index=t.index, dtype=object),
                 direction=[_direction_text(r) for _, r in t.iterrows()])
    cols = [c for c in ["model", "arm", "layer", "coefficient", "alpha", "direction", "prompt_set", "rate", "ci_low",
                        "ci_high", "n_prompts"] if c in t.columns]
    return markdown_table(t[cols].sort_values(["model", "prompt_set", "arm"], kind="stable"))


def _direction_text(r: pd.Series) -> str:
    """An arm's direction in the steering table: its operator's `direction_key` column when it has one (a
    subspace's stacked directions), else L<layer>/p<position> ('' where none)."""
    from refusal_ray.ops.base import owner

    op = owner(r["mode"])
    if op is not None and op.direction_key and op.direction_key in r.index:
        return r[op.direction_key]
    return f"L{int(r['direction_layer'])}/p{int(r['direction_position'])}" if r["direction_layer"] >= 0 else ""


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
    return png(steering_figure(arms, summary)[0])


# -- the reader -------------------------------------------------------------------------------------------
def arms(ctx) -> pd.DataFrame:
    """`pooled_arms` of the steering rows under `ctx.judge`'s labels (`ctx.judged`), computed once per context
    (`ctx.arms`)."""
    steering = ctx.judged("steering")
    return pooled_arms(steering, ctx.judged("completions") if not steering.empty else None)


def operator_columns(a: pd.DataFrame, rule: dict, steer_spec: dict) -> dict:
    """Each operator's own summary columns (`Operator.summary_columns`, report order) from one model's pooled
    arms `a` (the rule's single ablation direction: `ablation_direction`), for an operator whose block the
    spec sets or whose arms are stored; the rule's arms give none (their columns are the rule's)."""
    from refusal_ray.ops import OPS

    out: dict = {}
    for op in OPS.by_report_order():
        block = steer_spec.get(op.name)
        if block is not None or (a["mode"] == op.name).any():
            out |= op.summary_columns(a, rule, block)
    return out


def summary(ctx, model: str, row: dict) -> dict:
    """The operators' columns of one model (`operator_columns`); {} without a steer block or a best layer."""
    steer_spec = ctx.stages.get("steer")
    if "best_layer" not in row or steer_spec is None:
        return {}
    pooled = ctx.arms
    a, _ = ablation_direction(pooled[pooled["model"] == model] if not pooled.empty else pooled)
    return operator_columns(a, ctx.rule, steer_spec)


OPERATORS = "other operators (not part of the verdicts)"   # the compact layout's table of their columns
_EFFECTS = {   # column suffix -> (label suffix, legend); `{op}` the operator's label
    "_suppression_vs_control": ("drop vs control", "{op} minus its random control: the control's harmful refusal "
                                                   "minus its own"),
    "_suppression": ("drop", "baseline harmful refusal minus harmful refusal under {op}"),
    "_induction_vs_control": ("rise vs control", "{op} minus its random control: its harmless refusal minus the "
                                                 "control's"),
    "_induction": ("rise", "harmless refusal under {op} minus baseline harmless refusal"),
}


def operator_column(op, entry) -> Column:
    """An operator's `display` entry (column, header, fmt) as a Column of the OPERATORS table, spelled out
    from its column name: `<op>_suppression` -> "<op> drop" (and "drop vs control", "rise", "rise vs
    control"); the operator's own arm name (`subspace`) -> the arm the columns beside it read."""
    key, header, fmt = entry
    what = op.label or op.name
    if key == op.name:
        return column(entry, OPERATORS).replace(label=op.name, legend=f"the {what} arm the columns beside it read, "
                                                                      f"and how many seeds ran it")
    for suffix, (label, legend) in _EFFECTS.items():
        if key == op.name + suffix:
            return column(entry, OPERATORS).replace(label=f"{op.name} {label}", legend=legend.format(op=what))
    return column(entry, OPERATORS)


def display() -> list[Column]:
    """Each operator's `display` columns, in report order (`operator_column`)."""
    from refusal_ray.ops import OPS

    return [operator_column(op, c) for op in OPS.by_report_order() for c in op.display]


def operator_sections(pooled: pd.DataFrame, stages: dict) -> list[str]:
    """One section per operator with its own (`report_section`; the rule's arms are in the steering table):
    a table of its pooled arms (`report_columns`), or why it did not run. A newer operator that this sweep
    did not use (not `dump_when_none`, no block) gets none."""
    from refusal_ray.ops import OPS

    lines: list[str] = []
    for op in OPS.by_report_order():
        if not op.report_section:
            continue
        ran = not pooled.empty and (pooled["mode"] == op.name).any()
        if not ran and not op.dump_when_none and (stages.get("steer") or {}).get(op.name) is None:
            continue
        lines += [f"## {op.section_title or op.label.capitalize()}", ""]
        lines += ([*markdown_table(integral(pooled[pooled["mode"] == op.name][[c for c in op.report_columns
                                                                                if c in pooled.columns]])), ""]
                  if ran else
                  [f"Not run in this sweep (no `stages.steer.{op.name}` block)." if "steer" in stages else
                   "Not run in this sweep (no `stages.steer` block).", ""])
    return lines


def report(ctx) -> list[str]:
    """The steering section (the arms table beside their controls and the addition-curve figure, or why
    nothing is stored), then each operator's own section (`operator_sections`). Rates here are the inline
    substring judge's (the stored steering rows), whichever judge the verdicts read."""
    from refusal_ray.judges.config import INLINE

    steering, table, stages = ctx.tables["steering"], ctx.summary, ctx.stages
    if steering.empty:
        pooled = pd.DataFrame()
    else:
        pooled = ctx.arms if ctx.judge == INLINE else pooled_arms(steering, ctx.tables["completions"])
    lines = [f"## {TITLE}", ""]
    if steering.empty:
        lines += not_run("steer", stages)
    else:
        fig = []
        if "best_layer" in table.columns and (steering["mode"] == "addition").any():
            fig = ctx.figure("steering.png", plot_steering_curves(pooled, table.dropna(subset=["best_layer"])))
        lines += [*steering_arms_table(pooled, table), "", *fig]
    return lines + operator_sections(pooled, stages)


def headline(row, rule: dict) -> str | None:
    """The model's headline sentences on steering: each operator's (`Operator.headline`), or None."""
    from refusal_ray.ops import OPS

    return " ".join(text for op in OPS.by_report_order() if (text := op.headline(row, rule))) or None


READER = Reader(summary=summary, display=display, report=report, order=30, title=TITLE,
                tables=("steering", "completions"), provides={"pooled_arms": arms}, headline=headline)
