"""Angular steering: rotate each activation in the plane of the refusal direction and a second axis
(Vu & Nguyen 2025, "Angular Steering: Behavior Control via Rotation in Activation Space", NeurIPS 2025,
Sec. 3; code: lone17/angular-steering, `_get_rotation_args` and the steering output hook,
pytorch_pure/extract_directions.py, vllm_angular_steering.py).

The plane: b1 = v / |v|, v the difference of means at the arm's direction (`direction_layer`: 'selected',
'best' or a layer, as directional ablation); b2 = the second axis orthogonalised against b1 (Gram-Schmidt,
as the paper does at run time) and normalised. The second axis is, as in the paper, a principal
component (`pca_component`, default 0) of the stacked per-layer candidate directions: every layer's
stored resid_pre direction at the direction's position, each scaled to unit norm (zero-norm directions,
e.g. layer 0 at a template token, dropped), centred, SVD in float64, with scikit-learn's sign rule (the
component's largest-magnitude entry positive). The steering rows store which axis was used (`axis`, e.g.
"pca0"), its explained variance ratio (`axis_evr`) and its cosine with b1 before orthogonalisation
(`axis_cos`).

The edit, with c1 = x . b1, c2 = x . b2 (per row and position; x: [batch, pos, d_model]):

    x <- x - c1 b1 - c2 b2 + n1 b1 + n2 b2

  rotation: target (the paper's):  (n1, n2) = |(c1, c2)| (cos theta, sin theta)
      i.e. x - P x + |P x| (cos theta b1 + sin theta b2), P = b1 b1^T + b2 b2^T: the in-plane component is
      turned TO the angle theta from b1 (0: all along the refusal direction, induce; 180: against it,
      bypass; 90: onto b2, the refusal component removed as directional ablation removes it). theta = 0 is
      not the identity here; an activation already at angle theta is left unchanged, and the edit is
      idempotent.
  rotation: relative:  (n1, n2) = R(theta) (c1, c2): the in-plane component turned BY theta (theta = 0 is
      the identity; the issue's "rotation by theta"). Applied at several sites of the residual stream, the
      rotations compound (each site turns what the last one left).

Both are norm-preserving (|x'| = |x|). `adaptive: true` (the paper's adaptive variant, its adaptive_mode 1)
edits only the (row, position) activations aligned with the direction, x . b1 > 0 (read at the site,
before the edit); the others are left bit-identical. theta is in degrees; thetas and adaptive are sweep
axes.

Sites (where we depart from the paper): its hooks edit the *outputs* of both norms of every decoder layer
(input_layernorm and post_attention_layernorm: the normalised inputs of attention and of the MLP), so the
residual stream itself is never edited, and the RMSNorm gain g has already been applied. The site table has
no norm-output site, so this operator edits the same norms' *inputs*: `blocks.{L}.hook_resid_pre` and
`blocks.{L}.hook_resid_mid` of `layers` (default every layer; `sites` can drop one). The residual stream is
edited (the rotation persists into later layers, and the norm's gain acts after it). The target rotation is
idempotent, so the sites' order does not matter for it. The direction b1 is our difference of means of raw
activations at resid_pre (the paper: of per-prompt normalised activations at the norms' inputs, b1 at its
max_sim / max_norm layer); one plane at every edited site, as the paper's config.

Random control: the same rotation (theta, rotation, adaptive, sites) in a random plane: two standard
Gaussian [d_model] vectors seeded by the control cell's id (`draw_id`), orthonormalised by QR in float64
(b1 = the first, b2 = the second). Rotations are norm-free, so no norm is matched. Its rows say
`axis: random`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from refusal_ray.ops.base import (LayerList, Operator, Strict, cell_seed, check_layers, direction_of, draw_id,
                                  effect_columns, layer_list, register)

SiteKind = Literal["resid_pre", "resid_mid"]
ZERO_RTOL = 1e-6     # a stacked direction at most this x the largest norm is dropped (zero-norm candidate)
PARALLEL_TOL = 1e-6  # the axis is refused when its part orthogonal to b1 is below this (unit vectors)


class AngularArm(Strict):
    """Angular steering: rotate the activation in the plane of the refusal direction b1 and a PCA axis b2."""

    thetas: list[float] = Field([0.0, 90.0, 180.0, 270.0], min_length=1, description=(
        "Angles in degrees (a sweep axis). rotation 'target': the angle from b1 the in-plane component is "
        "turned to (0 induce, 180 bypass, 90 the refusal component removed); 'relative': the angle it is "
        "turned by (0 is the identity)."))
    rotation: Literal["target", "relative"] = Field("target", description=(
        "'target' (the paper's: x - Px + |Px| (cos theta b1 + sin theta b2)) or 'relative' (the in-plane "
        "component rotated by theta)."))
    adaptive: list[bool] = Field([False], min_length=1, description=(
        "Sweep axis: false edits every activation; true (the paper's adaptive variant) only those with "
        "x . b1 > 0 at the site."))
    layers: LayerList = Field("all", description="Layers edited ('all', as the paper, or a list).")
    sites: list[SiteKind] = Field(["resid_pre", "resid_mid"], min_length=1, description=(
        "Sites edited at each layer: the inputs of the two norms the paper edits the outputs of."))
    direction_layer: Literal["selected", "best"] | int = Field(
        "selected", description="Direction b1: 'selected' (stage select's choice for the seed, layer and "
                                "position), 'best' (highest separation at steer.position) or a layer.")
    direction_position: int | None = Field(None, lt=0, description="Position of an explicit direction_layer "
                                                                   "(None: steer.position).")
    pca_component: int = Field(0, ge=0, description=(
        "Second axis: this principal component (0: the paper's) of every layer's unit resid_pre direction at "
        "b1's position."))

    @model_validator(mode="after")
    def _fields(self):
        if not all(np.isfinite(t) for t in self.thetas):
            raise ValueError("thetas must be finite angles in degrees")
        if len(set(self.thetas)) != len(self.thetas):
            raise ValueError("thetas has a repeated angle")
        if len(set(self.adaptive)) != len(self.adaptive):
            raise ValueError("adaptive lists a value twice (give [false], [true] or [false, true])")
        if len(set(self.sites)) != len(self.sites):
            raise ValueError("sites lists a site twice")
        if self.direction_position is not None and not isinstance(self.direction_layer, int):
            raise ValueError("direction_position needs an integer direction_layer (the selected and best "
                             "directions come with their own position)")
        return self


@dataclass(frozen=True)
class Plane:
    """One angular cell's plane and its provenance.

    b1, b2: orthonormal [d_model] float32 (float64 Gram-Schmidt, then cast).
    layer, position: the direction's (resid_pre) layer and position.
    vector_norm: |v| of the difference of means b1 came from.
    axis: "pca{k}" (the second axis used), or "random" (a control's plane).
    evr: the component's explained variance ratio (None for a control).
    cos: cosine of the PCA axis with b1 before orthogonalisation (None for a control).
    n_stacked: directions the PCA stacked (None for a control).
    """

    b1: np.ndarray
    b2: np.ndarray
    layer: int
    position: int
    vector_norm: float
    axis: str
    evr: float | None = None
    cos: float | None = None
    n_stacked: int | None = None


# -- the math (numpy: the plane; torch: the per-row edit) ------------------------------------------------


def stacked_directions(d, position: int) -> list[np.ndarray]:
    """Every layer's stored resid_pre direction at `position`, in layer order ([d_model] each): from
    `d.rows` (the stored rows), else `d.vectors` when `position` is steer.position (inputs built by hand)."""
    rows = {layer: r for (layer, p), r in (d.rows or {}).items() if p == position}
    if rows:
        return [np.asarray(rows[layer]["vector"], np.float64) for layer in sorted(rows)]
    if position == d.position:
        return [np.asarray(d.vectors[layer], np.float64) for layer in sorted(d.vectors)]
    return []


def pca_axis(vectors: list[np.ndarray], component: int) -> tuple[np.ndarray, float, int]:
    """(principal component `component` [d_model] float64 (unit), its explained variance ratio, rows used) of
    the directions scaled to unit norm (those at most ZERO_RTOL x the largest norm dropped), centred; SVD in
    float64, the sign rule of scikit-learn's PCA (largest-magnitude entry positive). Raises LookupError when
    fewer than component + 2 directions remain (a centred stack of n rows has n - 1 components)."""
    m = np.stack(vectors).astype(np.float64) if vectors else np.zeros((0, 0))
    norms = np.linalg.norm(m, axis=1) if len(m) else np.zeros(0)
    keep = norms > ZERO_RTOL * (norms.max() if len(norms) else 0.0)
    m = m[keep] / norms[keep, None]
    if m.shape[0] < component + 2:
        raise LookupError(f"the second axis pca{component} needs at least {component + 2} nonzero per-layer "
                          f"directions at this position; this seed has {m.shape[0]}")
    centred = m - m.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    var = s ** 2
    if var[component] <= 1e-12 * m.shape[0]:   # unit rows: the total variance is at most n
        raise LookupError(f"the second axis pca{component} has no variance (the stacked directions span fewer "
                          f"dimensions)")
    axis = vt[component]
    axis = axis * (1.0 if axis[np.argmax(np.abs(axis))] >= 0 else -1.0)
    return axis, float(var[component] / var.sum()), int(m.shape[0])


def orthonormal_plane(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(b1, b2) float64: b1 = first / |first|, b2 = second minus its b1 component, normalised (the paper's
    Gram-Schmidt). Raises LookupError when `second` is (nearly) parallel to `first`."""
    b1 = np.asarray(first, np.float64)
    b1 = b1 / np.linalg.norm(b1)
    s = np.asarray(second, np.float64)
    s = s / np.linalg.norm(s)
    b2 = s - (s @ b1) * b1
    if np.linalg.norm(b2) < PARALLEL_TOL:
        raise LookupError("the second axis is parallel to the direction: no plane")
    return b1, b2 / np.linalg.norm(b2)


def random_plane(cell_id: str, d_model: int) -> tuple[np.ndarray, np.ndarray]:
    """A random plane seeded by the cell id: a standard Gaussian [d_model, 2] matrix orthonormalised by QR in
    float64. (b1, b2) [d_model] float64."""
    g = np.random.default_rng(cell_seed(cell_id)).standard_normal((d_model, 2))
    q, _ = np.linalg.qr(g)
    return q[:, 0], q[:, 1]


def cos_sin(theta_deg: float) -> tuple[float, float]:
    """cos and sin of an angle in degrees, exact (0, +-1) at multiples of 90 degrees."""
    t = float(theta_deg) % 360.0
    exact = {0.0: (1.0, 0.0), 90.0: (0.0, 1.0), 180.0: (-1.0, 0.0), 270.0: (0.0, -1.0)}
    if t in exact:
        return exact[t]
    r = np.deg2rad(t)
    return float(np.cos(r)), float(np.sin(r))


def rotate(x, b1, b2, cos, sin, relative, adaptive, active):
    """Angular steering of each row b of x in its own plane.

    Args:
        x: [batch, pos, d_model] activations.
        b1, b2: [batch, d_model] orthonormal per row (any value on inactive rows).
        cos, sin: [batch] of each row's theta.
        relative: [batch] bool: rotate by theta (True) or to theta (False, the paper's target form).
        adaptive: [batch] bool: edit only positions with x . b1 > 0.
        active: [batch] bool: rows edited at this site; the others are returned bit-identical.
    Returns:
        x' [batch, pos, d_model], |x'| = |x| per (row, position) up to rounding, in x's dtype.
    """
    import torch

    c1 = torch.einsum("bpd,bd->bp", x, b1)                                    # [batch, pos]
    c2 = torch.einsum("bpd,bd->bp", x, b2)
    cs, sn, rel = cos[:, None], sin[:, None], relative[:, None]
    r = torch.sqrt(c1 * c1 + c2 * c2)
    n1 = torch.where(rel, c1 * cs - c2 * sn, r * cs)
    n2 = torch.where(rel, c1 * sn + c2 * cs, r * sn)
    out = x + (n1 - c1)[..., None] * b1[:, None, :] + (n2 - c2)[..., None] * b2[:, None, :]
    gate = active[:, None] & (~adaptive[:, None] | (c1 > 0))                 # [batch, pos]
    return torch.where(gate[..., None], out, x)


class RotationEdit:
    """The SiteEdit of one site: `rotate` with the chunk's shared planes b1, b2 [n, d_model] and per-row
    theta / flags [n]; `active` [n] marks the rows edited at this site."""

    def __init__(self, b1, b2, cos, sin, relative, adaptive, active):
        self.b1, self.b2, self.cos, self.sin = b1, b2, cos, sin
        self.relative, self.adaptive, self.active = relative, adaptive, active

    def on_device(self, device, moved: dict) -> None:
        for name in ("b1", "b2", "cos", "sin", "relative", "adaptive", "active"):
            t = getattr(self, name)
            if id(t) not in moved:
                moved[id(t)] = t.to(device)
            setattr(self, name, moved[id(t)])

    def __call__(self, x):
        def like(t):
            return t if (t.device == x.device and t.dtype == x.dtype) else t.to(x.device, x.dtype)

        def on(t):
            return t if t.device == x.device else t.to(x.device)

        return rotate(x, like(self.b1), like(self.b2), like(self.cos), like(self.sin), on(self.relative),
                      on(self.adaptive), on(self.active))


# -- the operator -----------------------------------------------------------------------------------------


def _nearest(thetas: list[float], target: float) -> float:
    """The angle of `thetas` closest to `target` on the circle (ties: the lower angle)."""
    return min(thetas, key=lambda t: (abs((t - target + 180.0) % 360.0 - 180.0), t))


def _float(v) -> float:
    return float("nan") if v is None else float(v)


def _missing(v) -> bool:
    try:
        return v is None or bool(np.isnan(v))
    except TypeError:
        return False


# the angles the summary reads: (bypass, induce) per rotation form
SUMMARY_THETAS = {"target": (180.0, 0.0), "relative": (180.0, 180.0)}


@register
class Angular(Operator):
    name = "angular"
    label = "angular steering"
    order = 40
    config = AngularArm
    field_description = ("Angular steering arms (Vu & Nguyen 2025): rotation in the plane of the refusal "
                         "direction and a PCA axis (None: none).")
    effect = "both"
    arm_keys = ("theta", "adaptive", "rotation")
    column_types = {"theta": "float64", "adaptive": "bool", "rotation": "string", "axis": "string",
                    "axis_evr": "float64", "axis_cos": "float64"}
    short = "ang"
    color = "tab:purple"

    # spec and plan
    def arms(self, spec, block, n_layers):
        extra = {} if block.direction_position is None else {"direction_position": block.direction_position}
        if block.direction_layer == "selected" and spec.stages.select is not None:
            extra["select"] = spec.stages.select.model_dump(mode="json", exclude={"batch_size"})
        base = {"mode": self.name, "layer": None, "coefficient": 0.0, "alpha": 0.0,
                "direction_layer": block.direction_layer, "rotation": block.rotation,
                "angular_layers": layer_list(block.layers, n_layers), "sites": list(block.sites),
                "pca_component": block.pca_component, **extra}
        return [{**base, "theta": float(t), "adaptive": bool(a)} for t in block.thetas for a in block.adaptive]

    def describe(self, spec, block):
        return [f"angular steering: thetas {block.thetas} ({block.rotation}), adaptive {block.adaptive}, "
                f"layers {block.layers} at {', '.join(block.sites)}, direction {block.direction_layer}, "
                f"second axis pca{block.pca_component}"]

    def validate(self, spec, block) -> None:
        if block is not None:   # (its own model validator already checks direction_position)
            from refusal_ray.ops.base import check_direction_fields

            check_direction_fields(spec, block, "angular")

    def check(self, plan, block) -> None:
        if block is None:
            return
        check_layers(plan, "stages.steer.angular.layers", block.layers)
        if isinstance(block.direction_layer, int):
            check_layers(plan, "stages.steer.angular.direction_layer", [block.direction_layer])
        if plan.models:   # PCA over a model's L per-layer directions has at most L components (fewer nonzero)
            from refusal_ray.errors import SpecError

            shallow = min(plan.models.values(), key=lambda mp: mp.n_layers)
            if block.pca_component >= shallow.n_layers:
                raise SpecError(plan.spec_file, "stages.steer.angular.pca_component",
                                f"{block.pca_component} is out of range: the PCA of model {shallow.name!r}'s "
                                f"{shallow.n_layers} per-layer directions has components 0..{shallow.n_layers - 1}")

    # run time
    def inputs(self, settings, d) -> dict:
        """A per-seed memo {(position, component): the PCA axis, or the LookupError it raised}."""
        return {}

    def resolve(self, cell, d) -> Plane:
        """The cell's plane: b1 from its direction, b2 its PCA axis (memoised per seed in `d.ops`); a control
        cell's random plane (seeded by `draw_id`). Raises LookupError (nothing selected, too few directions
        for the component, an axis parallel to b1)."""
        p = cell.params
        layer, position, v = direction_of(cell, d)
        norm = float(np.linalg.norm(v))
        if p["control"]:
            b1, b2 = random_plane(draw_id(cell, d), v.shape[0])
            return Plane(b1.astype(np.float32), b2.astype(np.float32), layer, position, norm, "random")
        if norm == 0.0:
            raise LookupError(f"the direction at L{layer}/p{position} is zero: no plane")
        k = int(p["pca_component"])
        memo = d.ops.get(self.name)
        if not isinstance(memo, dict):      # inputs built by hand: memoise here
            memo = d.ops[self.name] = {}
        if (position, k) not in memo:
            try:
                memo[(position, k)] = pca_axis(stacked_directions(d, position), k)
            except LookupError as e:
                memo[(position, k)] = e
        got = memo[(position, k)]
        if isinstance(got, LookupError):
            raise LookupError(str(got))
        axis, evr, n = got
        b1, b2 = orthonormal_plane(v, axis)
        return Plane(b1.astype(np.float32), b2.astype(np.float32), layer, position, norm, f"pca{k}", evr,
                     float(axis @ b1), n)

    def edits(self, rows, chunk, d):
        """One RotationEdit per (site, layer) the chunk's angular rows edit; planes and angles are per-row
        tensors shared by every site ([n, d_model], [n]); rows not edited at a site are inactive there."""
        import torch

        n, dm = chunk.n, chunk.d_model
        b1, b2 = torch.zeros(n, dm), torch.zeros(n, dm)
        cos, sin = torch.zeros(n), torch.zeros(n)
        relative = torch.zeros(n, dtype=torch.bool)
        adaptive = torch.zeros(n, dtype=torch.bool)
        active: dict = {}
        for i, cell, plane in rows:
            p = cell.params
            b1[i], b2[i] = torch.from_numpy(plane.b1), torch.from_numpy(plane.b2)
            cos[i], sin[i] = cos_sin(p["theta"])
            relative[i], adaptive[i] = p["rotation"] == "relative", bool(p["adaptive"])
            for layer in p["angular_layers"]:
                for kind in p["sites"]:
                    active.setdefault((kind, layer), torch.zeros(n, dtype=torch.bool))[i] = True
        return {key: RotationEdit(b1, b2, cos, sin, relative, adaptive, a) for key, a in active.items()}

    def columns(self, cell, resolved: Plane) -> dict:
        p = cell.params
        return {"direction_layer": resolved.layer, "direction_position": resolved.position,
                "vector_norm": resolved.vector_norm, "theta": float(p["theta"]), "adaptive": bool(p["adaptive"]),
                "rotation": p["rotation"], "axis": resolved.axis,
                # NaN, not None, on a control's rows: a file of control rows only must still store doubles
                "axis_evr": _float(resolved.evr), "axis_cos": _float(resolved.cos)}

    # summary and report
    def summary_columns(self, a, rule, block) -> dict:
        """Suppression (harmful) at the measured theta nearest 180 degrees and induction (harmless) at the one
        nearest 0 (target rotation; relative: both at the one nearest 180), each beside its control, at the
        first adaptive setting measured (false before true). `angular_setting` names both."""
        if "theta" not in a.columns:
            return effect_columns(a, self, None)
        mine = a[(a["mode"] == self.name) & ~a["control"].astype(bool)]
        if mine.empty:
            return effect_columns(a, self, None)
        rotation = str(mine["rotation"].iloc[0]) if "rotation" in mine.columns else "target"
        thetas = sorted({float(t) for t in mine["theta"] if str(t) != ""})
        keys = [k for k in ("direction_layer", "direction_position", *self.arm_keys) if k in a.columns]
        out: dict = {}
        names = []
        for part, target in zip(("bypass", "induce"), SUMMARY_THETAS.get(rotation, (180.0, 0.0))):
            theta = _nearest(thetas, target)
            sel = mine[[float(t) == theta for t in mine["theta"]]]
            first = sel.sort_values(keys, kind="stable").iloc[0]
            setting = {k: first[k] for k in keys if not _missing(first[k])}
            cols = effect_columns(a, self, setting)
            want = ("harmful_refusal", "suppression") if part == "bypass" else ("harmless_refusal", "induction")
            out |= {k: v for k, v in cols.items() if k.removeprefix(f"{self.name}_").startswith(want)}
            names.append(f"{part}: {cols[f'{self.name}_setting']}")
        out[f"{self.name}_setting"] = "; ".join(names)
        return out

    def cost_setting(self, rule):
        return "theta", None
