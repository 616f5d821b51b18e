"""Stage `search`: multi-objective search of interventions (issue 21), the declaration (torch-free at import).

A study per (model, seed) searches heretic's space (`refusal_ray.stages.search.space`: the layer-weight kernel per
component and the fractional direction index over the seed's difference-of-means directions) with Optuna
(multivariate TPE by default, NSGA-II or random available), minimising two objectives on the val prompts: the
refusal rate on harmful prompts and the first-token KL on harmless ones (`.run`). The study runs through
`refusal_ray.stages.search.study` (`refusal-ray search SPEC`): Optuna's ask/tell in the driver, trials evaluated on
the model's actors, which keep their weights loaded, several trials per batched forward and several calls in flight;
the study lives in a journal file in the store (`search/<model>.journal`), so a killed driver resumes and a rerun
adds trials up to `n_trials`. Its Pareto-optimal trials (or the `held_out` rule's pick) are re-run on the test
split beside a norm-matched random control, plain ablation of the same direction and the baseline, with Wilson
intervals (tables `trials`, `pareto`; the read side `.read`).

An ordinary `refusal-ray run` plans no search cell: the stage's work is the study, not a grid of cells.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_serializer, model_validator

from refusal_ray.ops.base import Strict
from refusal_ray.stages.base import Stage, lazy

Range = tuple[float, float]


class SearchSpace(Strict):
    """Heretic's search space (p-e-w/heretic main.py): ranges of the float params; direction_index,
    max_weight_position and the high end of min_weight_distance are fractions of the last layer index."""

    components: list[Literal["attn_out", "mlp_out", "resid_pre"]] = Field(
        ["attn_out", "mlp_out"], min_length=1,
        description="Components whose outputs are ablated, each with its own kernel: heretic's attn_out (o_proj) and "
                    "mlp_out (down_proj); resid_pre (the block's input, so also what the embeddings wrote) is ours.")
    direction_scope: list[Literal["global", "per_layer"]] = Field(
        ["global"], min_length=1, description="'global': one interpolated direction everywhere; 'per_layer': each "
                                              "layer's own; both: a categorical param, as heretic searches it.")
    direction_index: Range = Field((0.4, 0.9), description="Fractional direction index, as fractions of the last "
                                                           "layer index.")
    max_weight: Range = Field((0.8, 1.5), description="Kernel peak weight.")
    max_weight_position: Range = Field((0.6, 1.0), description="Kernel peak layer, fractions of the last layer index.")
    min_weight: Range = Field((0.0, 1.0), description="Kernel edge weight, as a fraction of max_weight.")
    min_weight_distance: Range = Field((1.0, 0.6), description="Kernel half-width: low end in layers, high end a "
                                                               "fraction of the last layer index (at least the low).")

    @model_validator(mode="after")
    def _ordered(self):
        for name in ("direction_index", "max_weight", "max_weight_position", "min_weight"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"stages.search.space.{name}: low {lo} is above high {hi}")
        for name in ("direction_index", "max_weight_position"):
            lo, hi = getattr(self, name)
            if lo < 0 or hi > 1:
                raise ValueError(f"stages.search.space.{name}: fractions of the last layer index must lie in [0, 1], "
                                 f"got [{lo}, {hi}]")
        if self.min_weight_distance[0] <= 0:
            raise ValueError("stages.search.space.min_weight_distance: the low end must be > 0 layers")
        return self


class SearchBlock(Strict):
    """Stage search: the study's size, sampler, objectives, pruning and held-out pick."""

    n_trials: int = Field(64, ge=1, description="Trials per (model, seed) study (a rerun adds trials up to this).")
    n_startup_trials: int = Field(16, ge=0, description="Random start-up trials of the TPE sampler.")
    sampler: Literal["tpe", "nsga2", "random"] = Field("tpe", description="Optuna sampler (TPE multivariate, "
                                                                          "NSGA-II, or random).")
    sampler_seed: int = Field(0, description="Sampler seed (plus the spec seed).")
    space: SearchSpace = Field(default_factory=SearchSpace)
    objective: Literal["substring", "refusal_score"] = Field(
        "substring", description="Refusal objective on harmful val prompts: the substring judge on greedy "
                                 "completions, or the first-token refusal score (refusal-token mass > 1/2), a cheap "
                                 "proxy.")
    kl_bound: float | None = Field(None, gt=0, description="Prune a trial whose val KL exceeds this (nats): its "
                                                           "refusals are not counted.")
    n_val: int | None = Field(None, ge=2, description="Val prompts per class (None: data.n_val).")
    max_new_tokens: int | None = Field(None, ge=1, description="Completion length for the refusal objective and "
                                                               "the held-out arms (None: generation.max_new_tokens).")
    trials_per_call: int = Field(2, ge=1, description="Trials sharing one batched forward on an actor.")
    concurrency: int | None = Field(None, ge=1, description="Calls in flight (None: one per actor; the actors "
                                                            "follow the cluster's resources).")
    batch_size: int = Field(64, ge=1, description="Rows (trial x prompt) per forward / generate call.")
    held_out: Literal["pareto", "lowest_refusal"] = Field(
        "pareto", description="Trials re-run on the test split: the Pareto front (lowest val refusal first), or "
                              "the one lowest val refusal with KL <= kl_bound (ties: lowest KL).")
    held_out_max: int = Field(8, ge=1, description="At most this many Pareto trials re-run on the test split.")
    kl_prompts: Literal["all", "answered"] = Field(
        "all", description="Harmless val prompts of the KL objective: 'all' (heretic's, Arditi's), or 'answered': "
                           "those the unedited model does not refuse (substring judge on its greedy completion), so "
                           "a trial is not charged for undoing false refusals (a few refused harmless prompts, each "
                           "~10 nats when the edit flips it to an answer, otherwise swamp the mean).")
    enqueue: list[Literal["plain_ablation"]] = Field(
        [], description="Known-good points evaluated first in a fresh study (Optuna `study.enqueue_trial`; a "
                        "resumed study enqueues nothing): 'plain_ablation' is Arditi et al.'s directional ablation "
                        "(weight 1 at every layer's resid_pre, attn_out and mlp_out, global scope) of each "
                        "candidate direction, one trial per integer layer in direction_index's range. Needs all "
                        "three components and a space that holds weight 1 on every layer. Off by default (heretic "
                        "enqueues nothing; its space, without resid_pre, cannot express the point).")

    @model_serializer(mode="wrap")
    def _absent_when_unset(self, handler):
        """Fields newer than the stored search specs (`LATER_FIELDS`): absent from the dump (and the spec hash) at
        their default."""
        out = handler(self)
        for key, default in LATER_FIELDS.items():
            if out.get(key, default) == default:
                out.pop(key, None)
        return out


# search fields added after search specs were stored: {field: default}; absent from the dump at the default
LATER_FIELDS = {"enqueue": [], "kl_prompts": "all"}


def validate(spec) -> None:
    """Cross-field checks: start-up trials no more than n_trials; the held-out rule 'lowest_refusal' needs kl_bound;
    n_val no more than data.n_val. Raises ValueError."""
    s = spec.stages.search
    if s is None:
        return
    if s.n_startup_trials > s.n_trials:
        raise ValueError(f"stages.search.n_startup_trials {s.n_startup_trials} exceeds n_trials {s.n_trials}")
    if s.held_out == "lowest_refusal" and s.kl_bound is None:
        raise ValueError("stages.search.held_out 'lowest_refusal' needs stages.search.kl_bound")
    if s.n_val is not None and s.n_val > spec.data.n_val:
        raise ValueError(f"stages.search.n_val {s.n_val} exceeds data.n_val {spec.data.n_val}")
    if s.enqueue:
        from refusal_ray.stages.search.space import plain_ablation_problem

        problem = plain_ablation_problem(s.space.model_dump(mode="json"))
        if problem:
            raise ValueError(f"stages.search.enqueue 'plain_ablation': {problem}")
    if "resid_pre" not in spec.stages.directions.sites:
        raise ValueError("stages.search needs 'resid_pre' in stages.directions.sites (its directions)")


def id_key(spec) -> dict:
    from refusal_ray.stages.directions import directions_key

    return directions_key(spec) | {"search": spec.stages.search.model_dump(mode="json")}


def describe(plan) -> list[str]:
    s = plan.spec.stages.search
    return [f"search: {s.n_trials} trials per (model, seed) ({s.sampler}, {s.n_startup_trials} start-up), "
            f"objectives refusal ({s.objective}) and first-token KL on val, "
            f"pruning {'off' if s.kl_bound is None else f'KL > {s.kl_bound:g}'}, held-out: {s.held_out}; "
            f"run it with `refusal-ray search`"]


def resolve_model(plan, mp, tok) -> dict:
    """The refusal first tokens of the model (only for the refusal_score objective)."""
    s = plan.spec.stages.search
    if s is None or s.objective != "refusal_score" or mp.refusal_tokens:
        return {}
    from refusal_ray.stages.base import refusal_tokens

    return refusal_tokens(plan, mp, tok, "family", 1e-8)


STAGE = Stage(name="search", tables=("trials", "pareto"), needs=("directions",), cells=lambda spec, mp: [],
              id_key=id_key, run=lazy("refusal_ray.stages.search.run", "run"), describe=describe,
              resolve_model=resolve_model, block=SearchBlock, validate=validate,
              read="refusal_ray.stages.search.read")
