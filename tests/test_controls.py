"""Random controls with several draws (`controls: K`, issue 18 item 12).

K = 1 (`controls: true`) keeps the cell ids of before (golden ids of the quickstart's control arms,
computed before K existed) and today's draw (against an independent re-implementation of the seeding);
K >= 2 adds draws 1..K-1 as their own cells, which are distinct, norm-matched and reproducible; K draws
in one batch equal each draw run alone; the summary and cost statistics over draws against numpy; a
weight arm's control uses its hook twin's draws (capability run on the toy qwen-xs: orthogonalized
control draw j equals ablation control draw j, CE and KL to 1e-4); the rule's new `control_statistic`
leaves existing rules' hashes alone.
"""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import pandas as pd
import pytest
import yaml

from refusal_ray.grid import Cell

from conftest import REPO, TOY_MODELS, TOY_PROMPTS

QWEN_XS = TOY_MODELS / "toy-qwen-xs"
HELDOUT = TOY_PROMPTS / "heldout.jsonl"
RULE = {"control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25,
                           "addition_coefficient": 1.0, "ablation_alpha": 1.0},
        "steering_labels": {"strong": 0.5, "weak": 0.2}}

# sha256 of the comma-joined sorted ids of the quickstart's control cells that read no stage-select settings
# (steer: 168 addition controls; capability: 8 addition controls), computed at commit e97f015, before
# `controls: K`. Arms that read select carry its settings in their ids, which issue 18 changes elsewhere.
GOLDEN = {"steer": (168, "7693c154a81025ff"), "capability": (8, "4af3634c2edf7218")}
GOLDEN_RULE_HASH = "efa39bd790d9e968"   # the quickstart's decision rule, before control_statistic existed


def _write(tmp_path, spec: dict, name: str = "spec.yaml") -> str:
    f = tmp_path / name
    f.write_text(yaml.safe_dump(spec))
    return str(f)


@pytest.fixture(scope="module")
def quickstart_plans(tmp_path_factory):
    """The quickstart's plan as shipped (controls: true) and with controls: 3 in steer and capability."""
    from refusal_ray.plan import make_plan

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        one = make_plan("sweeps/quickstart.yaml")
        spec = yaml.safe_load((REPO / "sweeps" / "quickstart.yaml").read_text())
        spec["stages"]["steer"]["controls"] = 3
        spec["stages"]["capability"]["controls"] = 3
        three = make_plan(_write(tmp_path_factory.mktemp("k3"), spec))
    return one, three


def test_k1_keeps_the_quickstart_control_cell_ids(quickstart_plans):
    one, _ = quickstart_plans
    for stage, (n, digest) in GOLDEN.items():
        ids = sorted(c.id for c in one.cells if c.stage == stage and c.params["control"] and "select" not in c.params)
        assert (len(ids), hashlib.sha256(",".join(ids).encode()).hexdigest()[:16]) == (n, digest), stage
    assert not any("control_draw" in c.params for c in one.cells)


def test_k3_adds_draws_1_and_2_beside_every_k1_cell(quickstart_plans):
    one, three = quickstart_plans
    ids3 = {c.id: c for c in three.cells}
    assert {c.id for c in one.cells} <= set(ids3)                         # draw 0 is the K=1 cell, id and all
    extra = [c for c in three.cells if c.id not in {x.id for x in one.cells}]
    assert {c.params["control_draw"] for c in extra} == {1, 2} and all(c.params["control"] for c in extra)
    controls1 = [c for c in one.cells if c.stage in ("steer", "capability") and c.params["control"]]
    assert len(extra) == 2 * len(controls1)
    for c in extra:                                                        # each extra draw is a K=1 control + a draw
        base = {k: v for k, v in c.params.items() if k != "control_draw"}
        if "draws_from" in base:
            base["draws_from"] = {k: v for k, v in base["draws_from"].items() if k != "control_draw"}
            assert c.params["draws_from"].get("control_draw") == c.params["control_draw"]
        assert any(x.params == base and x.model == c.model and x.seed == c.seed for x in controls1)


def test_rule_hash_unchanged_without_control_statistic(tmp_path):
    from refusal_ray.spec import load_spec

    spec = load_spec(REPO / "sweeps" / "quickstart.yaml")
    assert spec.rule_hash() == GOLDEN_RULE_HASH
    assert "control_statistic" not in spec.decision_rule.model_dump()["control_margin"]
    raw = yaml.safe_load((REPO / "sweeps" / "quickstart.yaml").read_text())
    for value in ("mean", "quantile"):
        raw["decision_rule"]["control_margin"]["control_statistic"] = value
        other = load_spec(_write(tmp_path, raw))
        assert other.decision_rule.control_margin.control_statistic == value
        assert other.rule_hash() != GOLDEN_RULE_HASH


@pytest.mark.parametrize("value,want", [(True, True), (False, False), (1, True), (0, False), (4, 4)])
def test_controls_values(value, want):
    from refusal_ray.spec import SteerStage, n_draws

    got = SteerStage(controls=value).controls
    assert got == want and type(got) is type(want)
    assert n_draws(got) == {True: 1, False: 0}.get(want, want)


def test_negative_controls_exit_2_naming_the_field(tmp_path):
    from typer.testing import CliRunner

    from refusal_ray.cli import app
    from test_bad_input import base_spec

    spec = base_spec(QWEN_XS)
    spec["stages"]["steer"]["controls"] = -2
    f = _write(tmp_path, spec)
    result = CliRunner().invoke(app, ["validate", f])
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: {f}: stages.steer.controls: true (one random draw per arm), "
                                     f"false (none) or a number of draws K >= 2")


# -- the draws ---------------------------------------------------------------------------------------
def _todays_draw(cell_id: str, like: np.ndarray) -> np.ndarray:
    """The control direction as the code before `controls: K` drew it (re-implemented here)."""
    seed = int(hashlib.sha256(cell_id.encode()).hexdigest()[:8], 16)
    g = np.random.default_rng(seed).standard_normal(like.shape[0])
    return (g / np.linalg.norm(g) * np.linalg.norm(like)).astype(np.float32)


def _inputs(d: int = 16) -> tuple:
    from refusal_ray.ops.base import SteerInputs

    rng = np.random.default_rng(7)
    vectors = {layer: rng.standard_normal(d).astype(np.float32) * (layer + 1) for layer in range(3)}
    return SteerInputs(vectors, best=1), vectors


def _cells(draws: int, stage: str = "steer") -> list[Cell]:
    from refusal_ray.ops.base import control_arms

    arms = control_arms({"mode": "addition", "layer": 1, "coefficient": 2.0, "alpha": 0.0, "direction_layer": 1},
                        draws)
    return [Cell(hashlib.sha256(repr(sorted(p.items())).encode()).hexdigest()[:20], stage, "m", 0, p)
            for p in arms]


def test_k1_control_row_direction_is_todays_draw():
    from refusal_ray.ops.base import arm_columns, direction_of as arm_direction

    d, vectors = _inputs()
    _, ctl = _cells(1)
    assert ctl.params == {"mode": "addition", "layer": 1, "coefficient": 2.0, "alpha": 0.0, "direction_layer": 1,
                          "control": True}
    np.testing.assert_array_equal(arm_direction(ctl, d)[2], _todays_draw(ctl.id, vectors[1]))
    assert "control_draw" not in arm_columns(ctl, d)


def test_k_draws_are_distinct_norm_matched_and_reproducible():
    from refusal_ray.ops.base import arm_columns, direction_of as arm_direction

    d, vectors = _inputs()
    cells = _cells(5)
    real = arm_direction(cells[0], d)[2]
    draws = np.stack([arm_direction(c, d)[2] for c in cells[1:]])
    assert draws.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(draws, axis=1), np.linalg.norm(vectors[1]), rtol=1e-6)
    unit = draws / np.linalg.norm(draws, axis=1, keepdims=True)
    cos = unit @ unit.T
    assert np.abs(cos[~np.eye(5, dtype=bool)]).max() < 0.99                     # distinct directions
    assert abs(float(unit[0] @ real) / np.linalg.norm(real)) < 0.99
    np.testing.assert_array_equal(draws, np.stack([arm_direction(c, d)[2] for c in cells[1:]]))   # reproducible
    np.testing.assert_array_equal(draws[0], _todays_draw(cells[1].id, vectors[1]))      # draw 0 = today's
    assert [arm_columns(c, d).get("control_draw") for c in cells[1:]] == [None, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def toy_lm():
    from refusal_ray import load_model

    return load_model(str(QWEN_XS))


def test_k_draws_in_one_batch_equal_each_draw_alone(toy_lm):
    """Run steer's rows for an arm and its 3 control draws in one call, and each draw alone: the same
    completions, and the draws differ from one another (else the equality proves nothing)."""
    from refusal_ray.data import PromptSet, read_table
    from refusal_ray.stages.steer import SteerInputs, run_steer

    df = read_table(TOY_PROMPTS / "harmless.jsonl")
    harm = read_table(TOY_PROMPTS / "harmful.jsonl")
    prompts = {"harmful": PromptSet([str(i) for i in range(3)], list(harm["instruction"][:3]), [None] * 3),
               "harmless": PromptSet([str(i) for i in range(3)], list(df["instruction"][:3]), [None] * 3)}
    rng = np.random.default_rng(0)
    d_model = toy_lm.sites.d_model
    d = SteerInputs({1: (rng.standard_normal(d_model) * 8).astype(np.float32)}, best=1)
    cells = _cells(3)[1:]
    arms, comps = run_steer(toy_lm, cells, prompts, d, max_new_tokens=6, batch_size=64)
    alone = [run_steer(toy_lm, [c], prompts, d, max_new_tokens=6, batch_size=64) for c in cells]
    batched = pd.DataFrame(comps)
    single = pd.concat([pd.DataFrame(c) for _, c in alone], ignore_index=True)
    cols = ["cell_id", "prompt_set", "prompt_id", "completion", "refusal"]
    pd.testing.assert_frame_equal(batched[cols].sort_values(cols[:3]).reset_index(drop=True),
                                  single[cols].sort_values(cols[:3]).reset_index(drop=True))
    assert batched.groupby("cell_id")["completion"].apply(tuple).nunique() > 1
    assert sorted(pd.DataFrame(arms)["control_draw"].fillna(0).astype(int).unique()) == [0, 1, 2]


# -- statistics over draws ---------------------------------------------------------------------------
def test_capability_cost_draw_statistics_against_numpy():
    from refusal_ray.stages.capability.read import capability_cost, summary_columns

    rng = np.random.default_rng(3)
    rows = []
    base = {0: 2.0, 1: 2.5}
    for seed in (0, 1):
        rows.append({"model": "m", "seed": seed, "arm": "baseline", "control": False, "coefficient": 0.0,
                     "alpha": 0.0, "direction": None, "metric": "ce_loss", "value": base[seed]})
        rows.append({"model": "m", "seed": seed, "arm": "ablation", "control": False, "coefficient": 0.0,
                     "alpha": 1.0, "direction": "selected", "metric": "ce_loss", "value": base[seed] + 0.5})
    values = rng.uniform(0, 1, size=(4, 2))                        # [draw, seed] control CE increase
    for j in range(4):
        for seed in (0, 1):
            rows.append({"model": "m", "seed": seed, "arm": "ablation", "control": True, "coefficient": 0.0,
                         "alpha": 1.0, "direction": "selected", "metric": "ce_loss",
                         "value": base[seed] + values[j, seed], **({"control_draw": j} if j else {})})
    cost = capability_cost(pd.DataFrame(rows))
    ctl = cost[(cost["arm"] == "ablation") & cost["control"]].iloc[0]
    per_draw = values.mean(axis=1)
    # independent: mean, sd (ddof 1) and linear 0.95 quantile of the 4 per-draw costs
    srt = np.sort(per_draw)
    q = srt[2] + (srt[3] - srt[2]) * (0.95 * 3 - 2)
    assert ctl["draws"] == 4 and ctl["seeds"] == 2
    assert ctl["cost"] == pytest.approx(per_draw.sum() / 4)
    assert ctl["cost_sd"] == pytest.approx(np.sqrt(((per_draw - per_draw.mean()) ** 2).sum() / 3))
    assert ctl["cost_q95"] == pytest.approx(q)
    real = cost[(cost["arm"] == "ablation") & ~cost["control"]].iloc[0]
    assert real["draws"] == 1 and np.isnan(real["cost_sd"]) and real["cost_q95"] == pytest.approx(0.5)
    cols = summary_columns(cost, "m", RULE)
    assert cols["control_draws[ablation]"] == 4
    assert cols["cost_ce_sd[ablation-ctl]"] == pytest.approx(ctl["cost_sd"])
    assert cols["cost_ce_q95[ablation-ctl]"] == pytest.approx(q)
    one = capability_cost(pd.DataFrame([r for r in rows if "control_draw" not in r]))
    assert not any(k.startswith(("control_draws", "cost_ce_sd")) for k in summary_columns(one, "m", RULE))


def _pooled(abl_ctl: list[float], add_ctl: list[float]) -> pd.DataFrame:
    """Pooled arms of one model, one row per control draw (as pooled_arms gives them per `control_draw`)."""
    def row(mode, pset, rate, control=False, draw=0, layer=-1, coef=0.0, alpha=0.0):
        return {"mode": mode, "layer": layer, "coefficient": coef, "alpha": alpha, "control": control,
                "control_draw": draw, "direction_layer": 1, "direction_position": -1, "subspace": "",
                "prompt_set": pset, "rate": rate, "seeds": 1}
    rows = [row("baseline", "harmful", 0.9), row("baseline", "harmless", 0.1),
            row("ablation", "harmful", 0.2, alpha=1.0), row("addition", "harmless", 0.8, layer=1, coef=1.0)]
    rows += [row("ablation", "harmful", r, True, j, alpha=1.0) for j, r in enumerate(abl_ctl)]
    rows += [row("addition", "harmless", r, True, j, layer=1, coef=1.0) for j, r in enumerate(add_ctl)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("statistic", [None, "mean", "quantile"])
def test_summary_control_statistics_against_numpy(statistic):
    from refusal_ray.analysis.summary import steer_columns

    abl_ctl, add_ctl = [0.9, 0.7, 0.8, 0.4, 0.85], [0.1, 0.2, 0.45, 0.15, 0.1]
    rule = copy.deepcopy(RULE)
    if statistic:
        rule["control_margin"]["control_statistic"] = statistic
    out = steer_columns(_pooled(abl_ctl, add_ctl), 1, rule)
    supp = 0.9 - np.array(abl_ctl)
    ind = np.array(add_ctl) - 0.1
    assert out["control_draws"] == 5 and out["control_statistic"] == (statistic or "mean")
    assert out["ablation_control_suppression_mean"] == pytest.approx(supp.mean())
    assert out["ablation_control_suppression_sd"] == pytest.approx(np.sqrt(((supp - supp.mean()) ** 2).sum() / 4))
    srt = np.sort(supp)                                            # linear 0.95 quantile of 5: 3.8 -> srt[3..4]
    assert out["ablation_control_suppression_q95"] == pytest.approx(srt[3] + 0.8 * (srt[4] - srt[3]))
    srt = np.sort(ind)
    assert out["addition_control_induction_q95"] == pytest.approx(srt[3] + 0.8 * (srt[4] - srt[3]))
    if statistic == "quantile":      # vs the draws' 0.95 quantile of the controls' shifts
        q_abl, q_add = out["ablation_control_suppression_q95"], out["addition_control_induction_q95"]
        assert out["ablation_suppression_vs_control"] == pytest.approx((0.9 - 0.2) - q_abl)
        assert out["addition_induction_vs_control"] == pytest.approx((0.8 - 0.1) - q_add)
    else:
        assert out["ablation_suppression_vs_control"] == pytest.approx(np.mean(abl_ctl) - 0.2)
        assert out["addition_induction_vs_control"] == pytest.approx(0.8 - np.mean(add_ctl))


def test_summary_with_one_draw_is_as_before():
    from refusal_ray.analysis.summary import steer_columns

    a = _pooled([0.6], [0.3]).drop(columns="control_draw")
    out = steer_columns(a, 1, RULE)
    assert out["ablation_suppression_vs_control"] == 0.6 - 0.2 and out["addition_induction_vs_control"] == 0.8 - 0.3
    assert "control_draws" not in out and "ablation_control_suppression_sd" not in out


# -- twin arms share draws ---------------------------------------------------------------------------
def _cap_spec(controls, arms=("baseline", "ablation", "orthogonalized")) -> dict:
    return {
        "name": "controls",
        "models": [{"name": "qwen-xs", "path": str(QWEN_XS)}],
        "data": {"harmful": {"path": str(TOY_PROMPTS / "harmful.jsonl"), "split_column": "split"},
                 "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl"), "split_column": "split",
                              "reference_column": "reference"},
                 "n_train": 16, "n_val": 8, "n_test": 4},
        "seeds": [0],
        "stages": {"directions": {"sites": ["resid_pre"]},
                   "steer": {"addition": None, "controls": False,
                             "ablation": {"alphas": [1.0], "direction_layer": "best"}},
                   "capability": {"arms": list(arms), "controls": controls, "alphas": [0.5, 1.0], "generate": False,
                                  "text": {"path": str(HELDOUT), "n": 4}}},
        "generation": {"max_new_tokens": 2},
        "decision_rule": RULE,
    }


def test_weight_arm_controls_name_their_hook_twin_of_the_same_draw(tmp_path):
    from refusal_ray.plan import make_plan

    cells = [c for c in make_plan(_write(tmp_path, _cap_spec(3))).cells if c.stage == "capability"]
    hook = {c.params.get("control_draw", 0): c for c in cells
            if c.params["mode"] == "ablation" and c.params["control"] and c.params["alpha"] == 1.0}
    weight = [c for c in cells if c.params["mode"] == "orthogonalized" and c.params["control"]]
    assert len(hook) == len(weight) == 3
    for c in weight:
        assert c.params["draws_from"] == hook[c.params.get("control_draw", 0)].params
    real = [c for c in cells if c.params["mode"] == "orthogonalized" and not c.params["control"]]
    assert len(real) == 1 and "draws_from" not in real[0].params   # the real arm's id is unchanged


def test_orthogonalized_controls_equal_their_hook_twins_draw_by_draw(tmp_path):
    """On the toy qwen-xs: in-memory orthogonalisation equals hook ablation for the same direction, so
    with shared draws each orthogonalized control draw costs what its ablation twin costs (1e-4), while
    the draws differ from one another."""
    from test_capability import _run_local

    _, out, _ = _run_local(_cap_spec(2), tmp_path)
    assert set(out["cells"]["status"]) == {"done"}, out["cells"][["status", "error"]]
    cap = out["capability"]
    cap = cap.assign(control_draw=cap["control_draw"].fillna(0).astype(int) if "control_draw" in cap else 0)
    ctl = cap[cap["control"] & cap["metric"].isin(["ce_loss", "first_token_kl"]) & (cap["alpha"] == 1.0)]
    wide = ctl.pivot_table(index=["control_draw", "metric"], columns="arm", values="value")
    assert len(wide) == 4
    np.testing.assert_allclose(wide["orthogonalized"], wide["ablation"], atol=1e-4)
    ce = wide.xs("ce_loss", level="metric")["ablation"]
    assert abs(ce.iloc[0] - ce.iloc[1]) > 1e-4                      # two different draws
