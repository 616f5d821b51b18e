"""Stage `steer`, run side: every registered operator's arms (`refusal_ray.ops.OPS`), each with a random control
(the declaration, block and arms: `refusal_ray.stages.steer`; the read side: `.read`).

All arms x prompts of a batch of cells are rows of one `generate` call (chunked to
`batch_size` rows): each operator's per-row tensors (its layer, coefficient, direction, basis...) are
per-row tensors of one edit per site (see `refusal_ray.ops.base`), so hundreds of arms do not mean
hundreds of calls. The stage knows no operator: its arms, inputs, edits, columns, checks and plan lines
come from the operator modules (`refusal_ray/ops/`: addition, ablation, subspace ablation, ...).

Arms: the shared baseline (no edit), then each operator whose block `stages.steer.<name>` is set, in OPS
order, its arms each followed by its control arms.
Control draws (`controls: K`, K >= 2): each arm gets K control cells, draw j's params carrying
`control_draw: j` for j >= 1 (draw 0 is the cell of `controls: true`, id and rows unchanged), so every
draw is seeded by its own cell id, and a store measured with K draws reuses the draws it has. The K
cells are adjacent, so their rows share `generate` calls. Rows of draw j >= 1 carry `control_draw`;
a control row without it is draw 0.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from refusal_ray.data import PromptSet, encode
from refusal_ray.core.cells import Cell, layer_list
from refusal_ray.interventions import row_edits
from refusal_ray.judges import SubstringJudge, exact_match
from refusal_ray.models.chat import ChatOptions, generate, greedy_config
from refusal_ray.models.loading import LoadedModel
from refusal_ray.ops import OPS
from refusal_ray.ops.base import Chunk, SteerInputs, arm_columns, compose, draw_column, owner
from refusal_ray.stages.directions.run import best_layer
from refusal_ray.stats import wilson


@dataclass(frozen=True)
class Row:
    """One generation row: an arm applied to one prompt."""

    cell: Cell
    prompt_set: str          # "harmful" | "harmless"
    index: int               # index into that prompt set


def resolve_rows(rows: list[Row], directions: SteerInputs) -> list[tuple[object, list[tuple[int, Cell, object]]]]:
    """[(operator, [(row index, cell, resolved)])] for the operators with rows here, in OPS order; each cell
    resolved once (`Operator.resolve`), baseline rows and weight arms (no hooks) left out."""
    by_op: dict[str, list] = {}
    cache: dict[str, object] = {}
    for i, row in enumerate(rows):
        mode = row.cell.params["mode"]
        if mode not in OPS:
            continue
        if row.cell.id not in cache:
            cache[row.cell.id] = OPS[mode].resolve(row.cell, directions)
        by_op.setdefault(mode, []).append((i, row.cell, cache[row.cell.id]))
    return [(op, by_op[op.name]) for op in OPS if op.name in by_op]


def build_edits(rows: list[Row], directions: SteerInputs, ablation_layers: list[int] | None, d_model: int,
                n_layers: int | None = None, resolved=None, prefill: dict | None = None) -> dict:
    """Per-row edits for one chunk of rows: {(site kind, layer): SiteEdit}, the operators' edits composed
    per site in apply order (directional ablation, subspace ablation, ..., addition last).

    ablation_layers: the layers ablation arms whose params name none edit (steer's ablation block);
    `resolved`: `resolve_rows(rows, directions)` when the caller has it; prefill: {op name: state}."""
    if n_layers is None:
        n_layers = max(ablation_layers) + 1 if ablation_layers else 0
    chunk = Chunk(len(rows), d_model, n_layers, ablation_layers, prefill or {})
    per_op = resolve_rows(rows, directions) if resolved is None else resolved
    return compose([(op.rank, op.edits(r, chunk, directions)) for op, r in per_op])


def edits_on(edits: dict, device: torch.device) -> dict:
    """Move the edits' shared tensors (the subspace basis) to the model's device once per chunk, not at every
    hook call of every generated token (hooks still move them where a layer runs elsewhere)."""
    if device.type == "meta":
        return edits
    moved: dict = {}
    for e in edits.values():
        if hasattr(e, "on_device"):
            e.on_device(device, moved)
    return edits


def generate_rows(lm: LoadedModel, rows: list[Row], prompts: dict[str, PromptSet], directions: SteerInputs,
                  ablation_layers: list[int], max_new_tokens: int, batch_size: int, progress=None,
                  chat: ChatOptions | None = None, extras: list[dict] | None = None, **generate_kwargs) -> list[str]:
    """Greedy completions for every row, `batch_size` rows per `generate` call.

    Generation is `refusal_ray.models.chat.generate`: greedy, nothing inherited from the
    checkpoint's generation_config, stopped and cut at the union of stop tokens. Rows are sorted by
    prompt length so each call pads little; the result is in `rows` order. Operators with a `prefill`
    get each chunk's unedited input ids and mask ([rows, pos], left padded, as `encode` returns them)
    before its edited `generate`; `extras` (a list, filled in `rows` order) gets each row's
    `completion_columns` from its operator's prefill state. Extra keyword arguments go to `generate`
    (e.g. `min_new_tokens`).
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
        per_op = resolve_rows(chunk, directions)
        prefill = {op.name: op.prefill(lm, ids, mask, r, directions) for op, r in per_op if op.has_prefill()}
        edits = edits_on(build_edits(chunk, directions, ablation_layers, lm.sites.d_model, lm.sites.n_layers,
                                     per_op, prefill), lm.device)
        with row_edits(lm.sites, edits):
            texts_out = generate(lm, ids, mask, chat, max_new_tokens, config, **generate_kwargs)
        for i, text in zip(idx, texts_out):
            out[i] = text
        if extras is not None:
            if len(extras) < len(rows):
                extras.extend({} for _ in range(len(rows) - len(extras)))
            for op, r in per_op:
                if op.name in prefill:
                    for j, _, _ in r:
                        extras[idx[j]] = op.completion_columns(prefill[op.name], j)
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
        (steering rows: one per (cell, prompt set) with the arm's columns (`ops.base.arm_columns`: the
         common ones and its operator's own), mode, n, refusals, rate, Wilson interval, task accuracy;
         completion rows: one per (cell, prompt), with its `category`: None without a category column).
    """
    judge = judge or SubstringJudge()
    layers = layer_list(ablation_layers, lm.sites.n_layers)
    rows = [Row(c, s, i) for c in cells for s in ("harmful", "harmless") for i in range(len(prompts[s]))]
    extras: list[dict] = []
    completions = generate_rows(lm, rows, prompts, directions, layers, max_new_tokens, batch_size, progress, chat,
                                extras=extras)
    extras += [{} for _ in range(len(rows) - len(extras))]
    refusals = judge(completions)
    correct = exact_match(completions, [prompts[r.prompt_set].references[r.index] for r in rows])
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    comp_rows = []
    for i, r in enumerate(rows):
        groups[(r.cell.id, r.prompt_set)].append(i)
        comp_rows.append({"cell_id": r.cell.id, "seed": r.cell.seed, "prompt_set": r.prompt_set,
                          "prompt_id": prompts[r.prompt_set].ids[r.index],
                          "prompt": prompts[r.prompt_set].instructions[r.index],
                          "category": prompts[r.prompt_set].categories[r.index], "completion": completions[i],
                          "refusal": refusals[i], "correct": correct[i], **draw_column(r.cell), **extras[i]})
    by_id = {c.id: c for c in cells}
    arm_rows = []
    for (cid, pset), idx in groups.items():
        cell = by_id[cid]
        k, n = sum(refusals[i] for i in idx), len(idx)
        lo, hi = wilson(k, n)
        scored = [correct[i] for i in idx if correct[i] is not None]
        op = OPS[cell.params["mode"]] if cell.params["mode"] in OPS else None
        own = op.group_columns([extras[i] for i in idx]) if op is not None else {}
        arm_rows.append({
            **arm_columns(cell, directions), "mode": cell.params["mode"], "prompt_set": pset,
            "n": n, "refusals": k, "rate": k / n, "ci_low": lo, "ci_high": hi,
            "task_n": len(scored), "task_accuracy": (sum(scored) / len(scored)) if scored else None, **own,
        })
    return arm_rows, comp_rows


# -- the stage's run side (its declaration: refusal_ray/stages/steer/__init__.py) ------------------
def steering_inputs(settings: dict, needs: dict) -> SteerInputs:
    """SteerInputs from a seed's stored direction rows (and selection rows, when select ran), with every
    operator's per-seed inputs (`Operator.inputs`) in `ops`."""
    from refusal_ray.stages.select import ranked, selected_direction

    position = settings["steer"]["position"]
    rows = [r for r in needs["directions"]["directions"] if r["site"] == "resid_pre"]
    vecs = {int(r["layer"]): np.asarray(r["vector"], np.float32) for r in rows if int(r["position"]) == position}
    by_key = {(int(r["layer"]), int(r["position"])): r for r in rows}
    selected = selected_direction(needs["select"]["selection"]) if "select" in needs else None
    if selected is not None:
        selected["vector"] = np.asarray(by_key[(selected["layer"], selected["position"])]["vector"], np.float32)
    candidates, n_candidates = None, 0
    if "select" in needs:
        scored = (needs.get("select") or {}).get("selection") or []
        criterion = (settings.get("select") or {}).get("criterion", "bypass")
        candidates = ranked([r for r in scored if bool(r.get("passed"))], criterion)
        n_candidates = len(scored)
    d = SteerInputs(vecs, best_layer(rows, "resid_pre", position), position, selected, {}, rows=by_key,
                    candidates=candidates, n_candidates=n_candidates, settings=settings)
    for op in OPS:
        got = op.inputs(settings, d)
        if got is not None:
            d.ops[op.name] = got
    return d


def skip_reason(cell: Cell, d: SteerInputs) -> str | None:
    """Why an arm cannot run on this seed's inputs (its operator's `resolve` raised LookupError: nothing
    selected, a subspace it cannot build, ...), or None. A KeyError (a missing direction) is no skip."""
    op = owner(cell.params.get("mode"))
    if op is None:
        return None
    try:
        op.resolve(cell, d)
    except KeyError:
        raise
    except LookupError as e:
        return str(e)
    return None


def run(session, cells, payload) -> dict:
    """Stage.run: `run_steer` on the seed's test prompts, halving the batch after an out-of-memory error:
    {"steering": arm rows, "completions": completion rows}."""
    cfg = session.settings["steer"]
    test = session.prompts[cells[0].seed]["test"]
    ablation = cfg.get("ablation") or {"layers": "all"}
    arms, comps = session.halving(lambda bs: run_steer(
        session.lm, cells, test, payload, ablation_layers=ablation["layers"],
        max_new_tokens=session.settings["generation"]["max_new_tokens"], batch_size=bs, judge=session.judge,
        chat=session.chat), cfg["batch_size"])
    return {"steering": arms, "completions": comps}
