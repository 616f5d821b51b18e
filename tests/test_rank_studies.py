"""Stage rank's specs: sweeps/refusal_rank_scale.yaml (the study: a header naming what it extends, schema-valid,
the user's own prompt files, hub models only, validates offline) and its toy twin sweeps/toy/dimensionality.yaml,
which runs every source (select, pca, category, optimised) end to end through `refusal-ray run` and prints a
refusal rank per model (slow: Ray and stage optimise, about two minutes)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pandas as pd
import pytest

from conftest import REPO, TOY_PROMPTS

SWEEPS = REPO / "sweeps"
CLI = REPO / ".venv" / "bin" / "refusal-ray"
STUDY = SWEEPS / "refusal_rank_scale.yaml"
TOY = SWEEPS / "toy" / "dimensionality.yaml"
LADDER = ["Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-3B-Instruct",
          "Qwen/Qwen2.5-7B-Instruct", "meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-3B-Instruct",
          "meta-llama/Llama-3.1-8B-Instruct"]


def test_study_spec_names_what_it_extends_and_asks_the_ladder():
    from refusal_ray.spec import load_spec

    spec = load_spec(STUDY)
    header = "".join(line for line in STUDY.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert header.startswith("# Study: ") and "extends" in header and "differ" in header
    assert "sweeps/scale_audit.yaml" in header and "sweeps/llama32_subspace.yaml" in header
    assert "prompts/harmful.jsonl" in header and "prompts/harmless.jsonl" in header
    assert [m.hub_id for m in spec.models] == LADDER
    assert all(m.path is None and m.dtype == "bfloat16" for m in spec.models)
    assert spec.data.harmful.path == "prompts/harmful.jsonl" and spec.data.harmful.category_column == "category"
    assert spec.stages.rank is not None and set(spec.stages.rank.sources) == {"select", "pca", "category"}


def test_study_spec_validates_offline(tmp_path):
    (tmp_path / "prompts").mkdir()
    for name in ("harmful", "harmless"):          # stand-ins for the user's files (the toy ones have `category`)
        shutil.copy(TOY_PROMPTS / f"{name}.jsonl", tmp_path / "prompts" / f"{name}.jsonl")
    shutil.copy(STUDY, tmp_path / STUDY.name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("HF_HUB_CACHE", None)
    env.pop("TRANSFORMERS_CACHE", None)
    result = subprocess.run([str(CLI), "validate", STUDY.name], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, (result.stdout, result.stderr)
    lines = [ln for ln in (result.stdout + result.stderr).splitlines() if ln.startswith("could not check offline: models.")]
    assert len(lines) == len(LADDER)


@pytest.mark.slow
def test_toy_dimensionality_runs_end_to_end_and_prints_a_rank_per_model(tmp_path):
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "out"
    result = subprocess.run([str(CLI), "run", str(TOY), "--out", str(out), "--no-progress"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    lines = result.stdout.splitlines()
    start = lines.index("refusal rank per source:")
    table = lines[start + 1: start + 7]
    assert table[0].split()[:3] == ["model", "rank", "select"]
    models = ["qwen-xs", "qwen-s", "qwen-m", "llama-s"]
    rows = {ln.split()[0]: ln for ln in table[2:]}
    assert sorted(rows) == sorted(models)
    for m in models:   # a rank (k, "> K" or "n/a") for the pca and category sources of every model
        cells = rows[m].split()
        assert cells[0] == m and len(cells) >= 3, rows[m]
    summary = pd.read_csv(out / "summary.csv")
    ok = {str(k) for k in range(1, 4)} | {"> 3", "n/a"}
    for source in ("pca", "category", "optimised"):   # every source of the spec but select (qwen-xs selects none)
        assert set(summary[f"rank[{source}]"].astype(str)) <= ok, summary[f"rank[{source}]"]
    report = (out / "report.md").read_text()
    assert "## Refusal rank" in report and (out / "figures" / "rank_curve.png").exists()
    assert (out / "figures" / "rank_scale.png").exists()
    cells = pd.read_parquet(out / "cells")
    assert not (cells["status"] == "failed").any()
