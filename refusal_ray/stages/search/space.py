"""Stage `search`, the search space (torch-free): heretic's layer-weight kernel per component and the fractional
direction index, sampled from an Optuna trial, and the per-layer ablation weights they give.

Source: p-e-w/heretic, `src/heretic/main.py` (the objective's `suggest_*` calls: names, ranges, min_weight as a
fraction of max_weight) and `src/heretic/model.py` (`abliterate`: the kernel and the direction interpolation).

Kernel of one component c (attn_out or mlp_out) at layer l, with p = max_weight_position, D = min_weight_distance:

    d = |l - p|;   w_c(l) = 0 when d > D,   else  max_weight + (d / D) (min_weight - max_weight)

Direction: r = normalise(lerp(u[floor(f)], u[floor(f) + 1], f - floor(f))), u[i] the unit difference-of-means
direction at resid_pre of layer i (`direction_scope: global`), or u[l] at layer l (`per_layer`). Heretic indexes its
directions from the embeddings (its index i is our resid_pre[i + 1]): our `direction_index` f is heretic's f + 1.
The edit is directional ablation of the component's output, x <- x - w_c(l) (x . r) r, which equals heretic's
weight orthogonalisation of o_proj / down_proj (W <- W - w r r^T W) on every input.
"""

from __future__ import annotations

import math

import numpy as np

COMPONENTS = ("attn_out", "mlp_out", "resid_pre")   # heretic: the first two
KERNEL = ("max_weight", "max_weight_position", "min_weight", "min_weight_distance")


def bounds(space: dict, n_layers: int) -> dict[str, tuple[float, float]]:
    """{param name: (low, high)} of the float params, in layers where the range is given as a fraction of the last
    layer index (direction_index, max_weight_position, min_weight_distance's high end; heretic's ranges)."""
    last = n_layers - 1
    out = {"direction_index": (space["direction_index"][0] * last, space["direction_index"][1] * last)}
    for c in space["components"]:
        out[f"{c}.max_weight"] = tuple(space["max_weight"])
        out[f"{c}.max_weight_position"] = (space["max_weight_position"][0] * last,
                                           space["max_weight_position"][1] * last)
        out[f"{c}.min_weight"] = tuple(space["min_weight"])                       # a fraction of max_weight
        out[f"{c}.min_weight_distance"] = (space["min_weight_distance"][0],
                                           max(space["min_weight_distance"][1] * last, space["min_weight_distance"][0]))
    return out


def suggest(trial, space: dict, n_layers: int) -> dict:
    """The trial's params (Optuna `trial.suggest_*`, heretic's order: direction_scope when more than one is allowed,
    direction_index, then per component max_weight, max_weight_position, min_weight, min_weight_distance)."""
    params = {}
    scopes = space["direction_scope"]
    params["direction_scope"] = (trial.suggest_categorical("direction_scope", list(scopes)) if len(scopes) > 1
                                 else scopes[0])
    for name, (lo, hi) in bounds(space, n_layers).items():
        params[name] = trial.suggest_float(name, lo, hi) if hi > lo else lo
    return params


def kernel_weights(params: dict, component: str, n_layers: int) -> np.ndarray:
    """[n_layers] ablation weights of one component (heretic's kernel; min_weight given as a fraction of
    max_weight, as heretic samples it). A layer beyond min_weight_distance of the peak gets 0."""
    top = params[f"{component}.max_weight"]
    low = params[f"{component}.min_weight"] * top
    peak, reach = params[f"{component}.max_weight_position"], params[f"{component}.min_weight_distance"]
    out = np.zeros(n_layers)
    for layer in range(n_layers):
        d = abs(layer - peak)
        if d <= reach:
            out[layer] = top + (d / reach) * (low - top) if reach > 0 else top
    return out


def interpolated(directions: dict[int, np.ndarray], index: float) -> np.ndarray:
    """[d_model] unit vector: the normalised lerp of the unit directions at layers floor(index) and floor(index)+1
    (the last layer's alone at the top). Raises KeyError naming a missing layer."""
    frac, base = math.modf(index)
    lo = int(base)
    hi = min(lo + 1, max(directions))
    a, b = _unit(directions[lo]), _unit(directions[hi])
    v = a + frac * (b - a)
    return _unit(v)


def layer_directions(params: dict, directions: dict[int, np.ndarray], n_layers: int) -> np.ndarray:
    """[n_layers, d_model] the unit direction ablated at each layer: the interpolated one everywhere (global scope)
    or each layer's own (per_layer)."""
    if params.get("direction_scope", "global") == "per_layer":
        return np.stack([_unit(directions[layer]) for layer in range(n_layers)])
    r = interpolated(directions, params["direction_index"])
    return np.repeat(r[None], n_layers, 0)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


# -- warm start: the paper's point in the space ----------------------------------------------------------------
PLAIN = ("attn_out", "mlp_out", "resid_pre")   # Arditi's directional ablation edits all three, at every layer


def plain_ablation_problem(space: dict) -> str | None:
    """Why `space` (fractions, no model yet) cannot hold plain directional ablation, or None: it needs all three
    components, the global scope, weight 1 inside max_weight's range, min_weight's range reaching 1 (edge weight
    = peak), and a peak position p (fraction of the last layer) whose kernel can reach both ends,
    max(p, 1 - p) <= min_weight_distance's high end (a model with few layers may still fit through the low end in
    layers; `plain_ablation_points` checks that exactly)."""
    missing = [c for c in PLAIN if c not in space["components"]]
    if missing:
        return f"space.components lacks {', '.join(missing)} (plain ablation edits attn_out, mlp_out and resid_pre)"
    if "global" not in space["direction_scope"]:
        return "space.direction_scope lacks 'global' (plain ablation uses one direction at every layer)"
    lo, hi = space["max_weight"]
    if not lo <= 1.0 <= hi:
        return f"space.max_weight [{lo}, {hi}] does not contain weight 1"
    if space["min_weight"][1] < 1.0:
        return f"space.min_weight's high end {space['min_weight'][1]} is below 1 (the kernel's edge must equal its peak)"
    p_lo, p_hi = space["max_weight_position"]
    p = min(max(0.5, p_lo), p_hi)
    if max(p, 1 - p) > space["min_weight_distance"][1]:
        return (f"no kernel of the space reaches every layer: a peak in max_weight_position [{p_lo}, {p_hi}] needs "
                f"min_weight_distance up to {max(p, 1 - p):g} of the last layer index, the space stops at "
                f"{space['min_weight_distance'][1]:g}")
    return None


def plain_ablation_points(space: dict, n_layers: int) -> list[tuple[dict, dict]]:
    """Plain directional ablation (Arditi et al. 2024 Sec. 2.4: weight 1 at resid_pre, attn_out and mlp_out of
    every layer, resid_pre of layer 0 being what the embeddings wrote) of each candidate direction, as points of the
    space: one per integer layer in direction_index's range (Arditi's candidates, the unit difference-of-means at
    that layer's resid_pre; the range's midpoint when it holds no integer). Each point: max_weight 1, min_weight 1
    (a fraction of max_weight), the peak at the middle layer clipped into max_weight_position's range, and a
    half-width reaching both ends. Returns [(fixed params for `study.enqueue_trial`: only the params the space
    draws, the params `suggest` will return)]. Raises ValueError naming why the space cannot hold the point."""
    problem = plain_ablation_problem(space)
    if problem:
        raise ValueError(problem)
    b = bounds(space, n_layers)
    last = n_layers - 1
    lo, hi = b["direction_index"]
    indices = [float(i) for i in range(math.ceil(lo), math.floor(hi) + 1)] or [(lo + hi) / 2]
    out = []
    for index in indices:
        full = {"direction_scope": "global", "direction_index": index}
        for c in space["components"]:
            p_lo, p_hi = b[f"{c}.max_weight_position"]
            peak = min(max(last / 2, p_lo), p_hi)
            d_lo, d_hi = b[f"{c}.min_weight_distance"]
            reach = max(peak, last - peak, d_lo)
            if reach > d_hi:
                raise ValueError(f"no kernel of the space reaches every one of {n_layers} layers: a peak at layer "
                                 f"{peak:g} needs min_weight_distance {reach:g}, the space stops at {d_hi:g}")
            full |= {f"{c}.max_weight": 1.0, f"{c}.max_weight_position": peak, f"{c}.min_weight": 1.0,
                     f"{c}.min_weight_distance": reach}
        drawn = {"direction_scope": "global"} if len(space["direction_scope"]) > 1 else {}
        suggested = {"direction_scope": "global"}
        for name, (p_lo, p_hi) in b.items():   # as `suggest` draws them: a float param only where hi > lo
            if p_hi > p_lo:
                drawn[name] = suggested[name] = full[name]
            else:
                suggested[name] = p_lo
        for c in PLAIN:
            w = kernel_weights(suggested, c, n_layers)
            if not np.array_equal(w, np.ones(n_layers)):
                raise ValueError(f"the space's fixed values give {c} weights {w.tolist()}, not 1 at every layer")
        out.append((drawn, suggested))
    return out
