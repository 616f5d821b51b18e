"""Extraction diagnostics of the Qwen-1.8B study: minimally paired vs randomly paired train prompts,
and batched vs sequential (one prompt at a time) extraction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import TOY_MODELS, TOY_PROMPTS


def _spec(tmp_path, **directions) -> str:
    spec = {
        "name": "diag",
        "models": [{"name": "qwen-xs", "path": str(TOY_MODELS / "toy-qwen-xs")}],
        "data": {"harmful": {"path": str(TOY_PROMPTS / "harmful.jsonl"), "pair_column": "pair_id"},
                 "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl"), "pair_column": "pair_id"},
                 "n_train": 12, "n_val": 6, "n_test": 4},
        "seeds": [0, 1],
        "stages": {"directions": directions, "steer": None},
        "decision_rule": {
            "control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25,
                               "addition_coefficient": 1.0, "ablation_alpha": 1.0},
            "steering_labels": {"strong": 0.5, "weak": 0.2}},
    }
    f = tmp_path / f"spec-{len(list(tmp_path.iterdir()))}.yaml"
    f.write_text(yaml.safe_dump(spec))
    return str(f)


def test_paired_train_prompts_are_the_harmful_prompts_twins(tmp_path):
    from refusal_ray.plan import make_plan

    paired = make_plan(_spec(tmp_path, pairing="paired"))
    random = make_plan(_spec(tmp_path, pairing="random"))
    drawn = make_plan(_spec(tmp_path))
    harm = pd.read_json(TOY_PROMPTS / "harmful.jsonl", lines=True).set_index("id")["pair_id"]
    safe = pd.read_json(TOY_PROMPTS / "harmless.jsonl", lines=True).set_index("id")["pair_id"]
    for seed in (0, 1):
        train = paired.prompts[seed]["train"]
        assert [harm[i] for i in train["harmful"].ids] == [safe[i] for i in train["harmless"].ids]
        assert train["harmful"].ids == random.prompts[seed]["train"]["harmful"].ids   # the same harmful draw
        assert len(set(random.prompts[seed]["train"]["harmless"].ids) & set(train["harmless"].ids)) < 4
        # the default draw: on these row-aligned files the same seed draws the twins
        assert drawn.prompts[seed]["train"]["harmless"].ids == train["harmless"].ids
    # other splits are untouched; the directions' cell ids differ (their inputs differ)
    assert paired.prompts[0]["test"]["harmless"].ids == random.prompts[0]["test"]["harmless"].ids
    assert {c.id for c in paired.cells}.isdisjoint({c.id for c in random.cells})


def test_paired_needs_pair_columns(tmp_path):
    from refusal_ray.errors import SpecError
    from refusal_ray.plan import make_plan

    f = _spec(tmp_path, pairing="paired")
    raw = yaml.safe_load(open(f))
    del raw["data"]["harmless"]["pair_column"]
    open(f, "w").write(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match=r": stages.directions.pairing 'paired' needs data.harmless.pair_column$"):
        make_plan(f)


def test_sequential_cosine_matches_an_unbatched_refit(tmp_path):
    from refusal_ray.cluster.local import run_local
    from refusal_ray.plan import make_plan
    from refusal_ray.stages.directions import fit_directions

    plan = make_plan(_spec(tmp_path, compare_sequential=True, positions=[-1, -3]))
    rows = pd.DataFrame(run_local(plan, log=lambda m: None)["directions"])
    assert (rows["pairing"] == "as drawn").all()
    # resid_pre of layer 0 at template positions is the same token embedding for every prompt: v = 0, no cosine
    zero = rows["norm"] == 0
    assert zero.any() and rows.loc[zero, "sequential_cosine"].isna().all()
    # left padding with an attention mask changes nothing beyond float noise on the toy model
    assert rows.loc[~zero, "sequential_cosine"].min() > 0.9999
    # the stored cosine is the cosine to an independent fit at batch size 1
    from refusal_ray import load_model

    lm = load_model(str(TOY_MODELS / "toy-qwen-xs"))
    p = plan.prompts[0]
    one = fit_directions(lm, (p["train"]["harmful"], p["train"]["harmless"]), (p["val"]["harmful"], p["val"]["harmless"]),
                         ["resid_pre"], [-1, -3], batch_size=1)
    seed0 = rows[rows["seed"] == 0].reset_index(drop=True)
    for r, o in zip(seed0.itertuples(), one):
        if r.norm == 0:
            continue
        v, w = np.asarray(r.vector, np.float64), np.asarray(o["vector"], np.float64)
        expect = v @ w / (np.linalg.norm(v) * np.linalg.norm(w))
        assert r.sequential_cosine == pytest.approx(expect, abs=1e-6)


def test_ids_of_specs_without_the_new_settings_are_unchanged(tmp_path):
    from refusal_ray.plan import make_plan

    explicit = make_plan(_spec(tmp_path, pairing=None, compare_sequential=False))
    implicit = make_plan(_spec(tmp_path))
    assert [c.id for c in explicit.cells] == [c.id for c in implicit.cells]
