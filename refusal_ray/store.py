"""The Parquet store: hive-partitioned tables, atomic files, deduplicated reads.

Layout (see DESIGN.md): `<out>/<table>/model=<name>/part-<batch>.parquet`, plus
`manifest.json`, `summary.parquet`, `summary.csv` and `figures/`. Every file is written under a
dot-name and renamed into place, so a crash never leaves a half-written file that a reader
sees (pyarrow ignores names starting with '.' or '_'). Every file carries a `_batch` column
(time-ordered); readers keep, for each cell id, only the rows of its latest batch, so a cell
written twice is read once. The store knows tables, not stages.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

TABLES = ("cells", "directions", "steering", "completions")
# Columns that may be null in one file and set in another: one declared type each, so every file
# of a table has the same schema and `pd.read_parquet(table_dir)` reads them together.
COLUMN_TYPES = {
    "error": pa.string(), "node": pa.string(), "worker": pa.string(), "device": pa.string(), "params": pa.string(),
    "seconds": pa.float64(), "started": pa.float64(), "finished": pa.float64(), "attempts": pa.int64(),
    "layer": pa.int64(), "direction_layer": pa.int64(), "seed": pa.int64(), "vector_norm": pa.float64(),
    "task_accuracy": pa.float64(), "task_n": pa.int64(), "correct": pa.bool_(), "refusal": pa.bool_(),
}


def to_arrow(df: pd.DataFrame) -> pa.Table:
    """DataFrame -> Arrow with the declared types; an all-null undeclared column becomes string."""
    arrays, names = [], []
    for col in df.columns:
        arr = pa.array(df[col], type=COLUMN_TYPES.get(col), from_pandas=True)
        if pa.types.is_null(arr.type):
            arr = arr.cast(pa.string())
        arrays.append(arr)
        names.append(col)
    return pa.Table.from_arrays(arrays, names=names)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_parquet_atomic(path: Path, table: pa.Table) -> None:
    """Write a Parquet file under a temporary dot-name, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class Store:
    """One sweep's output directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- writing -----------------------------------------------------------------------------
    def write(self, table: str, model: str, rows: list[dict]) -> Path | None:
        """Append `rows` (dicts with the same keys) to `table` for `model` as one atomic file."""
        if not rows:
            return None
        batch = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        df = pd.DataFrame(rows)
        df["_batch"] = batch
        path = self.root / table / f"model={model}" / f"part-{batch}.parquet"
        write_parquet_atomic(path, to_arrow(df))
        return path

    def write_json(self, name: str, obj: dict) -> None:
        _atomic_write_bytes(self.root / name, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def read_json(self, name: str) -> dict | None:
        path = self.root / name
        return json.loads(path.read_text()) if path.is_file() else None

    # -- reading -----------------------------------------------------------------------------
    def read(self, table: str) -> pd.DataFrame:
        """One table as a DataFrame (with its `model` column), one row set per cell id."""
        path = self.root / table
        if not path.is_dir() or not any(path.rglob("*.parquet")):
            return pd.DataFrame()
        df = pd.read_parquet(path)
        if "model" in df.columns:
            df["model"] = df["model"].astype(str)
        if "cell_id" in df.columns and "_batch" in df.columns:
            latest = df.groupby("cell_id")["_batch"].transform("max")
            df = df[df["_batch"] == latest]
        if table == "cells" and "cell_id" in df.columns:
            df = df.drop_duplicates("cell_id", keep="last")
        return df.drop(columns=["_batch"], errors="ignore").reset_index(drop=True)

    def done_cells(self) -> set[str]:
        cells = self.read("cells")
        if cells.empty:
            return set()
        return set(cells.loc[cells["status"] == "done", "cell_id"])


def read(out_dir: str | Path, table: str) -> pd.DataFrame:
    """Public API: one store table as a pandas DataFrame (`summary` reads summary.parquet)."""
    if table == "summary":
        return pd.read_parquet(Path(out_dir) / "summary.parquet")
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; expected one of {', '.join(TABLES + ('summary',))}")
    return Store(out_dir).read(table)
