"""Stage `capability`, read side (pandas / numpy / matplotlib, no torch): refusal change against capability
cost, from the `capability` table: the cost tables, the summary's cost columns, the report section and
figure, and the files `capability_cost.parquet` / `.csv` the summary writes.

The cost of an arm on a metric is its value minus the baseline arm's value for the same (model, seed,
metric), averaged over seeds (first_token_kl is already measured against the baseline: its value is
its cost). Refusal change is the same difference on the refusal rates of the test prompts.

Random controls with several draws (`controls: K`; a row's `control_draw`, absent on draw 0): a control
arm's `cost` is the mean over draws of each draw's cost (itself the mean over seeds); `draws` counts the
draws, `cost_sd` is their standard deviation (ddof 1; NaN for one draw) and `cost_q95` their 0.95
quantile (numpy's linear interpolation: with K <= 20 draws it lies between the two largest). One draw:
cost_q95 is that draw's cost.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from refusal_ray.core.render import Column, column, has, not_run, num, plt, png, text_table
from refusal_ray.stages.base import Reader
from refusal_ray.store import Store

TITLE = "Capability cost (CE loss, first-token KL, task exact match, lm-eval)"

ARM_COLUMNS = ["model", "arm", "control", "coefficient", "alpha", "direction"]
# metrics whose value is already relative to the baseline
RELATIVE = {"first_token_kl"}
QUANTILE = 0.95   # the controls' upper quantile (cost_q95; control_margin's `control_statistic: quantile`)


def arm_order() -> dict[str, int]:
    """Sort rank of each capability arm: baseline, the operators (OPS order), their weight arms."""
    from refusal_ray.ops import OPS

    return {arm: i for i, arm in enumerate(["baseline", *OPS.modes()])}


def _op_keys(df: pd.DataFrame) -> list[str]:
    """The operators' extra arm keys (`Operator.arm_keys`) that the capability rows carry."""
    from refusal_ray.ops import OPS

    return [c for op in OPS for c in op.arm_keys if c in df.columns and c not in ARM_COLUMNS]


SHORT = {"refusal_harmful": "d refusal harmful", "refusal_harmless": "d refusal harmless", "ce_loss": "d CE",
         "first_token_kl": "KL", "task_exact_match": "d task EM"}


def capability_cost(capability: pd.DataFrame, key: str | None = None) -> pd.DataFrame:
    """Long table: one row per (model, arm settings, metric) with `value` (mean over seeds), `baseline`
    (the baseline arm's mean over the same seeds), `cost` (mean over seeds of value - baseline;
    the value itself for first_token_kl; for control arms of several draws the mean over draws),
    `seeds`, and over the control draws `draws`, `cost_sd` and `cost_q95` (module docstring; draws 1,
    cost_sd NaN, cost_q95 = cost on one-draw and non-control arms). Empty in, empty out.

    key: the manifest's `capability_key`: only rows measured under the current settings count (a store
    rerun with another text set or generation length holds rows of both; each arm is paired with the
    baseline of its own settings in any case)."""
    if capability.empty:
        return pd.DataFrame(columns=[*ARM_COLUMNS, "metric", "value", "baseline", "cost", "seeds", "draws",
                                     "cost_sd", "cost_q95"])
    df = capability.copy()
    if "measure_key" not in df.columns:
        df["measure_key"] = ""
    df["measure_key"] = df["measure_key"].fillna("")
    if key is not None and (df["measure_key"] == key).any():
        df = df[df["measure_key"] == key]
    df["direction"] = df["direction"].fillna("-")
    base = (df[df["arm"] == "baseline"][["model", "seed", "metric", "measure_key", "value"]]
            .rename(columns={"value": "baseline"}))
    df = df.merge(base, on=["model", "seed", "metric", "measure_key"], how="left")
    df["cost"] = np.where(df["metric"].isin(RELATIVE), df["value"], df["value"] - df["baseline"])
    draw = df["control_draw"] if "control_draw" in df.columns else pd.Series(np.nan, index=df.index)
    df["control_draw"] = draw.fillna(0).astype(int)
    keys = [*ARM_COLUMNS, *_op_keys(df), "metric", "measure_key"]
    per_draw = (df.groupby([*keys, "control_draw"], dropna=False, sort=False)
                .agg(value=("value", "mean"), baseline=("baseline", "mean"), cost=("cost", "mean"),
                     seeds=("seed", "nunique")).reset_index())
    out = (per_draw.groupby(keys, dropna=False, sort=False)
           .agg(value=("value", "mean"), baseline=("baseline", "mean"), cost=("cost", "mean"),
                seeds=("seeds", "max"), draws=("control_draw", "nunique"),
                cost_sd=("cost", lambda c: float(np.std(c, ddof=1)) if len(c) > 1 else np.nan),
                cost_q95=("cost", lambda c: float(np.quantile(c, QUANTILE)))).reset_index())
    out["_order"] = out["arm"].map(arm_order())
    return (out.sort_values(["model", "_order", "control", "coefficient", "alpha"], kind="stable")
            .drop(columns="_order").reset_index(drop=True))


def cost_table(cost: pd.DataFrame) -> pd.DataFrame:
    """Wide table: one row per (model, arm settings), one column per metric's cost (refusal change,
    CE change, KL, task exact-match change, each lm-eval metric's change)."""
    if cost.empty:
        return pd.DataFrame()
    index = [*ARM_COLUMNS, *_op_keys(cost), *(["measure_key"] if "measure_key" in cost.columns else []), "metric"]
    wide = cost.set_index(index)["cost"].unstack("metric").reset_index()
    wide.columns.name = None
    wide["_order"] = wide["arm"].map(arm_order())
    return wide.sort_values(["model", "_order", "control"], kind="stable").drop(columns="_order").reset_index(drop=True)


def summary_columns(cost: pd.DataFrame, model: str, rule: dict | None = None) -> dict:
    """Per model, for the summary table: the CE change and first-token KL of each non-control arm
    (cost_ce[arm], cost_kl[arm]) and of its random control (cost_ce[arm-ctl], ...), at the setting the
    decision rule reads (its operator's `cost_setting`: control_margin's ablation_alpha for ablation-like
    arms, addition_coefficient for addition arms) when it was measured, else at the arm's first setting; `cost_setting[arm]` names it.
    A control of several draws adds its draws' spread and upper quantile: `cost_ce_sd[arm-ctl]`,
    `cost_ce_q95[arm-ctl]` (and _kl), and `control_draws[arm]`."""
    out: dict = {}
    mine = cost[cost["model"] == model] if not cost.empty else cost
    from refusal_ray.ops import OPS
    from refusal_ray.ops.base import owner

    for arm in OPS.modes():
        rows = mine[mine["arm"] == arm]
        if rows.empty:
            continue
        key, wanted = owner(arm).cost_setting(rule or {})
        setting = wanted if wanted is not None and (rows[key] == wanted).any() else rows[key].iloc[0]
        out[f"cost_setting[{arm}]"] = f"{'c' if key == 'coefficient' else key}={setting:g}"
        for control, suffix in ((False, ""), (True, "-ctl")):
            at = rows[(rows["control"] == control) & (rows[key] == setting)]
            for metric, name in (("ce_loss", "ce"), ("first_token_kl", "kl")):
                hit = at[at["metric"] == metric]
                if not hit.empty:
                    out[f"cost_{name}[{arm}{suffix}]"] = float(hit["cost"].iloc[0])
                    if control and "draws" in hit.columns and int(hit["draws"].iloc[0]) > 1:
                        out[f"control_draws[{arm}]"] = int(hit["draws"].iloc[0])
                        out[f"cost_{name}_sd[{arm}{suffix}]"] = float(hit["cost_sd"].iloc[0])
                        out[f"cost_{name}_q95[{arm}{suffix}]"] = float(hit["cost_q95"].iloc[0])
    return out


def read_cost(out_dir) -> pd.DataFrame:
    """The long capability-cost table as `write_summary` last wrote it (empty without a capability stage)."""
    data = Store(out_dir).read_file("capability_cost.parquet")
    return pd.read_parquet(io.BytesIO(data)) if data is not None else pd.DataFrame()


def _op_setting(row: pd.Series) -> str:
    """'theta=180, adaptive=True': a capability row's values of its operator's own `arm_keys` ('' for
    operators without any, and for the weight arms)."""
    from refusal_ray.ops.base import owner

    op = owner(row["arm"])
    keys = [k for k in (getattr(op, "arm_keys", ()) if op is not None else ()) if k in row.index]
    vals = [(k, row[k]) for k in keys if row[k] is not None and not (isinstance(row[k], float) and np.isnan(row[k]))]
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in vals)


COST_LEGEND = {
    "refusal_harmful": "harmful refusal rate with the arm minus without (test prompts)",
    "refusal_harmless": "harmless refusal rate with the arm minus without (test prompts)",
    "ce_loss": "cross-entropy on the held-out text with the arm minus without (nats/token)",
    "first_token_kl": "first-token KL(baseline || arm) on the harmless test prompts (nats)",
    "task_exact_match": "task exact match with the arm minus without"}


def render_cost(cost: pd.DataFrame, wide: bool = False, width: int | None = None) -> str:
    """Refusal change against capability cost, one row per (model, arm) ('' without capability rows), fitted
    to `width` characters (default `core.render.WIDTH`) with a legend under it; `wide`: one line per row,
    unfitted, with the short headers of before."""
    from refusal_ray.core.render import WIDTH, fit_table, legend_lines

    table = cost_table(cost)
    if table.empty:
        return ""
    metrics = [m for m in ("refusal_harmful", "refusal_harmless", "ce_loss", "first_token_kl", "task_exact_match")
               if m in table.columns] + sorted(c for c in table.columns if c.startswith("lm_eval/"))
    table = table.assign(ctl=np.where(table["control"], "ctl", ""),
                         setting=[_op_setting(r) for _, r in table.iterrows()])
    cols = [Column("model", "model", "{}"), Column("arm", "arm", "{}"),
            Column("ctl", "ctl", "{}", legend="ctl: the arm's norm-matched random control"),
            Column("coefficient", "coef", "{:g}", legend="activation addition coefficient"),
            Column("alpha", "alpha", "{:g}", legend="ablation strength (1: the projection removed)"),
            Column("direction", "direction", "{}", legend="the direction the arm uses (layer L, position p)")]
    if (table["setting"] != "").any():   # operators with their own arm keys (angular's theta, CAST's threshold)
        cols.append(Column("setting", "setting", "{}", legend="the operator's own arm settings"))
    cols += [Column(m, SHORT.get(m, "d " + m.removeprefix("lm_eval/")), "{:+.3f}",
                    legend=COST_LEGEND.get(m, f"lm-eval {m.removeprefix('lm_eval/')} with the arm minus without"))
             for m in metrics]
    head = "capability cost (arm minus baseline, mean over seeds; KL is against the baseline):"
    if wide:
        return head + "\n" + "\n".join(text_table(table, cols))
    width = width or WIDTH
    return "\n".join([head, *fit_table(table, cols, width),
                      *legend_lines([(c.label, c.legend) for c in cols if c.legend], width)])


def plot_capability(cost: pd.DataFrame):
    """Refusal change against capability cost: per model, harmful-refusal change (y) against CE change
    (x), one point per arm setting, controls hollow. Returns a figure, or None without capability rows."""
    if cost.empty:
        return None
    wide = cost_table(cost)
    if not {"ce_loss", "refusal_harmful"} <= set(wide.columns):
        return None
    models = list(dict.fromkeys(wide["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    from refusal_ray.ops import OPS

    colors = {"baseline": "0.4", **{op.name: op.color for op in OPS},
              **{op.weight_arm: op.weight_color for op in OPS if op.weight_arm}}
    weights = {op.weight_arm for op in OPS if op.weight_arm}
    for ax, m in zip(axes[0], models):
        w = wide[wide["model"] == m]
        for arm, g in w.groupby("arm", sort=False):
            for control, h in g.groupby("control"):
                ax.scatter(h["ce_loss"], h["refusal_harmful"], s=30, label=f"{arm}{' control' if control else ''}",
                           facecolors="none" if control else colors.get(arm, "k"), edgecolors=colors.get(arm, "k"),
                           marker="s" if arm in weights else "o")
        ax.axhline(0, color="0.8", lw=0.8)
        ax.axvline(0, color="0.8", lw=0.8)
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("CE change (nats/token)")
        ax.set_ylabel("harmful refusal change")
        ax.legend(fontsize=6)
    return fig


# -- the reader -------------------------------------------------------------------------------------------
def store_cost(ctx) -> pd.DataFrame:
    """`capability_cost` of the store's capability rows measured under the manifest's `capability_key`
    (computed once per context: `ctx.provided("cost")`)."""
    return capability_cost(ctx.tables["capability"], ctx.manifest.get("capability_key"))


def summary(ctx, model: str, row: dict) -> dict:
    """The cost columns of one model (`summary_columns`); {} for a model without a best layer."""
    return summary_columns(ctx.provided("cost"), model, ctx.rule) if "best_layer" in row else {}


COST = "capability cost (arm minus baseline, mean over seeds; not part of the verdicts)"   # its compact table
_COST = {"ce": ("CE", "{arm}'s CE loss on the held-out text minus the baseline's (nats/token)"),
         "kl": ("KL", "{arm}'s first-token KL against the baseline on the harmless test prompts (nats)")}


def cost_column(entry) -> Column:
    """An operator's `cost_display` entry as a Column of the COST table: `cost_ce[arm]` -> "arm CE",
    `cost_kl[arm]` -> "arm KL", with their legends."""
    key = entry[0]
    metric, _, arm = key.removeprefix("cost_").partition("[")
    if metric in _COST and arm.endswith("]"):
        label, legend = _COST[metric]
        return column(entry, COST).replace(label=f"{arm[:-1]} {label}", legend=legend.format(arm=arm[:-1]))
    return column(entry, COST)


def display() -> list[Column]:
    """Each operator's `cost_display` columns, in apply order (ablation, orthogonalized, ..., addition)."""
    from refusal_ray.ops import OPS

    return [cost_column(c) for op in OPS.by_apply_order() for c in op.cost_display]


def report(ctx) -> list[str]:
    """The section: the cost table (`render_cost`) and the refusal-against-CE figure, or why it is empty."""
    table = ctx.provided("cost")
    lines = [f"## {TITLE}", ""]
    if table.empty:
        return lines + not_run("capability", ctx.stages)
    fig = plot_capability(table)
    return lines + ["```", render_cost(table), "```", "",
                    *ctx.figure("capability.png", None if fig is None else png(fig))]


def _cost_file(ctx):
    table = ctx.provided("cost")
    return None if table.empty else table


def _cost_csv(ctx):
    table = ctx.provided("cost")
    return None if table.empty else cost_table(table).to_csv(index=False).encode()


def headline(row, rule=None) -> str | None:
    """The model's headline sentence on capability cost: each measured operator's (and weight arm's) CE
    change and first-token KL at the setting the summary reads, or None."""
    from refusal_ray.ops import OPS

    costs = [(arm, row.get(f"cost_ce[{arm}]"), row.get(f"cost_kl[{arm}]"), row.get(f"cost_setting[{arm}]"))
             for op in OPS.by_apply_order() for arm in (op.name, op.weight_arm)
             if arm and has(row, f"cost_ce[{arm}]")]
    if not costs:
        return None
    return "Capability cost: " + "; ".join(f"{arm} ({setting}) {num(ce, '{:+.3f}')} nats CE, KL {num(kl, '{:.3f}')}"
                                           for arm, ce, kl, setting in costs) + "."


READER = Reader(summary=summary, display=display, report=report, order=40, title=TITLE, tables=("capability",),
                provides={"cost": store_cost},
                files={"capability_cost.parquet": _cost_file, "capability_cost.csv": _cost_csv}, headline=headline)
