"""Hooks of stage declarations whose modules are being rewritten in this issue (steer, capability,
directions; select's body):
what `plan`, `runner` and `session` used to do by stage name, now declared on the stage (`Stage.check`,
`Stage.check_model`, `Stage.manifest`). `refusal_ray.stages` attaches them to a declaration that does
not set them itself; each moves into its stage's module (its `STAGE = Stage(...)`) and this module
goes away (see the declarations named in each docstring).
"""

from __future__ import annotations

from dataclasses import replace

from refusal_ray.stages.base import (Stage, _no_manifest, _no_model_checks, _no_positions, _nothing_resolved,
                                     check_layers)


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


def refusal_tokens(plan, mp, tok, setting, epsilon) -> dict:
    """{"refusal_tokens": {"setting", "ids", "tokens" (decoded), "epsilon"}}: the refusal first tokens of
    one model (`refusal_ray.models.refusal_tokens.resolve`). Raises SpecError naming
    `stages.select.refusal_tokens`."""
    from refusal_ray.errors import SpecError
    from refusal_ray.judges.substring import DEFAULT_PHRASES
    from refusal_ray.models import refusal_tokens as rt

    try:
        ids = rt.resolve(setting, tok, mp.family, plan.spec.judge.phrases or DEFAULT_PHRASES)
    except rt.RefusalTokenError as e:
        raise SpecError(plan.spec_file, "stages.select.refusal_tokens", f"{e} (model {mp.name!r})") from None
    return {"refusal_tokens": {"setting": setting, "ids": ids, "tokens": rt.describe(tok, ids), "epsilon": epsilon}}


def directions_positions(spec):
    """directions: `positions=lambda spec: spec.stages.directions.positions`."""
    return spec.stages.directions.positions


def directions_resolve_model(plan, mp, tok) -> dict:
    """directions: `resolve_model=`: train filtering reads the family's refusal tokens when stage
    select (which names its own) is off."""
    if not plan.spec.stages.directions.filter_train or plan.spec.stages.select is not None:
        return {}
    return refusal_tokens(plan, mp, tok, "family", None)


def select_resolve_model(plan, mp, tok) -> dict:
    """select: `resolve_model=`: its refusal score's tokens (`stages.select.refusal_tokens`) and epsilon."""
    s = plan.spec.stages.select
    return refusal_tokens(plan, mp, tok, s.refusal_tokens, s.refusal_score_epsilon)


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
    if stage.name == "directions" and stage.resolve_model is _nothing_resolved:
        hooks["resolve_model"] = directions_resolve_model
    if stage.name == "directions" and stage.positions is _no_positions:
        hooks["positions"] = directions_positions
    if stage.name == "select" and stage.resolve_model is _nothing_resolved:
        hooks["resolve_model"] = select_resolve_model
    if stage.name == "capability" and stage.manifest is _no_manifest:
        hooks["manifest"] = capability_manifest
    return replace(stage, **hooks) if hooks else stage
