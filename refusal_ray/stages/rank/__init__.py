"""Stage `rank`: the declaration (torch-free at import). How many directions refusal needs (issue 20): subspace
ablation (x <- x - alpha Q Q^T x at resid_pre, attn_out and mlp_out of the ablation layers; Arditi et al. 2024,
Sec. 2.4, as `refusal_ray.ops.subspace`) of k = 1..K directions from a named source, each beside a random
subspace of the same rank (the control), generated greedily on the test split and judged by the run's
judge. The run side (bases, batched generation) is `refusal_ray.stages.rank.run`; the refusal rank, the
detail table, the figures and the report section `refusal_ray.stages.rank.read`.

Sources of the [k, d_model] orthonormal bases (`orthonormal_basis`), at resid_pre of `layer`, `position`:
- `select`: stage select's top-k candidates that passed its filters, by its criterion (as subspace.top_k);
- `pca`: the top-k right singular vectors of the per-prompt differences D_i = x_i - mean(harmless train),
  x_i the harmful train prompts' activations (uncentred SVD: with one direction PC1 is the difference of means
  up to sign). This is our reading of the issue's "per-prompt harmful - harmless differences";
- `category`: one difference of means per category of the harmful train prompts (category c's mean minus the
  shared harmless mean; Joad et al. 2026), ordered by category size (largest first) then name; the basis for
  k is the span of the first k (Gram-Schmidt in that order). Needs `data.harmful.category_column`;
- `optimised`: stage optimise's directions (table `optimised`, rows with dim == k, orthonormalised).

Cells of one (model, seed): the baseline (no edit), then per source and k = 1..max_k an ablation arm and its
control (`control: true`), then with `transfer` (and the category source) the transfer arms: each category's
own direction ablated alone (k = 1), measured on every category's test prompts, and its control.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from refusal_ray.ops.base import LayerList, Strict, layer_list, no_duplicates
from refusal_ray.stages.base import Stage, check_layers, lazy
from refusal_ray.stages.directions import directions_key

Source = Literal["select", "pca", "category", "optimised"]
SOURCES: tuple[str, ...] = ("select", "pca", "category", "optimised")


class RankStage(Strict):
    """Rank sweep: subspace ablation of k = 1..max_k directions per source, each beside a same-rank random
    control; the refusal rank is the smallest k that meets the suppression margins (read side)."""

    sources: list[Source] = Field(["select", "pca", "category"], min_length=1,
                                  description="Bases to sweep: select (stage select's top-k), pca (top-k right "
                                              "singular vectors of harmful - mean harmless differences), category "
                                              "(per-category differences of means), optimised (stage optimise).")
    max_k: int = Field(4, ge=1, le=64, description="K: ablate k = 1..K directions, each beside a same-rank random "
                                                   "control.")
    layer: int | None = Field(None, ge=0, description="Site layer of the pca / category bases (resid_pre): null = "
                                                      "stage select's chosen layer when select ran and selected, "
                                                      "else directions' best layer (highest separation).")
    position: int = Field(-1, lt=0, description="Token position of the bases (one of directions.positions).")
    ablation_layers: LayerList = Field("all", description="Layers ablated at ('all', as subspace ablation).")
    alpha: float = Field(1.0, description="Ablation strength (1: the projection removed).")
    margin: float | None = Field(None, description="Suppression margin of the refusal rank: null = the decision "
                                                   "rule's control_margin.baseline_margin (the control margin is "
                                                   "its control_margin). Read side only: not in the cell ids.")
    transfer: bool = Field(True, description="Per-category transfer matrix: ablate each category's own direction "
                                             "(k = 1) and measure refusal on every category's test prompts, each "
                                             "beside a random control (needs the category source).")
    batch_size: int = Field(32, ge=1, description="Rows (arm x prompt) per generate call.")

    @field_validator("sources")
    @classmethod
    def _unique(cls, v):
        no_duplicates(list(v), "stages.rank.sources entry")
        return v


def validate(spec) -> None:
    """Cross-field checks: the bases are resid_pre directions; `select` as a source needs a stages.select block;
    `optimised` needs a stages.optimise block; `position` among the direction positions (unless those are
    'post_instruction': `check_model`). Raises ValueError naming `stages.rank.<field>`."""
    block = spec.stages.rank
    if block is None:
        return
    if "resid_pre" not in spec.stages.directions.sites:
        raise ValueError("stages.rank needs 'resid_pre' in stages.directions.sites (its bases are resid_pre)")
    if "select" in block.sources and spec.stages.select is None:
        raise ValueError("stages.rank.sources 'select' needs a stages.select block")
    if "optimised" in block.sources and getattr(spec.stages, "optimise", None) is None:
        raise ValueError("stages.rank.sources 'optimised' needs a stages.optimise block")
    positions = spec.stages.directions.positions
    if positions != "post_instruction" and block.position not in positions:
        raise ValueError(f"stages.rank.position {block.position} is not among stages.directions.positions "
                         f"{positions}")


def rank_params(spec, n_layers: int) -> list[dict]:
    """The cells of one (model, seed): baseline; per source and k an arm and its control; the transfer arms."""
    block = spec.stages.rank
    common = {"layer": block.layer, "position": block.position, "alpha": float(block.alpha),
              "ablation_layers": layer_list(block.ablation_layers, n_layers)}
    cells = [{"source": "baseline", "k": 0, "control": False, "transfer": False, **common}]
    for source in block.sources:
        for k in range(1, block.max_k + 1):
            for control in (False, True):
                cells.append({"source": source, "k": k, "control": control, "transfer": False, **common})
    if block.transfer and "category" in block.sources:
        for control in (False, True):
            cells.append({"source": "category", "k": 1, "control": control, "transfer": True, **common})
    return cells


def id_key(spec) -> dict:
    """Directions' key, the generation and judge blocks, the test size, and the settings of the stages whose
    rows the bases read (select: its block without batch_size; optimise: its block)."""
    block = spec.stages.rank
    out = directions_key(spec) | {"generation": spec.generation.model_dump(mode="json"),
                                  "judge": spec.judge.model_dump(mode="json")}
    if spec.stages.select is not None and ("select" in block.sources or block.layer is None):
        out["select"] = spec.stages.select.model_dump(mode="json", exclude={"batch_size"})
    optimise = getattr(spec.stages, "optimise", None)
    if optimise is not None and "optimised" in block.sources:
        out["optimise"] = optimise.model_dump(mode="json", exclude={"batch_size"})
    return out


def group(cells: list, spec) -> list[list]:
    """One task per (model, seed): the bases are fitted once and every arm's rows share `generate` calls."""
    return [list(cells)]


def check(plan) -> None:
    """The ablation layers and an explicit layer exist in every model; the category source (and transfer) need
    `data.harmful.category_column`. Raises SpecError naming the field."""
    from refusal_ray.errors import SpecError

    block = plan.spec.stages.rank
    check_layers(plan, "stages.rank.ablation_layers", block.ablation_layers)
    if block.layer is not None:
        check_layers(plan, "stages.rank.layer", [block.layer])
    if "category" in block.sources and getattr(plan.spec.data.harmful, "category_column", None) is None:
        raise SpecError(plan.spec_file, "data.harmful.category_column",
                        "stages.rank.sources 'category' needs a category column in the harmful prompts "
                        "(data.harmful.category_column)")


def check_model(plan, mp) -> None:
    """`position` is among the model's direction positions. Raises SpecError naming stages.rank.position."""
    from refusal_ray.errors import SpecError

    block = plan.spec.stages.rank
    if block.position not in mp.positions:
        raise SpecError(plan.spec_file, "stages.rank.position", f"{block.position} is not among the direction "
                                                                f"positions {mp.positions} of model {mp.name!r}")


def describe(plan) -> list[str]:
    block = plan.spec.stages.rank
    where = f"layer {block.layer}" if block.layer is not None else "select's layer (else directions' best)"
    lines = [f"rank sweep: sources {', '.join(block.sources)}, k = 1..{block.max_k}, each beside a same-rank random "
             f"subspace; bases at resid_pre of {where}, p{block.position}; ablated at layers {block.ablation_layers}, "
             f"alpha {block.alpha}"]
    if block.transfer and "category" in block.sources:
        lines.append("rank transfer: each category's direction ablated alone, on every category's test prompts")
    return lines


def _declare_columns() -> None:
    """The rank tables' columns that are null on some rows (a skipped cell, a non-transfer arm, select's basis
    rows without a count), declared to the store so every file of a table has one schema."""
    from refusal_ray.store import declare_column_types

    declare_column_types({"ablated_category": "string", "category": "string", "skipped": "string",
                          "layer_from": "string", "singular_value": "float64", "explained_variance": "float64",
                          "basis_rank": "int64", "n": "int64", "norm": "float64"}, "stage 'rank'")


_declare_columns()
_RUN = "refusal_ray.stages.rank.run"
STAGE = Stage(name="rank", tables=("rank", "rank_bases", "completions"), needs=("directions", "select"),
              cells=lambda spec, mp: rank_params(spec, mp.n_layers), id_key=id_key, group=group,
              inputs=lazy(_RUN, "inputs"), skip=lazy(_RUN, "skip_reason"), run=lazy(_RUN, "run"),
              check=check, check_model=check_model, describe=describe,
              block=RankStage, validate=validate, read="refusal_ray.stages.rank.read")


def needing_optimise(stages) -> None:
    """Stage rank's `optimised` source reads stage optimise's rows: when a stage named optimise is among `stages`
    (the StageList), rank's entry gets "optimise" in its `needs` (in place, before any listener is set)."""
    import dataclasses

    names = [s.name for s in stages]
    if "optimise" in names and "rank" in names:
        i = names.index("rank")
        if "optimise" not in stages[i].needs:
            stages._stages[i] = dataclasses.replace(stages[i], needs=(*stages[i].needs, "optimise"))
