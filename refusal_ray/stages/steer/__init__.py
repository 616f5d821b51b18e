"""Stage `steer`: the declaration (torch-free at import). Every registered operator's arms
(`refusal_ray.ops.OPS`), each with its norm-matched random control, generated on the test prompts; the
generation is `refusal_ray.stages.steer.run`, the summary columns and report sections
`refusal_ray.stages.steer.read`.

- `SteerStage`: the `stages.steer` block: one optional block per registered operator
  (`stages.steer.<name>`, its `config` class; `sync_operator_fields`, rebuilt on every
  `ops.register` / `ops.unregister`) and the settings every arm shares (`STEER_SETTINGS`).
- `validate(spec)`: steer's cross-field checks (resid_pre directions, steer.position among the
  direction positions) and every operator's `validate` on its block.
- `steer_params(spec, n_layers)`: the arms (cells) of one (model, seed); `id_key`, `group`, `check`,
  `check_model`, `describe`, `manifest`: the rest of the declaration.
Old names (`run_steer`, `build_edits`, `Row`, `steering_inputs`, ...) resolve to `.run` on first use
(PEP 562 `__getattr__`).
"""

from __future__ import annotations

from pydantic import Field, model_serializer

from refusal_ray import ops
from refusal_ray.ops import OPS
from refusal_ray.ops.base import CONTROLS_HELP, Controls, Strict, control_arms, n_draws
from refusal_ray.stages.base import Stage, check_layers, lazy
from refusal_ray.stages.directions import directions_key


class SteerStage(Strict):
    """Stage steer: one optional block per registered operator (`refusal_ray.ops.OPS`; `stages.steer.<name>`,
    added by `sync_operator_fields`), and the settings every arm shares."""

    controls: "Controls" = Field(True, description=CONTROLS_HELP)
    position: int = Field(-1, description="Direction position used for steering (one of directions.positions).")
    batch_size: int = Field(256, ge=1, description="Rows (arm x prompt) per generate call.")

    @model_serializer(mode="wrap")
    def _absent_when_unset(self, handler):
        out = handler(self)
        for op in ops.OPS:   # a block of an operator newer than the stored specs is absent when None
            if not op.dump_when_none and out.get(op.name, 0) is None:
                out.pop(op.name)
        return out


STEER_SETTINGS = ("controls", "position", "batch_size")


def sync_operator_fields() -> None:
    """Give SteerStage one optional field per registered operator (`stages.steer.<name>`: its `config` class;
    default `config()` when `default_block`, else None), in OPS order before the shared settings, and rebuild
    it (called at import and after every `ops.register` / `ops.unregister`; the models that hold it, the
    spec's `Stages` and `Spec`, rebuild after it through their own `ops.on_change`)."""
    from pydantic.fields import FieldInfo

    fields = {}
    notes = {}
    for op in ops.OPS:
        ann = op.config | None
        info = (FieldInfo.from_annotated_attribute(ann, Field(default_factory=op.config)) if op.default_block
                else FieldInfo.from_annotated_attribute(ann, Field(None, description=op.field_description)))
        fields[op.name], notes[op.name] = info, ann
    own = {k: v for k, v in SteerStage.__pydantic_fields__.items() if k in STEER_SETTINGS}
    SteerStage.__pydantic_fields__ = {**fields, **own}
    SteerStage.__annotations__ = {**notes, **{k: v for k, v in SteerStage.__annotations__.items()
                                                if k in STEER_SETTINGS}}
    SteerStage.model_rebuild(force=True)


sync_operator_fields()
ops.on_change(sync_operator_fields)


def validate(spec) -> None:
    """Steering uses resid_pre directions at `stages.steer.position`, which must be among the direction
    positions (unless those are 'post_instruction', resolved per model: `check_model`); then every
    operator's cross-field checks on its `stages.steer.<name>` block (None when unset). Raises ValueError."""
    steer = spec.stages.steer
    if steer is not None and "resid_pre" not in spec.stages.directions.sites:
        raise ValueError("stages.steer needs 'resid_pre' in stages.directions.sites (steering uses those directions)")
    positions = spec.stages.directions.positions
    if steer is not None and positions != "post_instruction" and steer.position not in positions:
        raise ValueError(f"stages.steer.position {steer.position} is not among "
                         f"stages.directions.positions {positions}")
    for op in ops.OPS:
        op.validate(spec, None if steer is None else getattr(steer, op.name, None))


def controls_text(controls) -> str:
    """How `plan` prints a `controls` value: "none", "1 random draw per arm", "K random draws per arm"."""
    k = n_draws(controls)
    return "none" if k == 0 else f"{k} random draw{'s' if k > 1 else ''} per arm"


def steer_params(spec, n_layers: int) -> list[dict]:
    """Every steering arm of one (model, seed): baseline, then each operator whose `stages.steer.<name>`
    block is set (OPS order), each arm followed by its controls (`controls: K`: K control arms,
    `control_arms`)."""
    steer = spec.stages.steer
    draws = n_draws(steer.controls)
    arms: list[dict] = [{"mode": "baseline", "layer": None, "coefficient": 0.0, "alpha": 0.0,
                         "direction_layer": None, "control": False}]
    for op in OPS:
        block = getattr(steer, op.name, None)
        if block is not None:
            for arm in op.arms(spec, block, n_layers):
                arms += control_arms(arm, draws)
    return arms


def group(cells: list, spec) -> list[list]:
    """About four full `generate` chunks of rows per task."""
    per = max(1, (4 * spec.stages.steer.batch_size) // (2 * spec.data.n_test))
    return [cells[i: i + per] for i in range(0, len(cells), per)]


def id_key(spec) -> dict:
    return directions_key(spec) | {"generation": spec.generation.model_dump(mode="json"),
                                   "judge": spec.judge.model_dump(mode="json"), "position": spec.stages.steer.position}


def describe(plan) -> list[str]:
    steer = plan.spec.stages.steer
    lines = [line for op in OPS if getattr(steer, op.name, None) is not None
             for line in op.describe(plan.spec, getattr(steer, op.name))]
    return lines + [f"controls: {controls_text(steer.controls)}"]


def check(plan) -> None:
    """Plan-time checks: the addition and ablation layers and an explicit ablation direction_layer exist in
    every model (the shallowest names the error), then every operator block set (`Operator.check`).
    Raises SpecError naming the field."""
    steer = plan.spec.stages.steer
    add, abl = getattr(steer, "addition", None), getattr(steer, "ablation", None)
    if add is not None:
        check_layers(plan, "stages.steer.addition.layers", add.layers)
    if abl is not None:
        check_layers(plan, "stages.steer.ablation.layers", abl.layers)
        if isinstance(abl.direction_layer, int):
            check_layers(plan, "stages.steer.ablation.direction_layer", [abl.direction_layer])
    for op in OPS:
        block = getattr(steer, op.name, None)
        if block is not None:
            op.check(plan, block)


def check_model(plan, mp) -> None:
    """steer.position, and an ablation direction_position, are among the model's direction positions
    (`mp.positions`, resolved by plan). Raises SpecError naming the field."""
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


def manifest(plan) -> dict:
    """{"steer_position": steer.position}, -1 without the stage (the manifest's key either way)."""
    steer = plan.spec.stages.steer
    return {"steer_position": steer.position if steer is not None else -1}


_RUN = "refusal_ray.stages.steer.run"
STAGE = Stage(name="steer", tables=("steering", "completions"), needs=("directions", "select"),
              cells=lambda spec, mp: steer_params(spec, mp.n_layers), id_key=id_key, group=group,
              inputs=lazy(_RUN, "steering_inputs"), skip=lazy(_RUN, "skip_reason"), run=lazy(_RUN, "run"),
              check=check, describe=describe, check_model=check_model, manifest=manifest,
              block=SteerStage, validate=validate, read="refusal_ray.stages.steer.read")


def __getattr__(name: str):
    """Names of `.run` (run_steer, build_edits, Row, steering_inputs, ...), imported on first use."""
    if name.startswith("__"):
        raise AttributeError(name)
    import importlib

    try:
        return getattr(importlib.import_module("refusal_ray.stages.steer.run"), name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
