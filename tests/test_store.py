"""The Parquet store: atomic files, hive partitions, one row set per cell id."""

from __future__ import annotations

import uuid

import pandas as pd
import pyarrow.dataset as ds
import pytest

import refusal_ray
from refusal_ray.store import Store


def test_rewritten_cell_is_read_once(tmp_path):
    store = Store(tmp_path)
    store.write("steering", "m1", [{"cell_id": "a", "seed": 0, "rate": 0.1}, {"cell_id": "b", "seed": 0, "rate": 0.2}])
    # an interrupted run that is resumed may write cell "a" again; the newest batch wins
    store.write("steering", "m1", [{"cell_id": "a", "seed": 0, "rate": 0.3}])
    store.write("steering", "m2", [{"cell_id": "c", "seed": 0, "rate": 0.4}])
    df = refusal_ray.read(tmp_path, "steering").sort_values("cell_id")
    assert df["cell_id"].tolist() == ["a", "b", "c"]
    assert df["rate"].tolist() == [0.3, 0.2, 0.4]
    assert df["model"].tolist() == ["m1", "m1", "m2"]
    assert "_batch" not in df.columns


def test_tables_read_with_pandas_and_pyarrow_hive(tmp_path):
    store = Store(tmp_path)
    store.write("directions", "toy-a", [{"cell_id": "x", "layer": 0, "vector": [1.0, 2.0]}])
    df = pd.read_parquet(tmp_path / "directions")
    assert df["vector"].iloc[0].tolist() == [1.0, 2.0]
    table = ds.dataset(tmp_path / "directions", format="parquet", partitioning="hive").to_table()
    assert table.column("model").to_pylist() == ["toy-a"]


def test_half_written_files_are_invisible(tmp_path):
    store = Store(tmp_path)
    store.write("cells", "m", [{"cell_id": "a", "status": "done"}])
    (tmp_path / "cells" / "model=m" / ".part-crashed.parquet.123.tmp").write_bytes(b"garbage")
    assert store.done_cells() == {"a"}


def test_latest_status_wins(tmp_path):
    store = Store(tmp_path)
    store.write("cells", "m", [{"cell_id": "a", "status": "failed"}])
    store.write("cells", "m", [{"cell_id": "a", "status": "done"}])
    assert store.done_cells() == {"a"}
    assert len(store.read("cells")) == 1


def test_read_unknown_table(tmp_path):
    with pytest.raises(ValueError, match="unknown table 'nope'; expected one of cells, directions"):
        refusal_ray.read(tmp_path, "nope")


def test_null_in_one_file_and_set_in_another(tmp_path):
    store = Store(tmp_path)
    store.write("cells", "m", [{"cell_id": "a", "status": "done", "error": None, "seconds": None, "layer": None}])
    store.write("cells", "m", [{"cell_id": "b", "status": "failed", "error": "boom", "seconds": 1.5, "layer": 3}])
    df = pd.read_parquet(tmp_path / "cells").sort_values("cell_id")
    assert df["error"].tolist()[1] == "boom" and pd.isna(df["error"].tolist()[0])
    assert df["layer"].tolist()[1] == 3
    assert refusal_ray.read(tmp_path, "cells")["cell_id"].tolist() == ["a", "b"]


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_store_on_a_uri(tmp_path, scheme):
    """pyarrow URIs (file://, s3://, gs://) and fsspec protocols (memory:// here) work like paths."""
    root = f"file://{tmp_path}/s" if scheme == "file" else f"memory://rr-test-{uuid.uuid4().hex}/s"
    store = Store(root)
    assert not store.exists("manifest.json")
    store.write_json("manifest.json", {"rule_hash": "x"})
    store.write("cells", "m", [{"cell_id": "a", "status": "done"}])
    store.write("cells", "m", [{"cell_id": "a", "status": "done"}, {"cell_id": "b", "status": "failed"}])
    assert store.read_json("manifest.json") == {"rule_hash": "x"} and store.exists("manifest.json")
    assert store.done_cells() == {"a"}
    assert refusal_ray.read(root, "cells")["model"].tolist() == ["m", "m"]
    if scheme == "file":
        assert not list(tmp_path.rglob(".*.tmp"))                 # renamed into place
        assert len(pd.read_parquet(tmp_path / "s" / "cells")) == 3  # plain pandas on the same files


def test_files_of_different_schemas_read_together(tmp_path):
    """A column added after a store was first written (e.g. subspace_rank, prompt) is read from the
    files that have it, whichever file comes first."""
    store = Store(tmp_path / "out")
    store.write("steering", "m", [{"cell_id": "a", "rate": 0.5}])
    store.write("steering", "m", [{"cell_id": "b", "rate": 0.25, "subspace_rank": 2}])
    store.write("steering", "n", [{"cell_id": "c", "rate": 0.1, "subspace_rank": None}])
    df = store.read("steering").set_index("cell_id")
    assert df.loc["b", "subspace_rank"] == 2 and pd.isna(df.loc["a", "subspace_rank"])
    assert df["model"].tolist() == ["m", "m", "n"] and df["rate"].tolist() == [0.5, 0.25, 0.1]


def test_operator_column_types_keep_one_schema(tmp_path):
    """An operator's declared column (angular's axis_evr) that is all null in one file (its control rows) and
    set in another reads back as one float column; an undeclared all-null column would be string."""
    import refusal_ray.ops  # noqa: F401 - registers the operators and their column types
    from refusal_ray.store import COLUMN_TYPES, declare_column_types

    assert str(COLUMN_TYPES["axis_evr"]) == "double" and str(COLUMN_TYPES["adaptive"]) == "bool"
    s = Store(tmp_path)
    s.write("steering", "m", [{"cell_id": "a", "seed": 0, "axis_evr": None, "adaptive": None}])
    s.write("steering", "m", [{"cell_id": "b", "seed": 0, "axis_evr": 0.81, "adaptive": True}])
    df = s.read("steering").sort_values("cell_id")
    assert df["axis_evr"].isna().tolist() == [True, False] and df["axis_evr"].iloc[1] == 0.81
    with pytest.raises(ValueError, match=r"^operator 'x': column 'axis_evr' is already declared as double, not string$"):
        declare_column_types({"axis_evr": "string"}, "operator 'x'")
    with pytest.raises(ValueError, match=r"^operator 'x': column 'y' type 'float' is not one of"):
        declare_column_types({"y": "float"}, "operator 'x'")
