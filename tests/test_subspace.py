"""Subspace ablation (issue 11): x <- x - alpha Q Q^T x per row. Rank 1 equals directional ablation,
the ablated activations have no component in the subspace, mixed ranks in one batch equal each row
alone, the random control subspace, the arms only when configured (other cells' ids unchanged), the
top_k skip rule, plan-time checks, and a run on the toy qwen-xs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from refusal_ray import load_model
from refusal_ray.cli import app
from refusal_ray.data import encode
from refusal_ray.errors import SpecError
from refusal_ray.grid import Cell
from refusal_ray.interventions import RowEdit, forward, hooks, row_edits
from refusal_ray.models.sites import site_name
from refusal_ray.spec import Spec
from refusal_ray.ops import OPS
from refusal_ray.ops.base import ABLATION_SITES, SteerInputs, control_direction
from refusal_ray.ops.subspace import SubspaceInputs, control_subspace, orthonormal_basis, subspace_name
from refusal_ray.stages.steer import Row, build_edits, skip_reason, steer_params, steering_inputs

arm_subspace = OPS["subspace"].resolve

from conftest import PROMPTS, REPO, TOY_MODELS, TOY_PROMPTS
from test_bad_input import base_spec

SITES = ABLATION_SITES


@pytest.fixture(scope="module")
def lm(tiny_qwen_path):
    return load_model(str(tiny_qwen_path), attn_implementation="eager")


def _random(d: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((k, d)).astype(np.float32)


def _everywhere(sites, edit: RowEdit) -> dict:
    return {(kind, layer): edit for layer in range(sites.n_layers) for kind in SITES}


def _logits(lm, ids, mask, edits):
    with row_edits(lm.sites, edits), torch.no_grad():
        return forward(lm.model, ids, mask).logits


# -- the edit --------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_rank_one_subspace_equals_directional_ablation(lm, alpha):
    ids, mask = encode(lm.tokenizer, PROMPTS)
    n, d = ids.shape[0], lm.sites.d_model
    u = torch.from_numpy(_random(d, 1, 0)[0])
    u = u / u.norm()
    single = _logits(lm, ids, mask, _everywhere(lm.sites, RowEdit(u.expand(n, -1).clone(), torch.full((n,), alpha))))
    sub = _logits(lm, ids, mask, _everywhere(lm.sites, RowEdit(ablate_basis=u.expand(n, 1, -1).clone(),
                                                               basis_alpha=torch.full((n,), alpha))))
    plain = _logits(lm, ids, mask, {})
    real = mask.bool()
    assert (single - sub)[real].abs().max() <= 1e-5
    assert (single - plain)[real].abs().max() > 1e-3            # the ablation did something


def test_ablated_activations_have_no_component_in_the_subspace(lm):
    ids, mask = encode(lm.tokenizer, PROMPTS)
    n, d = ids.shape[0], lm.sites.d_model
    q = torch.from_numpy(orthonormal_basis(list(_random(d, 3, 1))))          # [3, d]
    edits = _everywhere(lm.sites, RowEdit(ablate_basis=q.expand(n, -1, -1).clone(), basis_alpha=torch.ones(n)))
    seen = {}
    names = [site_name(kind, layer) for layer in range(lm.sites.n_layers) for kind in SITES]
    with row_edits(lm.sites, edits):   # readers registered after the edits see the edited activations
        with hooks(lm.sites, {s: (lambda s: lambda x: seen.__setitem__(s, x.clone()))(s) for s in names}):
            with torch.no_grad():
                forward(lm.model, ids, mask)
    real = mask.bool()
    assert set(seen) == set(names)
    for name, x in seen.items():
        x = x[real]                                                           # [tokens, d]
        proj = (x @ q.T).abs()                                                # [tokens, 3]
        assert (proj <= 1e-5 * x.norm(dim=-1, keepdim=True)).all(), (name, float(proj.max()))


def test_mixed_ranks_in_one_batch_equal_each_row_alone(lm):
    """Rows of ranks 3, 1, 0 (untouched) and 2 in one batch, bases zero-padded to rank 3."""
    d = lm.sites.d_model
    ranks, alphas = [3, 1, 0, 2], [1.0, 1.0, 0.0, 0.7]
    bases = [torch.from_numpy(orthonormal_basis(list(_random(d, k, 10 + i)))) if k else torch.zeros(0, d)
             for i, k in enumerate(ranks)]
    padded = torch.zeros(len(ranks), max(ranks), d)
    for i, q in enumerate(bases):
        padded[i, :q.shape[0]] = q
    ids, mask = encode(lm.tokenizer, PROMPTS)
    mixed = _logits(lm, ids, mask, _everywhere(lm.sites, RowEdit(ablate_basis=padded,
                                                                 basis_alpha=torch.tensor(alphas))))
    plain = _logits(lm, ids, mask, {})
    for i, prompt in enumerate(PROMPTS):
        one_ids, one_mask = encode(lm.tokenizer, [prompt])
        edits = {} if not ranks[i] else _everywhere(lm.sites, RowEdit(ablate_basis=bases[i][None],
                                                                       basis_alpha=torch.tensor([alphas[i]])))
        alone = _logits(lm, one_ids, one_mask, edits)
        L = one_ids.shape[1]
        assert (mixed[i, -L:] - alone[0]).abs().max() <= 1e-5, i
        if ranks[i]:
            assert (mixed[i, -L:] - plain[i, -L:]).abs().max() > 1e-3, i
    assert (mixed[2] - plain[2]).abs().max() <= 1e-6                        # the rank-0 row is untouched


def test_single_direction_path_is_unchanged_by_the_new_fields():
    x = torch.randn(3, 5, 8)
    u = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    a, add = torch.tensor([1.0, 0.5, 0.0]), torch.randn(3, 8)
    proj = torch.einsum("bpd,bd->bp", x, u)
    want = x - (a[:, None] * proj)[..., None] * u[:, None, :] + add[:, None, :]
    assert torch.equal(RowEdit(u, a, add)(x), want)                           # bit-identical
    # a zero basis with zero strength leaves rows bit-identical too
    assert torch.equal(RowEdit(u, a, add, torch.zeros(3, 2, 8), torch.zeros(3))(x), want)


# -- bases and the random control ------------------------------------------------------------

def test_orthonormal_basis_spans_the_directions_and_drops_dependent_ones():
    v = _random(16, 3, 2)
    q = orthonormal_basis([v[0], np.zeros(16, np.float32), v[1], 2.5 * v[0], v[2], v[0] + v[1]])
    assert q.shape == (3, 16) and q.dtype == np.float32
    np.testing.assert_allclose(q @ q.T, np.eye(3), atol=1e-6)
    for x in v:                                                               # each direction is in the span
        assert np.linalg.norm(x - (x @ q.T) @ q) <= 1e-5 * np.linalg.norm(x)
    assert orthonormal_basis([np.zeros(16, np.float32)]).shape == (0, 16)
    # norm-free: scaling the directions gives the same projector
    q2 = orthonormal_basis([3 * v[0], 0.1 * v[1], v[2]])
    np.testing.assert_allclose(q.T @ q, q2.T @ q2, atol=1e-5)


def test_control_subspace_rank_orthonormal_and_seeded_by_the_cell():
    a, b = control_subspace("cell-a", 4, 32), control_subspace("cell-a", 4, 32)
    assert a.shape == (4, 32) and a.dtype == np.float32 and np.array_equal(a, b)
    np.testing.assert_allclose(a @ a.T, np.eye(4), atol=1e-6)
    assert not np.allclose(a, control_subspace("cell-b", 4, 32))
    # rank 1 spans the single-direction control of the same cell (the same Gaussian draws)
    u = control_direction("cell-a", np.ones(32, np.float32))
    one = control_subspace("cell-a", 1, 32)[0]
    assert abs(abs(float(one @ u)) / np.linalg.norm(u) - 1) <= 1e-6


def _subspace_cell(cid, control=False, alpha=1.0, layers=(0, 1, 2), ablation_layers=(0, 1, 2), top_k=None):
    sub = {"top_k": top_k} if top_k else {"layers": list(layers)}
    return Cell(cid, "steer", "tiny", 0, {"mode": "subspace", "layer": None, "coefficient": 0.0, "alpha": alpha,
                                           "direction_layer": None, "control": control, "subspace": sub,
                                           "ablation_layers": list(ablation_layers)})


def test_build_edits_pads_ranks_and_routes_sites():
    d = 8
    rng = np.random.default_rng(3)
    vectors = {layer: rng.standard_normal(d).astype(np.float32) for layer in range(3)}
    inputs = SteerInputs(vectors, best=2)
    abl = Cell("abl", "steer", "tiny", 0, {"mode": "ablation", "layer": None, "coefficient": 0.0, "alpha": 1.0,
                                           "direction_layer": "best", "control": False})
    cells = [abl, _subspace_cell("s3", layers=(0, 1, 2), ablation_layers=(1, 2)),
             _subspace_cell("s1", layers=(1,), ablation_layers=(1, 2), alpha=0.5),
             _subspace_cell("c3", control=True, layers=(0, 1, 2), ablation_layers=(1, 2))]
    rows = [Row(c, "harmful", 0) for c in cells]
    edits = build_edits(rows, inputs, ablation_layers=[0, 1], d_model=d)
    assert set(edits) == {(k, layer) for k in SITES for layer in (0, 1, 2)}
    e = edits[("mlp_out", 1)]
    assert e.ablate_basis.shape == (4, 3, d) and e.basis_alpha.tolist() == [0, 1, 0.5, 1]
    assert e.ablate_alpha.tolist() == [1, 0, 0, 0]
    assert e.ablate_basis[0].abs().sum() == 0 and e.ablate_basis[2, 1:].abs().sum() == 0    # zero padding
    q = e.ablate_basis[1].numpy()
    np.testing.assert_allclose(q @ q.T, np.eye(3), atol=1e-6)
    u1 = vectors[1] / np.linalg.norm(vectors[1])
    assert abs(abs(float(e.ablate_basis[2, 0].numpy() @ u1)) - 1) <= 1e-6
    np.testing.assert_array_equal(e.ablate_basis[3].numpy(), control_subspace("c3", 3, d))
    assert edits[("resid_pre", 0)].ablate_basis is None                     # subspace arms ablate layers 1, 2 only
    assert edits[("resid_pre", 2)].ablate_dirs is None                      # the ablation arm layers 0, 1 only


def _selection(passed: list[tuple[int, int, float]], failed: int = 2) -> list[dict]:
    rows = [{"layer": layer, "position": p, "bypass": b, "swing": 0.0, "separation": 1.0, "passed": True,
             "selected": False} for layer, p, b in passed]
    rows += [{"layer": 0, "position": -1 - i, "bypass": 9.0, "swing": 0.0, "separation": 1.0, "passed": False,
              "selected": False} for i in range(failed)]
    return rows


def _needs(selection, d=8, positions=(-1, -2)):
    rng = np.random.default_rng(5)
    dirs = [{"site": "resid_pre", "layer": layer, "position": p, "vector": rng.standard_normal(d).astype(np.float32),
             "separation": float(layer)} for layer in range(3) for p in positions]
    return {"directions": {"directions": dirs}, "select": {"selection": selection}}


def test_top_k_stacks_the_best_passing_candidates_and_skips_when_too_few():
    settings = {"steer": {"position": -1, "ablation": None, "subspace": {"top_k": 2}},
                "select": {"criterion": "bypass"}}
    needs = _needs(_selection([(1, -1, -1.0), (2, -2, -3.0), (2, -1, 0.5)]))
    d = steering_inputs(settings, needs)
    assert d.ops["subspace"].directions == [(2, -2), (1, -1)] and d.ops["subspace"].missing is None      # lowest bypass first
    assert subspace_name(d.ops["subspace"].directions) == "L2/p-2,L1/p-1"
    assert skip_reason(_subspace_cell("t", top_k=2), d) is None
    name, q = arm_subspace(_subspace_cell("t", top_k=2), d)
    assert name == "L2/p-2,L1/p-1" and q.shape == (2, 8)
    few = steering_inputs({**settings, "steer": {**settings["steer"], "subspace": {"top_k": 4}}}, needs)
    reason = skip_reason(_subspace_cell("t", top_k=4), few)
    assert "top_k 4" in reason and "3 of 5" in reason
    none = steering_inputs(settings, _needs(_selection([])))
    assert "no candidate passed" in skip_reason(_subspace_cell("t", top_k=2), none)
    with pytest.raises(LookupError):
        arm_subspace(_subspace_cell("t", top_k=2), none)
    # layers: that layer's direction at steer.position; every direction zero: rank 0, skipped
    layers = steering_inputs({"steer": {"position": -1, "subspace": {"layers": [0, 2]}}}, needs)
    assert layers.ops["subspace"].directions == [(0, -1), (2, -1)] and layers.ops["subspace"].name == "L0,L2/p-1"
    zero = SteerInputs({0: np.zeros(8, np.float32)}, best=0, ops={"subspace": SubspaceInputs([(0, -1)], [np.zeros(8)])})
    assert "rank 0" in skip_reason(_subspace_cell("z", layers=(0,)), zero)


# -- the declaration: arms, ids, plan-time checks ----------------------------------------------

def _spec_dict(model_path, subspace=None, select=False) -> dict:
    spec = base_spec(model_path)
    if select:
        spec["stages"]["select"] = {"kl_max": None}
    if subspace is not None:
        spec["stages"]["steer"]["subspace"] = subspace
    return spec


def test_steer_params_give_subspace_arms_only_when_configured(tiny_qwen_path):
    plain = steer_params(Spec.model_validate(_spec_dict(tiny_qwen_path)), 3)
    assert all(a["mode"] != "subspace" for a in plain)
    spec = Spec.model_validate(_spec_dict(tiny_qwen_path, {"layers": [0, 2], "alphas": [1.0, 0.5]}))
    arms = steer_params(spec, 3)
    assert arms[:len(plain)] == plain
    sub = arms[len(plain):]
    assert len(sub) == 4 and {a["mode"] for a in sub} == {"subspace"}
    assert sub[0] == {"mode": "subspace", "layer": None, "coefficient": 0.0, "alpha": 1.0, "direction_layer": None,
                      "control": False, "subspace": {"layers": [0, 2]}, "ablation_layers": [0, 1, 2]}
    top = steer_params(Spec.model_validate(_spec_dict(tiny_qwen_path, {"top_k": 2}, select=True)), 3)
    assert top[-1]["subspace"] == {"top_k": 2} and "select" in top[-1]


def _write(tmp_path, spec: dict, name="spec.yaml"):
    f = tmp_path / name
    f.write_text(yaml.safe_dump(spec))
    return f


def test_other_cells_keep_their_ids(tmp_path, tiny_qwen_path):
    from refusal_ray.plan import make_plan

    before = make_plan(_write(tmp_path, _spec_dict(tiny_qwen_path), "a.yaml")).cells
    after = make_plan(_write(tmp_path, _spec_dict(tiny_qwen_path, {"layers": [1, 2]}), "b.yaml")).cells
    assert [c.id for c in after if c.params.get("mode") != "subspace"] == [c.id for c in before]
    assert sum(c.params.get("mode") == "subspace" for c in after) == 2


def test_quickstart_cells_other_than_subspace_are_unchanged(monkeypatch, tmp_path):
    from refusal_ray.plan import make_plan

    monkeypatch.chdir(REPO)
    spec = yaml.safe_load((REPO / "sweeps" / "quickstart.yaml").read_text())
    assert spec["stages"]["steer"].get("subspace")
    without = copy.deepcopy(spec)
    del without["stages"]["steer"]["subspace"]
    with_ids = [c.id for c in make_plan("sweeps/quickstart.yaml").cells
                if c.params.get("mode") not in ("subspace", "orthogonalized_subspace")]
    f = _write(tmp_path, without)
    assert with_ids == [c.id for c in make_plan(str(f)).cells]


@pytest.mark.parametrize("subspace,field,words", [
    ({"layers": [0, 5]}, "stages.steer.subspace.layers", "layer 5 out of range"),
    ({"layers": [0, 1], "ablation_layers": [3]}, "stages.steer.subspace.ablation_layers", "layer 3 out of range"),
    ({"top_k": 500}, "stages.steer.subspace.top_k", "more than the"),
])
def test_plan_time_checks_exit_2_naming_the_field(tmp_path, tiny_qwen_path, subspace, field, words):
    from refusal_ray.plan import make_plan

    f = _write(tmp_path, _spec_dict(tiny_qwen_path, subspace, select="top_k" in subspace))
    with pytest.raises(SpecError) as e:
        make_plan(f)
    assert e.value.field == field and words in e.value.problem
    result = CliRunner().invoke(app, ["validate", str(f)])
    assert result.exit_code == 2 and result.output.startswith(f"error: {f}: {field}: "), result.output


# -- a run on the toy qwen-xs --------------------------------------------------------------------

def _toy_spec(tmp_path, subspace: dict) -> dict:
    return {
        "name": "subspace",
        "models": [{"name": "qwen-xs", "path": str(TOY_MODELS / "toy-qwen-xs")}],
        "data": {"harmful": {"path": str(TOY_PROMPTS / "harmful.jsonl"), "split_column": "split"},
                 "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl"), "split_column": "split",
                              "reference_column": "reference"},
                 "n_train": 32, "n_val": 16, "n_test": 8},
        "seeds": [0],
        "stages": {"directions": {"sites": ["resid_pre"]},
                   # int(0.8 L) keeps only layer 0 of the 2-layer qwen-xs, zero at template positions
                   "select": {"kl_max": None, "induce_min": 0.0, "max_layer_fraction": None},
                   "steer": {"addition": None, "ablation": {"alphas": [1.0], "direction_layer": "selected"},
                             "subspace": subspace, "batch_size": 128}},
        "generation": {"max_new_tokens": 12},
        "decision_rule": {
            "control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25,
                               "addition_coefficient": 1.0, "ablation_alpha": 1.0},
            "steering_labels": {"strong": 0.5, "weak": 0.2}},
    }


def _run(tmp_path, subspace):
    from refusal_ray.cluster.local import run_local
    from refusal_ray.plan import make_plan
    from refusal_ray.runner import freeze_manifest
    from refusal_ray.store import Store
    from refusal_ray.analysis.summary import write_summary

    plan = make_plan(_write(tmp_path, _toy_spec(tmp_path, subspace)))
    store = Store(tmp_path / "out")
    freeze_manifest(plan, store)
    out = run_local(plan, store, torch_threads=1, log=lambda m: None)
    return out, store, write_summary(store.uri)


def test_toy_run_stores_subspace_rows_with_their_rank(tmp_path):
    out, store, summary = _run(tmp_path, {"top_k": 2, "alphas": [1.0]})
    status = {c["cell_id"]: c["status"] for c in out["cells"]}
    assert set(status.values()) == {"done"}
    steering = store.read("steering")
    sub = steering[steering["mode"] == "subspace"]
    assert len(sub) == 4 and set(sub["control"]) == {False, True}           # (arm, control) x prompt sets
    assert set(sub["subspace_rank"].astype(int)) == {2}
    assert sub["direction"].nunique() == 1 and sub["direction"].iloc[0].startswith("L1/")
    assert steering.loc[steering["mode"] != "subspace", "subspace_rank"].isna().all()
    row = summary.iloc[0]
    assert row["subspace"].endswith("(1 of 1 seeds)") and row["subspace_alpha"] == 1.0
    assert row["subspace_suppression"] == pytest.approx(row["baseline_harmful_refusal"] - row["subspace_harmful_refusal"])
    assert not np.isnan(row["subspace_suppression_vs_control"])
    assert row["verdict_control_margin"] in ("SUPPORTED", "NOT-SUPPORTED (ablation)", "NO-BASELINE-REFUSAL",
                                             "INCOMPLETE")


def test_toy_run_skips_top_k_beyond_the_passing_candidates(tmp_path):
    out, store, summary = _run(tmp_path, {"top_k": 12, "alphas": [1.0]})
    skipped = [c for c in out["cells"] if c["status"] == "skipped"]
    assert len(skipped) == 2 and all("top_k 12 asks for more candidates" in c["error"] for c in skipped)
    assert not (store.read("steering")["mode"] == "subspace").any()
    assert summary.iloc[0]["subspace"] is None and np.isnan(summary.iloc[0]["subspace_harmful_refusal"])
