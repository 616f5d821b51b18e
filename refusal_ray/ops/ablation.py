"""Directional ablation: x <- x - alpha (x . u) u, u the unit difference-of-means direction, at resid_pre,
attn_out and mlp_out of the ablated layers (Arditi et al. 2024, Sec. 2.4). Control: the same arm with a
Gaussian direction of the same norm, seeded by the cell id. Weight twin: `orthogonalized` (the direction
projected out of the weights that write the residual stream, `refusal_ray.models.orthogonalize`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from refusal_ray.ops.base import (ABLATION_SITES, LayerList, Operator, Strict, direction_of, fmt_num, has_value as _has,
                                  layer_list, register)


class AblationArm(Strict):
    """Directional ablation x <- x - alpha (x . u) u at resid_pre, attn_out and mlp_out."""

    layers: LayerList = Field("all", description="Layers ablated at ('all' is Arditi's choice).")
    alphas: list[float] = Field([1.0], min_length=1, description="Ablation strengths.")
    direction_layer: Literal["selected", "best"] | int = Field(
        "selected", description="Direction ablated: 'selected' (stage select's choice for the seed, layer and "
                                "position), 'best' (highest separation at steer.position) or a layer.")
    direction_position: int | None = Field(None, lt=0, description="Position of an explicit direction_layer "
                                                                   "(None: steer.position).")


def _select_settings(spec) -> dict:
    return {"select": spec.stages.select.model_dump(mode="json", exclude={"batch_size"})}


def capability_direction(spec) -> tuple[str | int, int | None]:
    """(direction layer, explicit position or None) of capability's ablation / orthogonalized arms: the
    capability block's direction_layer (at steer.position), else steer's ablation direction with its
    direction_position, else 'selected' with a select block, else 'best'."""
    cap, steer = spec.stages.capability, spec.stages.steer
    if cap.direction_layer is not None:
        return cap.direction_layer, None
    if steer is not None and steer.ablation is not None:
        return steer.ablation.direction_layer, steer.ablation.direction_position
    return ("selected" if spec.stages.select is not None else "best"), None


@register
class Ablation(Operator):
    name = "ablation"
    label = "directional ablation"
    order = 20
    config = AblationArm
    default_block = True
    effect = "bypass"
    weight_arm = "orthogonalized"
    dump_when_none = True
    short = "abl"
    color = "tab:blue"

    report_section = False
    weight_color = "tab:green"

    def arms(self, spec, block, n_layers):
        extra = {} if block.direction_position is None else {"direction_position": block.direction_position}
        if block.layers != "all":   # part of the arm (ids of 'all' arms unchanged from before)
            extra["ablation_layers"] = layer_list(block.layers, n_layers)
        if block.direction_layer == "selected" and spec.stages.select is not None:
            extra |= _select_settings(spec)
        return [{"mode": "ablation", "layer": None, "coefficient": 0.0, "alpha": float(a),
                 "direction_layer": block.direction_layer, **extra} for a in block.alphas]

    def _capability_arm(self, spec, block, n_layers, alpha: float) -> dict:
        direction, position = capability_direction(spec)
        explicit = {**(_select_settings(spec) if direction == "selected" and spec.stages.select is not None else {}),
                    **({} if position is None else {"direction_position": position})}
        layers = {} if block is None or block.layers == "all" else {
            "ablation_layers": layer_list(block.layers, n_layers)}
        return {"mode": "ablation", "layer": None, "coefficient": 0.0, "alpha": float(alpha),
                "direction_layer": direction, **explicit, **layers}

    def capability_arms(self, spec, block, n_layers):
        return [self._capability_arm(spec, block, n_layers, a) for a in spec.stages.capability.alphas]

    def in_default_capability(self, spec, block) -> bool:
        return True

    def weight_params(self, spec, block, n_layers) -> tuple[dict, dict]:
        """(the orthogonalized arm's params, its hook twin's: this operator's capability arm at alpha 1)."""
        twin = self._capability_arm(spec, block, n_layers, 1.0)
        arm = {k: v for k, v in twin.items() if k != "ablation_layers"}
        return {**arm, "mode": "orthogonalized"}, twin

    def weight_partial(self, spec, block, n_layers) -> tuple[str, list[int]] | None:
        """(field, layers) when this block ablates only some layers (the weight arm is then no twin)."""
        if block is not None and block.layers != "all" and sorted(set(block.layers)) != list(range(n_layers)):
            return f"stages.steer.{self.name}.layers", list(block.layers)
        return None

    def weight_tensor(self, cell, resolved) -> np.ndarray:
        return resolved[2]

    def describe(self, spec, block):
        return [f"ablation: alphas {block.alphas}, direction {block.direction_layer}"]

    def validate(self, spec, block) -> None:
        if block is None:
            return
        from refusal_ray.ops.base import check_direction_fields

        check_direction_fields(spec, block, "ablation")
        cm = spec.decision_rule.control_margin
        if cm.ablation_alpha not in block.alphas:
            raise ValueError(f"decision_rule.control_margin.ablation_alpha {cm.ablation_alpha} "
                             f"is not in stages.steer.ablation.alphas")

    def resolve(self, cell, d):
        return direction_of(cell, d)

    def edits(self, rows, chunk, d):
        """x <- x - alpha (x . u) u: per site [n, d_model] unit directions and [n] strengths, zero elsewhere.
        Sites: the arm's `ablation_layers` param, else `chunk.ablation_layers` (default every layer)."""
        import torch

        from refusal_ray.interventions import RowEdit

        n, dm = chunk.n, chunk.d_model
        dirs: dict = {}
        alpha: dict = {}
        default = chunk.layers()
        for i, cell, (_, _, v) in rows:
            p = cell.params
            u = torch.from_numpy(v) / max(float(np.linalg.norm(v)), 1e-30)
            for layer in (default if chunk.ablation_layers is not None or "ablation_layers" not in p
                          else p["ablation_layers"]):
                for kind in ABLATION_SITES:
                    dirs.setdefault((kind, layer), torch.zeros(n, dm))[i] = u
                    alpha.setdefault((kind, layer), torch.zeros(n))[i] = p["alpha"]
        return {key: RowEdit(dirs[key], alpha[key]) for key in dirs}

    def columns(self, cell, resolved) -> dict:
        layer, position, v = resolved
        return {"direction_layer": layer, "direction_position": position, "vector_norm": float(np.linalg.norm(v))}

    def summary_columns(self, a, rule, block) -> dict:
        return {}   # the decision rule's ablation columns (summary.steer_columns)

    @property
    def display(self):
        return ()

    report_order = 5   # the rule's arms first: ablation, then addition

    @property
    def cost_display(self):
        return (("cost_ce[ablation]", "abl dCE", "{:+.3f}"), ("cost_kl[ablation]", "abl KL", "{:.3f}"),
                ("cost_ce[orthogonalized]", "orth dCE", "{:+.3f}"))

    def headline(self, row, rule):
        if not _has(row, "ablation_suppression"):
            return None
        return (f"Ablating {row.get('ablation_direction') or 'the direction'} moves harmful refusal "
                f"{fmt_num(row.get('baseline_harmful_refusal'))} -> {fmt_num(row.get('ablation_harmful_refusal'))} "
                f"({fmt_num(row.get('ablation_suppression_vs_control'), '{:+.2f}')} beyond its random control).")

    def cost_setting(self, rule):
        return "alpha", (rule.get("control_margin") or {}).get("ablation_alpha")

