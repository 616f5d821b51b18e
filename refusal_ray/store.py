"""The Parquet store: hive-partitioned tables, atomic files, deduplicated reads.

Layout (see DESIGN.md): `<out>/<table>/model=<name>/part-<batch>.parquet`, plus
`manifest.json`, `summary.parquet`, `summary.csv`, `figures/` and `report.md`. `<out>` is a local
path or a URI that pyarrow opens (`file://`, `s3://`, `gs://`, `hdfs://`), or any fsspec protocol
(through pyarrow's fsspec handler, e.g. `memory://` in tests). On a local filesystem every file is
written under a dot-name and renamed into place; on an object store a PUT is all-or-nothing. So a
crash never leaves a half-written file that a reader sees (pyarrow ignores names starting with
'.' or '_'). Every file carries a `_batch` column (time-ordered); readers keep, for each cell id,
only the rows of its latest batch, so a cell written twice is read once (`judgements` keys on
its own row id instead: the latest judgement of each (completion, judge)). The store knows tables,
not stages.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# Columns that may be null in one file and set in another: one declared type each, so every file
# of a table has the same schema and `pd.read_parquet(table_dir)` reads them together.
COLUMN_TYPES = {
    "error": pa.string(), "node": pa.string(), "worker": pa.string(), "device": pa.string(), "params": pa.string(),
    "seconds": pa.float64(), "started": pa.float64(), "finished": pa.float64(), "attempts": pa.int64(),
    "layer": pa.int64(), "direction_layer": pa.int64(), "seed": pa.int64(), "vector_norm": pa.float64(),
    "task_accuracy": pa.float64(), "task_n": pa.int64(), "correct": pa.bool_(), "refusal": pa.bool_(),
    "head": pa.int64(), "patched_score": pa.float64(), "recovery": pa.float64(), "attribution": pa.float64(),
    "attribution_rank": pa.int64(), "direction_position": pa.int64(), "filter": pa.string(),
    "selected_by": pa.string(), "direction": pa.string(),
    "compliance": pa.float64(), "coherence": pa.float64(), "score": pa.float64(), "raw": pa.string(),
    "malformed": pa.bool_(), "prompt": pa.string(), "sequential_cosine": pa.float64(), "subspace_rank": pa.int64(),
}
ARROW_TYPES = {"string": pa.string(), "float64": pa.float64(), "int64": pa.int64(), "bool": pa.bool_()}


def declare_column_types(types: dict[str, str], source: str) -> None:
    """Declare result columns' Arrow types ({column: "string" | "float64" | "int64" | "bool"}), as an
    operator does for its own columns (`Operator.column_types`), so a file in which a column is all null
    (a control row's missing value) has the same schema as the others. ValueError naming `source` on an
    unknown type name or a column already declared with another type."""
    for col, name in types.items():
        if name not in ARROW_TYPES:
            raise ValueError(f"{source}: column {col!r} type {name!r} is not one of {sorted(ARROW_TYPES)}")
        have = COLUMN_TYPES.get(col)
        if have is not None and have != ARROW_TYPES[name]:
            raise ValueError(f"{source}: column {col!r} is already declared as {have}, not {name}")
        COLUMN_TYPES[col] = ARROW_TYPES[name]


# Tables whose rows are identified by their own id rather than by the cell that wrote them: one
# judgement per (completion, judge) row id, written in chunks that cross cells.
ROW_KEYS = {"judgements": "judgement_id"}


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


def open_root(root: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a store root: a local path or a URI."""
    root = str(root)
    if "://" not in root:
        return pafs.LocalFileSystem(), str(Path(root).absolute())
    try:
        return pafs.FileSystem.from_uri(root)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        import fsspec

        protocol, _, path = root.partition("://")
        return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(protocol))), path


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


class Store:
    """One sweep's output directory (local path or URI)."""

    def __init__(self, root: str | Path):
        self.uri = str(root)
        self.fs, self.path = open_root(root)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def __str__(self) -> str:
        return self.uri

    def _join(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    # -- files -------------------------------------------------------------------------------
    def write_file(self, name: str, data: bytes) -> str:
        """Write `name` (relative, '/'-separated) atomically: tmp + rename locally, one PUT elsewhere."""
        final = self._join(name)
        parent = final.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        target = f"{parent}/.{final.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp" if self.local else final
        with self.fs.open_output_stream(target) as f:
            f.write(data)
        if target != final:
            self.fs.move(target, final)
        return final

    def read_file(self, name: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self._join(name)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def exists(self, name: str = "") -> bool:
        return self.fs.get_file_info(self._join(name) if name else self.path).type != pafs.FileType.NotFound

    # -- writing -----------------------------------------------------------------------------
    def write(self, table: str, model: str, rows: list[dict]) -> str | None:
        """Append `rows` (dicts with the same keys) to `table` for `model` as one atomic file."""
        if not rows:
            return None
        batch = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        df = pd.DataFrame(rows)
        df["_batch"] = batch
        return self.write_file(f"{table}/model={model}/part-{batch}.parquet", _parquet_bytes(to_arrow(df)))

    def write_frame(self, name: str, df: pd.DataFrame) -> None:
        """A single Parquet file (e.g. summary.parquet)."""
        self.write_file(name, _parquet_bytes(pa.Table.from_pandas(df, preserve_index=False)))

    def write_json(self, name: str, obj: dict) -> None:
        self.write_file(name, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def read_json(self, name: str) -> dict | None:
        data = self.read_file(name)
        return None if data is None else json.loads(data)

    # -- reading -----------------------------------------------------------------------------
    def read(self, table: str) -> pd.DataFrame:
        """One table as a DataFrame (with its `model` column), one row set per cell id."""
        base = self._join(table)
        if self.fs.get_file_info(base).type != pafs.FileType.Directory:
            return pd.DataFrame()
        files = sorted(i.path for i in self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
                       if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                       and not i.base_name.startswith((".", "_")))  # sorted: deterministic row order
        if not files:
            return pd.DataFrame()
        dataset = ds.dataset(files, filesystem=self.fs, format="parquet",
                             partitioning=ds.partitioning(flavor="hive"), partition_base_dir=base)
        schemas = [f.physical_schema for f in dataset.get_fragments()]
        if any(not sc.equals(schemas[0]) for sc in schemas[1:]):
            # files written before a column existed: read with the union of their schemas, not the
            # first file's (pyarrow's default), so no file's columns are dropped
            partition = [f for f in dataset.schema if f.name not in schemas[0].names]
            unified = pa.unify_schemas([*schemas, pa.schema(partition)], promote_options="permissive")
            dataset = ds.dataset(files, schema=unified, filesystem=self.fs, format="parquet",
                                 partitioning=ds.partitioning(flavor="hive"), partition_base_dir=base)
        df = dataset.to_table().to_pandas()
        if "model" in df.columns:
            df["model"] = df["model"].astype(str)
        key = ROW_KEYS.get(table, "cell_id")
        if key in df.columns and "_batch" in df.columns:
            latest = df.groupby(key)["_batch"].transform("max")
            df = df[df["_batch"] == latest]
        if table == "cells" and "cell_id" in df.columns:
            df = df.drop_duplicates("cell_id", keep="last")
        return df.drop(columns=["_batch"], errors="ignore").reset_index(drop=True)

    def done_cells(self) -> set[str]:
        """Cells with nothing left to run: done, or skipped (a skip is decided by the rows of the cells
        it needs, which are part of its id's inputs: rerunning gives the same skip)."""
        cells = self.read("cells")
        if cells.empty:
            return set()
        return set(cells.loc[cells["status"].isin(["done", "skipped"]), "cell_id"])


def read(out_dir: str | Path, table: str) -> pd.DataFrame:
    """Public API: one store table as a pandas DataFrame (`summary` reads summary.parquet)."""
    store = Store(out_dir)
    if table == "summary":
        data = store.read_file("summary.parquet")
        if data is None:
            raise FileNotFoundError(f"{store}/summary.parquet")
        return pd.read_parquet(io.BytesIO(data))
    if not store.exists(table):   # a table no cell wrote yet: known (empty) or a typo
        from refusal_ray.core.tables import TABLES   # every table a store can hold (the stages' are checked)

        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; expected one of {', '.join(TABLES + ('summary',))}")
    return store.read(table)
