"""The headline per model of the compiled report (`refusal-ray report DIR`; the stages' sections are their
readers', `Reader.report`). Every number is read from the summary; nothing here recomputes a measurement.
"""

from __future__ import annotations

import pandas as pd

from refusal_ray.core.render import has, markdown_table, not_run, num, plt  # noqa: F401 (re-exported)


_num, _has = num, has   # the old private names


def headline(row: pd.Series, rule: dict) -> str:
    """One paragraph per model: verdicts first (the decision rule's), then each stage's sentence (its
    reader's `headline`, in `headline_order`): the numbers the verdicts rest on (rates are pooled over
    seeds; costs are arm minus baseline)."""
    from refusal_ray.analysis.summary import readers

    parts = [f"**{row['model']}** ({num(row.get('params'), '{:,.0f}')} parameters, "
             f"{num(row.get('layers'), '{:.0f}')} layers):"]
    verdicts = [f"control_margin **{row['verdict_control_margin']}**" if has(row, "verdict_control_margin") else None,
                f"steering_labels **{row['verdict_steering_labels']}**" if has(row, "verdict_steering_labels") else None]
    verdicts = [v for v in verdicts if v]
    parts.append(("; ".join(verdicts) + ".") if verdicts else "no verdict (steering not run).")
    ordered = sorted(enumerate(r for _, r in readers()),
                     key=lambda ir: (ir[1].order if ir[1].headline_order is None else ir[1].headline_order, ir[0]))
    parts += [text for _, r in ordered if (text := r.headline(row, rule))]
    return " ".join(parts)


def __getattr__(name: str):
    """Names that moved to the stages' read modules (directions_diagnostics, steering_arms_table,
    plot_capability, ...; `summary.from_readers`)."""
    if name.startswith("__"):
        raise AttributeError(name)
    from refusal_ray.analysis.summary import from_readers

    return from_readers(name)
