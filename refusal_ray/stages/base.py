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
- `block`: the stage's spec block, a pydantic class (`refusal_ray.spec.Stages` gets one optional
  field `<name>` of this type, in STAGES order; None: the stage has no block, which only a stage
  still being converted may have). `block_default`: the block is always present (its defaults when
  the spec omits it), so the stage always runs (directions); otherwise it defaults to None (off).
- `validate(spec) -> None`: the stage's cross-field checks on the whole spec (called by Spec's
  after-validator for every stage, enabled or not, in STAGES order); raise ValueError with the
  message (pydantic reports it as a spec error, exit 2).
- `read`: the dotted path of the stage's read module ("refusal_ray.stages.<name>.read"), which
  defines `READER = Reader(...)` (pandas/numpy/matplotlib only, no torch); imported on use
  (`Stage.reader`). None: the stage contributes nothing to the summary and the report.

Declarations are torch-free at import: a field that needs torch points at its function through
`lazy("refusal_ray.stages.<name>.run", "fn")`, which imports the module on first call.

The read side (`Reader`, `ReadContext`) is what `refusal_ray.analysis.summary` and `.report` loop
over; they name no stage.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


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


def _no_validation(spec):
    return None


class lazy:
    """A callable standing for `module.name`, imported on its first call (so a declaration that names
    a torch-side function does not import torch). `lazy("refusal_ray.stages.steer.run", "run")(*a)`
    is `refusal_ray.stages.steer.run.run(*a)`; `.resolve()` gives the function itself. Raises the
    import's ImportError / AttributeError on first call when the module or the name does not exist."""

    __slots__ = ("module", "name", "_fn")

    def __init__(self, module: str, name: str):
        self.module, self.name, self._fn = module, name, None

    def resolve(self) -> Callable:
        if self._fn is None:
            self._fn = getattr(importlib.import_module(self.module), self.name)
        return self._fn

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"lazy({self.module}.{self.name}{'' if self._fn is None else ', loaded'})"

    def __eq__(self, other) -> bool:
        return isinstance(other, lazy) and (self.module, self.name) == (other.module, other.name)

    def __hash__(self) -> int:
        return hash((self.module, self.name))


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
    block: type | None = None
    block_default: bool = False
    validate: Callable = _no_validation
    read: str | None = None

    @property
    def reader(self) -> Reader | None:
        """The stage's `READER` (its read module imported now), or None without a read module."""
        if self.read is None:
            return None
        return importlib.import_module(self.read).READER

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


# Every listed layer exists in every model (SpecError naming the field): the operators' check, one for all.
from refusal_ray.ops.base import check_layers  # noqa: E402,F401



def refusal_tokens(plan, mp, tok, setting, epsilon) -> dict:
    """{"refusal_tokens": {"setting", "ids", "tokens" (decoded), "epsilon"}}: the refusal first tokens of
    one model (`refusal_ray.models.refusal_tokens.resolve`), for a stage's `resolve_model`. Raises
    SpecError naming `stages.select.refusal_tokens`."""
    from refusal_ray.errors import SpecError
    from refusal_ray.judges.substring import DEFAULT_PHRASES
    from refusal_ray.models import refusal_tokens as rt

    try:
        ids = rt.resolve(setting, tok, mp.family, plan.spec.judge.phrases or DEFAULT_PHRASES)
    except rt.RefusalTokenError as e:
        raise SpecError(plan.spec_file, "stages.select.refusal_tokens", f"{e} (model {mp.name!r})") from None
    return {"refusal_tokens": {"setting": setting, "ids": ids, "tokens": rt.describe(tok, ids), "epsilon": epsilon}}

# -- the read side: what a stage contributes to the summary and the report ----------------------
def _no_columns(ctx, model, row):
    return {}


def _no_display():
    return []


def _no_report(ctx):
    return []


def _no_headline(row, rule):
    return None


@dataclass(frozen=True)
class Reader:
    """A stage's read side, `READER` in its read module (pandas / numpy / matplotlib only, no torch).

    - `summary(ctx, model, row) -> dict`: the stage's summary-table columns for one model (a store's
      `manifest["models"]` key). `row` holds the columns so far: the model's params/layers and the
      columns of the stages before it (e.g. directions' `best_layer`; a model without directions rows
      has none, and a stage whose columns rest on it returns {}). Called in the spec's block order
      (`STAGES.by_block_order()`: the summary's column order), for the
      verdict judge's context (`ctx.judge`) and once per judge for `summary_by_judge`.
    - `display() -> [(column, header, fmt)]`: its columns in the printed summary table (a column the
      summary lacks is left out), in `order`.
    - `report(ctx) -> [markdown line]`: its report section, the `## title` heading included, present
      whether or not the stage ran (`refusal_ray.core.render.not_run`); figures through
      `ctx.figure(name, png_bytes)`. `ctx.summary` holds the summary table.
    - `order`: its position in the report and the printed table (lower first; ties: STAGES order).
    - `title`: its report section's title (informational; `report` writes the heading).
    - `tables`: the store tables it reads (loaded once per context, `ctx.tables[name]`).
    - `provides`: {name: fn} values other readers and the decision rule read through
      `ctx.provided(name)`, e.g. steer's "pooled_arms" (`fn(ctx) -> DataFrame`: the steering arms
      pooled over seeds under `ctx.judge`'s labels; `ctx.arms`), computed once per context.
    - `files`: {file name: fn(ctx) -> DataFrame | bytes | None} files `write_summary` writes into the store
      (a DataFrame as Parquet; None: nothing), e.g. capability's `capability_cost.parquet`.
    - `headline(row, rule) -> str | None`: its sentence in the report's headline paragraph of one model
      (`row`: the model's summary row), after the verdicts, in `headline_order` (default: `order`).
    """

    summary: Callable = _no_columns
    display: Callable = _no_display
    report: Callable = _no_report
    order: int = 0
    title: str = ""
    tables: tuple[str, ...] = ()
    provides: Mapping[str, Callable] = field(default_factory=dict)
    files: Mapping[str, Callable] = field(default_factory=dict)
    headline: Callable = _no_headline
    headline_order: int | None = None


class Tables(Mapping):
    """The store's tables by name, each read once on first use (`store.read(name)`: an absent table
    reads back as an empty DataFrame)."""

    def __init__(self, store, preloaded: Mapping | None = None):
        self._store, self._frames = store, dict(preloaded or {})

    def __getitem__(self, name: str):
        if name not in self._frames:
            self._frames[name] = self._store.read(name)
        return self._frames[name]

    def __iter__(self):
        return iter(self._frames)

    def __len__(self) -> int:
        return len(self._frames)


@dataclass
class ReadContext:
    """What a reader reads: one store under one judge.

    - `tables`: {table: DataFrame} (`Tables`, loaded once); `manifest`: manifest.json (a dict);
      `rule`: the decision rule without its judge; `judge`: the judge whose labels rates read
      (`refusal_ray.judges.config.INLINE`: the substring judge); `judge_kind`: its kind;
      `labels`: every judge's labels (`refusal_ray.analysis.judgements.judge_labels`).
    - `judged(name)`: table `name` relabelled under `judge` (`relabel(ctx) -> {table: DataFrame}`,
      supplied by the summary: the judges' recount; a table it does not relabel is `tables[name]`).
    - `provided(name)`: the value a reader `provides` (computed once); `arms`: `provided("pooled_arms")`
      (an empty DataFrame when no reader provides it).
    - `summary`: the summary table (one row per model), set for the report; None while summarising.
    - `figure(name, png) -> [lines]`: write `figures/<name>` into the store and return the report
      lines that show it (none for `png` None).
    - `stages`: the spec's `stages` block as the manifest records it ({name: settings or None}).
    """

    store: Any
    manifest: dict
    rule: dict
    judge: str
    readers: tuple[Reader, ...] = ()
    tables: Mapping = None
    labels: Any = None
    judge_kind: str | None = None
    relabel: Callable | None = None
    summary: Any = None
    figures: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.tables is None:
            self.tables = Tables(self.store)

    @property
    def stages(self) -> dict:
        return (self.manifest.get("spec") or {}).get("stages") or {}

    def judged(self, name: str):
        if self.relabel is None:
            return self.tables[name]
        if "__judged__" not in self._cache:
            self._cache["__judged__"] = self.relabel(self)
        judged = self._cache["__judged__"]
        return judged[name] if name in judged else self.tables[name]

    def provided(self, name: str, default=None):
        """The value of the first reader (in `readers` order) that provides `name`, computed once; `default`
        when none does."""
        key = ("provided", name)
        if key not in self._cache:
            fn = next((r.provides[name] for r in self.readers if name in r.provides), None)
            self._cache[key] = default if fn is None else fn(self)
        return self._cache[key]

    @property
    def arms(self):
        """The steering arms pooled over seeds under `judge` (the reader providing "pooled_arms"); empty without one."""
        import pandas as pd

        return self.provided("pooled_arms", pd.DataFrame())

    def with_judge(self, judge: str, judge_kind: str | None = None) -> ReadContext:
        """The same store (tables shared, read once) under another judge: provided values are recomputed."""
        return ReadContext(store=self.store, manifest=self.manifest, rule=self.rule, judge=judge, readers=self.readers,
                           tables=self.tables, labels=self.labels, judge_kind=judge_kind, relabel=self.relabel,
                           summary=self.summary, figures=self.figures)

    def figure(self, name: str, png: bytes | None) -> list[str]:
        if png is None:
            return []
        self.figures[name] = png
        if self.store is not None:
            self.store.write_file(f"figures/{name}", png)
        return [f"![{name}](figures/{name})", ""]
