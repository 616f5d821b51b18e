"""ACE, affine concept editing: set the activation's projection on the refusal direction to the harmless
mean's, plus alpha (Marshall, Scherlis & Belrose 2024, "Refusal in LLMs is an Affine Function",
arXiv 2411.09003, Sec. 3; code: EleutherAI/steering-llama3, steering/steer.py):

    x <- x - (x . r) r + (mu_harmless[L] . r) r + alpha r        x: [batch, pos, d_model], r unit

at resid_pre[L] of the arm's layers, every position (prompt and generated tokens). r = v / |v|, v the
difference of means at the arm's direction (`direction_layer`: 'selected', 'best' or a layer, as
directional ablation); mu_harmless[L] the harmless class's train mean (the directions table's
`mean_harmless`) at the same site (resid_pre) and at the direction's position, used as the reference at
every token position. `reference: per_layer` (default) reads the mean at each edited layer L (so an
edit at every layer keeps each layer's activations on that layer's harmless affine hyperplane);
`reference: direction_layer` uses the direction's own (layer, position) mean at every edited layer.
alpha = 0 sets every activation's projection on r to the harmless reference ("set to harmless",
bypass); alpha = |v| moves it to the harmful mean's at the direction layer (induce). `alpha_units:
direction` multiplies alpha by |v| (the paper's alpha r with r the raw difference: alpha = 1 is the
harmful mean); `unit` (default) takes alpha in activation units along r.

Where we depart from the paper's code: its ACE runs LEACE's orthogonal eraser (`--leace orth`), whose
reference point is the pooled mean of both classes' activations (the midpoint for balanced classes),
and adds mult * v; the paper's text, and this operator, take the harmless mean as the reference. Its
edits sit at one decoder layer's output (`--layer 15`) or at every attention and MLP output with a
vector fitted there (`--layer all --residual`); here they sit at resid_pre, where the directions are
fitted, at the layers listed (one direction for all of them, as directional ablation).

Random control: a Gaussian direction r' of the same norm as v (seeded by the control cell's id, as
every control), with its own reference mu_harmless[L] . r' and the same alpha (scaled by |v| in
`direction` units): the same affine edit along a random direction.

A store whose directions were fitted before the table stored the class means skips ACE cells
(`MEANS_MISSING`): rerun stage directions (`--fresh`, or a new out dir).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from refusal_ray.ops.base import (SELECTED_MISSING, LayerList, Operator, Strict, check_layers, direction_of,
                                  effect_columns, layer_list, register, setting_of)

MEANS_MISSING = ("this store's directions were fitted before the directions table stored the per-class means "
                 "(mean_harmful / mean_harmless) that ACE's reference needs; rerun stage directions "
                 "(`--fresh`, or a new out dir)")
SITE = "resid_pre"


class AceArm(Strict):
    """Affine concept editing x <- x - (x . r) r + (mu_harmless . r) r + alpha r at resid_pre of `layers`."""

    alphas: list[float] = Field([0.0], min_length=1, description=(
        "Offsets alpha of the projection from the harmless reference (a sweep axis; 0 sets every activation's "
        "projection to the harmless mean's: bypass; about |v|, or 1 in `direction` units: the harmful mean's)."))
    layers: LayerList = Field("all", description="Layers whose resid_pre is edited ('all' or a list).")
    direction_layer: Literal["selected", "best"] | int = Field(
        "selected", description="Direction r: 'selected' (stage select's choice for the seed, layer and position), "
                                "'best' (highest separation at steer.position) or a layer.")
    direction_position: int | None = Field(None, lt=0, description="Position of an explicit direction_layer "
                                                                   "(None: steer.position).")
    reference: Literal["per_layer", "direction_layer"] = Field(
        "per_layer", description="Harmless mean the reference projection is read from: each edited layer's "
                                 "('per_layer') or the direction's layer's at every edited layer; always at the "
                                 "direction's position, and used at every token position.")
    alpha_units: Literal["unit", "direction"] = Field(
        "unit", description="'unit': alpha in activation units along the unit direction; 'direction': alpha "
                            "times |v| (the paper's alpha r with r the raw difference of means).")


@dataclass(frozen=True)
class AceResolved:
    """One ACE cell's tensors.

    layer, position: the direction's (resid_pre) layer and position.
    v: the vector used [d_model] float32 (the difference of means, or the control's random vector).
    u: v / |v| [d_model] float32.
    targets: {edited layer: target projection on u = reference + alpha * scale}.
    references: {edited layer: mu_harmless[L or direction layer, position] . u} (float64 dot products).
    reference_projection: mu_harmless[direction layer, position] . u.
    """

    layer: int
    position: int
    v: np.ndarray
    u: np.ndarray
    targets: dict
    references: dict
    reference_projection: float


def has_means(row: dict | None) -> bool:
    """Whether a stored direction row carries both class means (not on a store written before the columns
    existed: the key is absent, or None / NaN where other files of the table have it)."""
    if row is None:
        return False
    for key in ("mean_harmful", "mean_harmless"):
        m = row.get(key)
        if m is None or isinstance(m, float) or len(m) == 0:
            return False
    return True


class AceEdit:
    """The ACE edit of the rows `idx` of a batch at one site: x[b] <- x[b] + (t[b] - x[b] . u[b]) u[b], which
    equals x - (x . u) u + t u (t = the reference plus alpha), computed in float32 (float64 inputs stay
    float64) and cast back to x's dtype. Other rows are returned bit-identical (only `idx` is written).
    When every row of the chunk is edited (`dense`, e.g. capability's broadcast edits: one row, any batch),
    u [n, d_model] and t [n] broadcast over the batch instead.

    idx: [k] long row indices; u: [k, d_model] unit directions; t: [k] target projections.
    """

    def __init__(self, idx, u, t, dense: bool):
        self.idx, self.u, self.t, self.dense = idx, u, t, dense

    def on_device(self, device, moved: dict) -> None:
        for name in ("idx", "u", "t"):
            t = getattr(self, name)
            key = id(t)
            if key not in moved:
                moved[key] = t.to(device)
            setattr(self, name, moved[key])

    def __call__(self, x):
        import torch

        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        u = self.u.to(x.device, work)
        t = self.t.to(x.device, work)
        if self.dense:
            xs = x.to(work)
            proj = torch.einsum("bpd,bd->bp", xs, u.expand(x.shape[0], -1) if u.shape[0] == 1 else u)
            out = xs + (t[:, None] - proj)[..., None] * u[:, None, :]
            return out.to(x.dtype)
        idx = self.idx.to(x.device)
        xs = x.index_select(0, idx).to(work)                 # [k, pos, d_model]
        proj = torch.einsum("kpd,kd->kp", xs, u)
        edited = xs + (t[:, None] - proj)[..., None] * u[:, None, :]
        return x.index_copy(0, idx, edited.to(x.dtype))


@register
class Ace(Operator):
    name = "ace"
    column_types = {"reference_projection": "float64"}
    label = "affine concept editing (ACE)"
    order = 50
    config = AceArm
    field_description = ("ACE arms: set the projection on the refusal direction to the harmless mean's plus alpha "
                         "(Marshall et al. 2024; None: none).")
    effect = "both"
    short = "ace"
    color = "tab:purple"

    # -- spec and plan ---------------------------------------------------------------------------------
    def arms(self, spec, block, n_layers):
        extra = {} if block.direction_position is None else {"direction_position": block.direction_position}
        if block.direction_layer == "selected" and spec.stages.select is not None:
            extra["select"] = spec.stages.select.model_dump(mode="json", exclude={"batch_size"})
        return [{"mode": self.name, "layer": None, "coefficient": 0.0, "alpha": float(a),
                 "direction_layer": block.direction_layer, "ace_layers": layer_list(block.layers, n_layers),
                 "reference": block.reference, "alpha_units": block.alpha_units, **extra} for a in block.alphas]

    def describe(self, spec, block):
        return [f"ACE: alphas {block.alphas} (alpha units: {block.alpha_units}), direction {block.direction_layer}, "
                f"resid_pre at layers {block.layers}, reference: harmless mean ({block.reference})"]

    def validate(self, spec, block) -> None:
        if block is None:
            return
        from refusal_ray.ops.base import check_direction_fields

        check_direction_fields(spec, block, "ace")

    def check(self, plan, block) -> None:
        if block is None:
            return
        check_layers(plan, "stages.steer.ace.layers", block.layers)
        if isinstance(block.direction_layer, int):
            check_layers(plan, "stages.steer.ace.direction_layer", [block.direction_layer])

    # -- run time --------------------------------------------------------------------------------------
    def inputs(self, settings, d):
        """{(layer, position): mean_harmless [d_model] float64} of the seed's resid_pre direction rows, or
        None when any row lacks the means (a store from before they were stored)."""
        if not d.rows or not all(has_means(r) for r in d.rows.values()):
            return None
        return {key: np.asarray(r["mean_harmless"], np.float64) for key, r in d.rows.items()}

    def resolve(self, cell, d):
        p = cell.params
        if p["direction_layer"] == "selected" and d.selected is None:
            raise LookupError(SELECTED_MISSING)
        means = d.ops.get(self.name) if self.name in d.ops else self.inputs(d.settings, d)
        if means is None:
            raise LookupError(MEANS_MISSING)
        layer, position, v = direction_of(cell, d)
        norm = float(np.linalg.norm(np.asarray(v, np.float64)))
        if not norm > 0:
            raise LookupError(f"the direction at layer {layer}, position {position} has zero norm: ACE needs a "
                              f"direction to set the projection on")
        u = (np.asarray(v, np.float64) / norm).astype(np.float32)
        u64 = u.astype(np.float64)
        scale = norm if p["alpha_units"] == "direction" else 1.0
        refs, targets = {}, {}
        for L in p["ace_layers"]:
            key = (int(L), position) if p["reference"] == "per_layer" else (layer, position)
            if key not in means:
                raise LookupError(f"no harmless mean at resid_pre layer {key[0]}, position {key[1]} in this "
                                  f"seed's directions")
            refs[int(L)] = float(means[key] @ u64)
            targets[int(L)] = refs[int(L)] + float(p["alpha"]) * scale
        if (layer, position) not in means:
            raise LookupError(f"no harmless mean at resid_pre layer {layer}, position {position}")
        return AceResolved(layer, position, np.asarray(v, np.float32), u, targets, refs,
                           float(means[(layer, position)] @ u64))

    def edits(self, rows, chunk, d):
        """Per edited layer one `AceEdit` at resid_pre with the rows of this operator that edit it."""
        import torch

        per: dict[int, list] = {}
        for i, _cell, r in rows:
            for L, t in r.targets.items():
                per.setdefault(L, []).append((i, r.u, t))
        out = {}
        for L, items in per.items():
            idx = torch.tensor([i for i, _, _ in items], dtype=torch.long)
            u = torch.from_numpy(np.stack([u for _, u, _ in items]))
            t = torch.tensor([t for _, _, t in items], dtype=torch.float64)
            dense = len(items) == chunk.n and sorted(i for i, _, _ in items) == list(range(chunk.n))
            if dense:   # rows in index order, so u[b] is row b's
                order = torch.argsort(idx)
                idx, u, t = idx[order], u[order], t[order]
            out[(SITE, L)] = AceEdit(idx, u, t, dense)
        return out

    def columns(self, cell, resolved) -> dict:
        return {"direction_layer": resolved.layer, "direction_position": resolved.position,
                "vector_norm": float(np.linalg.norm(resolved.v)),
                "reference_projection": resolved.reference_projection}

    # -- summary ---------------------------------------------------------------------------------------
    def summary_columns(self, a, rule, block) -> dict:
        """Suppression (harmful prompts) at the alpha nearest 0 (the paper's "set to harmless"), induction
        (harmless prompts) at the largest alpha, each beside its random control (`effect_columns`)."""
        from types import SimpleNamespace

        mine = a[(a["mode"] == self.name) & ~a["control"].astype(bool)]
        if mine.empty:
            return effect_columns(a, self, None)
        base = setting_of(a, self)
        alphas = sorted(set(float(x) for x in mine["alpha"]))
        low = min(alphas, key=lambda x: (abs(x), x))
        high = max(alphas)
        bypass = effect_columns(a, SimpleNamespace(name=self.name, effect="bypass"), {**base, "alpha": low})
        induce = effect_columns(a, SimpleNamespace(name=self.name, effect="induce"), {**base, "alpha": high})
        setting = f"bypass: {bypass.pop(f'{self.name}_setting')}; induce: {induce.pop(f'{self.name}_setting')}"
        return {f"{self.name}_setting": setting, **bypass, **induce}
