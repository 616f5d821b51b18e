"""Rank sweep cost: one batched run of every (k, control) arm against K separate runs (one per k), in one run.

Shape: stage rank's sweep on one (model, seed): the baseline plus k = 1..K (K = 4) subspace-ablation arms, each
beside its same-rank random control, on 32 harmful toy test prompts, 24 new tokens, greedy.
  one run     `run_rank` over all 1 + 2K cells: rows of different ranks share each `generate` call (bases
              zero-padded per row to the chunk's largest rank)
  K runs      `run_rank` once per k on that k's arm and control (the baseline with k = 1): what a loop over
              k (one subspace-ablation run per rank) does
Both at the same batch size (64 rows). The bases are a fixed random orthonormal set (the cost does not depend
on where they come from). The two give the same rows (checked). Reported as the ratio K runs / one run.
Run: python benchmarks/rank_sweep.py [--model data/models/toy-qwen-m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from refusal_ray.data import PromptSet
from refusal_ray.grid import Cell
from refusal_ray.models.loading import load_model
from refusal_ray.stages.rank.run import Bases, RankInputs, run_rank

REPO = Path(__file__).resolve().parent.parent
K, N_PROMPTS, NEW_TOKENS, BATCH = 4, 32, 24, 64


def prompts(n: int = N_PROMPTS) -> PromptSet:
    import pandas as pd

    df = pd.read_json(REPO / "data" / "prompts" / "toy" / "harmful.jsonl", lines=True)
    df = df[df["split"] == "test"].head(n)
    return PromptSet(list(df["id"]), list(df["instruction"]), [None] * len(df), categories=list(df["category"]))


def cells(k_max: int) -> list[Cell]:
    common = {"layer": None, "position": -1, "alpha": 1.0, "ablation_layers": []}
    out = [Cell("base", "rank", "bench", 0, {"source": "baseline", "k": 0, "control": False, "transfer": False,
                                             **common})]
    for k in range(1, k_max + 1):
        for control in (False, True):
            out.append(Cell(f"pca{k}{'c' if control else ''}", "rank", "bench", 0,
                            {"source": "pca", "k": k, "control": control, "transfer": False, **common}))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(REPO / "data" / "models" / "toy-qwen-m"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=N_PROMPTS, help="harmful test prompts per arm")
    args = ap.parse_args()
    lm = load_model(args.model)
    d_model, layers = lm.sites.d_model, list(range(lm.sites.n_layers))
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((d_model, K)))
    bases = Bases(RankInputs({}, 1, -1), pca=q.T.copy())
    test, all_cells = prompts(args.prompts), cells(K)
    for c in all_cells:
        c.params["ablation_layers"] = layers
    kw = dict(ablation_layers=layers, alpha=1.0, max_new_tokens=NEW_TOKENS, batch_size=BATCH)

    def one():
        return run_rank(lm, all_cells, bases, test, **kw)[0]

    def separate():
        rows = []
        for k in range(1, K + 1):
            mine = [c for c in all_cells if c.params["k"] == k or (k == 1 and c.params["source"] == "baseline")]
            rows += run_rank(lm, mine, bases, test, **kw)[0]
        return rows

    def timed(fn):
        best, rows = float("inf"), None
        for _ in range(args.repeats):
            t = time.perf_counter()
            rows = fn()
            best = min(best, time.perf_counter() - t)
        return best, rows

    t_one, r_one = timed(one)
    t_sep, r_sep = timed(separate)
    key = lambda r: (r["cell_id"], str(r["category"]))   # noqa: E731
    same = sorted((key(r), r["refusals"], r["n"]) for r in r_one) == sorted((key(r), r["refusals"], r["n"])
                                                                           for r in r_sep)
    out = {"model": Path(args.model).name, "K": K, "cells": len(all_cells), "prompts": len(test), "rows": len(all_cells) * len(test),
           "new_tokens": NEW_TOKENS, "batch_size": BATCH, "one_run_s": round(t_one, 2), "k_runs_s": round(t_sep, 2),
           "ratio_k_runs_over_one": round(t_sep / t_one, 2), "same_rows": same}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
