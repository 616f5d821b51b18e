"""Grid expansion and content-addressed cell ids."""

from __future__ import annotations

from types import SimpleNamespace

from refusal_ray.grid import expand
from refusal_ray.spec import Spec

from test_bad_input import base_spec

PLANS = {"tiny": SimpleNamespace(n_layers=3, positions=[-1])}   # what expand reads of a ModelPlan


def _spec(tmp_path, **changes) -> Spec:
    raw = base_spec(tmp_path)
    raw["seeds"] = [0, 1]
    raw["stages"] = {"steer": {"addition": {"coefficients": [-1.0, 0.0, 1.0, 2.0]},
                               "ablation": {"alphas": [1.0], "direction_layer": "best"}}}
    for k, v in changes.items():
        raw[k] = v
    return Spec.model_validate(raw)


def _fp(fingerprint: str = "fp") -> dict[str, str]:
    return {"tiny": fingerprint}


def test_cell_counts_and_order(tmp_path):
    spec = _spec(tmp_path)
    cells = expand(spec, PLANS, _fp())
    per_seed = 1 + 1 + 3 * 3 * 2 + 2   # directions, baseline, layers x (c != 0) x control, ablation x control
    assert len(cells) == 2 * per_seed
    assert cells[0].stage == "directions" and cells[per_seed].stage == "directions"
    assert len({c.id for c in cells}) == len(cells)


def test_ids_depend_on_results_not_on_scheduling(tmp_path):
    a = expand(_spec(tmp_path), PLANS, _fp())
    b = expand(_spec(tmp_path, resources={"num_cpus": 4}), PLANS, _fp())
    assert [c.id for c in a] == [c.id for c in b]
    rule = base_spec(tmp_path)["decision_rule"]
    rule["steering_labels"] = {"strong": 0.9, "weak": 0.1}
    assert [c.id for c in a] == [c.id for c in expand(_spec(tmp_path, decision_rule=rule), PLANS, _fp())]
    assert [c.id for c in a] != [c.id for c in expand(_spec(tmp_path), PLANS, _fp("other-data"))]
    assert [c.id for c in a] != [c.id for c in expand(_spec(tmp_path, generation={"max_new_tokens": 9}), PLANS, _fp())]


def test_ablation_layers_change_only_the_ablation_arms_ids(tmp_path):
    """`stages.steer.ablation.layers` determines an ablation arm's result, so it is part of its id; 'all'
    (the default) leaves the ids as they were before the option was part of them."""
    def cells(layers):
        steer = {"addition": {"coefficients": [1.0]}, "ablation": {"alphas": [1.0], "direction_layer": "best",
                                                                    "layers": layers}}
        return expand(_spec(tmp_path, stages={"steer": steer}), PLANS, _fp())

    every, some = cells("all"), cells([1, 2])
    for a, b in zip(every, some):
        assert (a.id == b.id) == (a.params.get("mode") != "ablation"), a.params
    assert all("ablation_layers" not in c.params for c in every)
    assert [c.params["ablation_layers"] for c in some if c.params.get("mode") == "ablation"] == [[1, 2]] * 4
