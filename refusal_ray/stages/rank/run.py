"""Stage `rank`, run side: the bases of every source and the rank sweep's batched generation (the declaration:
`refusal_ray.stages.rank`; the read side: `.read`).

Bases ([k, d_model] float32, orthonormal rows; `refusal_ray.ops.subspace.orthonormal_basis`) at resid_pre of
the site layer, the stage's position:
- pca: right singular vectors of D [n_harmful_train, d_model], D_i = x_i - mean(harmless train) (uncentred
  SVD: our definition of the issue's "per-prompt harmful - harmless differences"; with one direction PC1
  is the difference of means up to sign); singular values and explained variance s_j^2 / sum s^2 stored;
- category: r_c = mean(x_i, category c) - mean(harmless train) (difference of means against the shared
  harmless mean; Joad et al. 2026), ordered by category size (largest first) then name; basis for k: the
  span of r_1..r_k (Gram-Schmidt, QR in float64, in that order);
- select: stage select's top-k passing candidates (`refusal_ray.ops.subspace` top_k);
- optimised: stage optimise's rows with dim == k, orthonormalised.
Control: `control_subspace(cell id, rank, d_model)` (a Gaussian matrix seeded by the control cell's id,
orthonormalised by QR), the same rank as its arm's basis.

All arms x harmful test prompts are rows of one `generate` call per `batch_size` rows: each row carries its
own basis, zero-padded to the chunk's largest rank ([batch, k_max, d_model], `RowEdit(ablate_basis,
basis_alpha)` at resid_pre, attn_out and mlp_out of every ablation layer), so K x sources arms are not
K x sources runs (`benchmarks/rank_sweep.py` measures this against one run per k).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from refusal_ray.core.cells import Cell
from refusal_ray.data import PromptSet, encode
from refusal_ray.interventions import RowEdit, row_edits
from refusal_ray.judges import SubstringJudge
from refusal_ray.models.chat import ChatOptions, generate, greedy_config
from refusal_ray.ops.base import ABLATION_SITES
from refusal_ray.ops.subspace import control_subspace, orthonormal_basis
from refusal_ray.stats import wilson


# -- inputs from the needs' rows -------------------------------------------------------------------
@dataclass
class RankInputs:
    """One seed's stored inputs: resid_pre direction rows by (layer, position), the site layer of the fitted
    bases, stage select's passing candidates (best first; None: select did not run), and stage optimise's
    rows (None: it did not run)."""

    rows: dict
    layer: int
    position: int
    candidates: list | None = None
    n_candidates: int = 0
    optimised: list | None = None
    layer_from: str = ""


def site_layer(settings: dict, needs: dict) -> tuple[int, str]:
    """(layer, where it came from): `stages.rank.layer`, else select's selected layer (when select ran and
    selected), else directions' best layer at the position."""
    from refusal_ray.stages.directions.run import best_layer
    from refusal_ray.stages.select.run import selected_direction

    cfg = settings["rank"]
    if cfg.get("layer") is not None:
        return int(cfg["layer"]), "stages.rank.layer"
    if "select" in needs:
        chosen = selected_direction(needs["select"]["selection"])
        if chosen is not None:
            return int(chosen["layer"]), "select's chosen layer"
    rows = [r for r in needs["directions"]["directions"] if r["site"] == "resid_pre"]
    return int(best_layer(rows, "resid_pre", int(cfg["position"]))), "directions' best layer"


def inputs(settings: dict, needs: dict) -> RankInputs:
    """Stage.inputs: a seed's RankInputs from its directions (and selection, optimise) rows."""
    from refusal_ray.stages.select.run import ranked

    cfg = settings["rank"]
    rows = {(int(r["layer"]), int(r["position"])): r for r in needs["directions"]["directions"]
            if r["site"] == "resid_pre"}
    layer, where = site_layer(settings, needs)
    d = RankInputs(rows, layer, int(cfg["position"]), layer_from=where)
    if "select" in needs:
        scored = needs["select"]["selection"] or []
        criterion = (settings.get("select") or {}).get("criterion", "bypass")
        d.candidates = ranked([r for r in scored if bool(r.get("passed"))], criterion)
        d.n_candidates = len(scored)
    if "optimise" in needs:
        d.optimised = list((needs["optimise"] or {}).get("optimised") or [])
    return d


def select_vectors(d: RankInputs, k: int) -> list[np.ndarray]:
    """Stage select's top-k passing candidates' vectors. Raises LookupError (the skip reason) when fewer passed."""
    if d.candidates is None:
        raise LookupError("stages.rank.sources 'select': stage select did not run for this seed")
    if len(d.candidates) < k:
        raise LookupError(f"stages.rank.sources 'select': k = {k} asks for more candidates than passed stage "
                          f"select's filters for this seed ({len(d.candidates)} of {d.n_candidates})")
    return [np.asarray(d.rows[(int(r["layer"]), int(r["position"]))]["vector"], np.float32)
            for r in d.candidates[:k]]


def optimised_vectors(d: RankInputs, k: int) -> list[np.ndarray]:
    """Stage optimise's directions of its dim-k cone (rows with dim == k, by index). Raises LookupError."""
    if d.optimised is None:
        raise LookupError("stages.rank.sources 'optimised': stage optimise did not run for this seed")
    mine = sorted((r for r in d.optimised if int(r.get("dim", -1)) == k), key=lambda r: int(r["index"]))
    if len(mine) < k:
        raise LookupError(f"stages.rank.sources 'optimised': stage optimise stored {len(mine)} directions of "
                          f"dimension {k} for this seed (table optimised, dim == {k})")
    return [np.asarray(r["vector"], np.float32) for r in mine[:k]]


def skip_reason(cell: Cell, d: RankInputs) -> str | None:
    """Why a cell cannot run on this seed's stored inputs (select: too few passing candidates; optimised: no
    cone of that dimension), or None. The category source's count is known only with the prompts (run)."""
    try:
        if cell.params["source"] == "select":
            select_vectors(d, int(cell.params["k"]))
        elif cell.params["source"] == "optimised":
            optimised_vectors(d, int(cell.params["k"]))
    except LookupError as e:
        return str(e)
    return None


# -- bases fitted on the train prompts -------------------------------------------------------------
def site_activations(lm, prompts: PromptSet, layer: int, position: int, batch_size: int, chat=None) -> np.ndarray:
    """resid_pre of `layer` at `position`, float64 [n_prompts, d_model] (`directions.run._activations`)."""
    from refusal_ray.stages.directions.run import _activations

    return _activations(lm, prompts, ["resid_pre"], [position], batch_size, chat, layers=[layer])[:, 0, 0]


def pca_basis(harm: np.ndarray, safe_mean: np.ndarray, k_max: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top right singular vectors of D = harm - safe_mean (uncentred).

    harm: [n, d_model] float64; safe_mean: [d_model]. Returns (V [min(k_max, rank), d_model] float64, orthonormal
    rows; singular values [r]; explained variance s_j^2 / sum s^2 [r]). Sign: each row has a non-negative
    projection on the difference of means (D's mean), so PC1 points from harmless to harmful."""
    diff = harm - safe_mean[None]
    _, s, vt = np.linalg.svd(diff, full_matrices=False)
    mean = diff.mean(0)
    signs = np.where(vt @ mean < 0, -1.0, 1.0)
    vt = vt * signs[:, None]
    r = min(k_max, int((s > s[0] * 1e-9).sum()) if s.size and s[0] > 0 else 0)
    return vt[:r], s[:r], (s ** 2 / max(float((s ** 2).sum()), 1e-300))[:r]


def category_directions(harm: np.ndarray, categories: list, safe_mean: np.ndarray) -> list[tuple[str, int, np.ndarray]]:
    """[(category, n, r_c [d_model] float64)]: each category's difference of means against the shared harmless
    mean, ordered by size (largest first) then name. Rows whose category is None are left out."""
    by: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(categories):
        if c is not None:
            by[str(c)].append(i)
    order = sorted(by, key=lambda c: (-len(by[c]), c))
    return [(c, len(by[c]), harm[by[c]].mean(0) - safe_mean) for c in order]


@dataclass
class Bases:
    """One seed's fitted bases: `basis(source, k)` -> [k', d_model] float32 orthonormal (k' <= k when the
    vectors are dependent), or LookupError(reason); `rows`: the rank_bases table's rows."""

    d: RankInputs
    pca: np.ndarray | None = None
    categories: list = field(default_factory=list)
    rows: list = field(default_factory=list)

    def vectors(self, source: str, k: int) -> list[np.ndarray]:
        if source == "pca":
            if self.pca is None or len(self.pca) < k:
                raise LookupError(f"stages.rank.sources 'pca': the differences have rank "
                                  f"{0 if self.pca is None else len(self.pca)} < k = {k}")
            return list(self.pca[:k])
        if source == "category":
            if len(self.categories) < k:
                raise LookupError(f"stages.rank.sources 'category': k = {k} is more than the "
                                  f"{len(self.categories)} categories of the harmful train prompts")
            return [v for _, _, v in self.categories[:k]]
        if source == "select":
            return select_vectors(self.d, k)
        if source == "optimised":
            return optimised_vectors(self.d, k)
        raise KeyError(source)

    def basis(self, source: str, k: int) -> np.ndarray:
        q = orthonormal_basis(self.vectors(source, k))
        if q.shape[0] == 0:
            raise LookupError(f"stages.rank.sources {source!r}: the basis of k = {k} has rank 0")
        return q


def fit_bases(lm, train: dict, d: RankInputs, sources: list[str], k_max: int, batch_size: int, chat=None,
              seed: int = 0, cell_id: str = "") -> Bases:
    """The pca and category bases from a seed's train prompts ({"harmful", "harmless"} PromptSets) at resid_pre
    of `d.layer`, `d.position`, and the rank_bases rows of every source (select / optimised: their vectors)."""
    b = Bases(d)
    base = {"cell_id": cell_id, "seed": seed, "layer": d.layer, "position": d.position, "layer_from": d.layer_from}
    if "pca" in sources or "category" in sources:
        harm = site_activations(lm, train["harmful"], d.layer, d.position, batch_size, chat)
        safe_mean = site_activations(lm, train["harmless"], d.layer, d.position, batch_size, chat).mean(0)
        if "pca" in sources:
            v, s, ev = pca_basis(harm, safe_mean, k_max)
            b.pca = v
            b.rows += [{**base, "source": "pca", "index": j, "category": None, "n": len(harm),
                        "singular_value": float(s[j]), "explained_variance": float(ev[j]),
                        "norm": 1.0, "vector": v[j].astype(np.float32).tolist()} for j in range(len(v))]
        if "category" in sources:
            b.categories = category_directions(harm, list(train["harmful"].categories), safe_mean)
            b.rows += [{**base, "source": "category", "index": j, "category": c, "n": n, "singular_value": None,
                        "explained_variance": None, "norm": float(np.linalg.norm(v)),
                        "vector": v.astype(np.float32).tolist()} for j, (c, n, v) in enumerate(b.categories)]
    for source in ("select", "optimised"):
        if source in sources:
            for k in range(k_max, 0, -1):
                try:
                    vecs = b.vectors(source, k)
                except LookupError:
                    continue
                b.rows += [{**base, "source": source, "index": j, "category": None, "n": None,
                            "singular_value": None, "explained_variance": None,
                            "norm": float(np.linalg.norm(v)), "vector": np.asarray(v, np.float32).tolist()}
                           for j, v in enumerate(vecs)]
                break
    return b


# -- the rows and their batched generation ------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One generation row: an arm on one harmful test prompt, with its basis (None: the baseline) and, for a
    transfer arm, the category whose direction it ablates."""

    cell: Cell
    index: int
    basis: np.ndarray | None
    ablated: str | None = None


def generate_rows(lm, rows: list[Row], prompts: PromptSet, ablation_layers: list[int], alpha: float,
                  max_new_tokens: int, batch_size: int, chat: ChatOptions | None = None) -> list[str]:
    """Greedy completions of every row, `batch_size` rows per `generate` call (sorted by prompt length; the
    result in `rows` order). Each chunk's bases are one [n, k_max, d_model] tensor (lower ranks and baseline
    rows zero-padded, strength 0 on baseline rows), shared by resid_pre, attn_out and mlp_out of every
    ablation layer (`RowEdit`: x <- x - alpha (x Q^T) Q per row)."""
    chat = chat or ChatOptions()
    texts = prompts.instructions
    order = sorted(range(len(rows)), key=lambda i: len(texts[rows[i].index]))
    out = [""] * len(rows)
    config = greedy_config(lm.model, lm.tokenizer, chat, max_new_tokens)
    d_model = lm.sites.d_model
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        chunk = [rows[i] for i in idx]
        ids, mask = encode(lm.tokenizer, [texts[r.index] for r in chunk], chat)
        k = max([r.basis.shape[0] for r in chunk if r.basis is not None] or [0])
        edits = {}
        if k:
            basis, beta = torch.zeros(len(chunk), k, d_model), torch.zeros(len(chunk))
            for j, r in enumerate(chunk):
                if r.basis is not None:
                    basis[j, :r.basis.shape[0]] = torch.from_numpy(r.basis)
                    beta[j] = alpha
            if lm.device.type != "meta":
                basis = basis.to(lm.device)
            edit = RowEdit(ablate_basis=basis, basis_alpha=beta)
            edits = {(kind, layer): edit for layer in ablation_layers for kind in ABLATION_SITES}
        with row_edits(lm.sites, edits):
            got = generate(lm, ids, mask, chat, max_new_tokens, config)
        for i, text in zip(idx, got):
            out[i] = text
    return out


def arm_rows(cells: list[Cell], bases: Bases, test: PromptSet, d_model: int) -> tuple[list[Row], dict]:
    """The generation rows of every cell (its basis on each harmful test prompt; a transfer cell: each
    category's own direction on every prompt), and {cell id: reason} of the cells that cannot run here
    (the category source beyond the categories present)."""
    rows, skipped = [], {}
    n = len(test)
    for cell in cells:
        p = cell.params
        if p["source"] == "baseline":
            rows += [Row(cell, i, None) for i in range(n)]
            continue
        if p.get("transfer"):
            if not bases.categories:
                skipped[cell.id] = "stages.rank.transfer: no categories in the harmful train prompts"
                continue
            for c, _, v in bases.categories:
                q = orthonormal_basis([v])
                if p["control"]:
                    q = control_subspace(f"{cell.id}:{c}", 1, d_model)
                rows += [Row(cell, i, q, c) for i in range(n)]
            continue
        try:
            q = bases.basis(p["source"], int(p["k"]))
        except LookupError as e:
            skipped[cell.id] = str(e)
            continue
        if p["control"]:
            q = control_subspace(cell.id, q.shape[0], d_model)
        rows += [Row(cell, i, q) for i in range(n)]
    return rows, skipped


def rate_row(cell: Cell, labels: list[bool], **extra) -> dict:
    k, n = int(sum(labels)), len(labels)
    lo, hi = wilson(k, n) if n else (float("nan"), float("nan"))
    p = cell.params
    return {"cell_id": cell.id, "seed": cell.seed, "source": p["source"], "k": int(p["k"]),
            "control": bool(p["control"]), "transfer": bool(p.get("transfer", False)), "prompt_set": "harmful",
            "n": n, "refusals": k, "rate": k / n if n else float("nan"), "ci_low": lo, "ci_high": hi, **extra}


def run_rank(lm, cells: list[Cell], bases: Bases, test: PromptSet, *, ablation_layers: list[int], alpha: float,
             max_new_tokens: int = 32, batch_size: int = 32, judge: SubstringJudge | None = None,
             chat: ChatOptions | None = None) -> tuple[list[dict], list[dict]]:
    """The rank sweep of one (model, seed) on its harmful test prompts.

    Returns (rank rows: one per (cell, category) with category None for all prompts, and per category when the
    prompts have one; a transfer cell's per (ablated category, category); n, refusals, rate, Wilson interval,
    basis_rank, layer, position; a cell that cannot run: one row with `skipped` and n 0;
    completion rows: one per (cell, prompt[, ablated category]), with `category`)."""
    judge = judge or SubstringJudge()
    rows, skipped = arm_rows(cells, bases, test, lm.sites.d_model)
    completions = generate_rows(lm, rows, test, ablation_layers, alpha, max_new_tokens, batch_size, chat)
    labels = judge(completions)
    groups: dict[tuple, list[int]] = defaultdict(list)
    comp = []
    for i, r in enumerate(rows):
        cat = test.categories[r.index]
        groups[(r.cell.id, r.ablated, None)].append(i)
        if cat is not None:
            groups[(r.cell.id, r.ablated, cat)].append(i)
        comp.append({"cell_id": r.cell.id, "seed": r.cell.seed, "prompt_set": "harmful", "prompt_id": test.ids[r.index],
                     "prompt": test.instructions[r.index], "category": cat, "completion": completions[i],
                     "refusal": labels[i], "correct": None, "ablated_category": r.ablated})
    by_id = {c.id: c for c in cells}
    rank_of = {r.cell.id: (0 if r.basis is None else int(r.basis.shape[0])) for r in rows}
    out = []
    for (cid, ablated, cat), idx in groups.items():
        out.append(rate_row(by_id[cid], [labels[i] for i in idx], category=cat, ablated_category=ablated,
                            basis_rank=rank_of[cid], layer=bases.d.layer, position=bases.d.position,
                            layer_from=bases.d.layer_from, skipped=None))
    for cid, reason in skipped.items():
        out.append(rate_row(by_id[cid], [], category=None, ablated_category=None, basis_rank=0,
                            layer=bases.d.layer, position=bases.d.position, layer_from=bases.d.layer_from,
                            skipped=reason))
    return out, comp


def run(session, cells, payload) -> dict:
    """Stage.run: fit the seed's bases on its train prompts, then `run_rank` on its test prompts, halving the
    batch after an out-of-memory error: {"rank": rows, "rank_bases": basis rows, "completions": rows}."""
    cfg = session.settings["rank"]
    seed = cells[0].seed
    p = session.prompts[seed]
    owner = next((c for c in cells if c.params["source"] == "baseline"), cells[0])
    bases = session.halving(lambda bs: fit_bases(session.lm, p["train"], payload, list(cfg["sources"]),
                                                 int(cfg["max_k"]), bs, session.chat, seed, owner.id),
                            cfg["batch_size"])
    layers = list(cells[0].params["ablation_layers"])
    rows, comps = session.halving(lambda bs: run_rank(
        session.lm, cells, bases, p["test"]["harmful"], ablation_layers=layers, alpha=float(cfg["alpha"]),
        max_new_tokens=session.settings["generation"]["max_new_tokens"], batch_size=bs, judge=session.judge,
        chat=session.chat), cfg["batch_size"])
    return {"rank": rows, "rank_bases": bases.rows, "completions": comps}
