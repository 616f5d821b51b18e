"""Prompt sets: reading JSONL / CSV / Parquet, per-seed splits, and the chat template.

A new seed resamples the instructions of every split (and so refits the directions), as in the
pre-registered replication protocol.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from refusal_ray.errors import SpecError
from refusal_ray.spec import DataSpec, PromptFile

SPLITS = ("train", "val", "test")


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a prompt file by extension (.jsonl, .json, .csv, .parquet)."""
    path = Path(path)
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


@dataclass(frozen=True)
class PromptSet:
    """Instructions of one class (harmful or harmless) for one split and seed."""

    ids: list[str]
    instructions: list[str]
    references: list[str | None]

    def __len__(self) -> int:
        return len(self.ids)


def load_prompts(pf: PromptFile, field: str, spec_file: str = "<spec>") -> pd.DataFrame:
    """Read and check one prompt file. Raises SpecError naming the spec field."""
    path = Path(pf.path)
    if not path.is_file():
        raise SpecError(spec_file, f"{field}.path", f"file not found: {pf.path}")
    try:
        df = read_table(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is bad input
        raise SpecError(spec_file, f"{field}.path", f"cannot read {pf.path}: {e}".splitlines()[0]) from None
    if df.empty:
        raise SpecError(spec_file, f"{field}.path", f"prompt file is empty: {pf.path}")
    for key in ("instruction_column", "id_column", "split_column", "reference_column"):
        col = getattr(pf, key)
        if col is not None and col not in df.columns:
            raise SpecError(spec_file, f"{field}.{key}", f"column {col!r} not in {pf.path} "
                                                         f"(columns: {', '.join(map(str, df.columns))})")
    return df


def split_prompts(df: pd.DataFrame, pf: PromptFile, data: DataSpec, seed: int) -> dict[str, PromptSet]:
    """Draw n_train / n_val / n_test disjoint rows for `seed`.

    With a split column, each split samples from its own rows; without one, the whole file is
    shuffled and cut. Raises ValueError when a split has too few rows.
    """
    rng = np.random.default_rng(seed)
    want = {"train": data.n_train, "val": data.n_val, "test": data.n_test}
    ids = df[pf.id_column].astype(str) if pf.id_column else pd.Series(map(str, range(len(df))))
    out: dict[str, PromptSet] = {}
    if pf.split_column:
        pools = {s: np.flatnonzero(df[pf.split_column].astype(str).to_numpy() == s) for s in SPLITS}
    else:
        order = rng.permutation(len(df))
        cuts = np.cumsum([want[s] for s in SPLITS])
        pools = {s: order[c - want[s]: c] for s, c in zip(SPLITS, cuts)}
    for split in SPLITS:
        pool = pools[split]
        if len(pool) < want[split]:
            raise ValueError(f"{pf.path}: split {split!r} has {len(pool)} rows, n_{split} asks for {want[split]}")
        rows = np.sort(rng.choice(pool, size=want[split], replace=False))
        refs = (df[pf.reference_column].iloc[rows].tolist() if pf.reference_column else [None] * len(rows))
        out[split] = PromptSet(ids.iloc[rows].tolist(), df[pf.instruction_column].iloc[rows].astype(str).tolist(),
                               [None if (r is None or (isinstance(r, float) and np.isnan(r))) else str(r) for r in refs])
    return out


def chat_prompts(tokenizer, instructions: list[str]) -> list[str]:
    """Instructions wrapped in the tokenizer's chat template with a generation prompt."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": x}], add_generation_prompt=True,
                                          tokenize=False) for x in instructions]


def encode(tokenizer, instructions: list[str]):
    """Left-padded token batch of chat prompts: (input_ids, attention_mask), each [batch, pos]."""
    enc = tokenizer(chat_prompts(tokenizer, instructions), return_tensors="pt", padding=True,
                    add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]
