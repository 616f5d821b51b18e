"""Subspace ablation: x <- x - alpha Q Q^T x at resid_pre, attn_out and mlp_out of its own ablation layers,
Q the orthonormal basis (QR in float64, linearly dependent directions dropped) of several difference-of-means
directions: `stages.steer.subspace.layers` (those layers' resid_pre directions at steer.position) or `top_k`
(stage select's top-k candidates that passed its filters, by its criterion). The Llama-3.2-1B study ablated
layers 7-10's span. Control: a random subspace of the same rank (a Gaussian [d_model, rank] matrix seeded
by the cell id, orthonormalised by QR: norm-free, only the projection matters). Weight twin:
`orthogonalized_subspace` (the basis projected out of the residual-writing weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import Field, model_validator

from refusal_ray.ops.base import (ABLATION_SITES, LayerList, Operator, Strict, cell_seed, check_layers, draw_id,
                                  fmt_num, layer_list, register)


class SubspaceArm(Strict):
    """Subspace ablation x <- x - alpha Q Q^T x at the ablation sites, Q the orthonormal basis (QR, float64)
    of several difference-of-means directions (the Llama-3.2-1B study: layers 7-10)."""

    layers: list[int] | None = Field(None, min_length=1, description="Stack these layers' resid_pre directions at "
                                                                      "steer.position.")
    top_k: int | None = Field(None, ge=1, description="Stack the top-k candidates of stage select (by its "
                                                      "criterion, among those that passed its filters).")
    ablation_layers: LayerList = Field("all", description="Layers ablated at ('all', as single-direction ablation).")
    alphas: list[float] = Field([1.0], min_length=1, description="Ablation strengths.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.layers is None) == (self.top_k is None):
            raise ValueError("give exactly one of 'layers' or 'top_k'")
        return self


def orthonormal_basis(vectors: list[np.ndarray], rtol: float | None = None) -> np.ndarray:
    """`refusal_ray.models.orthogonalize.span_basis` as float32 [rank, d_model]: dependent and zero
    vectors dropped, so a subspace arm's rank can be below its number of directions."""
    from refusal_ray.models.orthogonalize import RANK_RTOL, span_basis

    return np.ascontiguousarray(span_basis(vectors, RANK_RTOL if rtol is None else rtol), dtype=np.float32)


def control_subspace(cell_id: str, rank: int, d_model: int) -> np.ndarray:
    """Random subspace of `rank` dimensions, seeded by the cell id: a standard Gaussian
    [d_model, rank] matrix orthonormalised by QR in float64. [rank, d_model] float32, orthonormal rows.
    (For rank 1 it spans `control_direction`'s direction: the same draws.)"""
    g = np.random.default_rng(cell_seed(cell_id)).standard_normal((d_model, rank))
    q, _ = np.linalg.qr(g)
    return np.ascontiguousarray(q.T, dtype=np.float32)


def subspace_name(directions: list[tuple[int, int]]) -> str:
    """'L7,L8,L9,L10/p-1' (one position) or 'L3/p-1,L2/p-2' (several), in stacking order."""
    positions = {p for _, p in directions}
    if len(positions) == 1:
        return ",".join(f"L{layer}" for layer, _ in directions) + f"/p{positions.pop()}"
    return ",".join(f"L{layer}/p{p}" for layer, p in directions)


@dataclass
class SubspaceInputs:
    """The directions one seed's subspace arms stack (in order), or why there are none.

    directions: [(layer, position)] of each stacked resid_pre direction
    vectors: the matching differences of means, each [d_model] float32
    missing: why this seed has no subspace (its subspace cells are skipped with this reason)
    """

    directions: list[tuple[int, int]]
    vectors: list[np.ndarray]
    missing: str | None = None

    @property
    def name(self) -> str:
        return subspace_name(self.directions)


def stacked_directions(spec) -> dict:
    """What a subspace arm's params say about its directions: {"subspace": {"layers": [...]} or
    {"top_k": k}}, plus stage select's settings (batch size aside) when it stacks select's top k."""
    sub = spec.stages.steer.subspace
    out = {"subspace": {"layers": list(sub.layers)} if sub.layers is not None else {"top_k": sub.top_k}}
    if sub.top_k is not None and spec.stages.select is not None:
        out["select"] = spec.stages.select.model_dump(mode="json", exclude={"batch_size"})
    return out


@register
class Subspace(Operator):
    name = "subspace"
    label = "subspace ablation"
    order = 30
    config = SubspaceArm
    field_description = "Subspace ablation arms (None: none)."
    effect = "bypass"
    weight_arm = "orthogonalized_subspace"
    row_columns = ("subspace_rank",)
    arm_keys = ("subspace",)
    dump_when_none = True
    short = "sub"
    color = "tab:purple"
    capability_needs_block = True

    direction_key = "subspace"
    weight_color = "tab:olive"
    report_columns = ("model", "subspace", "alpha", "control", "prompt_set", "rate", "ci_low", "ci_high", "n_prompts")

    def arms(self, spec, block, n_layers):
        extra = {**stacked_directions(spec), "ablation_layers": layer_list(block.ablation_layers, n_layers)}
        return [{"mode": "subspace", "layer": None, "coefficient": 0.0, "alpha": float(a), "direction_layer": None,
                 **extra} for a in block.alphas]

    def weight_params(self, spec, block, n_layers) -> tuple[dict, dict]:
        twin = self.arms(spec, block.model_copy(update={"alphas": [1.0]}), n_layers)[0]
        return ({"mode": "orthogonalized_subspace", "layer": None, "coefficient": 0.0, "alpha": 1.0,
                 "direction_layer": None, **stacked_directions(spec)}, twin)

    def weight_partial(self, spec, block, n_layers):
        if block is not None and block.ablation_layers != "all" \
                and sorted(set(block.ablation_layers)) != list(range(n_layers)):
            return "stages.steer.subspace.ablation_layers", list(block.ablation_layers)
        return None

    def weight_tensor(self, cell, resolved) -> np.ndarray:
        return resolved[1]                      # [rank, d_model] orthonormal rows

    def describe(self, spec, block):
        what = (f"layers {block.layers} at p{spec.stages.steer.position}" if block.layers is not None
                else f"top {block.top_k} of stage select's passing candidates")
        return [f"subspace ablation: {what}, ablated at layers {block.ablation_layers}, alphas {block.alphas}"]

    def validate(self, spec, block) -> None:
        if block is not None and block.top_k is not None and spec.stages.select is None:
            raise ValueError("stages.steer.subspace.top_k needs a stages.select block (or give subspace.layers)")

    def check(self, plan, block) -> None:
        """Its layers exist in every model, and top_k is not more than the candidates stage select scores
        (filters can leave fewer: those seeds are skipped)."""
        from refusal_ray.errors import SpecError

        if block.layers is not None:
            check_layers(plan, "stages.steer.subspace.layers", block.layers)
        check_layers(plan, "stages.steer.subspace.ablation_layers", block.ablation_layers)
        select = plan.spec.stages.select
        if block.top_k is not None and select is not None:
            for mp in plan.models.values():
                layers = mp.n_layers if select.layers == "all" else len(select.layers)
                n = layers * len(mp.positions or [])
                if block.top_k > n:
                    raise SpecError(plan.spec_file, "stages.steer.subspace.top_k",
                                    f"{block.top_k} is more than the {n} candidates stage select scores for "
                                    f"model {mp.name!r} ({layers} layers x {len(mp.positions or [])} positions)")

    def inputs(self, settings, d) -> SubspaceInputs | None:
        """The directions a seed's subspace arms stack: `layers` at steer.position, or stage select's top_k
        candidates among those that passed its filters, best first by its criterion (`d.candidates`).
        None without a subspace block."""
        sub = (settings.get("steer") or {}).get("subspace")
        if not sub:
            return None
        if sub.get("layers") is not None:
            layers = [int(layer) for layer in sub["layers"]]
            return SubspaceInputs([(layer, d.position) for layer in layers], [d.vectors[layer] for layer in layers])
        k = int(sub["top_k"])
        passed = d.candidates or []
        if not passed:
            return SubspaceInputs([], [], f"no subspace for this seed: no candidate passed the selection filters "
                                          f"(stages.steer.subspace.top_k {k}; stages.select: loosen kl_max / "
                                          f"induce_min / max_layer_fraction)")
        if len(passed) < k:
            return SubspaceInputs([], [], f"stages.steer.subspace.top_k {k} asks for more candidates than passed "
                                          f"stage select's filters for this seed ({len(passed)} of "
                                          f"{d.n_candidates})")
        top = [(int(r["layer"]), int(r["position"])) for r in passed[:k]]
        return SubspaceInputs(top, [np.asarray(d.rows[key]["vector"], np.float32) for key in top])

    def resolve(self, cell, d) -> tuple[str, np.ndarray]:
        """(name of the stacked directions, orthonormal basis [rank, d_model] float32); control arms get a
        random subspace of the same rank. Raises LookupError when the seed has no subspace (top_k beyond the
        candidates that passed, nothing selected, every direction zero)."""
        sub = d.ops.get("subspace")
        if sub is None:
            layers = cell.params["subspace"].get("layers")
            if layers is None:
                raise LookupError("no subspace inputs for this seed (stage select's candidates were not given)")
            sub = SubspaceInputs([(int(layer), d.position) for layer in layers],
                                 [d.vectors[int(layer)] for layer in layers])
        if sub.missing is not None:
            raise LookupError(sub.missing)
        q = orthonormal_basis(sub.vectors)
        if q.shape[0] == 0:
            raise LookupError(f"subspace {sub.name} has rank 0: every stacked direction is zero")
        if cell.params["control"]:
            q = control_subspace(draw_id(cell, d), q.shape[0], q.shape[1])
        return sub.name, q

    def edits(self, rows, chunk, d):
        """One [n, k, d_model] basis tensor shared by every site (k the chunk's largest rank, lower ranks and
        other rows zero-padded); each site's strengths [n] are 0 on rows not ablated there."""
        import torch

        from refusal_ray.interventions import RowEdit

        if not rows:
            return {}
        n = chunk.n
        k = max(q.shape[0] for _, _, (_, q) in rows)
        basis = torch.zeros(n, k, chunk.d_model)
        beta: dict = {}
        for i, cell, (_, q) in rows:
            basis[i, :q.shape[0]] = torch.from_numpy(q)
            for layer in cell.params["ablation_layers"]:
                for kind in ABLATION_SITES:
                    beta.setdefault((kind, layer), torch.zeros(n))[i] = cell.params["alpha"]
        return {key: RowEdit(ablate_basis=basis, basis_alpha=b) for key, b in beta.items()}

    def columns(self, cell, resolved) -> dict:
        name, q = resolved
        return {"direction": name, "subspace_rank": int(q.shape[0])}

    # summary and report
    def arm_key_values(self, df) -> dict[str, list]:
        """`subspace`: a subspace arm's stacked directions ("L7,L8/p-1", its row's `direction`), "" elsewhere."""
        names = df["direction"] if "direction" in df.columns else [None] * len(df)
        return {"subspace": [str(n) if m == "subspace" and isinstance(n, str) else ""
                             for m, n in zip(df["mode"], names)]}

    def summary_columns(self, a, rule, block) -> dict:
        """The subspace most seeds ablated (ties: the name first in sort order), at alpha = control_margin's
        ablation_alpha if among the block's alphas (default: those measured), else the first of them.
        Baseline harmful refusal minus the subspace arm's, and the random same-rank control's minus it
        (several control draws: their mean rate)."""
        nan = float("nan")
        sub = a[(a["mode"] == "subspace") & ~a["control"].astype(bool)]
        alphas = [float(x) for x in ((block or {}).get("alphas") or sorted(set(sub["alpha"])))]
        want = float((rule.get("control_margin") or {}).get("ablation_alpha", 1.0))
        alpha = want if any(np.isclose(want, x) for x in alphas) else (alphas[0] if alphas else nan)
        out = {"subspace": None, "subspace_alpha": alpha, "subspace_harmful_refusal": nan,
               "subspace_suppression": nan, "subspace_suppression_vs_control": nan}
        if sub.empty:
            return out
        seeds = sub.groupby("subspace")["seeds"].max().reset_index().sort_values(["seeds", "subspace"],
                                                                                ascending=[False, True])
        name, k = str(seeds.iloc[0]["subspace"]), int(seeds.iloc[0]["seeds"])
        total = int(a[a["mode"] == "baseline"]["seeds"].max()) if (a["mode"] == "baseline").any() else k
        mine = a[(a["mode"] == "subspace") & (a["subspace"] == name)]
        b = a[(a["mode"] == "baseline") & (a["prompt_set"] == "harmful")]
        base = float(b["rate"].iloc[0]) if len(b) else nan
        r = mine[~mine["control"].astype(bool) & np.isclose(mine["alpha"], alpha) & (mine["prompt_set"] == "harmful")]
        rate = float(r["rate"].iloc[0]) if len(r) else nan
        ctl_rows = mine[mine["control"].astype(bool) & np.isclose(mine["alpha"], alpha)
                        & (mine["prompt_set"] == "harmful")]
        ctl = float(ctl_rows["rate"].mean()) if len(ctl_rows) else nan   # the draws' mean (one draw: it)
        return out | {"subspace": f"{name} ({k} of {total} seeds)", "subspace_harmful_refusal": rate,
                      "subspace_suppression": base - rate, "subspace_suppression_vs_control": ctl - rate}

    @property
    def display(self):
        return (("subspace", "subspace", "{}"), ("subspace_suppression", "sub-base", "{:+.2f}"),
                ("subspace_suppression_vs_control", "sub-ctl", "{:+.2f}"))

    @property
    def cost_display(self):
        return ()

    def headline(self, row, rule):
        v = row.get("subspace_suppression")
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return None
        return (f"Subspace ablation ({row.get('subspace')}) lowers harmful refusal by {fmt_num(v)} "
                f"({fmt_num(row.get('subspace_suppression_vs_control'), '{:+.2f}')}"
                f" beyond a random subspace of the same rank).")

    def cost_setting(self, rule):
        return "alpha", (rule.get("control_margin") or {}).get("ablation_alpha")
