"""ACE (affine concept editing, Marshall et al. 2024, arXiv 2411.09003): against an independent float64
implementation of x - (x.r)r + (mu_harmless.r)r + alpha r on random tensors, "set to harmless" at
alpha = 0, the reference options, the random control (own reference, same alpha), batched == unbatched,
other operators' rows bit-identical in a mixed chunk, the skip reason on a store without class means,
and bad-config errors."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from refusal_ray.core.cells import Cell
from refusal_ray.ops import OPS
from refusal_ray.ops.base import Chunk, SteerInputs, compose

D, N_LAYERS = 16, 4
ACE = OPS["ace"]


def _inputs(seed: int = 0, means: bool = True, positions=(-1, -2)) -> SteerInputs:
    """A seed's resid_pre direction rows at every layer and two positions (means far from the origin, as
    real activations), the difference of means their vector."""
    rng = np.random.default_rng(seed)
    rows = {}
    for L in range(N_LAYERS):
        for p in positions:
            harm = (rng.standard_normal(D) * 2 + 5).astype(np.float32)
            safe = (rng.standard_normal(D) * 2 + 5).astype(np.float32)
            row = {"site": "resid_pre", "layer": L, "position": p, "vector": (harm - safe).tolist(),
                   "separation": float(L)}
            if means:
                row |= {"mean_harmful": harm.tolist(), "mean_harmless": safe.tolist()}
            rows[(L, p)] = row
    vectors = {L: np.asarray(rows[(L, -1)]["vector"], np.float32) for L in range(N_LAYERS)}
    d = SteerInputs(vectors, best=2, position=-1, rows=rows)
    d.ops["ace"] = ACE.inputs({}, d)
    return d


def _cell(alpha=0.0, control=False, layers=(1, 2), direction_layer=2, reference="per_layer", units="unit",
          draw=0, **extra) -> Cell:
    p = {"mode": "ace", "layer": None, "coefficient": 0.0, "alpha": float(alpha), "direction_layer": direction_layer,
         "ace_layers": list(layers), "reference": reference, "alpha_units": units, "control": control,
         **({"control_draw": draw} if draw else {}), **extra}
    return Cell(hashlib.sha256(repr(sorted(p.items())).encode()).hexdigest()[:20], "steer", "m", 0, p)


def _reference_ace(x: np.ndarray, r: np.ndarray, mu: np.ndarray, alpha: float) -> np.ndarray:
    """The paper's formula in float64, written out: x - (x.r)r + (mu.r)r + alpha r, r unit. x [pos, d]."""
    r = r / np.linalg.norm(r)
    return x - np.outer(x @ r, r) + (mu @ r) * r + alpha * r


def _apply(edits: dict, x: torch.Tensor, layer: int) -> torch.Tensor:
    e = edits.get(("resid_pre", layer))
    return x if e is None else e(x)


def _edits(cells, d, n=None):
    rows = [(i, c, ACE.resolve(c, d)) for i, c in enumerate(cells) if c is not None]
    return ACE.edits(rows, Chunk(n or len(cells), D, N_LAYERS), d)


def test_matches_the_formula_on_random_tensors():
    d = _inputs()
    cells = [_cell(0.0), _cell(1.5), _cell(-2.0, layers=(0, 3)), _cell(0.7, reference="direction_layer"),
             _cell(0.5, units="direction"), _cell(1.5, direction_layer="best"),
             _cell(0.3, direction_layer=1, direction_position=-2)]
    x = torch.randn(len(cells), 5, D, dtype=torch.float64) * 3 + 4
    edits = _edits(cells, d)
    for layer in range(N_LAYERS):
        got = _apply(edits, x, layer).numpy()
        for b, c in enumerate(cells):
            p = c.params
            dl = p["direction_layer"] if isinstance(p["direction_layer"], int) else d.best
            pos = p.get("direction_position", -1)
            v = np.asarray(d.rows[(dl, pos)]["vector"], np.float64)
            if layer not in p["ace_layers"]:
                assert np.array_equal(got[b], x[b].numpy())
                continue
            ref_layer = layer if p["reference"] == "per_layer" else dl
            mu = np.asarray(d.rows[(ref_layer, pos)]["mean_harmless"], np.float64)
            alpha = p["alpha"] * (np.linalg.norm(v) if p["alpha_units"] == "direction" else 1.0)
            want = _reference_ace(x[b].numpy(), v, mu, alpha)
            np.testing.assert_allclose(got[b], want, rtol=0, atol=1e-5)   # u is stored as float32


def test_alpha_zero_sets_every_projection_to_the_harmless_reference():
    """alpha = 0: every position's projection on r is mu_harmless.r; the orthogonal part is untouched."""
    d = _inputs(1)
    cell = _cell(0.0, layers=(2,), direction_layer=2)
    x = torch.randn(3, 7, D) * 4 + 3                      # float32, as a model's activations
    out = _apply(_edits([cell] * 3, d), x, 2)
    v = np.asarray(d.rows[(2, -1)]["vector"], np.float64)
    r = v / np.linalg.norm(v)
    mu = np.asarray(d.rows[(2, -1)]["mean_harmless"], np.float64)
    proj = out.double().numpy() @ r                         # [3, 7]
    np.testing.assert_allclose(proj, np.full_like(proj, mu @ r), atol=2e-5)
    perp_in = x.double().numpy() - (x.double().numpy() @ r)[..., None] * r
    perp_out = out.double().numpy() - proj[..., None] * r
    np.testing.assert_allclose(perp_out, perp_in, atol=2e-5)
    # the reference projection it reports is that of the harmless mean, and equals the harmful mean's minus |v|
    res = ACE.resolve(cell, d)
    assert res.reference_projection == pytest.approx(mu @ r, rel=1e-6)   # u is float32
    harm = np.asarray(d.rows[(2, -1)]["mean_harmful"], np.float64)
    assert harm @ r - mu @ r == pytest.approx(np.linalg.norm(v), rel=1e-5)


def test_alpha_one_in_direction_units_is_the_harmful_mean():
    d = _inputs(2)
    x = torch.randn(2, 3, D, dtype=torch.float64)
    out = _apply(_edits([_cell(1.0, layers=(2,), units="direction")] * 2, d), x, 2).numpy()
    v = np.asarray(d.rows[(2, -1)]["vector"], np.float64)
    harm = np.asarray(d.rows[(2, -1)]["mean_harmful"], np.float64)
    np.testing.assert_allclose(out @ (v / np.linalg.norm(v)), harm @ (v / np.linalg.norm(v)), atol=1e-5)


def test_control_is_a_random_direction_with_its_own_reference():
    d = _inputs(3)
    real, ctl = _cell(1.0), _cell(1.0, control=True)
    r, c = ACE.resolve(real, d), ACE.resolve(ctl, d)
    assert np.linalg.norm(c.v) == pytest.approx(np.linalg.norm(r.v), rel=1e-6)     # norm-matched
    assert abs(float(c.u @ r.u)) < 0.9
    for L in (1, 2):
        mu = np.asarray(d.rows[(L, -1)]["mean_harmless"], np.float64)
        assert c.references[L] == pytest.approx(mu @ c.u.astype(np.float64), abs=1e-9)
        assert c.targets[L] - c.references[L] == pytest.approx(1.0)                # the same alpha
    again = ACE.resolve(ctl, d)
    assert np.array_equal(again.v, c.v)                                              # seeded by the cell id
    other = ACE.resolve(_cell(1.0, control=True, draw=1), d)
    assert not np.array_equal(other.v, c.v)                                          # each draw its own
    x = torch.randn(1, 4, D, dtype=torch.float64)
    out = _apply(_edits([ctl], d), x, 1).numpy()[0]
    mu = np.asarray(d.rows[(1, -1)]["mean_harmless"], np.float64)
    np.testing.assert_allclose(out, _reference_ace(x[0].numpy(), c.v.astype(np.float64), mu, 1.0), atol=1e-5)


def test_batched_equals_unbatched():
    """Row b of a chunk of ACE rows (several alphas, a control, different layers) equals it run alone, and
    alone equals it in a chunk beside an unedited row (the indexed path vs the dense one)."""
    d = _inputs(4)
    cells = [_cell(0.0), _cell(2.0, control=True), _cell(-1.0, layers=(0, 1, 2, 3)), _cell(0.5, layers=(3,))]
    x = torch.randn(len(cells), 6, D) * 2
    batched = _edits(cells, d)
    for layer in range(N_LAYERS):
        out = _apply(batched, x, layer)
        for b, c in enumerate(cells):
            alone = _apply(_edits([c], d), x[b: b + 1], layer)
            assert torch.equal(out[b: b + 1], alone)
            beside = _apply(_edits([c, None], d), x[[b, b]], layer)
            assert torch.equal(beside[:1], alone) and torch.equal(beside[1:], x[b: b + 1])


def test_broadcast_edit_of_one_row_edits_the_whole_batch():
    """Capability's broadcast edits: `edits` of one row (chunk.n == 1) applied to a batch of any size."""
    d = _inputs(5)
    x = torch.randn(5, 3, D)
    one = _edits([_cell(0.25)], d)
    out = _apply(one, x, 1)
    for b in range(5):
        assert torch.equal(out[b: b + 1], _apply(one, x[b: b + 1], 1))


def test_half_precision_is_computed_in_float32():
    d = _inputs(6)
    x = torch.randn(2, 3, D) * 3
    e = _edits([_cell(0.5)] * 2, d)
    got = _apply(e, x.to(torch.bfloat16), 1)
    assert got.dtype == torch.bfloat16
    want = _apply(e, x.to(torch.bfloat16).float(), 1).to(torch.bfloat16)
    assert torch.equal(got, want)


def test_mixed_chunk_leaves_other_rows_bit_identical():
    """ACE rows beside directional ablation rows (and addition rows, once that operator is registered) and a
    baseline row: composed per site in apply order, every other row is bit-identical to the same chunk
    without the ACE rows (those rows then unedited), and the ACE rows are edited."""
    d = _inputs(7)
    others = [("ablation", {"mode": "ablation", "layer": None, "coefficient": 0.0, "alpha": 1.0,
                            "direction_layer": 1, "control": False}),
              ("addition", {"mode": "addition", "layer": 2, "coefficient": 1.0, "alpha": 0.0,
                            "direction_layer": 2, "control": False})]
    kinds = [("baseline", None)]
    for name, p in others:
        if name in OPS:
            kinds += [(name, Cell(name, "steer", "m", 0, p)), (name, Cell(name + "c", "steer", "m", 0,
                                                                          {**p, "control": True}))]
    kinds[2:2] = [("ace", _cell(0.0))]
    kinds += [("ace", _cell(1.0, control=True))]
    assert {k for k, _ in kinds} >= {"ablation", "ace", "baseline"}
    chunk = Chunk(len(kinds), D, N_LAYERS)

    def edits(with_ace: bool):
        per_op = []
        for op in OPS.by_apply_order():
            if op.name == "ace" and not with_ace:
                continue
            mine = [(i, c, op.resolve(c, d)) for i, (k, c) in enumerate(kinds) if k == op.name]
            if mine:
                per_op.append((op.rank, op.edits(mine, chunk, d)))
        return compose(per_op)

    x = torch.randn(len(kinds), 4, D)
    with_ace, without = edits(True), edits(False)
    for layer in range(N_LAYERS):
        for kind in ("resid_pre", "attn_out", "mlp_out"):
            a, b = with_ace.get((kind, layer)), without.get((kind, layer))
            ya = x if a is None else a(x)
            yb = x if b is None else b(x)
            for i, (k, _) in enumerate(kinds):
                if k != "ace":
                    assert torch.equal(ya[i], yb[i]), (kind, layer, i)
                elif kind == "resid_pre" and layer in (1, 2):
                    assert not torch.equal(ya[i], x[i])
                else:
                    assert torch.equal(ya[i], x[i])


def test_skips_on_a_store_without_class_means():
    from refusal_ray.ops.ace import MEANS_MISSING, has_means

    old = _inputs(8, means=False)
    assert old.ops["ace"] is None
    with pytest.raises(LookupError) as e:
        ACE.resolve(_cell(0.0), old)
    assert str(e.value) == MEANS_MISSING
    assert "rerun stage directions (`--fresh`, or a new out dir)" in MEANS_MISSING
    # a table read with the union of old and new files' schemas: NaN / None where a file lacks them
    assert not has_means({"vector": [1.0], "mean_harmful": float("nan"), "mean_harmless": float("nan")})
    assert not has_means({"vector": [1.0], "mean_harmful": None, "mean_harmless": None})
    assert has_means({"mean_harmful": np.ones(3), "mean_harmless": np.ones(3)})


def test_other_skip_reasons():
    from refusal_ray.ops.base import SELECTED_MISSING

    d = _inputs(9)
    with pytest.raises(LookupError, match="^" + SELECTED_MISSING.replace("(", r"\(").replace(")", r"\)") + "$"):
        ACE.resolve(_cell(0.0, direction_layer="selected"), d)
    d.rows[(1, -1)]["vector"] = [0.0] * D
    d.vectors[1] = np.zeros(D, np.float32)
    with pytest.raises(LookupError, match="^the direction at layer 1, position -1 has zero norm"):
        ACE.resolve(_cell(0.0, direction_layer=1), d)


def test_columns_and_arms():
    d = _inputs(10)
    cell = _cell(0.5)
    res = ACE.resolve(cell, d)
    cols = ACE.columns(cell, res)
    assert cols == {"direction_layer": 2, "direction_position": -1,
                    "vector_norm": pytest.approx(float(np.linalg.norm(d.vectors[2]))),
                    "reference_projection": pytest.approx(res.references[2])}
    from refusal_ray.ops.ace import AceArm

    spec = SimpleNamespace(stages=SimpleNamespace(select=None))
    arms = ACE.arms(spec, AceArm(alphas=[0.0, 2.0], layers=[1], direction_layer="best"), N_LAYERS)
    assert arms == [{"mode": "ace", "layer": None, "coefficient": 0.0, "alpha": a, "direction_layer": "best",
                     "ace_layers": [1], "reference": "per_layer", "alpha_units": "unit"} for a in (0.0, 2.0)]
    assert ACE.arms(spec, AceArm(direction_layer=1), 3)[0]["ace_layers"] == [0, 1, 2]


def test_bad_config_errors():
    from pydantic import ValidationError

    from refusal_ray.ops.ace import AceArm

    no_select = SimpleNamespace(stages=SimpleNamespace(select=None))
    with pytest.raises(ValueError) as e:
        ACE.validate(no_select, AceArm())
    assert str(e.value) == ("stages.steer.ace.direction_layer 'selected' needs a stages.select block "
                            "(or direction_layer: best / a layer)")
    with pytest.raises(ValueError) as e:
        ACE.validate(no_select, AceArm(direction_layer="best", direction_position=-2))
    assert str(e.value) == ("stages.steer.ace.direction_position needs an integer direction_layer "
                            "(the selected and best directions come with their own position)")
    ACE.validate(no_select, AceArm(direction_layer=1, direction_position=-2))
    for bad in ({"alphas": []}, {"reference": "pooled"}, {"alpha_units": "raw"}, {"direction_position": 0},
                {"extra": 1}):
        with pytest.raises(ValidationError):
            AceArm(**bad)


def test_summary_reads_suppression_at_alpha_zero_and_induction_at_the_largest():
    import pandas as pd

    rows = [("baseline", False, 0.0, "harmful", 0.9), ("baseline", False, 0.0, "harmless", 0.1)]
    for a, harm, safe in ((0.0, 0.2, 0.1), (4.0, 0.95, 0.8)):
        rows += [("ace", False, a, "harmful", harm), ("ace", False, a, "harmless", safe),
                 ("ace", True, a, "harmful", 0.85), ("ace", True, a, "harmless", 0.15)]
    a = pd.DataFrame(rows, columns=["mode", "control", "alpha", "prompt_set", "rate"])
    a["layer"], a["coefficient"], a["direction_layer"], a["direction_position"] = -1, 0.0, "best", -1
    out = ACE.summary_columns(a, {}, None)
    assert out["ace_suppression"] == pytest.approx(0.9 - 0.2)
    assert out["ace_suppression_vs_control"] == pytest.approx(0.85 - 0.2)
    assert out["ace_induction"] == pytest.approx(0.8 - 0.1)
    assert out["ace_induction_vs_control"] == pytest.approx(0.8 - 0.15)
    assert "alpha=0.0" in out["ace_setting"].split(";")[0] and "alpha=4.0" in out["ace_setting"].split(";")[1]


def _steer_has_ace() -> bool:
    from refusal_ray.spec import SteerStage

    return "ace" in SteerStage.model_fields


def _toy_spec(tmp_path, ace: dict) -> str:
    import yaml

    from conftest import TOY_MODELS, TOY_PROMPTS

    spec = {"name": "ace", "models": [{"name": "qwen-xs", "path": str(TOY_MODELS / "toy-qwen-xs")}],
            "data": {"harmful": {"path": str(TOY_PROMPTS / "harmful.jsonl")},
                     "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl")},
                     "n_train": 6, "n_val": 4, "n_test": 2},
            "seeds": [0],
            "stages": {"directions": {}, "steer": {"addition": None, "ablation": None, "ace": ace}},
            "generation": {"max_new_tokens": 4},
            "decision_rule": {"control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5,
                                                 "control_margin": 0.25, "addition_coefficient": 1.0,
                                                 "ablation_alpha": 1.0},
                              "steering_labels": {"strong": 0.5, "weak": 0.2}}}
    f = tmp_path / f"spec-{len(list(tmp_path.iterdir()))}.yaml"
    f.write_text(yaml.safe_dump(spec))
    return str(f)


def test_spec_errors_name_the_file_and_field(tmp_path):
    if not _steer_has_ace():
        pytest.skip("stage steer does not loop over OPS yet (the operator seam's steer half)")
    from refusal_ray.errors import SpecError
    from refusal_ray.plan import make_plan

    for ace, msg in (
            ({}, "stages.steer.ace.direction_layer 'selected' needs a stages.select block "
                 "(or direction_layer: best / a layer)"),
            ({"direction_layer": "best", "alphas": []},
             "stages.steer.ace.alphas: List should have at least 1 item after validation, not 0"),
            ({"direction_layer": "best", "layers": [7]},
             "stages.steer.ace.layers: layer 7 out of range: model 'qwen-xs' has 2 layers (0..1)"),
            ({"direction_layer": "best", "reference": "pooled"},
             "stages.steer.ace.reference: Input should be 'per_layer' or 'direction_layer'")):
        f = _toy_spec(tmp_path, ace)
        with pytest.raises(SpecError) as e:
            make_plan(f)
        assert str(e.value) == f"{f}: {msg}"


def test_plan_line(tmp_path):
    if not _steer_has_ace():
        pytest.skip("stage steer does not loop over OPS yet (the operator seam's steer half)")
    from refusal_ray.plan import make_plan

    plan = make_plan(_toy_spec(tmp_path, {"direction_layer": "best", "alphas": [0.0, 2.0], "layers": [1]}))
    block = plan.spec.stages.steer.ace
    assert ACE.describe(plan.spec, block) == [
        "ACE: alphas [0.0, 2.0] (alpha units: unit), direction best, resid_pre at layers [1], "
        "reference: harmless mean (per_layer)"]
    arms = [c.params for c in plan.cells if c.stage == "steer" and c.params["mode"] == "ace"]
    assert [(p["alpha"], p["control"], p["ace_layers"]) for p in arms] == [
        (0.0, False, [1]), (0.0, True, [1]), (2.0, False, [1]), (2.0, True, [1])]


def test_end_to_end_through_the_steer_stage(tmp_path):
    """A tiny toy sweep with ACE arms (two alphas, a control each) through `run_local`: its steering rows carry
    alpha and reference_projection, which is the stored harmless mean's projection on the stored direction."""
    if not _steer_has_ace():
        pytest.skip("stage steer does not loop over OPS yet (the operator seam's steer half)")
    from refusal_ray.cluster.local import run_local
    from refusal_ray.plan import make_plan

    f = _toy_spec(tmp_path, {"alphas": [0.0, 3.0], "direction_layer": "best"})
    plan = make_plan(str(f))
    out = run_local(plan, log=lambda *a: None)
    rows = [r for r in out["steering"] if r["mode"] == "ace"]
    assert sorted((r["alpha"], bool(r["control"]), r["prompt_set"]) for r in rows) == sorted(
        (a, c, s) for a in (0.0, 3.0) for c in (False, True) for s in ("harmful", "harmless"))
    dirs = {(r["layer"], r["position"]): r for r in out["directions"] if r["site"] == "resid_pre"}
    for r in rows:
        if r["control"]:
            continue
        row = dirs[(r["direction_layer"], r["direction_position"])]
        v = np.asarray(row["vector"], np.float64)
        want = np.asarray(row["mean_harmless"], np.float64) @ (v / np.linalg.norm(v))
        assert r["reference_projection"] == pytest.approx(want, rel=1e-5)
        assert r["vector_norm"] == pytest.approx(np.linalg.norm(v), rel=1e-6)
    cells = {c["cell_id"]: c["status"] for c in out["cells"]}
    assert all(cells[r["cell_id"]] == "done" for r in rows)

    # the same seed's direction rows as a store from before the class means: every ACE cell skips, saying why
    from refusal_ray.ops.ace import MEANS_MISSING
    from refusal_ray.plan import settings_payload
    from refusal_ray.stages.steer import skip_reason, steering_inputs

    old = [{k: v for k, v in r.items() if k not in ("mean_harmful", "mean_harmless", "model")}
           for r in out["directions"]]
    ace_cells = [c for c in plan.cells if c.stage == "steer" and c.params["mode"] == "ace"]
    assert len(ace_cells) == 4
    settings = settings_payload(plan)
    fresh = steering_inputs(settings, {"directions": {"directions": out["directions"]}})
    stale = steering_inputs(settings, {"directions": {"directions": old}})
    assert [skip_reason(c, fresh) for c in ace_cells] == [None] * 4
    assert [skip_reason(c, stale) for c in ace_cells] == [MEANS_MISSING] * 4
