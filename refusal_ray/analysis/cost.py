"""Refusal change against capability cost, from the `capability` table.

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

import numpy as np
import pandas as pd

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
