"""Refusal change against capability cost, from the `capability` table.

The cost of an arm on a metric is its value minus the baseline arm's value for the same (model, seed,
metric), averaged over seeds (first_token_kl is already measured against the baseline: its value is
its cost). Refusal change is the same difference on the refusal rates of the test prompts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

ARM_COLUMNS = ["model", "arm", "control", "coefficient", "alpha", "direction"]
# metrics whose value is already relative to the baseline
RELATIVE = {"first_token_kl"}
ORDER = {"baseline": 0, "addition": 1, "ablation": 2, "subspace": 3, "orthogonalized": 4, "orthogonalized_subspace": 5}
SHORT = {"refusal_harmful": "d refusal harmful", "refusal_harmless": "d refusal harmless", "ce_loss": "d CE",
         "first_token_kl": "KL", "task_exact_match": "d task EM"}


def capability_cost(capability: pd.DataFrame, key: str | None = None) -> pd.DataFrame:
    """Long table: one row per (model, arm settings, metric) with `value` (mean over seeds), `baseline`
    (the baseline arm's mean over the same seeds), `cost` (mean over seeds of value - baseline;
    the value itself for first_token_kl) and `seeds`. Empty in, empty out.

    key: the manifest's `capability_key`: only rows measured under the current settings count (a store
    rerun with another text set or generation length holds rows of both; each arm is paired with the
    baseline of its own settings in any case)."""
    if capability.empty:
        return pd.DataFrame(columns=[*ARM_COLUMNS, "metric", "value", "baseline", "cost", "seeds"])
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
    out = (df.groupby([*ARM_COLUMNS, "metric", "measure_key"], dropna=False, sort=False)
           .agg(value=("value", "mean"), baseline=("baseline", "mean"), cost=("cost", "mean"),
                seeds=("seed", "nunique")).reset_index())
    out["_order"] = out["arm"].map(ORDER)
    return (out.sort_values(["model", "_order", "control", "coefficient", "alpha"], kind="stable")
            .drop(columns="_order").reset_index(drop=True))


def cost_table(cost: pd.DataFrame) -> pd.DataFrame:
    """Wide table: one row per (model, arm settings), one column per metric's cost (refusal change,
    CE change, KL, task exact-match change, each lm-eval metric's change)."""
    if cost.empty:
        return pd.DataFrame()
    index = [*ARM_COLUMNS, *(["measure_key"] if "measure_key" in cost.columns else []), "metric"]
    wide = cost.set_index(index)["cost"].unstack("metric").reset_index()
    wide.columns.name = None
    wide["_order"] = wide["arm"].map(ORDER)
    return wide.sort_values(["model", "_order", "control"], kind="stable").drop(columns="_order").reset_index(drop=True)


def summary_columns(cost: pd.DataFrame, model: str, rule: dict | None = None) -> dict:
    """Per model, for the summary table: the CE change and first-token KL of each non-control arm
    (cost_ce[arm], cost_kl[arm]) and of its random control (cost_ce[arm-ctl], ...), at the setting the
    decision rule reads (control_margin's ablation_alpha for ablation arms, addition_coefficient for
    addition arms) when it was measured, else at the arm's first setting; `cost_setting[arm]` names it."""
    out: dict = {}
    cm = (rule or {}).get("control_margin") or {}
    mine = cost[cost["model"] == model] if not cost.empty else cost
    for arm in ("addition", "ablation", "subspace", "orthogonalized", "orthogonalized_subspace"):
        rows = mine[mine["arm"] == arm]
        if rows.empty:
            continue
        key, wanted = ("coefficient", cm.get("addition_coefficient")) if arm == "addition" else \
            ("alpha", cm.get("ablation_alpha"))
        setting = wanted if wanted is not None and (rows[key] == wanted).any() else rows[key].iloc[0]
        out[f"cost_setting[{arm}]"] = f"{'c' if key == 'coefficient' else 'alpha'}={setting:g}"
        for control, suffix in ((False, ""), (True, "-ctl")):
            at = rows[(rows["control"] == control) & (rows[key] == setting)]
            for metric, name in (("ce_loss", "ce"), ("first_token_kl", "kl")):
                hit = at[at["metric"] == metric]
                if not hit.empty:
                    out[f"cost_{name}[{arm}{suffix}]"] = float(hit["cost"].iloc[0])
    return out
