"""Stage `directions`, run side: difference-of-means refusal directions at every layer (the declaration and
block: `refusal_ray.stages.directions`; the summary columns and report section: `.read`).

Arditi et al. 2024, Sec. 2.1: r[L, pos] = mean_harmful x[L, pos] - mean_harmless x[L, pos], with x
the residual stream at a post-instruction position. All layers and sites are read in one
forward pass per batch; sums are accumulated in float64 and stored as float32 with the norm.
Each row also stores the two class means it is the difference of (`mean_harmful`,
`mean_harmless`): affine operators (ACE, Marshall et al. 2024) need the harmless mean as their
reference point. A store written before these columns existed lacks them; its direction cells keep
their ids (the columns are outputs, not inputs), so operators that need the means skip with a reason
(`refusal_ray.ops.ace`) until the directions are refitted (`--fresh`, or a new out dir).
Separation is Cohen's d (pooled sd) of held-out projections onto the unit direction.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from refusal_ray.data import PromptSet, encode
from refusal_ray.interventions import capture
from refusal_ray.models.loading import LoadedModel
from refusal_ray.models.sites import site_name
from refusal_ray.stages.directions import refusal_tokens_setting
from refusal_ray.stats import cohens_d


@dataclass(frozen=True)
class DirectionKey:
    site: str       # site kind, e.g. "resid_pre"
    layer: int
    position: int   # negative, from the end of the prompt


def _activations(lm: LoadedModel, prompts: PromptSet, sites: list[str], positions: list[int],
                 batch_size: int, chat=None, layers: list[int] | None = None) -> np.ndarray:
    """Activations at the given positions: float64 [n_prompts, n_sites * len(layers), n_pos, d_model],
    site-major (index s * len(layers) + i for the i-th of `layers`; every layer when None). Only the named
    layers are captured, so one layer costs 1 / n_layers of the memory."""
    layers = list(range(lm.sites.n_layers)) if layers is None else list(layers)
    names = [site_name(s, layer) for s in sites for layer in layers]
    pos = torch.tensor(positions)
    chunks = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = encode(lm.tokenizer, prompts.instructions[start: start + batch_size], chat)
        acts = capture(lm.model, ids, mask, names, lm.sites, positions=pos)
        chunks.append(torch.stack([acts[n] for n in names], 1).double().numpy())  # [b, sites*layers, pos, d]
    out = np.concatenate(chunks)
    if not np.isfinite(out).all():
        raise FloatingPointError("non-finite activations at real prompt positions")
    return out


def refusal_scores(lm: LoadedModel, prompts: PromptSet, token_ids: list[int], batch_size: int,
                   chat=None) -> np.ndarray:
    """Refusal score log p - log(1 - p) of the refusal first tokens `token_ids` at the last prompt
    position, per prompt: float64 [n_prompts] (DESIGN.md; `refusal_ray.stages.patch.RefusalScore`).
    Only its sign is used (train filtering), which epsilon does not change."""
    from refusal_ray.interventions import forward
    from refusal_ray.stages.patch import RefusalScore

    metric = RefusalScore(token_ids)
    out = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            ids, mask = encode(lm.tokenizer, prompts.instructions[start: start + batch_size], chat)
            logits = forward(lm.model, ids.to(lm.device), mask.to(lm.device), logits_to_keep=1).logits[:, -1]
            out.append(metric(logits.double()).cpu().numpy())
    return np.concatenate(out)


def filter_train(lm: LoadedModel, harmful: PromptSet, harmless: PromptSet, token_ids: list[int], batch_size: int,
                 chat=None) -> tuple[PromptSet, PromptSet]:
    """Arditi et al.'s train filtering (App. B; `filter_data` in run_pipeline.py): keep harmful
    prompts the model refuses (refusal score > 0) and harmless prompts it does not (score < 0), with
    the refusal tokens of stage select (`stages.select.refusal_tokens`, default: the family's).

    Raises ValueError when a class keeps fewer than 2 prompts (a difference of means needs them).
    """
    keep = []
    for ps, refuse in ((harmful, True), (harmless, False)):
        s = refusal_scores(lm, ps, token_ids, batch_size, chat)
        idx = np.flatnonzero(s > 0 if refuse else s < 0)
        if len(idx) < 2:
            what = "harmful prompts the model refuses" if refuse else "harmless prompts the model does not refuse"
            raise ValueError(f"filter_train kept {len(idx)} {what} (of {len(ps)}); set filter_train: false")
        keep.append(PromptSet([ps.ids[i] for i in idx], [ps.instructions[i] for i in idx],
                              [ps.references[i] for i in idx]))
    return keep[0], keep[1]


def fit_directions(lm: LoadedModel, train: tuple[PromptSet, PromptSet], val: tuple[PromptSet, PromptSet],
                   sites: list[str] = ("resid_pre",), positions: list[int] = (-1,),
                   batch_size: int = 64, chat=None) -> list[dict]:
    """Fit difference-of-means directions and their held-out separation.

    Args:
        train, val: (harmful, harmless) prompt sets.
        sites: residual site kinds ("resid_pre", "resid_post"); positions: negative offsets.
        chat: ChatOptions for rendering the prompts (None: defaults).
    Returns:
        One row per (site, layer, position): vector (float32 list, length d_model), norm,
        `mean_harmful` / `mean_harmless` (the per-class means of the train activations the vector
        is the difference of, float32 lists of length d_model: vector = mean_harmful - mean_harmless
        up to float32 rounding, all three rounded from the same float64 means; ACE's reference point,
        Marshall et al. 2024), separation (Cohen's d on val), mean projections of each val class,
        n_train (harmful prompts fitted on), n_train_harmless, n_val.
    """
    sites, positions = list(sites), list(positions)
    harm = _activations(lm, train[0], sites, positions, batch_size, chat)
    safe = _activations(lm, train[1], sites, positions, batch_size, chat)
    mu_harm, mu_safe = harm.mean(0), safe.mean(0)            # [sites*layers, pos, d] float64
    diff = mu_harm - mu_safe
    v_harm = _activations(lm, val[0], sites, positions, batch_size, chat)
    v_safe = _activations(lm, val[1], sites, positions, batch_size, chat)
    rows = []
    n_layers = lm.sites.n_layers
    for i, (site, layer) in enumerate((s, layer) for s in sites for layer in range(n_layers)):
        for j, position in enumerate(positions):
            v = diff[i, j]
            norm = float(np.linalg.norm(v))
            u = v / norm if norm > 0 else np.zeros_like(v)
            p_harm, p_safe = v_harm[:, i, j] @ u, v_safe[:, i, j] @ u   # [n_val]
            rows.append({
                "site": site, "layer": layer, "position": position,
                "vector": v.astype(np.float32).tolist(), "norm": norm,
                "mean_harmful": mu_harm[i, j].astype(np.float32).tolist(),
                "mean_harmless": mu_safe[i, j].astype(np.float32).tolist(),
                "separation": cohens_d(p_harm, p_safe),
                "val_proj_harmful": float(p_harm.mean()), "val_proj_harmless": float(p_safe.mean()),
                "n_train": len(train[0]), "n_train_harmless": len(train[1]), "n_val": len(val[0]),
            })
    return rows


def best_layer(rows: list[dict], site: str = "resid_pre", position: int = -1) -> int:
    """Layer with the highest separation at (site, position); ties go to the earliest layer."""
    cands = [r for r in rows if r["site"] == site and r["position"] == position]
    if not cands:
        raise ValueError(f"no directions at site {site!r}, position {position}")
    return max(cands, key=lambda r: (np.nan_to_num(r["separation"], nan=-np.inf), -r["layer"]))["layer"]


# -- the stage's run side (its declaration: refusal_ray/stages/directions/__init__.py) --------------
def train_filter_tokens(session) -> list[int]:
    from refusal_ray.models import refusal_tokens
    from refusal_ray.models.loading import model_type

    return refusal_tokens.resolve(refusal_tokens_setting(session.settings.get("select")), session.lm.tokenizer,
                                  model_type(session.lm), session.judge.phrases)


def paired_train(plan) -> None:
    """`pairing: paired`: each seed's harmless train prompts become the minimal-pair twins of its
    harmful train prompts (by the files' pair columns). Raises SpecError when a twin is missing."""
    from refusal_ray.data import PromptSet, row_ids
    from refusal_ray.errors import SpecError

    df, pf = plan.frames["harmless"]
    _, pf_harm = plan.frames["harmful"]
    harm_df = plan.frames["harmful"][0]
    pair_of = dict(zip(row_ids(harm_df, pf_harm), harm_df[pf_harm.pair_column].astype(str)))
    ids = row_ids(df, pf)
    twin = {p: i for i, p in enumerate(df[pf.pair_column].astype(str))}
    for seed, splits in plan.prompts.items():
        rows = []
        for hid in splits["train"]["harmful"].ids:
            i = twin.get(pair_of[hid])
            if i is None:
                raise SpecError(plan.spec_file, "stages.directions.pairing",
                                f"harmful train prompt {hid!r} has no harmless twin (pair {pair_of[hid]!r})")
            rows.append(i)
        refs = [None] * len(rows) if not pf.reference_column else [
            None if pd.isna(df[pf.reference_column].iloc[i]) else str(df[pf.reference_column].iloc[i]) for i in rows]
        splits["train"]["harmless"] = PromptSet([ids.iloc[i] for i in rows],
                                                [str(df[pf.instruction_column].iloc[i]) for i in rows], refs)


def random_train(plan) -> None:
    """`pairing: random`: each seed's harmless train prompts are redrawn from the harmless train split
    with a stream independent of the harmful draw (seeded by (seed, "random-pairing"))."""
    from refusal_ray.data import split_prompts

    df, pf = plan.frames["harmless"]
    for seed, splits in plan.prompts.items():
        stream = int.from_bytes(hashlib.sha256(f"{seed}:random-pairing".encode()).digest()[:4], "little")
        splits["train"]["harmless"] = split_prompts(df, pf, plan.spec.data, stream)["train"]


def prepare(plan) -> None:
    """Stage.prepare: `pairing` redraws each seed's harmless train prompts (`paired_train`, `random_train`)."""
    pairing = plan.spec.stages.directions.pairing
    if pairing == "paired":
        paired_train(plan)
    elif pairing == "random":
        random_train(plan)


def sequential_cosines(lm: LoadedModel, train: tuple[PromptSet, PromptSet], batched: list[dict], sites: list[str],
                       positions: list[int], chat=None) -> list[float]:
    """Refit every direction one prompt at a time (batch size 1: no padding) and return, per row of
    `batched` (same order), the cosine between the two fits (the Qwen-1.8B study's batched vs
    sequential extraction check)."""
    harm = _activations(lm, train[0], sites, positions, 1, chat)
    safe = _activations(lm, train[1], sites, positions, 1, chat)
    diff = harm.mean(0) - safe.mean(0)                       # [sites*layers, pos, d] float64
    index = {(s, layer): i for i, (s, layer) in enumerate((s, layer) for s in sites
                                                           for layer in range(lm.sites.n_layers))}
    out = []
    for r in batched:
        seq = diff[index[(r["site"], r["layer"])], positions.index(r["position"])]
        v = np.asarray(r["vector"], np.float64)
        denom = np.linalg.norm(v) * np.linalg.norm(seq)
        out.append(float(v @ seq / denom) if denom > 0 else float("nan"))
    return out


def run(session, cells, payload) -> dict:
    """Stage.run: fit each cell's directions (train filtering and the sequential refit when set):
    {"directions": rows}."""
    cfg = session.settings["directions"]
    rows = []
    for cell in cells:
        p = session.prompts[cell.seed]
        train = (p["train"]["harmful"], p["train"]["harmless"])
        n_before = (len(train[0]), len(train[1]))
        if cfg.get("filter_train"):
            tokens = train_filter_tokens(session)
            train = session.halving(lambda bs, t=train: filter_train(session.lm, *t, tokens, bs, session.chat),
                                    cfg["batch_size"])
        fitted = session.halving(lambda bs: fit_directions(
            session.lm, train, (p["val"]["harmful"], p["val"]["harmless"]), cfg["sites"], session.positions, bs,
            session.chat), cfg["batch_size"])
        cos = [None] * len(fitted)
        if cfg.get("compare_sequential"):
            cos = sequential_cosines(session.lm, train, fitted, cfg["sites"], list(session.positions), session.chat)
        rows += [{"cell_id": cell.id, "seed": cell.seed, **r, "n_train_drawn": n_before[0],
                  "n_train_harmless_drawn": n_before[1], "pairing": cfg.get("pairing") or "as drawn",
                  "sequential_cosine": c} for r, c in zip(fitted, cos)]
    return {"directions": rows}
