"""Stage `optimise`, the declaration (torch-free at import): gradient-optimised refusal directions and
orthonormal sets (RDO / RCO-style; Wollschlaeger et al., ICML 2025, arXiv 2502.17420; issue 20's
"optimised directions"). The optimisation, its losses and where it differs from the paper:
`refusal_ray.stages.optimise.run`; the summary columns and report section: `.read`.

- `OptimiseStage`: the `stages.optimise` block (off when absent: no cell, no id, no spec field changes).
- `validate(spec)`: its cross-field checks (the addition layer reads resid_pre directions).
- cells: one per set size in `dims` ({"dim": k, "kind": kind}); rows: table `optimised`, one row per learned
  vector (columns in `run.ROW_COLUMNS`; stage rank reads them).
- `check` / `check_model`: the layer exists in every model, every dim <= the model's d_model (SpecError).
"""

from __future__ import annotations

from importlib import import_module
from typing import Literal

from pydantic import Field, field_validator

from refusal_ray.ops.base import Strict, no_duplicates
from refusal_ray.stages.base import Stage, check_layers, lazy


class Weights(Strict):
    """The loss weights (the paper's DEFAULT_CONFIG: ablation 1, addition 0.2, retain 1)."""

    ablation: float = Field(1.0, ge=0)
    addition: float = Field(0.2, ge=0)
    retain: float = Field(1.0, ge=0)


class OptimiseStage(Strict):
    """Learn refusal directions by gradient descent (RDO-style): ablating the set removes refusal on harmful
    train prompts, adding each vector induces it on harmless ones, ablation leaves harmless prompts unchanged."""

    dims: list[int] = Field([1], min_length=1, description="Set sizes to learn: 1 = one unit direction; k >= 2 an "
                                                           "orthonormal set of k (one cell each).")
    kind: Literal["subspace", "cone"] = Field("subspace", description=(
        "'subspace': ablate the whole set jointly (and add each vector); 'cone': the paper's RCO, each step "
        "ablates / adds each basis vector and `cone_samples` directions of the set's positive orthant, alone."))
    layer: int | None = Field(None, ge=0, description="Addition layer (resid_pre) and the DIM direction's layer; "
                                                      "None: stage select's layer, else the directions' best.")
    position: int = Field(-1, lt=0, description="The DIM direction's position when stage select is off.")
    steps: int = Field(200, ge=1, description="Optimiser steps (one batch per class each).")
    lr: float = Field(0.01, gt=0, description="AdamW learning rate (the paper's 1e-2).")
    batch_size: int = Field(16, ge=1, description="Harmful and harmless train prompts per step (each).")
    weights: Weights = Field(default_factory=Weights)
    retain_positions: int = Field(8, ge=1, description="Last prompt positions the retain KL sums over.")
    cone_samples: int = Field(8, ge=1, description="Cone samples per step (kind cone; the paper's n_sample 8).")
    init: Literal["random", "dim"] = Field("dim", description=(
        "'random': Gaussian (the paper's); 'dim': the first vector starts at the difference-of-means direction, "
        "the others random (orthonormalised)."))
    independence: Literal["orthogonal"] = Field("orthogonal", description=(
        "How a set's vectors are kept apart: 'orthogonal' (QR). The paper's representational independence "
        "(RepInd) is not implemented."))
    refusal_tokens: Literal["family", "judge_phrases"] = Field("family", description=(
        "The refusal first tokens the refusal score reads (as stages.select.refusal_tokens)."))
    max_seconds: float | None = Field(None, gt=0, description="Stop a cell after the step that passes this "
                                                              "(stored: stopped 'time').")
    max_memory_gb: float | None = Field(None, gt=0, description="Stop a cell after the step whose peak memory "
                                                                "passes this (stored: stopped 'memory').")

    @field_validator("dims")
    @classmethod
    def _dims(cls, v):
        if any(k < 1 for k in v):
            raise ValueError(f"dims must be >= 1 (got {min(v)})")
        no_duplicates(v, "dim")
        return v


def validate(spec) -> None:
    """The addition layer's DIM direction is a resid_pre direction. Raises ValueError."""
    if spec.stages.optimise is not None and "resid_pre" not in spec.stages.directions.sites:
        raise ValueError("stages.optimise needs 'resid_pre' in stages.directions.sites (its addition scale and "
                         "layer come from those directions)")
    opt = spec.stages.optimise
    positions = spec.stages.directions.positions
    if (opt is not None and spec.stages.select is None and positions != "post_instruction"
            and opt.position not in positions):
        raise ValueError(f"stages.optimise.position {opt.position} is not among stages.directions.positions "
                         f"{positions}")


def _cells(spec, mp) -> list[dict]:
    o = spec.stages.optimise
    return [{"dim": k, "kind": o.kind} for k in o.dims]


def _id_key(spec) -> dict:
    from refusal_ray.stages.directions import directions_key

    o = spec.stages.optimise
    select = spec.stages.select
    key = directions_key(spec) | {"optimise": o.model_dump(mode="json", exclude={"dims", "kind"})}
    if o.layer is None and select is not None:   # the layer and position come from stage select
        key["select"] = select.model_dump(mode="json", exclude={"batch_size"})
    if o.refusal_tokens == "judge_phrases":
        key["judge"] = spec.judge.model_dump(mode="json")
    return key


def _check(plan) -> None:
    o = plan.spec.stages.optimise
    if o.layer is not None:
        check_layers(plan, "stages.optimise.layer", [o.layer])


def _check_model(plan, mp) -> None:
    """Every set size fits the model: dim <= d_model. Raises SpecError naming stages.optimise.dims."""
    from refusal_ray.errors import SpecError

    for k in plan.spec.stages.optimise.dims:
        if k > mp.d_model:
            raise SpecError(plan.spec_file, "stages.optimise.dims",
                            f"dim {k} exceeds d_model {mp.d_model} of model {mp.name!r}")


def _describe(plan) -> list[str]:
    o = plan.spec.stages.optimise
    w = o.weights
    where = f"layer {o.layer}" if o.layer is not None else "select's layer (else the directions' best)"
    limits = ", ".join(x for x in (f"max {o.max_seconds:g} s" if o.max_seconds else "",
                                   f"max {o.max_memory_gb:g} GB" if o.max_memory_gb else "") if x) or "no limits"
    return [f"optimise: {o.kind} sets of size {o.dims} at {where}, {o.steps} steps, lr {o.lr:g}, batch "
            f"{o.batch_size}, weights ablation {w.ablation:g} / addition {w.addition:g} / retain {w.retain:g}, "
            f"init {o.init}, {o.independence}; {limits}"]


_RUN = "refusal_ray.stages.optimise.run"
STAGE = Stage(name="optimise", tables=("optimised",), needs=("directions", "select"), cells=_cells, id_key=_id_key,
              inputs=lazy(_RUN, "inputs"), skip=lazy(_RUN, "skip_reason"), run=lazy(_RUN, "run_task"),
              check=_check, check_model=_check_model, describe=_describe, block=OptimiseStage, validate=validate,
              read="refusal_ray.stages.optimise.read")


def __getattr__(name: str):
    """PEP 562: the run side's names (`optimise`, `principal_angles`, ...), importing `run.py` (torch)."""
    if name.startswith("__"):
        raise AttributeError(name)
    run = import_module(f"{__name__}.run")
    return run if name == "run" else getattr(run, name)
