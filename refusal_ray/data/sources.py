"""Prompt sources as published: one file, one source per split, or a Hugging Face `datasets` source, and
their canonical merged form.

A prompt set (`data.harmful` / `data.harmless`) is read into one frame that the draws work on:

- a single file (`PromptFile`, `path:`): the file as read, its own columns; fingerprint: its bytes.
- per split (`{train: SRC, val: SRC, test: SRC}`, Arditi et al. 2024's `dataset/splits/harmful_train.json`
  etc., or JailbreakBench's `dataset/processed/jailbreakbench.json` as the test split): the rows of its
  *canonical merged form*; fingerprint: the sha256 of that form.
- a whole-set `datasets` source (`dataset:`): its own rows and columns (after `where`, numbered from 0:
  row for row those of its canonical form); fingerprint: the sha256 of its canonical form.

The canonical merged form is one JSONL serialisation: one object per row, keys in the order instruction,
split (when the set has splits), then id, category, reference, pair (each when a source of the set names
that column; a split without a category or reference has null there), rows in train, val, test order
(a whole-set `datasets` source: its own row order); `json.dumps(row, ensure_ascii=False)` per line, UTF-8.
The set's fingerprint is the sha256 of those bytes (first 16 hex digits), its rows are those bytes read
back as a JSONL file, and a row's id is its id column or else its row number in the merged form. So the
merged file (`write_merged`) used as a single file has the same bytes, rows, ids, draws and cell ids.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from refusal_ray.data.files import apply_where, check_columns, fingerprint, load_file, text_or_none
from refusal_ray.errors import SpecError

SPLITS = ("train", "val", "test")
OPTIONAL = (("id", "id_column"), ("category", "category_column"), ("reference", "reference_column"),
            ("pair", "pair_column"))
INSTALL = "pip install 'refusal-ray[datasets]'"
# what an offline validate cannot check for a hub dataset it cannot read
UNCHECKED_DATA = "rows, columns and draws, and so the prompt fingerprints, tokenizers' chat rendering and cell ids"


class SourceUnreachable(SpecError):
    """A hub dataset could not be read: no network, or HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set."""


@dataclass(frozen=True)
class Columns:
    """The columns of a canonical merged frame, read as a PromptFile's (what the draws read)."""

    path: str
    instruction_column: str = "instruction"
    id_column: str | None = None
    split_column: str | None = None
    reference_column: str | None = None
    pair_column: str | None = None
    category_column: str | None = None


@dataclass(frozen=True)
class Loaded:
    """A prompt set as read: its rows (a per-split set's: its canonical form read back), the columns the
    draws read (a per-split set's: `Columns` of its canonical form), its fingerprint (sha256 of the file's
    bytes or of the canonical merged bytes, 16 hex digits), what the manifest records of where it came
    from, and the canonical bytes (None for a single file)."""

    frame: pd.DataFrame
    columns: object
    fingerprint: str
    provenance: dict = field(default_factory=dict)
    canonical: bytes | None = None
    merged: Columns | None = None   # the canonical form's columns (None for a single file)


def kind(src) -> str:
    """'splits' (one source per split), 'dataset' (a `datasets` source) or 'file'."""
    if all(hasattr(src, s) for s in SPLITS):
        return "splits"
    return "dataset" if hasattr(src, "dataset") else "file"


def load_source(src, field_: str, spec_file: str = "<spec>") -> Loaded:
    """Read one prompt set (`src`: a PromptFile, DatasetSource or SplitSources of the spec) named `field_`
    (e.g. "data.harmful"). Raises SpecError naming the spec field (`data.harmful.test.path: file not
    found: ...`), SourceUnreachable for a hub dataset that cannot be reached."""
    k = kind(src)
    if k == "file":
        df = load_file(src, field_, spec_file)
        fp = fingerprint(src.path)
        return Loaded(df, src, fp, {"kind": "file", "path": src.path, "fingerprint": fp})
    if k == "dataset":   # its own rows and columns (the spec's block names them, as stage checks read it);
        df, prov = _dataset_frame(src, field_, spec_file)   # row for row its canonical form's, numbered alike
        data, cols = canonical([(None, df, src, field_)], spec_file)
        fp = hashlib.sha256(data).hexdigest()[:16]
        return Loaded(df.reset_index(drop=True), src, fp, {**prov, "fingerprint": fp}, data,
                      Columns(f"<canonical form of {field_}>", **cols))
    parts, prov = [], {"kind": "splits", "splits": {}}
    for split in SPLITS:
        s = getattr(src, split)
        where = f"{field_}.{split}"
        if kind(s) == "dataset":
            df, p = _dataset_frame(s, where, spec_file)
        else:
            df = load_file(s, where, spec_file)
            p = {"kind": "file", "path": s.path, "fingerprint": fingerprint(s.path)}
        parts.append((split, df, s, where))
        prov["splits"][split] = p
    data, cols = canonical(parts, spec_file)
    fp = hashlib.sha256(data).hexdigest()[:16]
    frame = pd.read_json(io.BytesIO(data), lines=True, dtype=False)   # as the merged file reads
    merged = Columns(f"<canonical form of {field_}>", **cols)
    return Loaded(frame, merged, fp, {**prov, "fingerprint": fp}, data, merged)


def canonical_column(src, key: str) -> str | None:
    """The name a prompt source's column `key` (e.g. "pair_column") has in the form its rows are read in: a
    single file's own column; a per-split or `datasets` source's canonical name ("pair", "id", ...: what its
    merged file calls it), or None when it names no such column. What cell ids hash, so a source and its
    merged file get the same ids."""
    if kind(src) == "file":
        return getattr(src, key, None)
    name = {k: n for n, k in OPTIONAL}.get(key)
    return name if name is not None and getattr(src, key, None) is not None else getattr(src, key, None)


def pair_columns(data) -> list[str | None]:
    """[harmful's, harmless's] pair column by its canonical name (`canonical_column`): what stages patch and
    scrub put in their cells' id key (`data`: the spec's DataSpec)."""
    return [canonical_column(data.harmful, "pair_column"), canonical_column(data.harmless, "pair_column")]


def canonical(parts: list, spec_file: str = "<spec>") -> tuple[bytes, dict]:
    """The canonical merged bytes of `parts` ([(split or None, rows, source, field)]: the split the rows
    are, or None to take it from the source's split_column) and its column fields ({instruction_column,
    split_column, id_column, ...}). An id or pair column must be given on every part or on none: raises
    SpecError naming the first part without it."""
    has = {name: any(getattr(s, key, None) for _, _, s, _ in parts) for name, key in OPTIONAL}
    for name, key in (("id", "id_column"), ("pair", "pair_column")):
        if has[name]:
            for _, _, s, where in parts:
                if getattr(s, key, None) is None:
                    article = "an" if name == "id" else "a"
                    raise SpecError(spec_file, f"{where}.{key}", f"missing: another split names {article} {name} "
                                    f"column; give {key} on every split or on none")
    with_split = any(split is not None or getattr(s, "split_column", None) for split, _, s, _ in parts)
    lines = []
    for split, df, s, _ in parts:
        n = len(df)
        cols = {"instruction": df[s.instruction_column].astype(str).tolist()}
        if with_split:
            cols["split"] = [split] * n if split is not None else df[s.split_column].astype(str).tolist()
        for name, key in OPTIONAL:
            if has[name]:
                col = getattr(s, key, None)
                cols[name] = [text_or_none(v) for v in df[col]] if col is not None else [None] * n
        names = list(cols)
        lines += [json.dumps(dict(zip(names, row)), ensure_ascii=False) + "\n" for row in zip(*cols.values())]
    fields = {"split_column": "split" if with_split else None,
              **{key: name if has[name] else None for name, key in OPTIONAL}}
    return "".join(lines).encode("utf-8"), fields


def data_fingerprint(fingerprints) -> str:
    """One hash over the prompt sets' fingerprints, harmful then harmless (the manifest's `data_fingerprint`;
    for two single files, the hash of their byte fingerprints as before per-split sources existed)."""
    return hashlib.sha256("".join(fingerprints).encode()).hexdigest()[:16]


def _dataset_frame(src, field_: str, spec_file: str) -> tuple[pd.DataFrame, dict]:
    """A `datasets` source's rows as a frame, and its provenance (kind, name, split, the dataset's own
    fingerprint; for a hub dataset the resolved commit). `datasets` is imported here only. Raises
    SpecError naming `<field_>.dataset` / `.split` / `.data_files` / a column key."""
    try:
        import datasets
    except ImportError:
        raise SpecError(spec_file, f"{field_}.dataset", f"a `datasets` source needs the datasets package: "
                                                        f"{INSTALL}") from None
    datasets.disable_progress_bars()   # no download / map bars on the user's terminal
    path = Path(src.dataset).expanduser()
    prov = {"dataset": src.dataset, "config": src.config, "split": src.split}
    try:
        if src.data_files is None and path.is_dir() and any(
                (path / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[_pick_split(list(ds), src, field_, spec_file)]
            prov["kind"] = "load_from_disk"
        elif src.data_files is not None or path.exists():
            files = [src.data_files] if isinstance(src.data_files, str) else list(src.data_files or [])
            for f in files:
                if not glob.glob(f):
                    raise SpecError(spec_file, f"{field_}.data_files", f"file not found: {f}")
            builder, data_files = src.dataset, src.data_files
            if path.is_file():
                builder, data_files = BUILDERS.get(path.suffix.lower()), str(path)
                if builder is None:
                    raise SpecError(spec_file, f"{field_}.dataset", f"unsupported data file type {path.suffix!r} "
                                    f"(use {', '.join(BUILDERS)}, or a save_to_disk folder)")
            all_splits = datasets.load_dataset(builder, name=src.config, data_files=data_files)
            ds = all_splits[_pick_split(list(all_splits), src, field_, spec_file)]
            prov["kind"] = "local"
            prov["data_files"] = src.data_files
        elif not is_hub_name(src.dataset):   # a mistyped local path: never a hub request
            raise SpecError(spec_file, f"{field_}.dataset", f"file not found: {src.dataset} (a hub dataset is "
                                                            f"named owner/name, without a file suffix)")
        else:
            ds, prov["revision"] = _hub(datasets, src, field_, spec_file)
            prov["kind"] = "hub"
    except SpecError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is bad input
        raise SpecError(spec_file, f"{field_}.dataset", f"cannot read {src.dataset}: {e}".splitlines()[0]) from None
    prov["dataset_fingerprint"] = getattr(ds, "_fingerprint", None)   # the datasets library's own
    df = ds.to_pandas()
    if df.empty:
        raise SpecError(spec_file, f"{field_}.dataset", f"dataset is empty: {src.dataset}")
    check_columns(df, src, field_, spec_file, src.dataset)
    return apply_where(df.reset_index(drop=True), src, field_, spec_file, src.dataset), prov


BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}
# file suffixes that make a `dataset:` value a local path (never a hub name)
DATA_SUFFIXES = (*BUILDERS, ".ndjson", ".pq", ".txt", ".tsv", ".zip", ".gz")
_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def is_hub_name(name: str) -> bool:
    """Whether a `dataset:` value names a hub dataset: `owner/name` (or a bare `name`) of letters, digits,
    '_', '.', '-', at most one '/', not starting with '.', '/' or '~', not ending in a data file suffix
    (`DATA_SUFFIXES`), and no such local path exists. Anything else is a local path (not found: bad input)."""
    return (_HUB_NAME.fullmatch(name) is not None and not name.lower().endswith(DATA_SUFFIXES)
            and not Path(name).expanduser().exists())


def pin_revisions(data, sources: dict | None):
    """`data` (a DataSpec) with each hub `datasets` source pinned to the commit a run recorded for it
    (`sources`: the manifest's `data_sources`), so a re-judge reads the rows the run drew, not the branch's
    head. Sources without a recorded hub revision are left as they are."""
    def pinned(src, prov):
        rev = (prov or {}).get("revision")
        return src.model_copy(update={"revision": rev}) if (prov or {}).get("kind") == "hub" and rev else src

    update = {}
    for cls in ("harmful", "harmless"):
        src, prov = getattr(data, cls), (sources or {}).get(cls) or {}
        if kind(src) == "dataset":
            update[cls] = pinned(src, prov)
        elif kind(src) == "splits":
            splits = prov.get("splits") or {}
            update[cls] = src.model_copy(update={s: pinned(getattr(src, s), splits.get(s)) if kind(getattr(src, s))
                                                 == "dataset" else getattr(src, s) for s in SPLITS})
    return data.model_copy(update=update)


def _pick_split(names: list[str], src, field_: str, spec_file: str) -> str:
    """The dataset's split to read: `src.split`, else its only split, else 'train'."""
    want = src.split or (names[0] if len(names) == 1 else "train")
    if want not in names:
        raise SpecError(spec_file, f"{field_}.split", f"split {want!r} not in {src.dataset} "
                                                      f"(splits: {', '.join(names)})")
    return want


def _hub(datasets, src, field_: str, spec_file: str):
    """A hub dataset's split and its resolved commit. Raises SourceUnreachable offline."""
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if offline:
        raise SourceUnreachable(spec_file, f"{field_}.dataset", f"hub dataset {src.dataset!r}: the hub is offline")
    try:
        from huggingface_hub import HfApi

        sha = HfApi().dataset_info(src.dataset, revision=src.revision).sha
        ds = datasets.load_dataset(src.dataset, name=src.config, split=src.split or "train", revision=sha)
    except Exception as e:  # noqa: BLE001
        text = f"{type(e).__name__}: {e}".lower()
        if any(k in text for k in ("couldn't connect", "offline", "connection", "name or service not known",
                                   "cached files", "localentrynotfound", "timed out", "max retries")):
            raise SourceUnreachable(spec_file, f"{field_}.dataset", f"hub dataset {src.dataset!r}: cannot reach "
                                    f"the hub") from None
        raise SpecError(spec_file, f"{field_}.dataset", f"cannot read {src.dataset}: {e}".splitlines()[0]) from None
    return ds, sha


def write_merged(spec, out_dir: str | Path, spec_file: str = "<spec>") -> str:
    """Write the spec's prompt sets (`spec`: a loaded Spec, or its DataSpec) as single files in `out_dir`: a
    per-split or `datasets` set as its canonical merged form `harmful.jsonl` / `harmless.jsonl`; a single file copied as
    it is (same bytes and suffix). Returns the equivalent `data:` block as YAML text, whose sets give the
    same draws, fingerprints and cell ids as `data`'s. Raises SpecError as `load_source`."""
    import yaml

    data = getattr(spec, "data", spec)
    out = Path(out_dir)
    block: dict = {}
    # both sets are read (and checked) before anything is written: a bad set leaves the folder untouched
    sets = {cls: (getattr(data, cls), load_source(getattr(data, cls), f"data.{cls}", spec_file))
            for cls in ("harmful", "harmless")}
    out.mkdir(parents=True, exist_ok=True)
    for cls, (src, loaded) in sets.items():
        if loaded.canonical is None:
            target = out / f"{cls}{Path(src.path).suffix}"
            target.write_bytes(Path(src.path).read_bytes())
            block[cls] = {**src.model_dump(mode="json"), "path": str(target)}
        else:
            target = out / f"{cls}.jsonl"
            target.write_bytes(loaded.canonical)
            c = loaded.merged
            block[cls] = {"path": str(target), "instruction_column": c.instruction_column, "id_column": c.id_column,
                          "split_column": c.split_column, "reference_column": c.reference_column,
                          "pair_column": c.pair_column,
                          **({"category_column": c.category_column} if c.category_column else {})}
    block |= {k: getattr(data, k) for k in ("n_train", "n_val", "n_test")}
    return yaml.safe_dump({"data": block}, sort_keys=False)
