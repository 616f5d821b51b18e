"""Reading one prompt file (JSONL, JSON array, CSV, Parquet) and its byte fingerprint."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pandas as pd

from refusal_ray.errors import SpecError

# the column fields a prompt source may name, checked against the columns it has
COLUMN_KEYS = ("instruction_column", "id_column", "split_column", "reference_column", "pair_column",
               "category_column")


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a prompt file by extension (.jsonl, .json, .csv, .parquet); the index is the row number."""
    return _read_table(Path(path)).reset_index(drop=True)


def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return pd.read_json(path, lines=True, dtype=False)
    if suffix == ".json":
        return pd.read_json(path, dtype=False)
    if suffix == ".csv":
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    raise ValueError(f"unsupported prompt file type {suffix!r} (use .jsonl, .csv or .parquet)")


def fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes (first 16 hex digits); part of every cell id."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def check_columns(df: pd.DataFrame, src, field: str, spec_file: str, what: str) -> None:
    """Every column `src` names (`COLUMN_KEYS`) is in `df`. Raises SpecError naming `<field>.<key>`."""
    for key in COLUMN_KEYS:
        col = getattr(src, key, None)
        if col is not None and col not in df.columns:
            raise SpecError(spec_file, f"{field}.{key}", f"column {col!r} not in {what} "
                                                         f"(columns: {', '.join(map(str, df.columns))})")


def text_or_none(v) -> str | None:
    """A cell as text; None / NaN as None."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def where_text(v) -> str:
    """A `where` value or a cell, as the text they are compared by: booleans as 'true' / 'false' (a YAML
    `true`, a JSON `true`, a CSV 'True' alike), whole floats as integers (a Parquet 1.0 matches a YAML 1),
    anything else as `str`."""
    if isinstance(v, str):
        return v.lower() if v.lower() in ("true", "false") else v
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def apply_where(df: pd.DataFrame, src, field: str, spec_file: str, what: str) -> pd.DataFrame:
    """The rows whose `src.where` columns hold one of the listed values (compared as text, `where_text`:
    XSTest's `{label: unsafe}`, a flag column's `{harmful: true}`, `{level: [1, 2]}`); the index (row number
    in the source) is kept. Raises SpecError naming `<field>.where` for a column the source lacks, a value
    that is not text, a number or a boolean, or when no row is left."""
    where = getattr(src, "where", None)
    if not where:
        return df
    keep = pd.Series(True, index=df.index)
    for col, values in where.items():
        if col not in df.columns:
            raise SpecError(spec_file, f"{field}.where", f"column {col!r} not in {what} "
                                                         f"(columns: {', '.join(map(str, df.columns))})")
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        bad = [v for v in values if not isinstance(v, (str, int, float, bool))]
        if bad:
            raise SpecError(spec_file, f"{field}.where", f"{col}: {bad[0]!r} is not a text, number or boolean")
        as_before = df[col].astype(str).isin([v for v in values if isinstance(v, str)])   # text against str(cell)
        keep &= as_before | df[col].map(where_text).isin([where_text(v) for v in values])
    if not keep.any():
        raise SpecError(spec_file, f"{field}.where", f"no row of {what} matches {dict(where)}")
    return df[keep]


def load_file(pf, field: str, spec_file: str = "<spec>") -> pd.DataFrame:
    """Read and check one prompt file (`pf`: a PromptFile or SplitFile), keeping the rows its `where`
    selects. Raises SpecError naming the spec field: `<field>.path` (not found, unreadable, empty),
    `<field>.<column key>` (a column it lacks) or `<field>.where`."""
    path = Path(pf.path)
    if not path.is_file():
        raise SpecError(spec_file, f"{field}.path", f"file not found: {pf.path}")
    try:
        df = read_table(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is bad input
        raise SpecError(spec_file, f"{field}.path", f"cannot read {pf.path}: {e}".splitlines()[0]) from None
    if df.empty:
        raise SpecError(spec_file, f"{field}.path", f"prompt file is empty: {pf.path}")
    check_columns(df, pf, field, spec_file, pf.path)
    return apply_where(df, pf, field, spec_file, pf.path)
