"""Rendering helpers the stages' read modules and the analysis share (below both, so a read module
never imports `refusal_ray.analysis`, which imports the read modules: no circle).

- `num(v, fmt)`: a number as text, "?" when missing; `has(row, key)`: whether a row has a value there.
- `markdown_table(df, floats)`: a pipe table; `text_table(df, cols)`: fixed-width lines.
- `not_run(stage, stages)`: the lines of a report section whose stage stored no rows.
- `integral(df)`: float columns holding whole numbers as integers (for tables).
- `plt` (matplotlib on the Agg backend: no display) and `png(fig)`: a finished figure as PNG bytes;
  `grid(n)`: a figure with n panels, at most 4 a row.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

__all__ = ["plt", "png", "grid", "num", "has", "missing", "markdown_table", "text_table", "not_run", "integral"]


def missing(v) -> bool:
    """None or a float NaN."""
    return v is None or (isinstance(v, float) and np.isnan(v))


def num(v, fmt: str = "{:.2f}") -> str:
    """`fmt.format(v)`, or "?" for a missing value."""
    return "?" if missing(v) else fmt.format(v)


def has(row: pd.Series, key: str) -> bool:
    """Whether `row[key]` holds a value (present, not None, not NaN)."""
    return not missing(row.get(key))


def markdown_table(df: pd.DataFrame, floats: str = "{:.3f}") -> list[str]:
    """A pipe table (floats formatted, missing values '-')."""
    if df.empty:
        return ["(no rows)"]

    def cell(v) -> str:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "-"
        if isinstance(v, (float, np.floating)):
            return floats.format(v)
        return str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return lines


def text_table(df: pd.DataFrame, cols: list[tuple[str, str, str]]) -> list[str]:
    """Fixed-width lines: a header, a rule, one line per row; `cols` = [(column, header, fmt)]; '-' for
    missing values."""
    cells = [[h for _, h, _ in cols]]
    for _, r in df.iterrows():
        cells.append(["-" if (v := r[k]) is None or (isinstance(v, float) and np.isnan(v)) else f.format(v)
                      for k, _, f in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def not_run(stage: str, stages: dict) -> list[str]:
    """The lines of a stage section without rows: not in the spec (`stages`: the manifest's spec
    stages, {name: settings or None}), or in it with nothing stored."""
    if stages.get(stage) is not None:
        return [f"No rows stored: every `{stage}` cell failed or was skipped (reasons in the `cells` table).", ""]
    return [f"Not run in this sweep (no `stages.{stage}` block).", ""]


_NOT_INTEGRAL = ("rate", "ci_low", "ci_high", "coefficient", "alpha", "theta", "threshold")


def integral(t: pd.DataFrame, keep: tuple[str, ...] = _NOT_INTEGRAL) -> pd.DataFrame:
    """Float columns whose values are all whole numbers (an operator's integer arm keys, floats in the pooled
    table because other operators' rows hold NaN there) as integers, so a layer prints as 1, not 1.000;
    the columns in `keep` stay floats."""
    out = t.copy()
    for c in out.columns:
        v = out[c]
        if v.dtype.kind == "f" and v.notna().all() and len(v) and (v == v.round()).all() and c not in keep:
            out[c] = v.astype(int)
    return out


def png(fig) -> bytes:
    """`fig` as PNG bytes (tight layout, 110 dpi); closes the figure."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def grid(n: int):
    """(figure, [n axes]): panels of 4 x 3.2 inches, at most 4 a row; spare panels hidden."""
    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)
