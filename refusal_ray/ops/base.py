"""The operator seam: what one intervention kind (an "operator") declares, and the registry `OPS`.

An operator is one module under `refusal_ray/ops/` defining one `Operator` subclass decorated with
`@register`. Every module of the package except this one (and names starting with "_") is imported
by `refusal_ray/ops/__init__.py` (pkgutil), so a new operator is its module plus its tests: stage
steer, stage capability, the spec, the summary and the report reach it only through `OPS`.

No torch at module level here or in any operator module (`refusal_ray.analysis` imports this
package and must not load torch): import torch inside the functions that build tensors. Operators
import no `refusal_ray.stages` module (layers: stages -> ops -> models -> core).

The contract (class attributes, then methods; every method has a default unless marked required):

- `name` (required): the key of its block under `stages.steer`, the cells' `params["mode"]`, and a
  `stages.capability.arms` entry. `label`: plan / report text ("activation addition").
- `order` (required): arms and rows are built in OPS order (addition 10, ablation 20, subspace 30; new
  operators 40+). `apply_order`: the order edits of several operators compose at one site (default:
  `order`; addition is 90, so it comes last, as `RowEdit` does: directional ablation, subspace
  ablation, then addition).
- `config` (required): the pydantic block class (subclass `Strict`). SteerStage gets one optional field
  `stages.steer.<name>` per registered operator; `default_block` True makes its default `config()`
  (addition, ablation), else None. `field_description`: the field's JSON-schema description.
  An unset (None) block is absent from the spec dump (so spec hashes of before stay), unless
  `dump_when_none` (addition, ablation, subspace: their None was in every stored dump).
- `effect`: "bypass" | "induce" | "both": which summary columns it gets (suppression of harmful refusal,
  induction of harmless refusal, each beside its random control's).
- `arms(spec, block, n_layers) -> [params]` (required): base arm params (no "control" key: steer wraps
  each with `control_arms(arm, draws)`). Every params dict has "mode": name; what is in it is part of
  the cell id (golden ids: never change a built-in's params).
- `capability_arms(spec, block, n_layers) -> [params]`: its capability-cost arms (default: `arms`, [] when
  block is None). `in_default_capability(spec, block) -> bool`: whether capability measures it when
  `stages.capability.arms` is unset (default: block is not None). `weight_arm`: name of a capability arm
  that applies this operator's resolved tensor to the weights (`orthogonalized` for ablation), or None;
  `weight_tensor(cell, resolved) -> np.ndarray` gives that tensor ([d_model] or [rank, d_model]).
- `inputs(settings, d: SteerInputs) -> Any`: per-seed data of this operator (read from d.rows, d.vectors,
  d.candidates...), stored as `d.ops[name]`. Default None.
- `resolve(cell, d: SteerInputs) -> Any` (required): the per-cell tensors (its direction, basis...), for a
  control cell its norm-matched random control, seeded by `draw_id(cell, d)`. Raises LookupError(reason)
  when the arm cannot run on this seed (the stored skip reason).
- `edits(rows, chunk: Chunk, d) -> {(site kind, layer): SiteEdit}` (required): per-row tensors for the
  rows of this operator in a chunk of `chunk.n` rows; rows = [(row index, cell, resolved)], only this
  operator's. Every other row must be left bit-identical (strength 0 / zero vector). Keep one tensor per
  site (no per-row Python work inside a hook). A SiteEdit is a callable x [batch, pos, d_model] -> x
  (`refusal_ray.interventions.RowEdit` is one); an optional `on_device(device, moved: dict)` moves shared
  tensors once per chunk (memo `moved` keyed by id()). Steer and capability compose the operators'
  edits at a site in `apply_order` (`compose`).
- `prefill(lm, input_ids, attention_mask, rows, d) -> Any`: called with the unedited batch
  ([batch, pos], left padded, on the model's device) before an edited `generate` (steer, and
  capability's generation), e.g. to gate rows on the prompt (CAST); the result is
  `chunk.prefill[name]` in `edits`. Default: nothing (None), and no extra pass is made. Capability's
  CE / KL passes give an operator with a prefill its prefill per batch (one row per text, gated on its
  own tokens: `stages/capability/run.py: GatedEdits`); every other operator gets broadcast edits (`edits` of
  one row, chunk.n == 1). lm-eval batches its own requests under one set of hooks, so arms of an
  operator with a prefill get no lm-eval metrics (the plan line says so).
- `completion_columns(prefill, i) -> dict` / `group_columns(rows) -> dict`: per-completion columns from
  the prefill state (row i of the chunk), and the steering row's columns from its completions' ones.
- `columns(cell, resolved) -> dict`: its result columns on its rows (steering, capability). Keys of the
  common arm columns (`base_columns`: layer, direction_layer, direction_position, direction,
  coefficient, alpha, vector_norm, ...) override those; new keys are added on its rows only.
  `row_columns`: extra columns present (None) on every row (legacy only: subspace's `subspace_rank`).
  `column_types`: {column: "float64" | "int64" | "bool" | "string"} of its own result columns, declared to
  the store at `register` (a column that is null in one file, e.g. on control rows, keeps one schema).
- `describe(spec, block) -> [lines]` for `refusal-ray plan`; `check(plan, block)`: plan-time checks,
  raise SpecError naming the field; `validate(spec, block)`: spec cross-field checks (block may be None;
  raise ValueError, pydantic reports it with the file).
- summary / report (analysis, no torch): `arm_keys` (extra groupable columns of pooled arms) and
  `arm_key_values(df) -> {column: [value per row]}` (neutral values on other modes' rows);
  `summary_columns(a, rule, block) -> dict` from one model's pooled arms `a` (default: `effect_columns`
  at its first setting); `display` ((column, header, format) entries of the summary table);
  `headline(row, rule) -> str | None` (report sentence); `cost_setting(rule) -> (column, value|None)`:
  which setting the cost columns read; `cost_display` (summary cost columns); `short` (2-4 letter tag),
  `color` / `weight_color` (matplotlib); `report_mask(a, summary_row)` (its rows in the steering table),
  `direction_key`, `report_section` / `section_title` / `report_columns` (its own report section, a table
  of its pooled arms), `report_order` (order of summary columns and headline sentences).

Registry: `OPS` iterates operator instances in `order`; `OPS[name]`, `name in OPS`, `OPS.names()`.
`register` refuses a duplicate name (ValueError naming it); `unregister(name)` (tests); `get(name)`.
`on_change(fn)`: fn() after every register / unregister (the spec rebuilds SteerStage's fields).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict

# -- spec building blocks (the spec imports these; operators' config classes subclass Strict) ---------------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


LayerList = Literal["all"] | list[int]


def negative(positions: list[int]) -> list[int]:
    """`positions` unchanged; ValueError unless every one is negative (token positions count from the end)."""
    if any(p >= 0 for p in positions):
        raise ValueError("positions count from the end of the prompt and must be negative (e.g. -1)")
    return positions


NegativePositions = Annotated[list[int], AfterValidator(negative)]


def no_duplicates(names: list, what: str) -> None:
    """ValueError naming the first (sorted) name that occurs twice in `names` ("duplicate <what> 'x'")."""
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate {what} {dup[0]!r}")


def _controls(v: bool | int) -> bool | int:
    """`controls`: true (one draw, the meaning before K existed), false (none) or K >= 2 draws; 1 reads as
    true and 0 as false."""
    if isinstance(v, bool):
        return v
    if v < 0:
        raise ValueError("true (one random draw per arm), false (none) or a number of draws K >= 2")
    return v if v >= 2 else bool(v)


Controls = Annotated[bool | int, AfterValidator(_controls)]
CONTROLS_HELP = ("Norm-matched random-direction controls per arm: true (one draw, seeded by the control cell's "
                 "id), false (none), or K >= 2 draws (K control cells per arm; draw 0 is the draw of `true`).")


def n_draws(controls: bool | int) -> int:
    """Random control draws per arm of a `controls` value: 0, 1 or K."""
    return int(controls) if not isinstance(controls, bool) else int(controls)
from refusal_ray.core.cells import layer_list  # noqa: E402,F401 - operators' layer fields ('all' or a list)

def check_direction_fields(spec, block, name: str) -> None:
    """The cross-field checks of an operator block with `direction_layer` (and `direction_position`):
    an explicit position needs an integer layer, and 'selected' needs a stages.select block. Raises
    ValueError naming `stages.steer.<name>.<field>`."""
    if getattr(block, "direction_position", None) is not None and not isinstance(block.direction_layer, int):
        raise ValueError(f"stages.steer.{name}.direction_position needs an integer direction_layer "
                         "(the selected and best directions come with their own position)")
    if block.direction_layer == "selected" and spec.stages.select is None:
        raise ValueError(f"stages.steer.{name}.direction_layer 'selected' needs a stages.select block "
                         "(or direction_layer: best / a layer)")


# sites that write the residual stream, where ablation-like operators edit (Arditi et al. 2024, Sec. 2.4)
ABLATION_SITES = ("resid_pre", "attn_out", "mlp_out")


def check_layers(plan, field_: str, layers) -> None:
    """Every listed layer exists in every model ('all' always does). Raises SpecError naming `field_`."""
    from refusal_ray.errors import SpecError

    if not plan.models:   # validate offline, no model reachable
        return
    shallow = min(plan.models.values(), key=lambda mp: mp.n_layers)
    for layer in ([] if layers == "all" else layers):
        if not 0 <= layer < shallow.n_layers:
            raise SpecError(plan.spec_file, field_, f"layer {layer} out of range: model {shallow.name!r} has "
                                                    f"{shallow.n_layers} layers (0..{shallow.n_layers - 1})")


# -- random controls ---------------------------------------------------------------------------------


def cell_seed(cell_id: str) -> int:
    """The RNG seed of a control cell: the first 8 hex digits of sha256(cell id)."""
    return int(hashlib.sha256(cell_id.encode()).hexdigest()[:8], 16)


def control_direction(cell_id: str, like: np.ndarray) -> np.ndarray:
    """Gaussian direction with the norm of `like`, seeded by the cell id. [d_model] float32."""
    g = np.random.default_rng(cell_seed(cell_id)).standard_normal(like.shape[0])
    norm = float(np.linalg.norm(like))
    return (g / np.linalg.norm(g) * norm).astype(np.float32)


def control_arms(arm: dict, draws: int) -> list[dict]:
    """An arm and its `draws` control arms (draw j >= 1 with `control_draw: j`), adjacent."""
    return [{**arm, "control": False}] + [{**arm, "control": True, **({"control_draw": j} if j else {})}
                                          for j in range(draws)]


def draw_column(cell) -> dict:
    """{"control_draw": j} for a control cell of draw j >= 1, else {} (draw 0's rows are the rows of
    `controls: true`, byte for byte)."""
    j = cell.params.get("control_draw", 0)
    return {"control_draw": int(j)} if j else {}


# -- what operators read -----------------------------------------------------------------------------


@dataclass
class SteerInputs:
    """The directions a (model, seed)'s steering arms use.

    vectors: {layer: difference of means [d_model] float32} at resid_pre and steer.position.
    best: the layer of highest separation at steer.position.
    position: steer.position (negative, from the end of the prompt).
    selected: stage select's choice {layer, position, selected_by, vector, ...}, or None (not run, or
        nothing passed its filters).
    explicit: {(layer, position): vector} for ablation arms naming a layer and position.
    ops: {operator name: its per-seed inputs (`Operator.inputs`)}.
    draw_ids: {control cell id: the cell id seeding its draw} where that is another cell's (stage
        capability's weight arms draw their hook twin's directions); None: every cell its own.
    rows: {(layer, position): the stored resid_pre direction row, whole (every column: vector,
        separation, and whatever stage directions stores)}; {} when built by hand.
    candidates: stage select's candidates that passed its filters, best first by its criterion (ties as
        its `choose`), as stored selection rows; None when select did not run.
    n_candidates: how many candidates select scored (passed or not); 0 when it did not run.
    settings: the stage settings payload the inputs were read with ({stage: block as dict}).
    """

    vectors: dict[int, np.ndarray]
    best: int
    position: int = -1
    selected: dict | None = None
    explicit: dict = None
    ops: dict = field(default_factory=dict)
    draw_ids: dict | None = None
    rows: dict = field(default_factory=dict)
    candidates: list[dict] | None = None
    n_candidates: int = 0
    settings: dict = field(default_factory=dict)


def draw_id(cell, d: SteerInputs) -> str:
    """The cell id that seeds a control arm's random draw: its own, or its hook twin's for a weight arm
    (stage capability fills `SteerInputs.draw_ids`, so the orthogonalized control uses its twin's draw)."""
    return (d.draw_ids or {}).get(cell.id, cell.id)


SELECTED_MISSING = ("no direction selected for this seed: no candidate passed the selection filters "
                    "(stages.select: loosen kl_max / induce_min / max_layer_fraction, or set a fallback)")


def direction_of(cell, d: SteerInputs) -> tuple[int, int, np.ndarray]:
    """(direction layer, direction position, vector v [d_model] float32) of a direction arm, from its params'
    `direction_layer` ('selected': stage select's choice; 'best': highest separation at steer.position; a
    layer, at `direction_position` or steer.position); a control arm gets its random vector of the same
    norm (seeded by `draw_id`). Raises LookupError (SELECTED_MISSING) for 'selected' when nothing was."""
    p = cell.params
    if p["direction_layer"] == "selected":
        if d.selected is None:
            raise LookupError(SELECTED_MISSING)
        layer, position, v = d.selected["layer"], d.selected["position"], d.selected["vector"]
    elif p["direction_layer"] == "best":
        layer, position, v = d.best, d.position, d.vectors[d.best]
    elif p.get("direction_position") is not None:
        layer, position = int(p["direction_layer"]), int(p["direction_position"])
        key = (layer, position)
        v = d.explicit[key] if d.explicit and key in d.explicit else np.asarray(d.rows[key]["vector"], np.float32)
    else:
        layer, position, v = int(p["direction_layer"]), d.position, d.vectors[int(p["direction_layer"])]
    return layer, position, (control_direction(draw_id(cell, d), v) if p["control"] else v)


def owner(mode: str):
    """The operator a cell mode belongs to: the operator of that name, or the one whose `weight_arm` it is;
    None for 'baseline' (and unknown modes)."""
    if mode in OPS:
        return OPS[mode]
    return next((op for op in OPS if op.weight_arm == mode), None)


def base_columns(cell) -> dict:
    """The arm columns every result row has (steering, capability), before its operator's `columns`: cell id,
    seed, layer, direction_layer, direction_position, direction (the spec's direction_layer as text), the
    operators' `row_columns` (None), coefficient, alpha, control, vector_norm."""
    p = cell.params
    dl = p.get("direction_layer")
    cols = {"cell_id": cell.id, "seed": cell.seed, "layer": p.get("layer"), "direction_layer": None,
            "direction_position": None, "direction": None if dl is None else str(dl)}
    for op in OPS:
        cols |= {c: None for c in op.row_columns}
    return cols | {"coefficient": p.get("coefficient"), "alpha": p.get("alpha"), "control": p["control"],
                   "vector_norm": None}


def arm_columns(cell, d: SteerInputs) -> dict:
    """An arm's columns in a result row: `base_columns`, its operator's `columns(cell, resolved)`, and
    `control_draw` on rows of control draw j >= 1 (`draw_column`). Raises LookupError as `resolve`."""
    op = owner(cell.params["mode"])
    own = {} if op is None else op.columns(cell, op.resolve(cell, d))
    return {**base_columns(cell), **own, **draw_column(cell)}


@dataclass
class Chunk:
    """One edited batch: `n` rows of a model with `n_layers` layers of width `d_model`.

    ablation_layers: the layers ablation-like arms whose params name none edit (steer's
        `stages.steer.ablation.layers`, resolved; every layer by default).
    prefill: {operator name: what its `prefill` returned for this batch}.
    """

    n: int
    d_model: int
    n_layers: int
    ablation_layers: list[int] | None = None
    prefill: dict = field(default_factory=dict)

    def layers(self) -> list[int]:
        return list(range(self.n_layers)) if self.ablation_layers is None else list(self.ablation_layers)


def compose(per_op: list[tuple[int, dict]]) -> dict:
    """{(site kind, layer): SiteEdit} from [(apply_order, that operator's edits)]: one callable per site,
    applying the operators' edits in apply_order (a site edited by one operator keeps its own edit; RowEdits
    of directional ablation, subspace ablation and addition merge into one RowEdit, as before; others are
    `Composed`)."""
    sites: dict[tuple[str, int], list[tuple[int, Callable]]] = {}
    for rank, edits in per_op:
        for key, e in edits.items():
            sites.setdefault(key, []).append((rank, e))
    out = {}
    for key, es in sites.items():
        es.sort(key=lambda t: t[0])
        edits = [e for _, e in es]
        out[key] = edits[0] if len(edits) == 1 else (_merged(edits) or Composed(edits))
    return out


_ROW_EDIT_PARTS = (("ablate_dirs", "ablate_alpha"), ("ablate_basis", "basis_alpha"), ("add",))


def _merged(edits: list) -> Any:
    """One `RowEdit` holding several RowEdits' disjoint parts when their order is RowEdit's own (directional
    ablation, subspace ablation, addition): the same arithmetic in the same order, one callable; else None."""
    from refusal_ray.interventions import RowEdit

    if not all(type(e) is RowEdit for e in edits):
        return None
    last, fields = -1, {}
    for e in edits:
        used = [i for i, part in enumerate(_ROW_EDIT_PARTS) if any(getattr(e, f) is not None for f in part)]
        if not used or min(used) <= last:
            return None
        last = max(used)
        fields |= {f: getattr(e, f) for i in used for f in _ROW_EDIT_PARTS[i]}
    return RowEdit(**fields)


class Composed:
    """Several operators' SiteEdits at one site, applied in order. x: [batch, pos, d_model]."""

    def __init__(self, edits: list[Callable]):
        self.edits = edits

    def __call__(self, x):
        for e in self.edits:
            x = e(x)
        return x

    def on_device(self, device, moved: dict) -> None:
        for e in self.edits:
            if hasattr(e, "on_device"):
                e.on_device(device, moved)


# -- the operator ------------------------------------------------------------------------------------


class Operator:
    """One intervention kind (see the module docstring for the contract)."""

    name: ClassVar[str]
    label: ClassVar[str] = ""
    order: ClassVar[int]
    apply_order: ClassVar[int | None] = None
    config: ClassVar[type[Strict]]
    default_block: ClassVar[bool] = False
    field_description: ClassVar[str | None] = None
    effect: ClassVar[Literal["bypass", "induce", "both"]] = "both"
    weight_arm: ClassVar[str | None] = None
    row_columns: ClassVar[tuple[str, ...]] = ()
    column_types: ClassVar[dict[str, str]] = {}   # its result columns' types: {column: "float64" | "int64" | "bool" | "string"}
    arm_keys: ClassVar[tuple[str, ...]] = ()
    short: ClassVar[str] = ""
    color: ClassVar[str] = "tab:gray"
    report_order: ClassVar[int | None] = None   # summary columns / report sentences order (default: order)
    capability_needs_block: ClassVar[bool] = False   # a stages.capability.arms entry needs stages.steer.<name>
    dump_when_none: ClassVar[bool] = False   # its unset block is in the spec dump (built-ins of before: True)
    weight_color: ClassVar[str] = "tab:olive"
    direction_key: ClassVar[str | None] = None   # arm-key column the steering table shows as its direction
    report_section: ClassVar[bool] = True        # its own report section (the rule's arms: False)
    section_title: ClassVar[str | None] = None   # default: label, capitalised

    @property
    def rank(self) -> int:
        return self.order if self.apply_order is None else self.apply_order

    @property
    def report_rank(self) -> int:
        return self.order if self.report_order is None else self.report_order

    # spec and plan
    def arms(self, spec, block, n_layers: int) -> list[dict]:
        raise NotImplementedError

    def capability_arms(self, spec, block, n_layers: int) -> list[dict]:
        return [] if block is None else self.arms(spec, block, n_layers)

    def in_default_capability(self, spec, block) -> bool:
        return block is not None

    def describe(self, spec, block) -> list[str]:
        return [f"{self.label or self.name}: {block.model_dump(mode='json')}"]

    def check(self, plan, block) -> None:
        return None

    def validate(self, spec, block) -> None:
        return None

    # run time
    def inputs(self, settings: dict, d: SteerInputs) -> Any:
        return None

    def resolve(self, cell, d: SteerInputs) -> Any:
        raise NotImplementedError

    def edits(self, rows: list[tuple[int, Any, Any]], chunk: Chunk, d: SteerInputs) -> dict:
        raise NotImplementedError

    def prefill(self, lm, input_ids, attention_mask, rows, d: SteerInputs) -> Any:
        return None

    @classmethod
    def has_prefill(cls) -> bool:
        return cls.prefill is not Operator.prefill

    def columns(self, cell, resolved) -> dict:
        return {}

    def completion_columns(self, prefill, i: int) -> dict:
        """Extra columns of completion row `i` of a chunk (its index in the batch), from this operator's
        `prefill` state; only on its rows. Default {}."""
        return {}

    def group_columns(self, rows: list[dict]) -> dict:
        """Extra columns of one steering row (cell, prompt set) from its completion rows' `completion_columns`
        dicts. Default {}."""
        return {}

    def weight_tensor(self, cell, resolved) -> np.ndarray:
        raise NotImplementedError(f"operator {self.name!r} has no weight arm")

    # summary and report (pandas frames, no torch)
    def arm_key_values(self, df) -> dict[str, list]:
        """{column: value per row} for `arm_keys`: str(value) of the column on this operator's rows, ""
        elsewhere (and where the column is missing)."""
        out = {}
        for col in self.arm_keys:
            vals = df[col] if col in df.columns else [None] * len(df)
            out[col] = ["" if m != self.name or v is None or (isinstance(v, float) and np.isnan(v)) else _key_text(v)
                        for m, v in zip(df["mode"], vals)]
        return out

    def summary_columns(self, a, rule: dict, block) -> dict:
        return effect_columns(a, self, setting_of(a, self))

    @property
    def display(self) -> tuple[tuple[str, str, str], ...]:
        tag = self.short or self.name[:4]
        out = []
        if self.effect in ("bypass", "both"):
            out += [(f"{self.name}_suppression", f"{tag}-base", "{:+.2f}"),
                    (f"{self.name}_suppression_vs_control", f"{tag}-ctl", "{:+.2f}")]
        if self.effect in ("induce", "both"):
            out += [(f"{self.name}_induction", f"{tag}+base", "{:+.2f}"),
                    (f"{self.name}_induction_vs_control", f"{tag}+ctl", "{:+.2f}")]
        return tuple(out)

    @property
    def cost_display(self) -> tuple[tuple[str, str, str], ...]:
        return ((f"cost_ce[{self.name}]", f"{self.short or self.name[:4]} dCE", "{:+.3f}"),)

    def headline(self, row: dict, rule: dict) -> str | None:
        parts = []
        for what, col, pset in (("lowers harmful refusal by", "suppression", "bypass"),
                                ("raises harmless refusal by", "induction", "induce")):
            v, c = row.get(f"{self.name}_{col}"), row.get(f"{self.name}_{col}_vs_control")
            if self.effect in (pset, "both") and v is not None and not _nan(v):
                parts.append(f"{what} {fmt_num(v)} ({fmt_num(c, '{:+.2f}')} beyond its random control)")
        if not parts:
            return None
        return f"{(self.label or self.name).capitalize()} ({row.get(self.name + '_setting')}) " + " and ".join(parts) + "."

    def cost_setting(self, rule: dict) -> tuple[str, float | None]:
        return "alpha", None

    @property
    def report_columns(self) -> tuple[str, ...]:
        """Columns of its report section's table of pooled arms (those present)."""
        return ("model", *self.arm_keys, "layer", "coefficient", "alpha", "direction_layer", "direction_position",
                "control", "control_draw", "prompt_set", "rate", "ci_low", "ci_high", "n_prompts")

    def report_mask(self, a, summary_row):
        """Which of one model's pooled arms `a` the steering table shows (default: all of this operator's)."""
        return a["mode"] == self.name


def _key_text(v) -> str:
    """An arm key's value as text: whole floats without a fraction (a layer stored as float beside other
    operators' NaN prints as '1', not '1.0'), other values as str()."""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def fmt_num(v, fmt: str = "{:.2f}") -> str:
    """A number as the report prints it: '?' for None / NaN."""
    return "?" if v is None or _nan(v) else fmt.format(v)


def has_value(row, key: str) -> bool:
    """Whether row[key] is set (not None, not NaN)."""
    v = row.get(key)
    return v is not None and not _nan(v)


def _nan(x) -> bool:
    try:
        return bool(np.isnan(x))
    except TypeError:
        return False


SETTING_KEYS = ("layer", "coefficient", "alpha", "direction_layer", "direction_position")


def setting_of(a, op: Operator) -> dict | None:
    """The first (sorted) non-control setting of operator `op` in pooled arms `a`: {arm key: value}
    over the pooled arm keys other than control, control_draw and prompt_set; None when unmeasured."""
    keys = [k for k in (*SETTING_KEYS, *getattr(op, "arm_keys", ())) if k in a.columns]
    mine = a[(a["mode"] == op.name) & ~a["control"].astype(bool)]
    if mine.empty:
        return None
    first = mine.sort_values(keys, kind="stable").iloc[0]
    return {k: first[k] for k in keys}


def setting_text(a, op: Operator, setting: dict | None) -> str | None:
    """'scale=0.0': the keys of `setting` that tell this operator's arms in `a` apart (its `arm_keys` and the
    settings that vary among its arms)."""
    if setting is None:
        return None
    mine = a[a["mode"] == op.name]
    own = getattr(op, "arm_keys", ())
    shown = [k for k in setting if k in own or mine[k].nunique() > 1]
    return ", ".join(f"{k}={setting[k]}" for k in shown) or "its one setting"


def effect_columns(a, op: Operator, setting: dict | None) -> dict:
    """`{name}_setting` and, per `op.effect`, `{name}_harmful_refusal`, `{name}_suppression` (baseline harmful
    refusal minus the arm's), `{name}_suppression_vs_control` (the controls' mean rate minus the arm's), and
    `{name}_harmless_refusal`, `{name}_induction`, `{name}_induction_vs_control` (arm minus controls' mean),
    from one model's pooled arms `a` at `setting` (NaN when unmeasured)."""
    nan = float("nan")
    out: dict = {f"{op.name}_setting": setting_text(a, op, setting)}

    def rate(pset: str, control: bool) -> float:
        if setting is None:
            return nan
        sel = a[(a["mode"] == op.name) & (a["control"].astype(bool) == control) & (a["prompt_set"] == pset)]
        for k, v in setting.items():
            sel = sel[np.isclose(sel[k], v)] if isinstance(v, float) else sel[sel[k] == v]
        return float(sel["rate"].mean()) if len(sel) else nan

    def base(pset: str) -> float:
        sel = a[(a["mode"] == "baseline") & (a["prompt_set"] == pset)]
        return float(sel["rate"].iloc[0]) if len(sel) else nan

    if op.effect in ("bypass", "both"):
        r, c = rate("harmful", False), rate("harmful", True)
        out |= {f"{op.name}_harmful_refusal": r, f"{op.name}_suppression": base("harmful") - r,
                f"{op.name}_suppression_vs_control": c - r}
    if op.effect in ("induce", "both"):
        r, c = rate("harmless", False), rate("harmless", True)
        out |= {f"{op.name}_harmless_refusal": r, f"{op.name}_induction": r - base("harmless"),
                f"{op.name}_induction_vs_control": r - c}
    return out


# -- the registry ------------------------------------------------------------------------------------


class Registry:
    """Registered operators, iterated in `order` (then name)."""

    def __init__(self):
        self._ops: dict[str, Operator] = {}
        self._listeners: list[Callable[[], None]] = []

    def __iter__(self) -> Iterator[Operator]:
        return iter(sorted(self._ops.values(), key=lambda op: (op.order, op.name)))

    def __len__(self) -> int:
        return len(self._ops)

    def __contains__(self, name) -> bool:
        return name in self._ops

    def __getitem__(self, name: str) -> Operator:
        return self._ops[name]

    def names(self) -> list[str]:
        return [op.name for op in self]

    def by_apply_order(self) -> list[Operator]:
        return sorted(self._ops.values(), key=lambda op: (op.rank, op.order, op.name))

    def by_report_order(self) -> list[Operator]:
        return sorted(self._ops.values(), key=lambda op: (op.report_rank, op.order, op.name))

    def modes(self) -> list[str]:
        """Every arm mode operators declare: their names, then their weight arms (OPS order)."""
        return [op.name for op in self] + [op.weight_arm for op in self if op.weight_arm]

    def _changed(self) -> None:
        for fn in list(self._listeners):
            fn()


OPS = Registry()


def register(cls: type[Operator]) -> type[Operator]:
    """Class decorator: register an Operator subclass (one instance). ValueError on a duplicate name."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"operator {cls.__name__} needs a `name` (an identifier), got {name!r}")
    if name in OPS._ops:
        raise ValueError(f"operator {name!r} is already registered ({type(OPS._ops[name]).__module__})")
    if name in ("baseline", "controls", "position", "batch_size"):
        raise ValueError(f"operator name {name!r} is reserved (a steer setting or the baseline arm)")
    types = getattr(cls, "column_types", {})
    if types:   # its result columns' Arrow types (a column null in one file, set in another: one schema)
        from refusal_ray.store import declare_column_types

        declare_column_types(types, f"operator {name!r}")
    OPS._ops[name] = cls()
    OPS._changed()
    return cls


def unregister(name: str) -> None:
    """Remove an operator (tests). KeyError naming it when it is not registered."""
    if name not in OPS._ops:
        raise KeyError(f"operator {name!r} is not registered")
    del OPS._ops[name]
    OPS._changed()


def get(name: str) -> Operator:
    """The registered operator `name`. KeyError naming the known ones."""
    try:
        return OPS._ops[name]
    except KeyError:
        raise KeyError(f"unknown operator {name!r} (known: {', '.join(OPS.names())})") from None


def on_change(fn: Callable[[], None]) -> None:
    """Call fn() after every register / unregister."""
    OPS._listeners.append(fn)
