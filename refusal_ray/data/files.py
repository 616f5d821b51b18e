"""Reading one prompt file (JSONL, JSON array, CSV, Parquet) and its byte fingerprint."""

from __future__ import annotations

import hashlib
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


def apply_where(df: pd.DataFrame, src, field: str, spec_file: str, what: str) -> pd.DataFrame:
    """The rows whose `src.where` columns hold one of the listed values (compared as text; XSTest's
    `{label: unsafe}`); the index (row number in the source) is kept. Raises SpecError naming
    `<field>.where` for a column the source lacks or when no row is left."""
    where = getattr(src, "where", None)
    if not where:
        return df
    keep = pd.Series(True, index=df.index)
    for col, values in where.items():
        if col not in df.columns:
            raise SpecError(spec_file, f"{field}.where", f"column {col!r} not in {what} "
                                                         f"(columns: {', '.join(map(str, df.columns))})")
        keep &= df[col].astype(str).isin([values] if isinstance(values, str) else list(values))
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
