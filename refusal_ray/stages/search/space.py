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
