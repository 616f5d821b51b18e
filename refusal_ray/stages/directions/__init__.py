"""Stage `directions`: the declaration (torch-free at import). Difference-of-means refusal directions at
every layer x position (Arditi et al. 2024, Sec. 2.1); the fitting is `refusal_ray.stages.directions.run`,
the summary columns and report section `refusal_ray.stages.directions.read`.

- `DirectionsStage`: the `stages.directions` block (always present: its default is the default block).
- `validate(spec)`: its cross-field checks (`pairing: paired` needs both files' pair columns).
- `directions_key(spec)`: what determines a direction (part of every downstream stage's cell ids).
- `positions`, `resolve_model`: the direction positions plan resolves per model, and the train-filtering
  refusal tokens (when stage select, which names its own, is off).
Old names (`fit_directions`, `best_layer`, ...) resolve to `.run` on first use (PEP 562 `__getattr__`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from refusal_ray.ops.base import NegativePositions, Strict, negative
from refusal_ray.stages.base import Stage, lazy

SiteKind = Literal["resid_pre", "resid_post"]


class DirectionsStage(Strict):
    """Difference of means (Arditi et al. 2024, Sec. 2.1) at every layer x position."""

    sites: list[SiteKind] = Field(["resid_pre"], min_length=1, description="Residual sites to fit at.")
    positions: Literal["post_instruction"] | Annotated[NegativePositions, Field(min_length=1)] = Field(
        "post_instruction", description="'post_instruction': every token the chat template puts after the "
                                        "instruction (found by rendering the template); or negative offsets "
                                        "from the end (-1: last token of the chat template).")
    filter_train: bool = Field(False, description="Arditi's train filtering: drop harmful train prompts the model "
                                                  "does not refuse and harmless ones it does (refusal score > 0 "
                                                  "counts as refusing); the counts are stored.")
    pairing: Literal["paired", "random"] | None = Field(
        None, description="Which harmless prompts a seed fits on. None: each class drawn from its train split with "
                          "the seed (on row-aligned files such as the toy data this draws the harmful prompts' "
                          "twins); 'paired': the minimal-pair twins of the harmful train prompts (data.*.pair_column); "
                          "'random': a draw independent of the harmful one (seeded), as in the Qwen-1.8B study's "
                          "paired vs random comparison.")
    compare_sequential: bool = Field(False, description="Also refit every direction one prompt at a time (no "
                                                        "padding) and store its cosine to the batched fit "
                                                        "(`sequential_cosine`).")
    batch_size: int = Field(64, ge=1, description="Prompts per forward pass.")

    @field_validator("positions", mode="before")
    @classmethod
    def _positions(cls, v):
        if isinstance(v, list) and v and all(isinstance(p, int) for p in v):
            return negative(v)
        if v != "post_instruction":
            raise ValueError("positions: 'post_instruction' or a list of negative offsets (e.g. [-1])")
        return v


def validate(spec) -> None:
    """`pairing: paired` needs `data.harmful.pair_column` and `data.harmless.pair_column`. Raises ValueError."""
    if spec.stages.directions.pairing == "paired":
        for cls in ("harmful", "harmless"):
            if getattr(spec.data, cls).pair_column is None:
                raise ValueError(f"stages.directions.pairing 'paired' needs data.{cls}.pair_column")


# settings added later, left out of ids at these values, so stores written before them resume
LATER_DEFAULTS = {"pairing": None, "compare_sequential": False}


def refusal_tokens_setting(select: dict | None) -> object:
    """The refusal-token setting train filtering uses: stage select's, else the family default."""
    return (select or {}).get("refusal_tokens", "family")


def directions_key(spec) -> dict:
    """What determines a direction (and everything fitted from it): sample sizes and the stage's settings
    (with train filtering, also the refusal tokens it reads: `refusal_tokens`)."""
    block = spec.stages.directions.model_dump(mode="json", exclude={"batch_size"})
    block = {k: v for k, v in block.items() if LATER_DEFAULTS.get(k, object()) != v}
    if block.get("filter_train"):
        select = spec.stages.select
        tokens = refusal_tokens_setting(None if select is None else select.model_dump(mode="json"))
        if tokens != "judge_phrases":   # judge_phrases: the tokens before the setting existed, the ids of before
            block["refusal_tokens"] = tokens
    return {"n": [spec.data.n_train, spec.data.n_val, spec.data.n_test], "directions": block}


def positions(spec):
    """The positions directions are fitted at: 'post_instruction' or the listed negative offsets."""
    return spec.stages.directions.positions


def resolve_model(plan, mp, tok) -> dict:
    """Train filtering reads the family's refusal tokens when stage select (which names its own) is off:
    {"refusal_tokens": ...} then (`stages.base.refusal_tokens`), else {}. Raises SpecError naming
    `stages.select.refusal_tokens` when the family's tokens do not resolve."""
    if not plan.spec.stages.directions.filter_train or plan.spec.stages.select is not None:
        return {}
    from refusal_ray.stages.base import refusal_tokens

    return refusal_tokens(plan, mp, tok, "family", None)


_RUN = "refusal_ray.stages.directions.run"
STAGE = Stage(name="directions", tables=("directions",), cells=lambda spec, mp: [{}],
              id_key=directions_key, run=lazy(_RUN, "run"), prepare=lazy(_RUN, "prepare"),
              positions=positions, resolve_model=resolve_model,
              block=DirectionsStage, block_default=True, validate=validate,
              read="refusal_ray.stages.directions.read")


def __getattr__(name: str):
    """Names of `.run` (fit_directions, best_layer, filter_train, ...), imported on first use."""
    if name.startswith("__"):
        raise AttributeError(name)
    import importlib

    try:
        return getattr(importlib.import_module("refusal_ray.stages.directions.run"), name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
