"""Weight arms beside partial-layer ablation (issue 18, item 8).

`orthogonalized` and `orthogonalized_subspace` edit the weights of every layer. Beside an ablation or
subspace arm restricted to some layers they are not that arm's weight twin: an explicit arm list naming
them is exit 2 at validate with one line naming `stages.capability.arms`, and the default arm list leaves
them out. An explicit layer list that covers every layer is 'all' and keeps them.
"""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from refusal_ray.cli import app

from conftest import TOY_MODELS, TOY_PROMPTS
from test_bad_input import base_spec

QWEN_XS = TOY_MODELS / "toy-qwen-xs"      # 2 layers
HELDOUT = TOY_PROMPTS / "heldout.jsonl"


def _spec(tmp_path, ablation_layers="all", subspace_layers=None, arms=None) -> str:
    spec = base_spec(QWEN_XS)
    spec["stages"]["steer"]["ablation"]["layers"] = ablation_layers
    if subspace_layers is not None:
        spec["stages"]["steer"]["subspace"] = {"layers": [0, 1], "ablation_layers": subspace_layers}
    spec["stages"]["capability"] = {"text": {"path": str(HELDOUT), "n": 2}, **({"arms": arms} if arms else {})}
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    return str(f)


@pytest.mark.parametrize("arm,kwargs,field_,layers", [
    ("orthogonalized", {"ablation_layers": [1]}, "stages.steer.ablation.layers", [1]),
    ("orthogonalized_subspace", {"subspace_layers": [0]}, "stages.steer.subspace.ablation_layers", [0]),
])
def test_listed_weight_arm_beside_partial_layers_exits_2(tmp_path, arm, kwargs, field_, layers):
    f = _spec(tmp_path, arms=["baseline", "ablation", arm], **kwargs)
    result = CliRunner().invoke(app, ["validate", f])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: {f}: stages.capability.arms: '{arm}' edits the weights of every layer, but {field_} ablates "
        f"layers {layers} only (model 'tiny' has 2): it is not that arm's weight twin; drop it from the list "
        f"(the default list leaves it out) or ablate every layer")


def _modes(f: str) -> set[str]:
    from refusal_ray.plan import make_plan

    return {c.params["mode"] for c in make_plan(f).cells if c.stage == "capability"}


def test_default_arms_leave_the_weight_twin_out_of_partial_layers(tmp_path):
    assert _modes(_spec(tmp_path, ablation_layers=[1])) == {"baseline", "addition", "ablation"}
    assert _modes(_spec(tmp_path, subspace_layers=[0])) == {"baseline", "addition", "ablation", "subspace",
                                                           "orthogonalized"}
    both = _modes(_spec(tmp_path, ablation_layers=[0], subspace_layers=[1]))
    assert both == {"baseline", "addition", "ablation", "subspace"}


def test_every_layer_listed_keeps_the_weight_twins(tmp_path):
    full = _modes(_spec(tmp_path, ablation_layers=[1, 0], subspace_layers=[0, 1]))
    assert {"orthogonalized", "orthogonalized_subspace"} <= full
    f = _spec(tmp_path, ablation_layers=[0, 1], arms=["baseline", "ablation", "orthogonalized"])
    assert CliRunner().invoke(app, ["validate", f]).exit_code == 0
