"""Stage `steer`: activation addition and directional ablation, each with a random control.

All arms x prompts of a batch of cells are rows of one `generate` call (chunked to
`batch_size` rows): the layer, coefficient, direction and control axes are per-row tensors
(see `refusal_ray.interventions`), so hundreds of arms do not mean hundreds of calls.

Arms (Arditi et al. 2024, Sec. 2.3-2.4):
  addition  x <- x + c * v at resid_pre[L], every position (prompt and generated tokens)
  ablation  x <- x - alpha (x . u) u at resid_pre, attn_out and mlp_out of the ablated layers
  subspace  x <- x - alpha Q Q^T x at the same sites of its own ablation layers, Q the orthonormal
            basis (QR in float64, linearly dependent directions dropped) of several directions:
            `stages.steer.subspace.layers` (those layers' resid_pre directions at steer.position)
            or `top_k` (stage select's top-k candidates that passed its filters, by its criterion)
  control   the same arm with a Gaussian direction of the same norm as v, seeded per cell; for a
            subspace arm a random subspace of the same rank (a Gaussian [d_model, rank] matrix
            seeded per cell, orthonormalised by QR: norm-free, only the projection matters)

Control draws (`controls: K`, K >= 2): each arm gets K control cells, draw j's params carrying
`control_draw: j` for j >= 1 (draw 0 is the cell of `controls: true`, id and rows unchanged), so every
draw is seeded by its own cell id, and a store measured with K draws reuses the draws it has. The K
cells are adjacent, so their rows share `generate` calls. Rows of draw j >= 1 carry `control_draw`;
a control row without it is draw 0.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from refusal_ray.data import PromptSet, encode
from refusal_ray.grid import Cell, layer_list
from refusal_ray.interventions import RowEdit, row_edits
from refusal_ray.judges import SubstringJudge, exact_match
from refusal_ray.models.chat import ChatOptions, generate, greedy_config
from refusal_ray.models.loading import LoadedModel
from refusal_ray.models.orthogonalize import RANK_RTOL, span_basis
from refusal_ray.stages.base import Stage, check_layers
from refusal_ray.stages.directions import best_layer, directions_key
from refusal_ray.stats import wilson

ABLATION_SITES = ("resid_pre", "attn_out", "mlp_out")
# arms whose edit is a subspace (stage capability's orthogonalized_subspace edits the weights instead of hooks)
SUBSPACE_MODES = ("subspace", "orthogonalized_subspace")


@dataclass(frozen=True)
class Row:
    """One generation row: an arm applied to one prompt."""

    cell: Cell
    prompt_set: str          # "harmful" | "harmless"
    index: int               # index into that prompt set


def _cell_seed(cell_id: str) -> int:
    return int(hashlib.sha256(cell_id.encode()).hexdigest()[:8], 16)


def control_direction(cell_id: str, like: np.ndarray) -> np.ndarray:
    """Gaussian direction with the norm of `like`, seeded by the cell id. [d_model] float32."""
    g = np.random.default_rng(_cell_seed(cell_id)).standard_normal(like.shape[0])
    norm = float(np.linalg.norm(like))
    return (g / np.linalg.norm(g) * norm).astype(np.float32)


def orthonormal_basis(vectors: list[np.ndarray], rtol: float = RANK_RTOL) -> np.ndarray:
    """`refusal_ray.models.orthogonalize.span_basis` as float32 [rank, d_model]: dependent and zero
    vectors dropped, so a subspace arm's rank can be below its number of directions."""
    return np.ascontiguousarray(span_basis(vectors, rtol), dtype=np.float32)


def control_subspace(cell_id: str, rank: int, d_model: int) -> np.ndarray:
    """Random subspace of `rank` dimensions, seeded by the cell id: a standard Gaussian
    [d_model, rank] matrix orthonormalised by QR in float64. [rank, d_model] float32, orthonormal rows.
    (For rank 1 it spans `control_direction`'s direction: the same draws.)"""
    g = np.random.default_rng(_cell_seed(cell_id)).standard_normal((d_model, rank))
    q, _ = np.linalg.qr(g)
    return np.ascontiguousarray(q.T, dtype=np.float32)


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


def subspace_name(directions: list[tuple[int, int]]) -> str:
    """'L7,L8,L9,L10/p-1' (one position) or 'L3/p-1,L2/p-2' (several), in stacking order."""
    positions = {p for _, p in directions}
    if len(positions) == 1:
        return ",".join(f"L{layer}" for layer, _ in directions) + f"/p{positions.pop()}"
    return ",".join(f"L{layer}/p{p}" for layer, p in directions)


@dataclass
class SteerInputs:
    """The directions a (model, seed)'s steering arms use.

    vectors: {layer: difference of means [d_model]} at resid_pre and steer.position (addition arms,
        and ablation with `direction_layer: best` or a layer).
    best: the layer of highest separation at steer.position.
    selected: stage select's choice {layer, position, selected_by, vector}, or None (not run, or
        nothing passed its filters).
    explicit: {(layer, position): vector} for ablation arms naming a layer and position.
    subspace: the directions subspace arms stack (`SubspaceInputs`), or None (no subspace block;
        arms naming `layers` then stack `vectors`).
    draw_ids: {control cell id: the cell id seeding its draw} where that is another cell's (stage
        capability's weight arms draw their hook twin's directions); None: every cell its own.
    """

    vectors: dict[int, np.ndarray]
    best: int
    position: int = -1
    selected: dict | None = None
    explicit: dict = None
    subspace: SubspaceInputs | None = None
    draw_ids: dict | None = None


def draw_id(cell: Cell, d: SteerInputs) -> str:
    """The cell id that seeds a control arm's random draw: its own, or its hook twin's for a weight arm
    (stage capability fills `SteerInputs.draw_ids`, so the orthogonalized control uses its twin's draw)."""
    return (d.draw_ids or {}).get(cell.id, cell.id)


def arm_direction(cell: Cell, d: SteerInputs) -> tuple[int | None, int | None, np.ndarray | None]:
    """(direction layer, direction position, vector v) of an arm; control arms get their random
    vector of the same norm (seeded by `draw_id`). Raises LookupError for a `selected` arm when nothing
    was selected."""
    p = cell.params
    if p["mode"] in ("baseline", *SUBSPACE_MODES):
        return None, None, None
    if p["direction_layer"] == "selected":
        if d.selected is None:
            raise LookupError("no direction selected for this seed")
        layer, position, v = d.selected["layer"], d.selected["position"], d.selected["vector"]
    elif p["direction_layer"] == "best":
        layer, position, v = d.best, d.position, d.vectors[d.best]
    elif p.get("direction_position") is not None:
        layer, position = int(p["direction_layer"]), int(p["direction_position"])
        v = d.explicit[(layer, position)]
    else:
        layer, position, v = int(p["direction_layer"]), d.position, d.vectors[int(p["direction_layer"])]
    return layer, position, (control_direction(draw_id(cell, d), v) if p["control"] else v)


def arm_subspace(cell: Cell, d: SteerInputs) -> tuple[str, np.ndarray]:
    """(name of the stacked directions, orthonormal basis [rank, d_model] float32) of a subspace arm;
    control arms get a random subspace of the same rank. Raises LookupError when the seed has no
    subspace (top_k beyond the candidates that passed, nothing selected, every direction zero)."""
    sub = d.subspace
    if sub is None:
        layers = cell.params["subspace"].get("layers")
        if layers is None:
            raise LookupError("no subspace inputs for this seed (stage select's candidates were not given)")
        sub = SubspaceInputs([(int(layer), d.position) for layer in layers], [d.vectors[int(layer)] for layer in layers])
    if sub.missing is not None:
        raise LookupError(sub.missing)
    q = orthonormal_basis(sub.vectors)
    if q.shape[0] == 0:
        raise LookupError(f"subspace {sub.name} has rank 0: every stacked direction is zero")
    if cell.params["control"]:
        q = control_subspace(draw_id(cell, d), q.shape[0], q.shape[1])
    return sub.name, q


def build_edits(rows: list[Row], directions: SteerInputs,
                ablation_layers: list[int], d_model: int) -> dict[tuple[str, int], RowEdit]:
    """Per-row edit tensors for one chunk of rows: {(site kind, layer): RowEdit}.

    Ablation rows use `ablation_layers`; subspace rows their arm's own `ablation_layers` param.
    Subspace rows share one [rows, k, d_model] basis tensor (k the chunk's largest rank, lower ranks
    zero-padded) across every site; each site's strengths [rows] are 0 on rows not ablated there."""
    n = len(rows)
    add: dict[int, torch.Tensor] = {}
    dirs: dict[tuple[str, int], torch.Tensor] = {}
    alpha: dict[tuple[str, int], torch.Tensor] = {}
    cells = {r.cell.id: r.cell for r in rows if r.cell.params["mode"] == "subspace"}
    bases = {cid: arm_subspace(cell, directions)[1] for cid, cell in cells.items()}   # one QR per cell, not per row
    k = max((q.shape[0] for q in bases.values()), default=0)
    basis = torch.zeros(n, k, d_model) if bases else None                       # shared by every site
    beta: dict[tuple[str, int], torch.Tensor] = {}
    for i, row in enumerate(rows):
        p = row.cell.params
        if p["mode"] == "subspace":
            q = torch.from_numpy(bases[row.cell.id])                            # [rank, d_model]
            basis[i, :q.shape[0]] = q
            for layer in p["ablation_layers"]:
                for kind in ABLATION_SITES:
                    beta.setdefault((kind, layer), torch.zeros(n))[i] = p["alpha"]
            continue
        _, _, v = arm_direction(row.cell, directions)
        if p["mode"] == "addition":
            t = add.setdefault(p["layer"], torch.zeros(n, d_model))
            t[i] = torch.from_numpy(v) * p["coefficient"]
        elif p["mode"] == "ablation":
            u = torch.from_numpy(v) / max(float(np.linalg.norm(v)), 1e-30)
            for layer in ablation_layers:
                for kind in ABLATION_SITES:
                    dirs.setdefault((kind, layer), torch.zeros(n, d_model))[i] = u
                    alpha.setdefault((kind, layer), torch.zeros(n))[i] = p["alpha"]
    edits: dict[tuple[str, int], RowEdit] = {key: RowEdit(dirs[key], alpha[key]) for key in dirs}
    for key in beta:
        e = edits.get(key, RowEdit())
        edits[key] = RowEdit(e.ablate_dirs, e.ablate_alpha, None, basis, beta[key])
    for layer, t in add.items():
        key = ("resid_pre", layer)
        e = edits.get(key, RowEdit())
        edits[key] = RowEdit(e.ablate_dirs, e.ablate_alpha, t, e.ablate_basis, e.basis_alpha)
    return edits


def _bases_on(edits: dict[tuple[str, int], RowEdit], device: torch.device) -> dict[tuple[str, int], RowEdit]:
    """Move the subspace basis (one tensor shared by every site) to the model's device once per chunk,
    not at every hook call of every generated token (hooks still move it where a layer runs elsewhere)."""
    if device.type == "meta":
        return edits
    moved: dict[int, torch.Tensor] = {}
    for e in edits.values():
        if e.ablate_basis is not None:
            if id(e.ablate_basis) not in moved:
                moved[id(e.ablate_basis)] = e.ablate_basis.to(device)
            e.ablate_basis = moved[id(e.ablate_basis)]
    return edits


@torch.inference_mode()
def generate_rows(lm: LoadedModel, rows: list[Row], prompts: dict[str, PromptSet], directions: SteerInputs,
                  ablation_layers: list[int], max_new_tokens: int, batch_size: int, progress=None,
                  chat: ChatOptions | None = None, **generate_kwargs) -> list[str]:
    """Greedy completions for every row, `batch_size` rows per `generate` call.

    Generation is `refusal_ray.models.chat.generate`: greedy, nothing inherited from the
    checkpoint's generation_config, stopped and cut at the union of stop tokens. Rows are sorted by
    prompt length so each call pads little; the result is in `rows` order. Extra keyword arguments
    go to `generate` (e.g. `min_new_tokens` in benchmarks).
    """
    chat = chat or ChatOptions()
    texts = {s: ps.instructions for s, ps in prompts.items()}
    order = sorted(range(len(rows)), key=lambda i: len(texts[rows[i].prompt_set][rows[i].index]))
    out: list[str] = [""] * len(rows)
    config = greedy_config(lm.model, lm.tokenizer, chat, max_new_tokens)
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        chunk = [rows[i] for i in idx]
        ids, mask = encode(lm.tokenizer, [texts[r.prompt_set][r.index] for r in chunk], chat)
        edits = _bases_on(build_edits(chunk, directions, ablation_layers, lm.sites.d_model), lm.device)
        with row_edits(lm.sites, edits):
            texts_out = generate(lm, ids, mask, chat, max_new_tokens, config, **generate_kwargs)
        for i, text in zip(idx, texts_out):
            out[i] = text
        if progress is not None:
            progress(len(chunk))
    return out


def run_steer(lm: LoadedModel, cells: list[Cell], prompts: dict[str, PromptSet],
              directions: SteerInputs, *, ablation_layers="all",
              max_new_tokens: int = 32, batch_size: int = 256, judge: SubstringJudge | None = None,
              progress=None, chat: ChatOptions | None = None) -> tuple[list[dict], list[dict]]:
    """Run steering cells of one (model, seed) on the test prompts.

    Args:
        prompts: {"harmful": PromptSet, "harmless": PromptSet} (test split).
        directions: the seed's directions (`SteerInputs`).
    Returns:
        (steering rows: one per (cell, prompt set) with n, refusals, rate, Wilson interval,
         task accuracy, and for subspace arms `direction` (the stacked directions, e.g.
         "L7,L8,L9,L10/p-1") and `subspace_rank` (None on other arms); completion rows: one per
         (cell, prompt)).
    """
    judge = judge or SubstringJudge()
    layers = layer_list(ablation_layers, lm.sites.n_layers)
    rows = [Row(c, s, i) for c in cells for s in ("harmful", "harmless") for i in range(len(prompts[s]))]
    completions = generate_rows(lm, rows, prompts, directions, layers, max_new_tokens, batch_size, progress, chat)
    refusals = judge(completions)
    correct = exact_match(completions, [prompts[r.prompt_set].references[r.index] for r in rows])
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    comp_rows = []
    for i, r in enumerate(rows):
        groups[(r.cell.id, r.prompt_set)].append(i)
        comp_rows.append({"cell_id": r.cell.id, "seed": r.cell.seed, "prompt_set": r.prompt_set,
                          "prompt_id": prompts[r.prompt_set].ids[r.index],
                          "prompt": prompts[r.prompt_set].instructions[r.index], "completion": completions[i],
                          "refusal": refusals[i], "correct": correct[i], **draw_column(r.cell)})
    by_id = {c.id: c for c in cells}
    arm_rows = []
    for (cid, pset), idx in groups.items():
        cell = by_id[cid]
        k, n = sum(refusals[i] for i in idx), len(idx)
        lo, hi = wilson(k, n)
        scored = [correct[i] for i in idx if correct[i] is not None]
        arm_rows.append({
            **arm_columns(cell, directions), "mode": cell.params["mode"], "prompt_set": pset,
            "n": n, "refusals": k, "rate": k / n, "ci_low": lo, "ci_high": hi,
            "task_n": len(scored), "task_accuracy": (sum(scored) / len(scored)) if scored else None,
        })
    return arm_rows, comp_rows


def draw_column(cell: Cell) -> dict:
    """{"control_draw": j} for a control cell of draw j >= 1, else {} (draw 0's rows are the rows of
    `controls: true`, byte for byte)."""
    j = cell.params.get("control_draw", 0)
    return {"control_draw": int(j)} if j else {}


def control_arms(arm: dict, draws: int) -> list[dict]:
    """An arm and its `draws` control arms (draw j >= 1 with `control_draw: j`), adjacent."""
    return [{**arm, "control": False}] + [{**arm, "control": True, **({"control_draw": j} if j else {})}
                                          for j in range(draws)]


def arm_columns(cell: Cell, d: SteerInputs) -> dict:
    """An arm's columns in a result row (steering, capability): cell id, seed, layer, resolved direction
    layer and position, `direction` (the stacked directions' name for subspace arms, else the spec's
    direction_layer), `subspace_rank`, coefficient, alpha, control, `vector_norm` (of the vector used),
    and `control_draw` on rows of control draw j >= 1 (`draw_column`)."""
    p = cell.params
    layer, position, v = arm_direction(cell, d)
    name, rank = None, None
    if p["mode"] in SUBSPACE_MODES:
        name, q = arm_subspace(cell, d)
        rank = int(q.shape[0])
    return {"cell_id": cell.id, "seed": cell.seed, "layer": p["layer"], "direction_layer": layer,
            "direction_position": position,
            "direction": name if name is not None else None if p["direction_layer"] is None
            else str(p["direction_layer"]),
            "subspace_rank": rank, "coefficient": p["coefficient"], "alpha": p["alpha"], "control": p["control"],
            "vector_norm": None if v is None else float(np.linalg.norm(v)), **draw_column(cell)}


# -- the declaration ---------------------------------------------------------------------------
def steer_params(spec, n_layers: int) -> list[dict]:
    """Every steering arm of one (model, seed): baseline, addition, ablation and (only when
    `stages.steer.subspace` is set) subspace ablation, with controls. Arms that ablate the selected
    direction or select's top-k carry stage select's settings (part of their ids only); subspace arms
    carry their subspace ({"layers": [...]} or {"top_k": k}) and their ablation layers (resolved).
    `controls: K` gives each arm K control arms (`control_arms`)."""
    from refusal_ray.spec import n_draws

    steer = spec.stages.steer
    draws = n_draws(steer.controls)
    arms: list[dict] = [{"mode": "baseline", "layer": None, "coefficient": 0.0, "alpha": 0.0,
                         "direction_layer": None, "control": False}]
    if steer.addition is not None:
        for layer in layer_list(steer.addition.layers, n_layers):
            for c in steer.addition.coefficients:
                if c == 0:
                    continue  # c = 0 is the shared baseline arm
                arms += control_arms({"mode": "addition", "layer": layer, "coefficient": float(c), "alpha": 0.0,
                                      "direction_layer": layer}, draws)
    if steer.ablation is not None:
        extra = {} if steer.ablation.direction_position is None else {
            "direction_position": steer.ablation.direction_position}
        if steer.ablation.layers != "all":   # part of the arm (ids of 'all' arms unchanged from before)
            extra["ablation_layers"] = layer_list(steer.ablation.layers, n_layers)
        if steer.ablation.direction_layer == "selected" and spec.stages.select is not None:
            extra["select"] = spec.stages.select.model_dump(mode="json", exclude={"batch_size"})
        for a in steer.ablation.alphas:
            arms += control_arms({"mode": "ablation", "layer": None, "coefficient": 0.0, "alpha": float(a),
                                  "direction_layer": steer.ablation.direction_layer, **extra}, draws)
    sub = steer.subspace
    if sub is not None:
        extra = {**stacked_directions(spec), "ablation_layers": layer_list(sub.ablation_layers, n_layers)}
        for a in sub.alphas:
            arms += control_arms({"mode": "subspace", "layer": None, "coefficient": 0.0, "alpha": float(a),
                                  "direction_layer": None, **extra}, draws)
    return arms


def stacked_directions(spec) -> dict:
    """What a subspace arm's params say about its directions: {"subspace": {"layers": [...]} or
    {"top_k": k}}, plus stage select's settings (batch size aside) when it stacks select's top k."""
    sub = spec.stages.steer.subspace
    out = {"subspace": {"layers": list(sub.layers)} if sub.layers is not None else {"top_k": sub.top_k}}
    if sub.top_k is not None and spec.stages.select is not None:
        out["select"] = spec.stages.select.model_dump(mode="json", exclude={"batch_size"})
    return out


def subspace_inputs(settings: dict, needs: dict, vectors: dict[int, np.ndarray], by_key: dict,
                    position: int) -> SubspaceInputs | None:
    """The directions a seed's subspace arms stack: `layers` at steer.position, or stage select's
    top_k candidates among those that passed its filters, best first by its criterion (ties as
    `choose`: lower layer, then later position). None without a subspace block."""
    from refusal_ray.stages.select import ranked

    sub = settings["steer"].get("subspace")
    if not sub:
        return None
    if sub.get("layers") is not None:
        layers = [int(layer) for layer in sub["layers"]]
        return SubspaceInputs([(layer, position) for layer in layers], [vectors[layer] for layer in layers])
    k = int(sub["top_k"])
    rows = (needs.get("select") or {}).get("selection") or []
    criterion = (settings.get("select") or {}).get("criterion", "bypass")
    passed = ranked([r for r in rows if bool(r.get("passed"))], criterion)
    if not passed:
        return SubspaceInputs([], [], f"no subspace for this seed: no candidate passed the selection filters "
                                      f"(stages.steer.subspace.top_k {k}; stages.select: loosen kl_max / "
                                      f"induce_min / max_layer_fraction)")
    if len(passed) < k:
        return SubspaceInputs([], [], f"stages.steer.subspace.top_k {k} asks for more candidates than passed "
                                      f"stage select's filters for this seed ({len(passed)} of {len(rows)})")
    top = [(int(r["layer"]), int(r["position"])) for r in passed[:k]]
    return SubspaceInputs(top, [np.asarray(by_key[key]["vector"], np.float32) for key in top])


def steering_inputs(settings: dict, needs: dict) -> SteerInputs:
    """SteerInputs from a seed's stored direction rows (and selection rows, when select ran)."""
    from refusal_ray.stages.select import selected_direction

    position = settings["steer"]["position"]
    rows = [r for r in needs["directions"]["directions"] if r["site"] == "resid_pre"]
    vecs = {int(r["layer"]): np.asarray(r["vector"], np.float32) for r in rows if int(r["position"]) == position}
    by_key = {(int(r["layer"]), int(r["position"])): r for r in rows}
    selected = selected_direction(needs["select"]["selection"]) if "select" in needs else None
    if selected is not None:
        selected["vector"] = np.asarray(by_key[(selected["layer"], selected["position"])]["vector"], np.float32)
    abl = settings["steer"].get("ablation") or {}
    explicit = {}
    if isinstance(abl.get("direction_layer"), int) and abl.get("direction_position") is not None:
        key = (abl["direction_layer"], abl["direction_position"])
        explicit[key] = np.asarray(by_key[key]["vector"], np.float32)
    return SteerInputs(vecs, best_layer(rows, "resid_pre", position), position, selected, explicit,
                       subspace_inputs(settings, needs, vecs, by_key, position))


def skip_reason(cell: Cell, d: SteerInputs) -> str | None:
    """Why an arm cannot run on this seed's directions (a subspace it cannot build, nothing selected), or None."""
    if cell.params.get("mode") in SUBSPACE_MODES:
        try:
            arm_subspace(cell, d)
        except LookupError as e:
            return str(e)
        return None
    if cell.params.get("direction_layer") == "selected" and d.selected is None:
        return ("no direction selected for this seed: no candidate passed the selection filters "
                "(stages.select: loosen kl_max / induce_min / max_layer_fraction, or set a fallback)")
    return None


def _group(cells: list[Cell], spec) -> list[list[Cell]]:
    """About four full `generate` chunks of rows per task."""
    per = max(1, (4 * spec.stages.steer.batch_size) // (2 * spec.data.n_test))
    return [cells[i: i + per] for i in range(0, len(cells), per)]


def _run(session, cells, payload) -> dict:
    cfg = session.settings["steer"]
    test = session.prompts[cells[0].seed]["test"]
    ablation = cfg.get("ablation") or {"layers": "all"}
    arms, comps = session.halving(lambda bs: run_steer(
        session.lm, cells, test, payload, ablation_layers=ablation["layers"],
        max_new_tokens=session.settings["generation"]["max_new_tokens"], batch_size=bs, judge=session.judge,
        chat=session.chat), cfg["batch_size"])
    return {"steering": arms, "completions": comps}


def _id_key(spec) -> dict:
    return directions_key(spec) | {"generation": spec.generation.model_dump(mode="json"),
                                   "judge": spec.judge.model_dump(mode="json"), "position": spec.stages.steer.position}


def _describe(plan) -> list[str]:
    steer = plan.spec.stages.steer
    add, abl = steer.addition, steer.ablation
    lines = [f"addition: layers {add.layers if add else '-'}, coefficients {add.coefficients if add else '-'}; "
             f"ablation: alphas {abl.alphas if abl else '-'}, direction {abl.direction_layer if abl else '-'}; "
             f"controls: {controls_text(steer.controls)}"]
    sub = steer.subspace
    if sub is not None:
        what = (f"layers {sub.layers} at p{steer.position}" if sub.layers is not None
                else f"top {sub.top_k} of stage select's passing candidates")
        lines.append(f"subspace ablation: {what}, ablated at layers {sub.ablation_layers}, alphas {sub.alphas}")
    return lines


def controls_text(controls) -> str:
    """How `plan` prints a `controls` value: "none", "1 random draw per arm", "K random draws per arm"."""
    from refusal_ray.spec import n_draws

    k = n_draws(controls)
    return "none" if k == 0 else f"{k} random draw{'s' if k > 1 else ''} per arm"


def _check(plan) -> None:
    """Plan-time checks of the subspace block: its layers exist in every model, and top_k is not
    more than the candidates stage select scores (filters can leave fewer: those seeds are skipped)."""
    from refusal_ray.errors import SpecError

    sub = plan.spec.stages.steer.subspace
    if sub is None:
        return
    if sub.layers is not None:
        check_layers(plan, "stages.steer.subspace.layers", sub.layers)
    check_layers(plan, "stages.steer.subspace.ablation_layers", sub.ablation_layers)
    select = plan.spec.stages.select
    if sub.top_k is not None and select is not None:
        for mp in plan.models.values():
            layers = mp.n_layers if select.layers == "all" else len(select.layers)
            n = layers * len(mp.positions or [])
            if sub.top_k > n:
                raise SpecError(plan.spec_file, "stages.steer.subspace.top_k",
                                f"{sub.top_k} is more than the {n} candidates stage select scores for "
                                f"model {mp.name!r} ({layers} layers x {len(mp.positions or [])} positions)")


STAGE = Stage(name="steer", tables=("steering", "completions"), needs=("directions", "select"),
              cells=lambda spec, mp: steer_params(spec, mp.n_layers), id_key=_id_key, group=_group,
              inputs=steering_inputs, skip=skip_reason, run=_run, check=_check, describe=_describe)
