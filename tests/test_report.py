"""The compiled report: a headline per model, a section per stage (present or saying it did not run),
and the capability-cost numbers it and the summary print equal to the store's rows."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, TOY_MODELS, TOY_PROMPTS

SECTIONS = ["## Headlines", "## Summary", "## Directions", "## Direction selection", "## Steering",
            "## Subspace ablation", "## Capability cost", "## Judges", "## Activation patching", "## Causal scrubbing"]


def _spec(tmp_path) -> str:
    spec = {
        "name": "report-toy",
        "models": [{"name": "qwen-xs", "path": str(TOY_MODELS / "toy-qwen-xs")}],
        "data": {"harmful": {"path": str(TOY_PROMPTS / "harmful.jsonl")},
                 "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl"), "reference_column": "reference"},
                 "n_train": 16, "n_val": 8, "n_test": 8},
        "seeds": [0, 1],
        "stages": {"directions": {"sites": ["resid_pre"], "positions": "post_instruction"},
                   # qwen-xs has 2 layers: the paper's layer filter keeps layer 0 only, whose template-token
                   # candidates are zero vectors, and its KL filter drops every toy candidate
                   "select": {"kl_max": None, "max_layer_fraction": None},
                   "steer": {"addition": {"layers": "all", "coefficients": [-1.0, 1.0]},
                             "subspace": {"top_k": 2}, "batch_size": 64},
                   "capability": {"text": {"path": str(TOY_PROMPTS / "heldout.jsonl"), "n": 16},
                                  "lm_eval": {"tasks": ["toy_choice"], "include_path": str(REPO / "tests" / "lmeval")}}},
        "generation": {"max_new_tokens": 12},
        "decision_rule": {"control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25,
                                             "addition_coefficient": 1.0, "ablation_alpha": 1.0},
                          "steering_labels": {"strong": 0.5, "weak": 0.2}},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec))   # JSON is YAML
    return str(path)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """A store written as `run` writes one, from run_local (no Ray)."""
    from refusal_ray.cluster.local import run_local
    from refusal_ray.plan import make_plan
    from refusal_ray.runner import freeze_manifest
    from refusal_ray.store import Store

    tmp = tmp_path_factory.mktemp("report")
    plan = make_plan(_spec(tmp))
    tables = run_local(plan, log=lambda *a: None)
    failed = [r for r in tables["cells"] if r["status"] == "failed"]
    assert not failed, failed[0]
    out = tmp / "out"
    store = Store(out)
    freeze_manifest(plan, store)
    for table, rows in tables.items():
        for model in {r["model"] for r in rows}:
            store.write(table, model, [{k: v for k, v in r.items() if k != "model"} for r in rows if r["model"] == model])
    return out


def test_report_has_every_section_in_order(store_dir):
    from refusal_ray.analysis.report import write_report

    text = open(write_report(store_dir)).read()
    positions = [text.find(h) for h in SECTIONS]
    assert all(p >= 0 for p in positions), [h for h, p in zip(SECTIONS, positions) if p < 0]
    assert positions == sorted(positions)
    assert "Not run in this sweep (no `stages.patch` block)." in text
    assert "Not run in this sweep (no `stages.scrub` block)." in text
    assert "![capability.png](figures/capability.png)" in text and (store_dir / "figures" / "capability.png").is_file()
    cap = text[text.find("## Capability cost"): text.find("## Judges")]
    for arm in ("baseline", "addition", "ablation", "subspace", "orthogonalized"):
        assert arm in cap


def test_headline_states_the_summary_numbers(store_dir):
    from refusal_ray.analysis.report import write_report
    from refusal_ray.analysis.summary import summarize

    text = open(write_report(store_dir)).read()
    row = summarize(store_dir).iloc[0]
    head = next(line for line in text.splitlines() if line.startswith("- **qwen-xs**"))
    assert f"control_margin **{row['verdict_control_margin']}**" in head
    assert f"steering_labels **{row['verdict_steering_labels']}**" in head
    assert (f"harmful refusal {row['baseline_harmful_refusal']:.2f} -> {row['ablation_harmful_refusal']:.2f}"
            in head)
    assert f"ablation (alpha=1) {row['cost_ce[ablation]']:+.3f} nats CE" in head


def test_cost_columns_equal_the_rows_recomputed_by_hand(store_dir):
    from refusal_ray.store import read
    from refusal_ray.analysis.summary import summarize

    cap = read(store_dir, "capability")
    row = summarize(store_dir).iloc[0]
    for arm in ("ablation", "orthogonalized", "addition"):
        diffs = []
        for seed in (0, 1):
            mine = cap[(cap["seed"] == seed) & (cap["metric"] == "ce_loss")]
            base = mine[mine["arm"] == "baseline"]["value"].iloc[0]
            hit = mine[(mine["arm"] == arm) & ~mine["control"].astype(bool)]
            diffs.append(hit.sort_values(["coefficient", "alpha"])["value"].iloc[0] - base)
        assert row[f"cost_ce[{arm}]"] == pytest.approx(np.mean(diffs), abs=1e-12)
        kl = cap[(cap["arm"] == arm) & ~cap["control"].astype(bool) & (cap["metric"] == "first_token_kl")]
        assert row[f"cost_kl[{arm}]"] == pytest.approx(kl.sort_values(["coefficient", "alpha"])
                                                       .groupby("seed")["value"].first().mean(), abs=1e-12)
    assert cap[(cap["arm"] == "baseline") & (cap["metric"] == "first_token_kl")]["value"].eq(0).all()


def test_cost_table_equals_plain_pandas_over_two_seeds(store_dir):
    """Every row of the stored cost table (every arm, setting, control and metric) against the cost
    recomputed with plain pandas from the capability rows of both seeds."""
    from refusal_ray.analysis.summary import read_cost, write_summary
    from refusal_ray.store import read

    from test_capability import assert_cost_equals_by_hand

    write_summary(store_dir)
    cap = read(store_dir, "capability")
    assert set(cap["seed"]) == {0, 1}
    want = assert_cost_equals_by_hand(read_cost(store_dir), cap)
    main = want.xs(False, level="control")
    assert (main["seeds"] == 2).all()
    ce = cap[(cap["metric"] == "ce_loss") & (cap["arm"] == "ablation") & ~cap["control"].astype(bool)]
    base = cap[(cap["metric"] == "ce_loss") & (cap["arm"] == "baseline")].set_index("seed")["value"]
    per_seed = ce.set_index("seed")["value"] - base
    assert per_seed.index.is_unique and len(per_seed) == 2
    assert main.xs(("ablation", "ce_loss"), level=("arm", "metric"))["cost"].iloc[0] == pytest.approx(
        per_seed.mean(), abs=1e-12)


def test_selection_rows_obey_the_filters_and_the_criterion(store_dir):
    """kl_max: null lets candidates pass on both seeds: exactly one selected per seed, the lowest
    bypass among those passing (recomputed in tests/test_e2e.py `check_selection`)."""
    from refusal_ray.store import Store

    from test_e2e import check_selection

    store = Store(store_dir)
    manifest = store.read_json("manifest.json")
    selection = store.read("selection")
    n_layers = {m: v["n_layers"] for m, v in manifest["models"].items()}
    assert check_selection(selection, n_layers, manifest["spec"]["stages"]["select"]) == 2


def test_cost_table_written_beside_the_summary(store_dir):
    from refusal_ray.analysis.summary import read_cost, render_cost, write_summary

    write_summary(store_dir)
    cost = read_cost(store_dir)
    wide = pd.read_csv(store_dir / "capability_cost.csv")
    assert {"ce_loss", "first_token_kl", "refusal_harmful", "lm_eval/toy_choice/acc"} <= set(wide.columns)
    base = cost[cost["arm"] == "baseline"]
    assert (base["cost"].abs() < 1e-12).all()
    text = render_cost(cost)
    assert text.startswith("capability cost") and "orthogonalized" in text and "d toy_choice/acc" in text


def test_report_of_a_sweep_without_capability_says_so(tmp_path):
    from refusal_ray.analysis.report import write_report

    from test_summary import make_store

    make_store(tmp_path / "out")
    text = open(write_report(tmp_path / "out")).read()
    assert "## Capability cost" in text and "Not run in this sweep (no `stages.capability` block)." in text
    assert "Not run in this sweep (no `stages.select` block)." in text
