"""Rendering helpers the stages' read modules and the analysis share (below both, so a read module
never imports `refusal_ray.analysis`, which imports the read modules: no circle).

- `num(v, fmt)`: a number as text, "?" when missing; `has(row, key)`: whether a row has a value there.
- `markdown_table(df, floats)`: a pipe table; `text_table(df, cols)`: fixed-width lines.
- `Column`: a printed summary column, (column, header, fmt) with the table of the compact layout it goes to,
  its spelled-out label and its legend; `fit_table(df, cols, width)`: fixed-width lines wrapped to `width`;
  `wrap(text, width)`, `legend_lines(items, width)`, `short_count(n)` ("522k", "1.24B").
- `not_run(stage, stages)`: the lines of a report section whose stage stored no rows.
- `integral(df)`: float columns holding whole numbers as integers (for tables).
- `plt` (matplotlib on the Agg backend: no display) and `png(fig)`: a finished figure as PNG bytes;
  `grid(n)`: a figure with n panels, at most 4 a row.
"""

from __future__ import annotations

import io
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

__all__ = ["plt", "png", "grid", "num", "has", "missing", "markdown_table", "text_table", "not_run", "integral",
           "Column", "HEADLINE", "DIRECTIONS", "WIDTH", "column", "wrap", "fit_table", "legend_lines", "short_count"]

HEADLINE = "headline"                 # the compact layout's first table (`Column.table`)
DIRECTIONS = "directions and layers"  # the detail table of the directions, the selection and the rule's layers
WIDTH = 120                           # the compact layout's line width (characters)


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


class Column(tuple):
    """One printed summary column: the tuple (column, header, fmt) that `text_table` takes (`header`: the
    `--wide` table's), with where the compact layout puts it and what it means.

    - `table`: the compact layout's table it goes to (`HEADLINE`, `DIRECTIONS` or any title; None: its
      reader's `title`); `label`: its header there (spelled out; default `header`); `legend`: the sentence
      under that table explaining `label`; `text(value) -> str`: its cell text there (default `fmt`).
    A plain 3-tuple (an operator's `display` entry) is a Column with none of these (`column`)."""

    def __new__(cls, key: str, header: str, fmt: str, table: str | None = None, label: str | None = None,
                legend: str = "", text=None):
        self = super().__new__(cls, (key, header, fmt))
        self.table, self.label, self.legend, self.text = table, label or header, legend, text
        return self

    def replace(self, **kw) -> Column:
        """A copy with the attributes in `kw` changed."""
        fields = dict(table=self.table, label=self.label, legend=self.legend, text=self.text) | kw
        return Column(*self, **fields)

    def cell(self, v) -> str:
        """The compact layout's text of value `v` ('-' when missing)."""
        if missing(v):
            return "-"
        return self.text(v) if self.text is not None else self[2].format(v)


def column(entry, table: str | None = None) -> Column:
    """`entry` ((column, header, fmt) or a Column) as a Column, its table `table` when it names none."""
    c = entry if isinstance(entry, Column) else Column(*entry)
    return c if c.table is not None or table is None else c.replace(table=table)


def short_count(n) -> str:
    """A count in 3 significant digits with k / M / B (1e3 / 1e6 / 1e9): 90528 -> "90.5k", 1301440 -> "1.30M"."""
    n = float(n)
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.{max(0, 2 - int(np.floor(np.log10(abs(v)))))}f}{suffix}"
    return f"{n:.0f}"


_BREAK = re.compile(r"(?<=[A-Za-z0-9)][-/])")   # after a hyphen or slash that follows a word
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?%?")   # 2, -0.47, 0.5, 1e-3, 12%


def _pieces(word: str) -> list[str]:
    """`word` cut after its hyphens and slashes, but never so that a piece is a bare number: "p-2" and
    "0.5-0.7" stay whole, "works-partially" and "Qwen2.5-1.5B" are cut."""
    out: list[str] = []
    for piece in (p for p in _BREAK.split(word) if p):
        if out and (_NUMBER.fullmatch(out[-1][:-1]) or _NUMBER.fullmatch(piece.rstrip("-/"))):
            out[-1] += piece
        else:
            out.append(piece)
    return out or [""]


def wrap(text: str, width: int) -> list[str]:
    """`text` in lines of at most `width` characters where it can break: at spaces (dropped; so after a
    comma only where a space follows it) and after a hyphen or slash inside a word (kept: "works-" /
    "partially"), never inside a number ("p-2", "-0.47", "0.5,0.7" stay whole, `_pieces`); a piece longer
    than `width` stays whole (a line may then be longer)."""
    lines: list[str] = []
    cur, sep = "", ""
    for word in text.split(" "):
        for piece in _pieces(word):
            joined = cur + sep + piece
            if cur and len(joined) > width:
                lines.append(cur)
                cur = piece
            else:
                cur = joined
            sep = ""
        sep = " "
    lines.append(cur)
    return lines


def _width(text: str, width: int) -> int:
    return max(len(line) for line in wrap(text, width))


def fit_table(df: pd.DataFrame, cols: list[Column], width: int = WIDTH, gap: int = 2) -> list[str]:
    """Fixed-width lines of `df` (a header, a rule, the rows) in at most `width` characters where it can:
    `cols` as Columns (header `label`, cells `Column.cell`). When the table is wider, headers wrap first
    (the widest column's, one break at a time), then cells (the column whose wrap adds the fewest lines,
    ties: the widest); headers bottom-aligned, cells top-aligned; lines carry no trailing spaces."""
    heads = [c.label for c in cols]
    body = [[c.cell(r[c[0]]) for c in cols] for _, r in df.iterrows()]
    w = [max([len(h), *(len(row[i]) for row in body)]) for i, h in enumerate(heads)]

    def total() -> int:
        return sum(w) + gap * (len(w) - 1)

    while total() > width:   # headers first
        shrink = [(w[i], i, t) for i in range(len(w))
                  if (t := max([_width(heads[i], w[i] - 1), *(len(row[i]) for row in body)])) < w[i]]
        if not shrink:
            break
        _, i, w[i] = max(shrink)
    while total() > width:   # then cells
        shrink = []
        for i in range(len(w)):
            t = max([_width(heads[i], w[i] - 1), *(_width(row[i], w[i] - 1) for row in body)])
            if t < w[i]:
                added = sum(len(wrap(row[i], t)) - len(wrap(row[i], w[i])) for row in body)
                shrink.append((added, -w[i], i, t))
        if not shrink:
            break
        _, _, i, w[i] = min(shrink)

    def lines_of(cells: list[str], bottom: bool) -> list[str]:
        wrapped = [wrap(c, w[i]) for i, c in enumerate(cells)]
        n = max(len(x) for x in wrapped)
        wrapped = [([""] * (n - len(x)) + x) if bottom else (x + [""] * (n - len(x))) for x in wrapped]
        return [(" " * gap).join(x[k].ljust(w[i]) for i, x in enumerate(wrapped)).rstrip() for k in range(n)]

    out = lines_of(heads, True)
    out.append((" " * gap).join("-" * x for x in w))
    for row in body:
        out += lines_of(row, False)
    return out


def legend_lines(items: list[tuple[str, str]], width: int = WIDTH, indent: str = "  ") -> list[str]:
    """One entry per (label, meaning): `indent + "label: meaning"`, wrapped to `width` with a deeper indent."""
    out = []
    for label, meaning in items:
        lines = wrap(f"{label}: {meaning}", width - len(indent) - 2)
        out += [indent + lines[0], *(indent + "  " + line for line in lines[1:])]
    return out


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
