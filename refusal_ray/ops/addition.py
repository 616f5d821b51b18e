"""Activation addition: x <- x + c v at resid_pre[L], every position (prompt and generated tokens), v the
difference of means (Arditi et al. 2024, Sec. 2.3). Control: the same arm with a Gaussian direction of the
same norm as v, seeded by the cell id.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from refusal_ray.ops.base import (LayerList, Operator, Strict, direction_of, fmt_num, has_value as _has, layer_list,
                                  register)


class AdditionArm(Strict):
    """Activation addition x <- x + c * v at resid_pre[L], all positions."""

    layers: LayerList = Field("all", description="Layers to add at ('all' or a list).")
    coefficients: list[float] = Field([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0], min_length=1,
                                      description="Coefficients c (c = 0 is the shared baseline arm).")


@register
class Addition(Operator):
    name = "addition"
    label = "activation addition"
    order = 10
    apply_order = 90          # after every projection at a site, as RowEdit: ablate, then add
    config = AdditionArm
    default_block = True
    effect = "induce"
    dump_when_none = True
    short = "add"
    color = "tab:red"

    report_section = False

    def report_mask(self, a, summary_row):
        """Addition arms at the rule's layer only (`addition_layer`)."""
        return (a["mode"] == "addition") & (a["layer"] == summary_row.get("addition_layer"))

    def arms(self, spec, block, n_layers):
        return [{"mode": "addition", "layer": layer, "coefficient": float(c), "alpha": 0.0, "direction_layer": layer}
                for layer in layer_list(block.layers, n_layers) for c in block.coefficients
                if c != 0]   # c = 0 is the shared baseline arm

    def capability_arms(self, spec, block, n_layers):
        """Capability's addition arms: `stages.capability.coefficients` at `addition_layer` (its site layer is
        left None until the direction resolves per seed)."""
        cap = spec.stages.capability
        sel = ({"select": spec.stages.select.model_dump(mode="json", exclude={"batch_size"})}
               if cap.addition_layer == "selected" and spec.stages.select is not None else {})
        return [{"mode": "addition", "layer": None, "coefficient": float(c), "alpha": 0.0,
                 "direction_layer": cap.addition_layer, **sel} for c in cap.coefficients if c != 0]

    def in_default_capability(self, spec, block) -> bool:
        return True

    def describe(self, spec, block):
        return [f"addition: layers {block.layers}, coefficients {block.coefficients}"]

    def validate(self, spec, block) -> None:
        cm = spec.decision_rule.control_margin
        if block is not None and cm.addition_coefficient not in block.coefficients:
            raise ValueError(f"decision_rule.control_margin.addition_coefficient {cm.addition_coefficient} "
                             f"is not in stages.steer.addition.coefficients")

    def resolve(self, cell, d):
        return direction_of(cell, d)

    def edits(self, rows, chunk, d):
        """x <- x + c v at resid_pre of the arm's layer (its direction's layer where params say None):
        one [n, d_model] tensor per layer, zero rows elsewhere."""
        import torch

        from refusal_ray.interventions import RowEdit

        add: dict = {}
        for i, cell, (layer, _, v) in rows:
            p = cell.params
            site = p["layer"] if p["layer"] is not None else layer
            add.setdefault(site, torch.zeros(chunk.n, chunk.d_model))[i] = torch.from_numpy(v) * p["coefficient"]
        return {("resid_pre", layer): RowEdit(add=t) for layer, t in add.items()}

    def columns(self, cell, resolved) -> dict:
        layer, position, v = resolved
        site = {} if cell.params["layer"] is not None else {"layer": layer}
        return {**site, "direction_layer": layer, "direction_position": position,
                "vector_norm": float(np.linalg.norm(v))}

    def summary_columns(self, a, rule, block) -> dict:
        return {}   # the decision rule's addition columns (summary.steer_columns)

    @property
    def display(self):
        return ()

    @property
    def cost_display(self):
        return (("cost_ce[addition]", "add dCE", "{:+.3f}"),)

    def headline(self, row, rule):
        if not _has(row, "addition_induction"):
            return None
        c = rule.get("control_margin", {}).get("addition_coefficient")
        return (f"Adding it (c = {fmt_num(c, '{:g}')}) at layer {fmt_num(row.get('addition_layer'), '{:.0f}')} moves "
                f"harmless refusal {fmt_num(row.get('baseline_harmless_refusal'))} -> "
                f"{fmt_num(row.get('addition_harmless_refusal'))} "
                f"({fmt_num(row.get('addition_induction_vs_control'), '{:+.2f}')} beyond its control).")

    def cost_setting(self, rule):
        return "coefficient", (rule.get("control_margin") or {}).get("addition_coefficient")
