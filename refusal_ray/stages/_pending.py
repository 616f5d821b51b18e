"""Hooks of stage declarations whose modules are being rewritten in this issue (steer, capability):
what `plan`, `runner` and `session` used to do by stage name, now declared on the stage (`Stage.check`,
`Stage.check_model`, `Stage.manifest`). `refusal_ray.stages` attaches them to a declaration that does
not set them itself; each moves into its stage's module (its `STAGE = Stage(...)`) and this module
goes away (see the declarations named in each docstring).
"""

from __future__ import annotations

from dataclasses import replace

from refusal_ray.stages.base import Stage, _no_manifest, _no_model_checks, check_layers


def steer_manifest(plan) -> dict:
    """steer: `manifest=lambda plan: {"steer_position": plan.spec.stages.steer.position if
    plan.spec.stages.steer else -1}` (the manifest's key, -1 without the stage, as before)."""
    steer = plan.spec.stages.steer
    return {"steer_position": steer.position if steer is not None else -1}


def capability_manifest(plan) -> dict:
    """capability: `manifest=lambda plan: {"capability_key": measure_key(plan) if
    plan.spec.stages.capability is not None else None}`."""
    if plan.spec.stages.capability is None:
        return {"capability_key": None}
    from refusal_ray.stages.capability import measure_key

    return {"capability_key": measure_key(plan)}


def steer_check_layers(plan) -> None:
    """steer (part of its `check`): the addition and ablation layers and an explicit ablation
    direction_layer exist in every model (the shallowest names the error). Raises SpecError."""
    steer = plan.spec.stages.steer
    add, abl = getattr(steer, "addition", None), getattr(steer, "ablation", None)
    if add is not None:
        check_layers(plan, "stages.steer.addition.layers", add.layers)
    if abl is not None:
        check_layers(plan, "stages.steer.ablation.layers", abl.layers)
        if isinstance(abl.direction_layer, int):
            check_layers(plan, "stages.steer.ablation.direction_layer", [abl.direction_layer])


def steer_check_model(plan, mp) -> None:
    """steer: `check_model=`: steer.position, and an ablation direction_position, are among the
    model's direction positions. Raises SpecError."""
    from refusal_ray.errors import SpecError

    steer = plan.spec.stages.steer
    if steer.position not in mp.positions:
        raise SpecError(plan.spec_file, "stages.steer.position", f"{steer.position} is not among the direction "
                                                                 f"positions {mp.positions} of model {mp.name!r}")
    abl = getattr(steer, "ablation", None)
    if abl is not None and abl.direction_position is not None and abl.direction_position not in mp.positions:
        raise SpecError(plan.spec_file, "stages.steer.ablation.direction_position",
                        f"{abl.direction_position} is not among the direction positions {mp.positions} of model "
                        f"{mp.name!r}")


def _then(first, second):
    def check(plan):
        first(plan)
        second(plan)
    return check


def adopt(stage: Stage) -> Stage:
    """`stage` with the hooks above that its own declaration does not set yet."""
    hooks = {}
    if stage.name == "steer":
        if stage.manifest is _no_manifest:
            hooks["manifest"] = steer_manifest
        if stage.check_model is _no_model_checks:
            hooks["check_model"] = steer_check_model
            hooks["check"] = _then(steer_check_layers, stage.check)
    if stage.name == "capability" and stage.manifest is _no_manifest:
        hooks["manifest"] = capability_manifest
    return replace(stage, **hooks) if hooks else stage
