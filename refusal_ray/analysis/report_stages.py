"""The headline per model of the compiled report (`refusal-ray report DIR`; the stages' sections are their
readers', `Reader.report`). Every number is read from the summary; nothing here recomputes a measurement.
"""

from __future__ import annotations

import pandas as pd

from refusal_ray.core.render import has, markdown_table, not_run, num, plt  # noqa: F401 (re-exported)


_num, _has = num, has   # the old private names


def headline(row: pd.Series, rule: dict) -> str:
    """One paragraph per model: verdicts first, then the numbers they rest on (rates are pooled over
    seeds; costs are arm minus baseline)."""
    parts = [f"**{row['model']}** ({_num(row.get('params'), '{:,.0f}')} parameters, "
             f"{_num(row.get('layers'), '{:.0f}')} layers):"]
    verdicts = [f"control_margin **{row['verdict_control_margin']}**" if _has(row, "verdict_control_margin") else None,
                f"steering_labels **{row['verdict_steering_labels']}**" if _has(row, "verdict_steering_labels") else None]
    verdicts = [v for v in verdicts if v]
    parts.append(("; ".join(verdicts) + ".") if verdicts else "no verdict (steering not run).")
    if _has(row, "separation"):
        parts.append(f"Separation peaks at layer {_num(row['best_layer'], '{:.0f}')} (Cohen's d "
                     f"{_num(row['separation'])}).")
    from refusal_ray.ops import OPS

    parts += [text for op in OPS.by_report_order() if (text := op.headline(row, rule))]
    costs = [(arm, row.get(f"cost_ce[{arm}]"), row.get(f"cost_kl[{arm}]"), row.get(f"cost_setting[{arm}]"))
             for op in OPS.by_apply_order() for arm in (op.name, op.weight_arm)
             if arm and _has(row, f"cost_ce[{arm}]")]
    if costs:
        parts.append("Capability cost: " + "; ".join(
            f"{arm} ({setting}) {_num(ce, '{:+.3f}')} nats CE, KL {_num(kl, '{:.3f}')}"
            for arm, ce, kl, setting in costs) + ".")
    if _has(row, "top_component"):
        parts.append(f"Top patched component {row['top_component']} (recovery {_num(row.get('top_recovery'))}).")
    if _has(row, "selection_warning"):   # a fallback selection above the KL filter (summary.fallback_warnings)
        parts.append(" ".join(f"**{w[0].upper()}{w[1:]}.**" for w in str(row["selection_warning"]).splitlines()))
    return " ".join(parts)


def __getattr__(name: str):
    """Names that moved to the stages' read modules (directions_diagnostics, steering_arms_table,
    plot_capability, ...; `summary.from_readers`)."""
    if name.startswith("__"):
        raise AttributeError(name)
    from refusal_ray.analysis.summary import from_readers

    return from_readers(name)
