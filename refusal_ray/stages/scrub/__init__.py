"""Stage `scrub`, the declaration: causal scrubbing of circuit hypotheses as the audits define it
(resample ablation of the hypothesis' complement; `run.py` has the method and its definitions,
`read.py` the verdicts pooled over seeds, their summary columns and the report section).

Torch-free at import: the spec block (`ScrubStage` with its `Hypothesis` items, `stages.scrub`),
`validate` (scrub has no cross-field check beyond its block's own validators), the plan-time hooks
(pattern checks, `scrub_warnings`), and `STAGE`, whose run-side callable imports `run.py` on first call
(`refusal_ray.stages.base.lazy`). Old names (`run_scrub`, `scrub_kl`, `hooks`, ...) still import from
here: module `__getattr__` forwards them to `run.py`.
"""

from __future__ import annotations

from importlib import import_module

from pydantic import Field, field_validator

from refusal_ray.models.patterns import expand
from refusal_ray.ops.base import Strict, no_duplicates
from refusal_ray.stages.base import Stage, draw_test_pairs, lazy


def _check_patterns(patterns: list[str]) -> list[str]:
    from refusal_ray.models.patterns import check_syntax

    for p in patterns:
        check_syntax(p)  # PatternError is a ValueError: pydantic reports it with the field
    return patterns


class Hypothesis(Strict):
    """A circuit hypothesis: the sites it says carry the behaviour (kept at their harmful-run values)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    protected: list[str] = Field(description="Site patterns, e.g. 'blocks.{9,10}.attn.hook_z', "
                                             "'blocks.3.attn.hook_z[0,2]' (heads), 'blocks.*.hook_mlp_out'; "
                                             "an empty list protects nothing.")

    @field_validator("protected")
    @classmethod
    def _syntax(cls, v):
        return _check_patterns(v)


class ScrubStage(Strict):
    """Causal scrubbing as the audits define it: resample ablation of the hypothesis' complement."""

    hypotheses: list[Hypothesis] = Field(min_length=1)
    scrubbed: list[str] = Field(["blocks.*.attn.hook_z", "blocks.*.hook_resid_post"], min_length=1,
                                description="Site patterns resampled unless protected (default: the audit's).")
    n_pairs: int = Field(8, ge=1, description="Harmful examples (from the test split), per seed.")
    answer_tokens: int = Field(8, ge=1, description="Greedy answer prefix scored after the prompt.")
    resamples: int = Field(1, ge=1, description="Resampled harmless inputs per example (seeded).")
    threshold: float = Field(0.5, gt=0, le=1, description="Faithfulness exp(-mean KL) at or above this: FAITHFUL.")
    batch_size: int = Field(48, ge=1, description="Rows per forward pass.")

    @field_validator("scrubbed")
    @classmethod
    def _syntax(cls, v):
        return _check_patterns(v)

    @field_validator("hypotheses")
    @classmethod
    def _unique(cls, v):
        no_duplicates([h.name for h in v], "hypothesis name")
        return v


def validate(spec) -> None:
    """Scrub's cross-field checks: none (its block's validators check the patterns' syntax and the
    hypotheses' names; whether the patterns fit each model is checked at plan time, `_check`)."""
    return None


# -- the declaration ---------------------------------------------------------------------------
def _prepare(plan) -> None:
    draw_test_pairs(plan, "scrub")      # harmful examples and harmless sources


def _check(plan) -> None:
    """Every scrub pattern must fit every model (layers and heads)."""
    from refusal_ray.errors import SpecError
    from refusal_ray.models.patterns import PatternError

    scrub = plan.spec.stages.scrub
    fields = [("stages.scrub.scrubbed", scrub.scrubbed)] + [
        (f"stages.scrub.hypotheses.{i}.protected", h.protected) for i, h in enumerate(scrub.hypotheses)]
    for mp in plan.models.values():
        for where, patterns in fields:
            try:
                expand(patterns, mp.n_layers, mp.n_heads)
            except PatternError as e:
                raise SpecError(plan.spec_file, where, f"{e} (model {mp.name!r})") from None


def scrub_warnings(plan) -> list[str]:
    """Hypotheses whose protected sites are overwritten by a scrubbed residual stream after them.

    Scrubbing `blocks.L.hook_resid_post` replaces the whole stream, so what a protected site at a
    layer <= L wrote is lost: the hypothesis then scores the resampled run's KL whatever it protects.
    """
    scrub, out = plan.spec.stages.scrub, []
    for mp in plan.models.values():
        scrubbed = expand(scrub.scrubbed, mp.n_layers, mp.n_heads)
        for h in scrub.hypotheses:
            prot = expand(h.protected, mp.n_layers, mp.n_heads)
            cut = [int(s.split(".")[1]) for s in scrubbed if s.endswith("hook_resid_post") and s not in prot]
            lost = sorted(s for s in prot if cut and int(s.split(".")[1]) <= max(cut))
            if lost:
                out.append(f"warning: hypothesis {h.name!r} on {mp.name}: blocks.{max(cut)}.hook_resid_post is "
                           f"scrubbed, which overwrites protected {lost[0]}" + (f" and {len(lost) - 1} more" if
                                                                               len(lost) > 1 else ""))
    return out


def _describe(plan) -> list[str]:
    s = plan.spec.stages.scrub
    return [f"scrub: {len(s.hypotheses)} hypotheses against {s.scrubbed}, {s.n_pairs} examples x "
            f"{s.resamples} resamples, threshold {s.threshold}", *scrub_warnings(plan)]


def _group(cells, spec):   # the hypotheses of a seed share forward passes
    return [cells] if cells else []


def _id_key(spec) -> dict:
    from refusal_ray.data.sources import pair_columns   # canonical names: a source and its merged file alike

    return {"scrub": spec.stages.scrub.model_dump(mode="json", exclude={"batch_size", "hypotheses"}),
            "pairs": pair_columns(spec.data)}


def _cells(spec, mp) -> list[dict]:
    return [{"hypothesis": h.name, "protected": list(h.protected)} for h in spec.stages.scrub.hypotheses]


STAGE = Stage(name="scrub", tables=("scrubbing",), cells=_cells, id_key=_id_key, group=_group,
              run=lazy("refusal_ray.stages.scrub.run", "run_task"), prepare=_prepare, check=_check,
              describe=_describe, block=ScrubStage, validate=validate, read="refusal_ray.stages.scrub.read")


def __getattr__(name: str):
    """PEP 562: the run side's names (`run_scrub`, `scrub_kl`, ...), importing `run.py` (torch)."""
    if name.startswith("__"):
        raise AttributeError(name)
    run = import_module(f"{__name__}.run")
    return run if name == "run" else getattr(run, name)
