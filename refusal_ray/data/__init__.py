"""Prompt sets: reading JSONL / CSV / Parquet, per-seed splits, and the chat template.

Reading one file: `refusal_ray.data.files`; per-split and Hugging Face `datasets` sources and their
canonical merged form: `refusal_ray.data.sources` (names re-exported here).

A new seed resamples the instructions of every split (and so refits the directions), as in the
pre-registered replication protocol.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from refusal_ray.data.files import fingerprint, load_file, read_table  # noqa: F401 - the old import paths
from refusal_ray.data.files import text_or_none
from refusal_ray.data.sources import (Columns, Loaded, SourceUnreachable, data_fingerprint,  # noqa: F401
                                      load_source, write_merged)

if TYPE_CHECKING:   # annotations only: the spec (above the stages) imports the stages, which import this module
    from refusal_ray.spec import DataSpec, PromptFile

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PromptSet:
    """Instructions of one class (harmful or harmless) for one split and seed."""

    ids: list[str]
    instructions: list[str]
    references: list[str | None]
    categories: list[str | None] | None = None   # each row's category (None: the source names no category column)

    def __post_init__(self):
        if self.categories is None:
            object.__setattr__(self, "categories", [None] * len(self.ids))

    def __len__(self) -> int:
        return len(self.ids)


def load_prompts(pf: PromptFile, field: str, spec_file: str = "<spec>") -> pd.DataFrame:
    """Read and check one prompt set's rows (`load_source(...).frame`: a single file as read, a per-split
    or `datasets` set's canonical merged form). Raises SpecError naming the spec field."""
    return load_source(pf, field, spec_file).frame


def row_ids(df: pd.DataFrame, pf: PromptFile) -> pd.Series:
    """Each row's id as a string: the file's id column, or the row number (the index of the file as read)."""
    return df[pf.id_column].astype(str) if pf.id_column else pd.Series(map(str, df.index), index=df.index)


def files_fingerprint(paths) -> str:
    """One hash over the prompt files (the manifest's `data_fingerprint` for single-file sets)."""
    return data_fingerprint(fingerprint(p) for p in paths)


def split_prompts(df: pd.DataFrame, pf: PromptFile, data: DataSpec, seed: int) -> dict[str, PromptSet]:
    """Draw n_train / n_val / n_test disjoint rows for `seed`.

    With a split column, each split samples from its own rows; without one, the whole file is
    shuffled and cut. Raises ValueError when a split has too few rows.
    """
    rng = np.random.default_rng(seed)
    want = {"train": data.n_train, "val": data.n_val, "test": data.n_test}
    ids = row_ids(df, pf)
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
        cat = getattr(pf, "category_column", None)
        cats = [text_or_none(c) for c in df[cat].iloc[rows]] if cat else None
        out[split] = PromptSet(ids.iloc[rows].tolist(), df[pf.instruction_column].iloc[rows].astype(str).tolist(),
                               [None if (r is None or (isinstance(r, float) and np.isnan(r))) else str(r) for r in refs],
                               cats)
    return out


def chat_prompts(tokenizer, instructions: list[str], chat=None) -> list[str]:
    """Instructions wrapped in the tokenizer's chat template with a generation prompt.

    `chat`: a `refusal_ray.models.chat.ChatOptions` (system prompt, fixed date); None: the defaults
    (no system prompt). Raises TemplateError when the tokenizer has no chat template.
    """
    from refusal_ray.models.chat import ChatOptions, render

    return render(tokenizer, instructions, chat or ChatOptions())


def prompt_tokens(tokenizer, instructions: list[str], chat=None) -> list[list[int]]:
    """Token ids of each rendered chat prompt (unpadded; the template's own special tokens only)."""
    return tokenizer(chat_prompts(tokenizer, instructions, chat), add_special_tokens=False)["input_ids"]


def encode(tokenizer, instructions: list[str], chat=None):
    """Left-padded token batch of chat prompts: (input_ids, attention_mask), each [batch, pos]."""
    enc = tokenizer(chat_prompts(tokenizer, instructions, chat), return_tensors="pt", padding=True,
                    add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


@dataclass(frozen=True)
class Pairs:
    """Aligned harmful/harmless prompts: row i of `harmful` and of `harmless` share `pair_ids[i]`."""

    pair_ids: list[str]
    harmful: PromptSet
    harmless: PromptSet

    def __len__(self) -> int:
        return len(self.pair_ids)


def draw_pairs(harmful: pd.DataFrame, harmless: pd.DataFrame, pf_harmful: PromptFile, pf_harmless: PromptFile,
               n: int, seed: int, split: str = "test") -> Pairs:
    """`n` pairs from `split` (the whole file without a split column), drawn with `seed`.

    With pair columns, rows are matched by pair id (a minimal pair: clean and corrupted input);
    without, the i-th harmful and harmless draws form a pair. Raises ValueError when fewer than
    `n` pairs exist.
    """
    rng = np.random.default_rng(seed)

    def rows(df: pd.DataFrame, pf: PromptFile) -> pd.DataFrame:
        if pf.split_column:
            df = df[df[pf.split_column].astype(str) == split]
        ids = row_ids(df, pf)
        refs = df[pf.reference_column] if pf.reference_column else pd.Series([None] * len(df), index=df.index)
        out = pd.DataFrame({"id": ids, "instruction": df[pf.instruction_column].astype(str),
                            "reference": [None if r is None or (isinstance(r, float) and np.isnan(r)) else str(r)
                                          for r in refs]}, index=df.index)
        if pf.pair_column:
            out["pair"] = df[pf.pair_column].astype(str)
        return out.reset_index(drop=True)

    a, b = rows(harmful, pf_harmful), rows(harmless, pf_harmless)
    if pf_harmful.pair_column and pf_harmless.pair_column:
        joined = a.merge(b, on="pair", suffixes=("_a", "_b")).sort_values("pair").reset_index(drop=True)
        if len(joined) < n:
            raise ValueError(f"split {split!r} has {len(joined)} harmful/harmless pairs, {n} asked for")
        pick = joined.iloc[np.sort(rng.choice(len(joined), size=n, replace=False))]
        pair_ids = pick["pair"].tolist()
    else:
        if min(len(a), len(b)) < n:
            raise ValueError(f"split {split!r} has {min(len(a), len(b))} rows in one class, {n} asked for")
        ia, ib = np.sort(rng.choice(len(a), n, replace=False)), np.sort(rng.choice(len(b), n, replace=False))
        pick = pd.concat([a.iloc[ia].add_suffix("_a").reset_index(drop=True),
                          b.iloc[ib].add_suffix("_b").reset_index(drop=True)], axis=1)
        pair_ids = [f"{x}|{y}" for x, y in zip(pick["id_a"], pick["id_b"])]

    def prompt_set(side: str) -> PromptSet:
        return PromptSet(pick[f"id_{side}"].tolist(), pick[f"instruction_{side}"].tolist(),
                         pick[f"reference_{side}"].tolist())

    return Pairs(pair_ids, prompt_set("a"), prompt_set("b"))


def left_pad(sequences: list[list[int]], pad_id: int):
    """Left-pad token id lists into (input_ids, attention_mask), each [batch, pos] int64."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def prompt_fingerprint(data_fingerprint: str, tokenizer, prompts: dict, chat) -> str:
    """Hash of the prompt files and of one seed's drawn prompts as token ids rendered for one model
    (`prompts`: split -> class -> PromptSet): the same files rendered with another template, system
    prompt or date give another hash; another seed's draw does not change this seed's."""
    h = hashlib.sha256(data_fingerprint.encode())
    for split in SPLITS:
        for cls in ("harmful", "harmless"):
            for ids in prompt_tokens(tokenizer, prompts[split][cls].instructions, chat):
                h.update(json.dumps(ids).encode())
    return h.hexdigest()[:16]
