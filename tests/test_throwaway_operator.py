"""An operator added from inside a test (README "Adding an operator"): registered with `register`, it runs,
stores its rows with its own columns, is summarised and reported, with no file of the repository changed;
unregistered at the end (the spec's SteerStage loses its field again).

The throwaway operator "scale" rescales the component along the unit direction u at resid_pre of one layer:
x <- x + (s - 1)(x . u) u (s = 1 is the identity, s = 0 directional ablation at that site); its control uses
a Gaussian direction of the same norm, seeded by the cell id."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from pydantic import Field

from refusal_ray.ops import OPS, register, unregister
from refusal_ray.ops.base import Operator, Strict, direction_of

from conftest import REPO, TOY_MODELS, TOY_PROMPTS


class ScaleArm(Strict):
    """x <- x + (s - 1)(x . u) u at resid_pre[layer]."""

    layer: int = Field(1, ge=0, description="Layer of the rescaled site and of the direction.")
    scales: list[float] = Field([0.0, 2.0], min_length=1, description="Scales s.")


def _make_scale():
    class Scale(Operator):
        name = "scale"
        label = "direction rescaling"
        order = 95
        config = ScaleArm
        effect = "both"
        short = "scl"
        arm_keys = ("scale",)

        def arms(self, spec, block, n_layers):
            return [{"mode": "scale", "layer": block.layer, "coefficient": 0.0, "alpha": 0.0,
                     "direction_layer": block.layer, "scale": float(s)} for s in block.scales]

        def resolve(self, cell, d):
            return direction_of(cell, d)

        def edits(self, rows, chunk, d):
            import torch

            layer = rows[0][1].params["layer"]
            u = torch.zeros(chunk.n, chunk.d_model)
            s = torch.ones(chunk.n)
            for i, cell, (_, _, v) in rows:
                u[i] = torch.from_numpy(v / max(float(np.linalg.norm(v)), 1e-30))
                s[i] = cell.params["scale"]

            def edit(x):   # x: [batch, pos, d_model]
                uu, ss = u.to(x.device, x.dtype), s.to(x.device, x.dtype)
                proj = torch.einsum("bpd,bd->bp", x, uu)
                return x + ((ss - 1)[:, None] * proj)[..., None] * uu[:, None, :]
            return {("resid_pre", layer): edit}

        def columns(self, cell, resolved):
            layer, position, v = resolved
            return {"direction_layer": layer, "direction_position": position,
                    "vector_norm": float(np.linalg.norm(v)), "scale": cell.params["scale"]}

    return Scale


def _spec(tmp_path) -> str:
    spec = {
        "name": "throwaway",
        "models": [{"name": "qwen-xs", "path": str(TOY_MODELS / "toy-qwen-xs")}],
        "data": {"harmful": {"path": str(TOY_PROMPTS / "harmful.jsonl")},
                 "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl"), "reference_column": "reference"},
                 "n_train": 8, "n_val": 4, "n_test": 4},
        "seeds": [0],
        "stages": {"steer": {"addition": {"layers": [1], "coefficients": [1.0]},
                             "ablation": {"alphas": [1.0], "direction_layer": "best"},
                             "scale": {"layer": 1, "scales": [0.0, 2.0]}, "batch_size": 64}},
        "generation": {"max_new_tokens": 4},
        "decision_rule": {
            "control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25,
                               "addition_coefficient": 1.0, "ablation_alpha": 1.0},
            "steering_labels": {"strong": 0.5, "weak": 0.2}},
    }
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    return str(f)


def _repo_listing() -> set[str]:
    """Paths under the repository root, refusal_ray/ and outputs/ (where a run or an operator could write)."""
    return {str(p.relative_to(REPO)) for d in (REPO, REPO / "refusal_ray", REPO / "refusal_ray" / "ops",
                                                REPO / "outputs") if d.is_dir() for p in d.iterdir()
            if p.suffix != ".pyc" and p.name != "__pycache__"}


@pytest.fixture
def scale_op():
    from refusal_ray.spec import SteerStage

    assert "scale" not in OPS and "scale" not in SteerStage.model_fields
    register(_make_scale())
    try:
        yield OPS["scale"]
    finally:
        unregister("scale")
    assert "scale" not in OPS and "scale" not in SteerStage.model_fields


def test_register_refuses_a_duplicate_name(scale_op):
    with pytest.raises(ValueError, match="operator 'scale' is already registered"):
        register(_make_scale())


def test_throwaway_operator_runs_stores_summarises_and_reports(scale_op, tmp_path):
    from refusal_ray.analysis.report import write_report
    from refusal_ray.analysis.summary import pooled_arms, render, summarize
    from refusal_ray.cluster.local import run_local
    from refusal_ray.plan import make_plan
    from refusal_ray.runner import freeze_manifest
    from refusal_ray.store import Store

    before = _repo_listing()
    plan = make_plan(_spec(tmp_path))
    scale_cells = [c for c in plan.cells if c.params.get("mode") == "scale"]
    assert sorted((c.params["scale"], c.params["control"]) for c in scale_cells) == \
        [(0.0, False), (0.0, True), (2.0, False), (2.0, True)]
    tables = run_local(plan, log=lambda *a: None)
    assert not [r for r in tables["cells"] if r["status"] != "done"]
    rows = [r for r in tables["steering"] if r["mode"] == "scale"]
    assert len(rows) == 8 and {r["scale"] for r in rows} == {0.0, 2.0}
    assert all(r["direction_layer"] == 1 and r["vector_norm"] > 0 for r in rows)
    others = [r for r in tables["steering"] if r["mode"] != "scale"]
    assert all("scale" not in r for r in others)          # its column only on its rows
    out = tmp_path / "out"
    store = Store(out)
    freeze_manifest(plan, store)
    for table, trs in tables.items():
        for model in {r["model"] for r in trs}:
            store.write(table, model, [{k: v for k, v in r.items() if k != "model"} for r in trs if r["model"] == model])
    arms = pooled_arms(store.read("steering"), store.read("completions"))
    mine = arms[arms["mode"] == "scale"]
    assert set(mine["scale"]) == {"0", "2"} and len(mine) == 8   # its arm key keeps the settings apart
    row = summarize(out).iloc[0]
    # the summary's default effect columns at its first setting (s = 0), against an independent recomputation
    a = arms[arms["model"] == "qwen-xs"]

    def rate(mode, pset, control=False, scale="0"):
        sel = a[(a["mode"] == mode) & (a["prompt_set"] == pset) & (a["control"] == control)]
        if mode == "scale":
            sel = sel[sel["scale"] == scale]
        return float(sel["rate"].mean())
    assert row["scale_suppression"] == pytest.approx(rate("baseline", "harmful") - rate("scale", "harmful"))
    assert row["scale_suppression_vs_control"] == pytest.approx(rate("scale", "harmful", True)
                                                                - rate("scale", "harmful"))
    assert row["scale_induction"] == pytest.approx(rate("scale", "harmless") - rate("baseline", "harmless"))
    text = open(write_report(out)).read()
    assert "## Direction rescaling" in text
    table = text[text.find("## Direction rescaling"):].split("\n\n")[1].splitlines()
    assert table[0].startswith("| model | scale |") and len(table) == 2 + 8      # its 8 pooled arms
    assert "Direction rescaling (scale=0) lowers harmful refusal by" in text   # its headline sentence
    assert f"{row['scale_suppression']:.2f}" in text.split("## Summary")[0]
    summary = summarize(out)
    assert "scl-ctl" in render(summary, wide=True)          # its summary table columns (--wide)
    assert "  scale drop vs control: direction rescaling minus its random control: the control's harmful refusal " \
        "minus its own" in render(summary)                  # spelled out in the other operators' table
    assert _repo_listing() == before   # the operator lives in this test only: the run wrote nothing into the repo
