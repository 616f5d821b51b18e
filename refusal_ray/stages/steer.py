"""Stage `steer`: activation addition and directional ablation, each with a random control.

All arms x prompts of a batch of cells are rows of one `generate` call (chunked to
`batch_size` rows): the layer, coefficient, direction and control axes are per-row tensors
(see `refusal_ray.interventions`), so hundreds of arms do not mean hundreds of calls.

Arms (Arditi et al. 2024, Sec. 2.3-2.4):
  addition  x <- x + c * v at resid_pre[L], every position (prompt and generated tokens)
  ablation  x <- x - alpha (x . u) u at resid_pre, attn_out and mlp_out of the ablated layers
  control   the same arm with a Gaussian direction of the same norm as v, seeded per cell
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
from refusal_ray.models.loading import LoadedModel
from refusal_ray.stats import wilson

ABLATION_SITES = ("resid_pre", "attn_out", "mlp_out")


@dataclass(frozen=True)
class Row:
    """One generation row: an arm applied to one prompt."""

    cell: Cell
    prompt_set: str          # "harmful" | "harmless"
    index: int               # index into that prompt set


def control_direction(cell_id: str, like: np.ndarray) -> np.ndarray:
    """Gaussian direction with the norm of `like`, seeded by the cell id. [d_model] float32."""
    seed = int(hashlib.sha256(cell_id.encode()).hexdigest()[:8], 16)
    g = np.random.default_rng(seed).standard_normal(like.shape[0])
    norm = float(np.linalg.norm(like))
    return (g / np.linalg.norm(g) * norm).astype(np.float32)


def arm_vector(cell: Cell, directions: dict[int, np.ndarray], best: int) -> tuple[int | None, np.ndarray | None]:
    """(resolved direction layer, direction vector v) of an arm; control arms get their random vector."""
    p = cell.params
    if p["mode"] == "baseline":
        return None, None
    layer = best if p["direction_layer"] == "best" else int(p["direction_layer"])
    v = directions[layer]
    return layer, (control_direction(cell.id, v) if p["control"] else v)


def build_edits(rows: list[Row], directions: dict[int, np.ndarray], best: int,
                ablation_layers: list[int], d_model: int) -> dict[tuple[str, int], RowEdit]:
    """Per-row edit tensors for one chunk of rows: {(site kind, layer): RowEdit}."""
    n = len(rows)
    add: dict[int, torch.Tensor] = {}
    dirs: dict[tuple[str, int], torch.Tensor] = {}
    alpha: dict[tuple[str, int], torch.Tensor] = {}
    for i, row in enumerate(rows):
        p = row.cell.params
        _, v = arm_vector(row.cell, directions, best)
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
    for layer, t in add.items():
        key = ("resid_pre", layer)
        edits[key] = RowEdit(edits[key].ablate_dirs, edits[key].ablate_alpha, t) if key in edits else RowEdit(add=t)
    return edits


@torch.inference_mode()
def generate_rows(lm: LoadedModel, rows: list[Row], prompts: dict[str, PromptSet],
                  directions: dict[int, np.ndarray], best: int, ablation_layers: list[int],
                  max_new_tokens: int, batch_size: int, progress=None, **generate_kwargs) -> list[str]:
    """Greedy completions for every row, `batch_size` rows per `generate` call.

    Rows are sorted by prompt length so each call pads little; the result is in `rows` order.
    Extra keyword arguments go to `generate` (e.g. `min_new_tokens` in benchmarks).
    """
    texts = {s: ps.instructions for s, ps in prompts.items()}
    order = sorted(range(len(rows)), key=lambda i: len(texts[rows[i].prompt_set][rows[i].index]))
    out: list[str] = [""] * len(rows)
    tok = lm.tokenizer
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        chunk = [rows[i] for i in idx]
        ids, mask = encode(tok, [texts[r.prompt_set][r.index] for r in chunk])
        edits = build_edits(chunk, directions, best, ablation_layers, lm.sites.d_model)
        with row_edits(lm.sites, edits):
            gen = lm.model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                                    max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                    **generate_kwargs)
        for i, text in zip(idx, tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)):
            out[i] = text
        if progress is not None:
            progress(len(chunk))
    return out


def run_steer(lm: LoadedModel, cells: list[Cell], prompts: dict[str, PromptSet],
              directions: dict[int, np.ndarray], best: int, *, ablation_layers="all",
              max_new_tokens: int = 32, batch_size: int = 256, judge: SubstringJudge | None = None,
              progress=None) -> tuple[list[dict], list[dict]]:
    """Run steering cells of one (model, seed) on the test prompts.

    Args:
        prompts: {"harmful": PromptSet, "harmless": PromptSet} (test split).
        directions: {layer: difference-of-means vector [d_model]} at resid_pre, steering position.
        best: layer resolved for `direction_layer: best`.
    Returns:
        (steering rows: one per (cell, prompt set) with n, refusals, rate, Wilson interval,
         task accuracy; completion rows: one per (cell, prompt)).
    """
    judge = judge or SubstringJudge()
    layers = layer_list(ablation_layers, lm.sites.n_layers)
    rows = [Row(c, s, i) for c in cells for s in ("harmful", "harmless") for i in range(len(prompts[s]))]
    completions = generate_rows(lm, rows, prompts, directions, best, layers, max_new_tokens, batch_size, progress)
    refusals = judge(completions)
    correct = exact_match(completions, [prompts[r.prompt_set].references[r.index] for r in rows])
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    comp_rows = []
    for i, r in enumerate(rows):
        groups[(r.cell.id, r.prompt_set)].append(i)
        comp_rows.append({"cell_id": r.cell.id, "seed": r.cell.seed, "prompt_set": r.prompt_set,
                          "prompt_id": prompts[r.prompt_set].ids[r.index], "completion": completions[i],
                          "refusal": refusals[i], "correct": correct[i]})
    by_id = {c.id: c for c in cells}
    arm_rows = []
    for (cid, pset), idx in groups.items():
        cell = by_id[cid]
        k, n = sum(refusals[i] for i in idx), len(idx)
        lo, hi = wilson(k, n)
        scored = [correct[i] for i in idx if correct[i] is not None]
        resolved, v = arm_vector(cell, directions, best)
        arm_rows.append({
            "cell_id": cid, "seed": cell.seed, "mode": cell.params["mode"], "layer": cell.params["layer"],
            "direction_layer": resolved, "coefficient": cell.params["coefficient"],
            "alpha": cell.params["alpha"], "control": cell.params["control"], "prompt_set": pset,
            "n": n, "refusals": k, "rate": k / n, "ci_low": lo, "ci_high": hi,
            "vector_norm": None if v is None else float(np.linalg.norm(v)),
            "task_n": len(scored), "task_accuracy": (sum(scored) / len(scored)) if scored else None,
        })
    return arm_rows, comp_rows
