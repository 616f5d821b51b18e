"""What a stage declares, so the grid, the plan, the driver, the session and the store need not
know any stage by name.

A stage is one module under `refusal_ray/stages/` that defines `STAGE = Stage(...)`; the list
`refusal_ray.stages.STAGES` holds them in dependency order. The rest of the system reads only:

- `name`: the key under `stages:` in a spec (its settings block) and the cells' `stage` value.
- `needs`: stages whose results for the same (model, seed) its cells read (directions -> select
  -> steer). A need that the spec does not enable is simply absent.
- `cells(spec, model_plan) -> [params]`: the cells of one (model, seed), as parameter dicts.
- `id_key(spec) -> dict`: the spec settings, besides the params, that determine a cell's result
  (part of the content-addressed cell id; batch sizes and resources never are).
- `group(cells, spec) -> [[Cell]]`: how a (model, seed)'s cells form tasks (one actor call each).
- `inputs(settings, needs) -> payload`: what a task carries from its needs' stored rows
  (`needs` maps a needed stage to {table: rows} of that (model, seed)).
- `skip(cell, payload) -> reason | None`: a cell that cannot run on these inputs (stored as
  `skipped` with the reason, never as a silent substitute).
- `run(session, cells, payload) -> {table: rows}`: the work, on a loaded model (no Ray).
- `tables`: the store tables its rows go to.
- `prepare(plan)`, `check(plan)`, `describe(plan)`: plan-time prompt draws, checks (raise
  SpecError naming the field) and the lines `refusal-ray plan` prints.
- `positions(spec) -> 'post_instruction' | [int] | None`: the token positions the stage fits
  directions at, which plan resolves per model (`model_plan.positions`; the first enabled stage
  that names them; none: [-1]).
- `check_model(plan, model_plan)`: plan-time checks of one model, called (for an enabled stage) as
  soon as the model's direction positions are resolved (`model_plan.positions`), before its prompt
  fingerprint; raise SpecError naming the field.
- `resolve_model(plan, model_plan, tokenizer) -> {field: value}`: what the stage resolves from one
  model's tokenizer at plan time, set on its ModelPlan (e.g. `refusal_tokens`); called for each
  enabled stage in stage order after `check_model` (a later stage's value replaces an earlier one).
- `manifest(plan) -> dict`: entries the stage adds to `manifest.json`; called for every stage,
  enabled or not, so a reader finds the keys either way (a disabled stage gives its "absent" value).
- `shards(settings, payload, n) -> [payload_i]` and `merge(settings, cells, payload, parts) ->
  {table: rows}` (optional, both or neither): a task that can be split across a model's n replicas.
  The driver runs `run(session, cells, payload_i)` for each shard (their results are never stored),
  then `merge` of the shards' `tables` (in shard order) gives the task's rows, exactly as one
  unsharded `run` would; a shard that fails fails the task as a whole. Without a cluster
  (`run_local`) a task is never split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def _one_task_per_cell(cells, spec):
    return [[c] for c in cells]


def _no_inputs(settings, needs):
    return None


def _never_skip(cell, payload):
    return None


def _nothing(plan):
    return None


def _no_lines(plan):
    return []


def _no_positions(spec):
    return None


def _no_model_checks(plan, model_plan):
    return None


def _no_manifest(plan):
    return {}


def _nothing_resolved(plan, model_plan, tokenizer):
    return {}


@dataclass(frozen=True)
class Stage:
    name: str
    tables: tuple[str, ...]
    cells: Callable
    id_key: Callable
    run: Callable
    needs: tuple[str, ...] = ()
    group: Callable = _one_task_per_cell
    inputs: Callable = _no_inputs
    skip: Callable = _never_skip
    prepare: Callable = _nothing
    check: Callable = _nothing
    describe: Callable = _no_lines
    positions: Callable = _no_positions
    check_model: Callable = _no_model_checks
    resolve_model: Callable = _nothing_resolved
    manifest: Callable = _no_manifest
    shards: Callable | None = None
    merge: Callable | None = None

    def enabled(self, spec) -> bool:
        return getattr(spec.stages, self.name) is not None

    @property
    def shardable(self) -> bool:
        return self.shards is not None and self.merge is not None

    def settings(self, spec) -> dict | None:
        block = getattr(spec.stages, self.name)
        return None if block is None else block.model_dump(mode="json")


# -- plan-time helpers shared by declarations ---------------------------------------------------
def draw_test_pairs(plan, stage: str) -> None:
    """Draw each seed's harmful/harmless pairs (`stages.<stage>.n_pairs`) from the test split into
    `plan.prompts[seed][stage]`. Raises SpecError naming the field when too few pairs exist."""
    from refusal_ray.data import draw_pairs
    from refusal_ray.errors import SpecError

    n, data = getattr(plan.spec.stages, stage).n_pairs, plan.spec.data
    for seed in plan.spec.seeds:
        try:
            plan.prompts[seed][stage] = draw_pairs(plan.frames["harmful"][0], plan.frames["harmless"][0],
                                                   data.harmful, data.harmless, n, seed)
        except ValueError as e:
            raise SpecError(plan.spec_file, f"stages.{stage}.n_pairs", str(e)) from None


def check_layers(plan, field: str, layers) -> None:
    """Every listed layer exists in every model ('all' always does). Raises SpecError naming `field`."""
    from refusal_ray.errors import SpecError

    if not plan.models:   # validate offline, no model reachable
        return
    shallow = min(plan.models.values(), key=lambda mp: mp.n_layers)
    for layer in ([] if layers == "all" else layers):
        if not 0 <= layer < shallow.n_layers:
            raise SpecError(plan.spec_file, field, f"layer {layer} out of range: model {shallow.name!r} has "
                                                   f"{shallow.n_layers} layers (0..{shallow.n_layers - 1})")
