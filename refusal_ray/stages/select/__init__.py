"""Stage `select`, the declaration: choose the refusal direction causally, as Arditi et al. 2024 do
(Sec. 2.3, App. C; `run.py` has the scores, the filters and the criteria with their definitions,
`read.py` the choice per seed for the summary, the fallback warnings and the report section).

Torch-free at import: the spec block (`SelectStage`, `stages.select`), its cross-field check
(`validate`), the layer filter's cut-off (`layer_cutoff`, shared by `run.choose` and the plan
lines), the plan-time hooks (layer check, plan lines, the refusal tokens resolved per model) and
`STAGE`, whose run-side callables import `run.py` on first call (`refusal_ray.stages.base.lazy`).
Old names (`run_select`, `score_candidates`, `choose`, `Candidate`, ...) still import from here:
module `__getattr__` forwards them to `run.py`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Annotated, Literal

from pydantic import Field

from refusal_ray.ops.base import LayerList, Strict
from refusal_ray.stages.base import Stage, check_layers, lazy
from refusal_ray.stages.base import refusal_tokens as _refusal_tokens


class SelectStage(Strict):
    """Causal direction selection (Arditi et al. 2024, Sec. 2.3 and App. C), every candidate as batch rows.

    Candidates: every layer x position of stages.directions at resid_pre. Scores on the val split:
    bypass (mean refusal score of harmful prompts with the unit direction ablated at every layer),
    induce (mean refusal score of harmless prompts with the direction added at its own layer),
    KL (mean first-token KL(baseline || ablated) on harmless prompts).
    """

    layers: LayerList = Field("all", description="Candidate layers ('all', Arditi's choice, or a list: fewer "
                                                    "candidates on big models).")
    criterion: Literal["bypass", "swing", "separation"] = Field(
        "bypass", description="'bypass': lowest bypass score (Arditi); 'swing': largest validation refusal-rate "
                              "swing (the pre-registered replication's; rates by refusal score > 0); "
                              "'separation': highest Cohen's d (the old 'best').")
    max_layer_fraction: float | None = Field(0.8, gt=0, le=1, description=(
        "Drop candidates at layers >= int(max_layer_fraction * n_layers), as Arditi et al.'s code prunes "
        "layer >= int(n_layers * (1 - 0.2)) (e.g. 16 layers: 0..11 kept; None: keep all)."))
    kl_max: float | None = Field(0.1, ge=0, description="Drop candidates whose ablation KL is above this (None: keep).")
    induce_min: float | None = Field(0.0, description="Drop candidates whose induce score is below this (None: keep).")
    fallback: Literal["bypass", "swing", "separation"] | None = Field(
        None, description="When no candidate passes the filters: None selects nothing (ablation arms that need "
                          "the selected direction are skipped and the verdict says NO-SELECTION); a criterion "
                          "picks among the scored candidates by it (never a NaN or zero-norm one), marked as a "
                          "fallback in the table and summary.")
    filter_val: bool = Field(False, description=(
        "Arditi et al.'s validation filtering (their default): score candidates only on the harmful val "
        "prompts the model refuses and the harmless ones it does not (refusal score > 0 / < 0, unedited); "
        "the kept counts are stored. Default true on specs with `reproduces: arditi2024`."))
    refusal_tokens: Literal["family", "judge_phrases"] | Annotated[list[str | int], Field(min_length=1)] = Field(
        "family", description=(
            "The refusal first tokens the refusal score reads. 'family': Arditi et al.'s per-family tokens "
            "(Llama 'I', Qwen 'I'/'As', Gemma 'I'; 'I' for families the paper has no file for; "
            "refusal_ray/models/refusal_tokens.py); 'judge_phrases': the first token of each substring-judge "
            "phrase (this tool's definition before v0.2); or a list of one-token strings and/or token ids."))
    refusal_score_epsilon: float = Field(1e-8, ge=0, description=(
        "epsilon of the refusal score log(p + eps) - log(1 - p + eps) (Arditi et al.'s code: 1e-8, which "
        "caps a prompt's score near +-18.4); 0: the unbounded log p - log(1 - p)."))
    kl_epsilon: float = Field(0.0, ge=0, description=(
        "0: the exact first-token KL. 1e-6: Arditi et al.'s kl_div_fn smoothing, sum P_base (log(P_base + eps) - "
        "log(P_abl + eps)), which reads 1-3% lower (the paper-compat switch; default with reproduces: arditi2024)."))
    batch_size: int = Field(256, ge=1, description="Rows (candidate x prompt) per forward pass.")


def validate(spec) -> None:
    """Cross-field check of a spec with a `stages.select` block: its candidates are resid_pre directions,
    so stages.directions must fit there. Raises ValueError."""
    if spec.stages.select is not None and "resid_pre" not in spec.stages.directions.sites:
        raise ValueError("stages.select needs 'resid_pre' in stages.directions.sites (candidates are "
                         "resid_pre directions)")


def layer_cutoff(n_layers: int, max_layer_fraction: float | None) -> int | None:
    """First pruned layer: candidates at layer >= int(n_layers * max_layer_fraction) are dropped, as
    Arditi et al.'s `filter_fn` prunes layer >= int(n_layers * (1 - prune_layer_percentage)) with
    prune_layer_percentage 0.2 (16 layers: 12, 24: 19, 28: 22, 32: 25). None: no layer filter."""
    return None if max_layer_fraction is None else int(n_layers * max_layer_fraction)


# -- the declaration ---------------------------------------------------------------------------
def _id_key(spec) -> dict:
    from refusal_ray.stages.directions import directions_key

    return directions_key(spec) | {"select": spec.stages.select.model_dump(mode="json", exclude={"batch_size"}),
                                   "judge": spec.judge.model_dump(mode="json")}


def _describe(plan) -> list[str]:
    s = plan.spec.stages.select
    lines = [f"select: layers {s.layers}, criterion {s.criterion}, filters layer < int({s.max_layer_fraction} L), "
             f"KL <= {s.kl_max}, induce >= {s.induce_min}, filter_val {s.filter_val}; fallback {s.fallback}; "
             f"refusal score log(p + {s.refusal_score_epsilon:g}) - log(1 - p + {s.refusal_score_epsilon:g}); "
             "candidates per seed: "
             + ", ".join(f"{n} {mp.n_layers if s.layers == 'all' else len(s.layers)}x{len(mp.positions)}"
                         for n, mp in plan.models.items())]
    for n, mp in plan.models.items():
        cutoff = layer_cutoff(mp.n_layers, s.max_layer_fraction)
        lines.append(f"  {n}: refusal tokens ({mp.refusal_tokens.get('setting')}) {mp.refusal_tokens.get('tokens')}; "
                     f"layers {'all' if cutoff is None else f'0..{cutoff - 1}'} of {mp.n_layers} kept by the layer filter")
    return lines


def _check(plan) -> None:
    check_layers(plan, "stages.select.layers", plan.spec.stages.select.layers)


def _resolve_model(plan, mp, tok) -> dict:
    """Its refusal score's tokens (`stages.select.refusal_tokens`) and epsilon, on the model's ModelPlan."""
    s = plan.spec.stages.select
    return _refusal_tokens(plan, mp, tok, s.refusal_tokens, s.refusal_score_epsilon)


_RUN = "refusal_ray.stages.select.run"
STAGE = Stage(name="select", tables=("selection",), needs=("directions",), cells=lambda spec, mp: [{}],
              id_key=_id_key, inputs=lazy(_RUN, "inputs"), run=lazy(_RUN, "run_task"), check=_check,
              describe=_describe, resolve_model=_resolve_model, shards=lazy(_RUN, "shards"),
              merge=lazy(_RUN, "merge"), block=SelectStage, validate=validate,
              read="refusal_ray.stages.select.read")


def __getattr__(name: str):
    """PEP 562: the run side's names (`run_select`, `score_candidates`, `Candidate`, ...), importing
    `run.py` (torch)."""
    if name.startswith("__"):
        raise AttributeError(name)
    run = import_module(f"{__name__}.run")
    return run if name == "run" else getattr(run, name)
