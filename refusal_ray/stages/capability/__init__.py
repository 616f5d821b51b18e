"""Stage `capability`: the declaration (torch-free at import). What each intervention arm costs (CE loss on
held-out text, first-token KL, task exact match and refusal, lm-eval tasks; Arditi et al. 2024, Sec. 4.2),
beside what it does to refusal; the measuring is `refusal_ray.stages.capability.run`, the cost table,
summary columns and report section `refusal_ray.stages.capability.read`.

- `CapabilityStage` (with `TextSet`, `LmEvalTasks`): the `stages.capability` block; `arms` accepts
  `arm_kinds()` (baseline, every registered operator, their weight arms).
- `validate(spec)`: its cross-field checks (an operator arm that needs its steer block, a 'selected'
  direction without stage select, resid_pre directions, position -1 without stage steer).
- `manifest`: the manifest's `capability_key` (`measure_key`; None without the stage).
Old names (`measure`, `capability_params`, `GatedEdits`, `broadcast_edits`, `measure_key`, ...) resolve to
`.run` on first use (PEP 562 `__getattr__`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from refusal_ray import ops
from refusal_ray.ops.base import CONTROLS_HELP, Controls, Strict
from refusal_ray.stages.base import Stage, lazy


def arm_kinds() -> list[str]:
    """Every capability arm kind `stages.capability.arms` accepts, in the order arms are built: baseline,
    every operator, their weight arms."""
    return ["baseline", *ops.OPS.modes()]


capability_arm_kinds = arm_kinds   # the spec's name


def _arm_kinds(v: list[str] | None) -> list[str] | None:
    known = arm_kinds()
    for a in v or []:
        if a not in known:
            listed = ", ".join(repr(k) for k in known[:-1]) + f" or {known[-1]!r}"
            raise ValueError(f"Input should be {listed}")
    return v


CapabilityArmKind = str


class TextSet(Strict):
    """Held-out text for the cross-entropy loss (Arditi et al. 2024, Sec. 4.2 and App. G: CE on held-out
    text, and on chat completions after their instruction)."""

    path: str = Field("data/prompts/toy/heldout.jsonl", description="A .txt file (one document per line) or a "
                                                                    "JSONL/CSV/Parquet file (default: the toy "
                                                                    "family's held-out harmless test "
                                                                    "conversations).")
    text_column: str = Field("completion", description="Column holding the scored text (tabular files only).")
    prompt_column: str | None = Field("prompt", description="Column holding an instruction the text answers: the "
                                                            "instruction is rendered with the chat template and "
                                                            "only the text's tokens after it are scored. None "
                                                            "(and .txt files): plain text, every token after "
                                                            "the first scored.")
    n: int = Field(64, ge=1, description="Documents scored (the first n).")
    max_tokens: int = Field(128, ge=2, description="Tokens per document, prompt included (longer ones are cut).")


class LmEvalTasks(Strict):
    """lm-evaluation-harness tasks run on the loaded model with each arm's intervention active."""

    tasks: list[str] = Field(min_length=1, description="Task names: a YAML task in include_path, or a registry "
                                                       "task of lm-eval (registry tasks download their data "
                                                       "from the hub at run time).")
    include_path: str | None = Field(None, description="Folder of local YAML tasks (their relative data_files "
                                                       "are read against the YAML's folder).")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples (None: the task's default).")
    limit: int | None = Field(None, ge=1, description="Documents per task (None: all).")
    batch_size: int = Field(16, ge=1, description="lm-eval batch size.")


class CapabilityStage(Strict):
    """What each intervention costs: CE loss on held-out text, first-token KL on harmless prompts, task
    exact match and refusal on the test prompts, and lm-evaluation-harness tasks, per arm."""

    arms: Annotated[list[CapabilityArmKind], AfterValidator(_arm_kinds)] | None = Field(
        None, min_length=1, description="Arms measured (baseline, an operator's name or its weight arm). None: "
                                        "baseline, every operator its default includes (addition, ablation, and "
                                        "an operator whose stages.steer block is set) and their weight arms "
                                        "(orthogonalized, orthogonalized_subspace: only where the weights can be "
                                        "orthogonalised).")
    direction_layer: Literal["selected", "best"] | int | None = Field(
        None, description="Direction of the ablation and orthogonalized arms. None: stages.steer.ablation's, "
                          "else 'selected' with a stages.select block, else 'best'.")
    addition_layer: Literal["best", "selected"] | int = Field(
        "best", description="Layer (and direction) of the addition arms: 'best' separation (the decision "
                            "rule's), 'selected' (stage select's), or a layer.")
    coefficients: list[float] = Field([1.0], min_length=1, description="Addition coefficients.")
    alphas: list[float] = Field([1.0], min_length=1, description="Ablation strengths (orthogonalized weights: "
                                                                "always 1).")
    controls: "Controls" = Field(True, description=CONTROLS_HELP)
    text: TextSet = Field(default_factory=TextSet)
    generate: bool = Field(True, description="Generate on the test prompts: task exact match and refusal rates "
                                             "(inline judge) per arm.")
    lm_eval: LmEvalTasks | None = Field(None, description="lm-evaluation-harness tasks (None: none).")
    batch_size: int = Field(32, ge=1, description="Rows per forward pass / generate call.")


def validate(spec) -> None:
    """Cross-field checks of a `stages.capability` block: an arm whose operator needs its
    `stages.steer.<name>` block (its directions) has it; a 'selected' direction has a stages.select block;
    the directions include resid_pre; without stage steer, the directions at position -1 exist.
    Raises ValueError."""
    cap = spec.stages.capability
    if cap is None:
        return
    steer = spec.stages.steer
    for arm in cap.arms or []:
        op = ops.base.owner(arm)
        if op is not None and op.capability_needs_block and (steer is None or getattr(steer, op.name) is None):
            raise ValueError(f"stages.capability.arms '{arm}' needs a stages.steer.{op.name} block (its "
                             f"directions)")
    if "selected" in (cap.direction_layer, cap.addition_layer) and spec.stages.select is None:
        raise ValueError("stages.capability: a 'selected' direction needs a stages.select block")
    if "resid_pre" not in spec.stages.directions.sites:
        raise ValueError("stages.capability needs 'resid_pre' in stages.directions.sites (its arms use those "
                         "directions)")
    positions = spec.stages.directions.positions
    if steer is None and positions != "post_instruction" and -1 not in positions:
        raise ValueError("stages.capability without a stages.steer block uses the directions at position -1: "
                         "add -1 to stages.directions.positions (or add a stages.steer block with its position)")


def manifest(plan) -> dict:
    """{"capability_key": `measure_key(plan)`}, None without the stage (the manifest's key either way)."""
    if plan.spec.stages.capability is None:
        return {"capability_key": None}
    from refusal_ray.stages.capability.run import measure_key

    return {"capability_key": measure_key(plan)}


_RUN = "refusal_ray.stages.capability.run"
STAGE = Stage(name="capability", tables=("capability",), needs=("directions", "select"),
              cells=lazy(_RUN, "capability_params"), id_key=lazy(_RUN, "id_key"), inputs=lazy(_RUN, "inputs"),
              skip=lazy("refusal_ray.stages.steer.run", "skip_reason"), run=lazy(_RUN, "run"),
              prepare=lazy(_RUN, "prepare"), check=lazy(_RUN, "check"), describe=lazy(_RUN, "describe"),
              manifest=manifest, block=CapabilityStage, validate=validate,
              read="refusal_ray.stages.capability.read")


def __getattr__(name: str):
    """Names of `.run` (measure, capability_params, GatedEdits, broadcast_edits, measure_key, ...), imported
    on first use."""
    if name.startswith("__"):
        raise AttributeError(name)
    import importlib

    try:
        return getattr(importlib.import_module(_RUN), name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
