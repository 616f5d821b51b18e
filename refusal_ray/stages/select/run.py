"""Stage `select`, the run side: choose the refusal direction causally, as Arditi et al. 2024 do (Sec. 2.3, App. C),
with the definitions of their code (andyrdt/refusal_direction, pipeline/submodules/select_direction.py).

Every (layer, position) difference-of-means direction at `resid_pre` is a candidate r. On the
validation split, with the refusal score m = log(p + eps) - log(1 - p + eps) (eps = 1e-8, the
paper's; p = probability of the refusal first tokens at the last prompt position; float64):

    bypass(r) = mean m over harmful prompts with r^ ablated at every layer (resid_pre, attn_out,
                mlp_out; x <- x - (x . r^) r^, every position)
    induce(r) = mean m over harmless prompts with r added at resid_pre[layer(r)], every position
    KL(r)     = mean first-token KL(baseline || ablated) over harmless prompts, exact by default;
                `kl_epsilon: 1e-6` is the paper's smoothing log(P + 1e-6) inside the logs (the
                paper-compat switch, on with `reproduces: arditi2024`)

The refusal tokens are the paper's per family (`refusal_ray.models.refusal_tokens`). `filter_val`
(the paper's default) scores only the harmful val prompts the unedited model refuses (m > 0) and the
harmless ones it does not (m < 0). Filters (spec values, paper defaults), as the paper's `filter_fn`:
a NaN score never passes; layer >= int(max_layer_fraction * n_layers) is pruned; KL <= kl_max;
induce >= induce_min. Ours in addition: a zero-norm candidate (e.g. layer 0 at a template token) is
not scored. Criteria: `bypass` (lowest bypass among the candidates that pass; Arditi), `swing`
(largest refusal-rate swing, the pre-registered replication's choice: the harmful rate's drop under
ablation plus the harmless rate's rise under addition), `separation` (highest Cohen's d; the old
`best`). Where the published methods and ours differ: the replication measured its swing on
generated completions with a judge; here a prompt counts as refused when its refusal score is > 0
(first-token proxy), so the whole selection needs forward passes only.

Every candidate is a batch row (per-row edit tensors), so one forward pass scores many
candidates at once; no per-candidate loop. When nothing passes the filters the stage says so:
no row is `selected` unless a `fallback` criterion is set, and then the row says `fallback:<c>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from refusal_ray.capability.measures import first_token_kl
from refusal_ray.data import PromptSet, left_pad, prompt_tokens
from refusal_ray.interventions import RowEdit, forward, row_edits
from refusal_ray.models import refusal_tokens
from refusal_ray.models.loading import LoadedModel, model_type
from refusal_ray.models.orthogonalize import RANK_RTOL
from refusal_ray.stages.patch.run import RefusalScore
from refusal_ray.stages.select import layer_cutoff

ABLATION_SITES = ("resid_pre", "attn_out", "mlp_out")
KINDS = ("bypass", "kl", "induce")   # ablate on harmful, ablate on harmless, add on harmless
EPSILON = 1e-8                        # Arditi et al.'s refusal_score epsilon
PAPER_KL_EPSILON = 1e-6               # Arditi et al.'s kl_div_fn epsilon (kl_epsilon's paper-compat value)


@dataclass(frozen=True)
class Candidate:
    layer: int
    position: int
    vector: np.ndarray      # [d_model] float32, the raw difference of means


def _edits(rows: list[tuple[int, Candidate | None]], n_layers: int, d_model: int) -> dict:
    """Per-row edits for a chunk: rows are (kind index into KINDS, candidate or None: unedited)."""
    n = len(rows)
    dirs, alpha, add = torch.zeros(n, d_model), torch.zeros(n), {}
    for i, (kind, c) in enumerate(rows):
        if c is None:
            continue
        v = torch.from_numpy(np.asarray(c.vector, np.float32))
        if KINDS[kind] == "induce":
            add.setdefault(c.layer, torch.zeros(n, d_model))[i] = v
        else:
            dirs[i] = v / max(float(v.norm()), 1e-30)
            alpha[i] = 1.0
    edits = {}
    if alpha.any():
        edits = {(site, layer): RowEdit(dirs, alpha) for layer in range(n_layers) for site in ABLATION_SITES}
    for layer, t in add.items():
        key = ("resid_pre", layer)
        edits[key] = RowEdit(edits[key].ablate_dirs, edits[key].ablate_alpha, t) if key in edits else RowEdit(add=t)
    return edits


def _passes(lm: LoadedModel, rows: list[tuple], seqs: dict[int, list[list[int]]], batch_size: int, progress=None,
            shard: tuple[int, int] | None = None, chunk: int | None = None):
    """Yield (row indices, float64 last-position logits [chunk, vocab]) for rows (kind, candidate,
    prompt index), sorted by prompt length so each chunk pads little.

    The sorted rows are cut into chunks of `chunk` rows (default `batch_size`); `shard` (i, n) keeps
    the chunks i, i + n, i + 2n, ... only, so n shards together run exactly the unsharded passes (the
    same rows in the same batches: bit-identical logits). Each chunk runs in passes of `batch_size`
    rows, which is the chunk itself unless an out-of-memory halving made `batch_size` smaller."""
    n_layers, d_model = lm.sites.n_layers, lm.sites.d_model
    order = sorted(range(len(rows)), key=lambda r: len(seqs[rows[r][0]][rows[r][2]]))
    chunk = chunk or batch_size
    first, step = shard or (0, 1)
    for c0 in range(first * chunk, len(order), step * chunk):
        part = order[c0: c0 + chunk]
        for start in range(0, len(part), batch_size):
            idx = part[start: start + batch_size]
            ids, mask = left_pad([seqs[rows[r][0]][rows[r][2]] for r in idx], lm.tokenizer.pad_token_id)
            edits = _edits([(rows[r][0], rows[r][1]) for r in idx], n_layers, d_model)
            with row_edits(lm.sites, edits):
                logits = forward(lm.model, ids.to(lm.device), mask.to(lm.device), logits_to_keep=1).logits[:, -1]
            yield idx, logits.double()                                       # [chunk, vocab], on the device
            if progress is not None:
                progress(len(idx))


@torch.inference_mode()
def score_candidates(lm: LoadedModel, candidates: list[Candidate], harmful: list[list[int]],
                     harmless: list[list[int]], token_ids: list[int], batch_size: int = 256,
                     progress=None, epsilon: float | None = EPSILON, filter_val: bool = False,
                     kl_epsilon: float | None = None, shard: tuple[int, int] | None = None,
                     chunk: int | None = None) -> dict:
    """Bypass, induce and KL of every candidate, many candidates per forward pass.

    One pass over the baseline rows (every val prompt unedited), then one over the candidate rows:
    per candidate, its ablation on every harmful prompt (bypass), its ablation on every harmless
    prompt (KL against the baseline's first-token distribution) and its addition on every harmless
    prompt (induce). Only the last position's logits are computed.

    Args:
        harmful, harmless: token ids of the rendered val prompts (unpadded).
        token_ids: the refusal first tokens (`refusal_ray.models.refusal_tokens.resolve`).
        epsilon: the refusal score's epsilon (`RefusalScore`; Arditi et al.: 1e-8; None: unbounded).
        filter_val: Arditi et al.'s `filter_val`: score candidates only on the harmful prompts whose
            baseline refusal score is > 0 and the harmless ones whose score is < 0.
        kl_epsilon: None or 0: the exact KL; Arditi et al.'s `kl_div_fn` smoothing with 1e-6, see `_kl`.
        shard: (i, n): run only shard i of n of the candidate passes (`_passes`: chunks i, i + n, ...
            of `chunk` rows, default `batch_size`; the baseline pass runs whole in every shard) and
            return that shard's partial scores; `merge_scores` of all n partials equals the unsharded
            result exactly (the same batches, so bit-identical).
    Returns:
        float64 arrays: "bypass", "induce", "kl" [n_candidates]; "bypass_scores", "induce_scores"
        [n_candidates, n_kept] (per-prompt refusal scores); "baseline_harmful", "baseline_harmless"
        [n_kept] (unedited scores); "kept_harmful", "kept_harmless" (indices into the inputs).
        KL in nats per prompt as `_kl` defines it, mean over the kept harmless prompts.
        With `shard`: a partial instead, {"values": [n_rows] per-row scores (NaN where not run),
        "done": [n_rows] bool, "shape": (n_candidates, n_kept_harmful, n_kept_harmless), the
        baseline and kept arrays}, rows ordered per candidate: bypass, KL, induce prompts.
    Raises:
        ValueError: filter_val keeps no prompt of a class (the message says which).
    """
    metric = RefusalScore(token_ids, epsilon)
    seqs = {0: harmful, 1: harmless}
    base_rows = [(0, None, i) for i in range(len(harmful))] + [(1, None, i) for i in range(len(harmless))]
    base_score = np.zeros(len(base_rows))
    base_lp: torch.Tensor | None = None                                       # [n_harmless, vocab] float64
    for idx, logits in _passes(lm, base_rows, seqs, batch_size, progress, chunk=chunk):
        base_score[idx] = metric(logits).cpu().numpy()
        lp = torch.log_softmax(logits, -1)
        if base_lp is None:
            base_lp = torch.zeros(len(harmless), lp.shape[-1], dtype=torch.float64, device=lp.device)
        for j, r in enumerate(idx):
            if base_rows[r][0] == 1:
                base_lp[base_rows[r][2]] = lp[j]
    n_drawn = len(harmful)
    keep_h, keep_s = np.arange(n_drawn), np.arange(len(harmless))
    if filter_val:
        keep_h, keep_s = np.flatnonzero(base_score[:n_drawn] > 0), np.flatnonzero(base_score[n_drawn:] < 0)
        for kept, n, what in ((keep_h, len(harmful), "harmful val prompts the model refuses"),
                              (keep_s, len(harmless), "harmless val prompts the model does not refuse")):
            if not len(kept):
                raise ValueError(f"filter_val kept 0 {what} (of {n}); set stages.select.filter_val: false")
    harmful, harmless = [harmful[i] for i in keep_h], [harmless[i] for i in keep_s]
    base_lp = base_lp[torch.as_tensor(keep_s, device=base_lp.device)]
    seqs = {0: harmful, 1: harmless, 2: harmless}      # by kind: bypass, kl, induce
    nh, ns, nc = len(harmful), len(harmless), len(candidates)
    rows = [(k, c, i) for c in candidates for k in range(3) for i in range(len(seqs[k]))]
    values, done = np.full(len(rows), np.nan), np.zeros(len(rows), bool)
    for idx, logits in _passes(lm, rows, seqs, batch_size, progress, shard or (0, 1), chunk):
        score = metric(logits).cpu().numpy()
        kinds = np.array([rows[r][0] for r in idx])
        prompt = np.array([rows[r][2] for r in idx])
        kl = np.full(len(idx), np.nan)
        if (kinds == 1).any():   # KL(baseline || ablated) of the first generated token, vectorised
            j, i = np.flatnonzero(kinds == 1), torch.as_tensor(prompt[kinds == 1], device=logits.device)
            lp = torch.log_softmax(logits[torch.as_tensor(j, device=logits.device)], -1)
            kl[j] = _kl(base_lp[i], lp, kl_epsilon).cpu().numpy()
        values[idx] = np.where(kinds == 1, kl, score)
        done[idx] = True
    part = {"values": values, "done": done, "shape": (nc, nh, ns), "baseline_harmful": base_score[:n_drawn][keep_h],
            "baseline_harmless": base_score[n_drawn:][keep_s], "kept_harmful": keep_h, "kept_harmless": keep_s}
    return part if shard is not None else merge_scores([part])


def merge_scores(parts: list[dict]) -> dict:
    """The full `score_candidates` result from the partials of shards 0..n-1 (`shard=(i, n)`).

    Every row must have been run by exactly one shard, and all shards must have kept the same val
    prompts (their baseline passes are the same batches). The per-prompt matrices are assembled
    before any mean is taken, so the result equals the unsharded run bit for bit.
    Raises:
        ValueError: the shards disagree on the shape or the kept prompts, or a row was run by no
            shard or by more than one.
    """
    first = parts[0]
    for p in parts[1:]:
        if p["shape"] != first["shape"] or not all(np.array_equal(p[k], first[k]) for k in ("kept_harmful", "kept_harmless")):
            raise ValueError("select shards disagree on the candidates or the kept val prompts")
    runs = np.sum([p["done"] for p in parts], axis=0)
    if (runs != 1).any():
        raise ValueError(f"select shards ran {int((runs == 0).sum())} rows never and {int((runs > 1).sum())} "
                         "rows more than once")
    values = first["values"].copy()
    for p in parts[1:]:
        values[p["done"]] = p["values"][p["done"]]
    nc, nh, ns = first["shape"]
    per = values.reshape(nc, nh + 2 * ns)            # per candidate: bypass, KL, induce prompts
    bypass, kl, induce = (np.ascontiguousarray(per[:, a:b]) for a, b in ((0, nh), (nh, nh + ns), (nh + ns, nh + 2 * ns)))
    return {"bypass": bypass.mean(1), "induce": induce.mean(1), "kl": kl.mean(1), "bypass_scores": bypass,
            "induce_scores": induce, "baseline_harmful": first["baseline_harmful"],
            "baseline_harmless": first["baseline_harmless"],
            "kept_harmful": first["kept_harmful"], "kept_harmless": first["kept_harmless"]}


def _kl(base_lp: torch.Tensor, lp: torch.Tensor, epsilon: float | None) -> torch.Tensor:
    """First-token KL(P_base || P_ablated) per prompt, from float64 log-probabilities [n, vocab]: [n] nats.

    With `epsilon` (Arditi et al.'s `kl_div_fn`, epsilon 1e-6, on float64 softmaxes):
    sum_t P_base(t) (log(P_base(t) + eps) - log(P_abl(t) + eps)). Without: the exact KL, where a token
    with P_base(t) = 0 contributes 0 (not 0 * inf = NaN; `capability.measures.first_token_kl`). The
    smoothing shrinks the terms of tokens below ~eps: it lowers a KL of 1.690 to 1.660 on toy-llama-s
    and 5.396 to 5.262 on SmolLM2-135M-Instruct (0.2174 to 0.2155 near the filter). The exact KL is
    the quantity the paper names and the default; the smoothing is the paper-compat setting.
    """
    if not epsilon:
        return first_token_kl(base_lp, lp)
    p, q = base_lp.exp(), lp.exp()
    return (p * (torch.log(p + epsilon) - torch.log(q + epsilon))).sum(-1)


def zero_norm(vectors: list[np.ndarray], rtol: float = RANK_RTOL) -> list[bool]:
    """Which candidates are zero vectors: norm at most `rtol` x the largest norm (e.g. resid_pre of
    layer 0 at a template token: the same embedding for every prompt, so the difference is 0 up to
    rounding). Such a candidate has no direction to ablate: it is not scored."""
    norms = np.array([float(np.linalg.norm(np.asarray(v, np.float64))) for v in vectors])
    top = norms.max(initial=0.0)
    return [bool(n <= rtol * top) for n in norms]


def choose(rows: list[dict], n_layers: int, cfg: dict) -> list[dict]:
    """Apply the filters and the criterion to candidate rows (in place); returns the rows.

    Filters, in the order of Arditi et al.'s `filter_fn`: a NaN bypass, induce or KL score ("nan"),
    layer >= int(max_layer_fraction * n_layers), KL > kl_max, induce < induce_min; and ours: a
    zero-norm candidate ("zero-norm", never scored). Each row gets `filter` (None when it passes,
    else the reasons, e.g. "layer>=int(0.8L),kl>0.1"), `passed`, `selected` and `selected_by` (the
    criterion, "fallback:<criterion>", or None). A fallback picks among the candidates whose only
    reasons are the layer, KL and induce filters: a NaN or zero-norm candidate is never selected.
    """
    cutoff = layer_cutoff(n_layers, cfg.get("max_layer_fraction"))
    kl_max, induce_min = cfg.get("kl_max"), cfg.get("induce_min")
    eligible = []
    for r in rows:
        why, broken = [], False
        if r.get("zero_norm"):
            why.append("zero-norm")
            broken = True
        elif any(_nan(r[k]) for k in ("bypass", "induce", "kl")):
            why.append("nan")
            broken = True
        if cutoff is not None and r["layer"] >= cutoff:
            why.append(f"layer>=int({cfg['max_layer_fraction']:g}L)")
        if not broken and kl_max is not None and not r["kl"] <= kl_max:
            why.append(f"kl>{kl_max:g}")
        if not broken and induce_min is not None and not r["induce"] >= induce_min:
            why.append(f"induce<{induce_min:g}")
        r.update(filter=",".join(why) or None, passed=not why, selected=False, selected_by=None)
        if not broken:
            eligible.append(r)
    pool, by, label = [r for r in rows if r["passed"]], cfg["criterion"], cfg["criterion"]
    if not pool and cfg.get("fallback"):
        pool, by, label = eligible, cfg["fallback"], f"fallback:{cfg['fallback']}"
    pool = [r for r in pool if not _nan(_rank_value(r, by))]
    if pool:
        best = ranked(pool, by)[0]
        best.update(selected=True, selected_by=label)
    return rows


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and np.isnan(x))


def ranked(rows: list[dict], criterion: str) -> list[dict]:
    """Candidates best first by `criterion` (ties: the lower layer, then the later position). The
    paper's loop keeps the first of equal scores in (position, layer) order, earliest position first;
    the two differ only on exactly equal scores."""
    return sorted(rows, key=lambda r: (_rank(r, criterion), int(r["layer"]), -int(r["position"])))


def _rank_value(row: dict, criterion: str):
    return {"bypass": row["bypass"], "swing": row["swing"], "separation": row["separation"]}[criterion]


def _rank(row: dict, criterion: str) -> float:
    value = _rank_value(row, criterion)
    if _nan(value):
        return np.inf
    return value if criterion == "bypass" else -value


def run_select(lm: LoadedModel, cell, val: dict[str, PromptSet], candidates: list[Candidate],
               separations: dict[tuple[int, int], float], cfg: dict, phrases: list[str], chat=None,
               progress=None) -> list[dict]:
    """One select cell: every candidate scored on the val split, filtered, one chosen (or none).

    Returns one row per candidate: layer, position, bypass, induce, kl, the refusal-rate swing
    parts, separation, filter, passed, selected, selected_by, the baselines, and the val counts
    (`n_val` / `n_val_harmless`: scored, after filter_val; `n_val_drawn` / `n_val_harmless_drawn`).
    Zero-norm candidates are not scored (NaN scores, filter "zero-norm").
    """
    return selection_rows(cell, candidates, separations, cfg,
                          score_select(lm, val, candidates, cfg, phrases, chat, progress))


def score_select(lm: LoadedModel, val: dict[str, PromptSet], candidates: list[Candidate], cfg: dict,
                 phrases: list[str], chat=None, progress=None, shard: tuple[int, int] | None = None,
                 chunk: int | None = None) -> dict:
    """`run_select`'s model half: {"scores": `score_candidates` of the non-zero-norm candidates (with
    `shard`, that shard's partial; `chunk`: the shards' unit, see `_passes`), "zero": [n_candidates]
    bool, "token_ids", "eps", "kl_eps", "n_drawn", "n_harmless_drawn", "n_layers"}."""
    tok = lm.tokenizer
    harmful, harmless = prompt_tokens(tok, val["harmful"].instructions, chat), prompt_tokens(
        tok, val["harmless"].instructions, chat)
    token_ids = refusal_tokens.resolve(cfg.get("refusal_tokens", "family"), tok, model_type(lm), phrases)
    eps = cfg.get("refusal_score_epsilon", EPSILON) or None
    zero = zero_norm([c.vector for c in candidates])
    scored = [c for c, z in zip(candidates, zero) if not z]
    kl_eps = cfg.get("kl_epsilon", 0.0) or None
    s = score_candidates(lm, scored, harmful, harmless, token_ids, cfg["batch_size"], progress, eps,
                         bool(cfg.get("filter_val")), kl_eps, shard, chunk)
    return {"scores": s, "zero": zero, "token_ids": token_ids, "eps": eps, "kl_eps": kl_eps,
            "n_drawn": len(harmful), "n_harmless_drawn": len(harmless), "n_layers": lm.sites.n_layers}


def selection_rows(cell, candidates: list[Candidate], separations: dict[tuple[int, int], float], cfg: dict,
                   scored: dict) -> list[dict]:
    """`run_select`'s rows from `score_select`'s result (no model needed): one per candidate, filtered
    and chosen (`choose`)."""
    s, zero, token_ids, eps, kl_eps = (scored[k] for k in ("scores", "zero", "token_ids", "eps", "kl_eps"))
    base_h_rate, base_s_rate = float((s["baseline_harmful"] > 0).mean()), float((s["baseline_harmless"] > 0).mean())
    rows, k = [], 0
    for c, z in zip(candidates, zero):
        if z:
            bypass = induce = kl = bypass_rate = induce_rate = float("nan")
        else:
            bypass, induce, kl = float(s["bypass"][k]), float(s["induce"][k]), float(s["kl"][k])
            bypass_rate, induce_rate = float((s["bypass_scores"][k] > 0).mean()), float((s["induce_scores"][k] > 0).mean())
            k += 1
        rows.append({
            "cell_id": cell.id, "seed": cell.seed, "layer": c.layer, "position": c.position,
            "bypass": bypass, "induce": induce, "kl": kl, "bypass_rate": bypass_rate, "induce_rate": induce_rate,
            "swing": (base_h_rate - bypass_rate) + (induce_rate - base_s_rate),
            "separation": separations.get((c.layer, c.position), float("nan")),
            "norm": float(np.linalg.norm(np.asarray(c.vector, np.float64))), "zero_norm": z,
            "baseline_harmful_score": float(s["baseline_harmful"].mean()),
            "baseline_harmless_score": float(s["baseline_harmless"].mean()),
            "baseline_harmful_rate": base_h_rate, "baseline_harmless_rate": base_s_rate,
            "n_val": len(s["kept_harmful"]), "n_val_harmless": len(s["kept_harmless"]),
            "n_val_drawn": scored["n_drawn"], "n_val_harmless_drawn": scored["n_harmless_drawn"],
            "criterion": cfg["criterion"], "refusal_tokens": json.dumps(token_ids),
            "refusal_score_epsilon": eps or 0.0, "kl_epsilon": kl_eps or 0.0,
        })
    return choose(rows, scored["n_layers"], cfg)


def selected_direction(selection_rows: list[dict]) -> dict | None:
    """{layer, position, selected_by} of the selected candidate, or None when nothing was selected."""
    chosen = [r for r in selection_rows if r.get("selected")]
    if not chosen:
        return None
    r = chosen[0]
    return {"layer": int(r["layer"]), "position": int(r["position"]), "selected_by": r["selected_by"]}


# -- the run side of the declaration (`STAGE.inputs`, `.run`, `.shards`, `.merge`) -----------------
def inputs(settings: dict, needs: dict) -> dict:
    """`STAGE.inputs`: the candidates (resid_pre directions of `stages.select.layers`, by layer then
    position) and their separations from the directions rows of the same (model, seed)."""
    layers = settings["select"].get("layers", "all")
    rows = [r for r in needs["directions"]["directions"] if r["site"] == "resid_pre"
            and (layers == "all" or int(r["layer"]) in layers)]
    return {"candidates": [Candidate(int(r["layer"]), int(r["position"]), np.asarray(r["vector"], np.float32))
                           for r in sorted(rows, key=lambda r: (r["layer"], r["position"]))],
            "separations": {(int(r["layer"]), int(r["position"])): float(r["separation"]) for r in rows}}


def run_task(session, cells, payload) -> dict:
    """`STAGE.run`: select cells; with payload["shard"] (i, n) (`shards`), shard i's partial scores per
    cell ({"select_shard": [{"cell_id", ...score_select}]}, never stored: `merge` turns the n partials
    into the selection rows)."""
    cfg = session.settings["select"]
    val = session.prompts[cells[0].seed]["val"]
    if payload.get("shard") is not None:
        return {"select_shard": [{"cell_id": cell.id, **session.halving(lambda bs: score_select(
            session.lm, val, payload["candidates"], {**cfg, "batch_size": bs}, session.judge.phrases, session.chat,
            shard=tuple(payload["shard"]), chunk=cfg["batch_size"]), cfg["batch_size"])} for cell in cells]}
    rows = []
    for cell in cells:
        rows += session.halving(lambda bs, cell=cell: run_select(
            session.lm, cell, val, payload["candidates"], payload["separations"], {**cfg, "batch_size": bs},
            session.judge.phrases, session.chat), cfg["batch_size"])
    return {"selection": rows}


def shards(settings: dict, payload: dict, n: int) -> list[dict]:
    """`STAGE.shards`: n shard payloads of a select task: shard i scores the candidate chunks i, i + n,
    ... (`_passes`)."""
    return [{**payload, "shard": (i, n)} for i in range(n)]


def merge(settings: dict, cells, payload: dict, parts: list[dict]) -> dict:
    """`STAGE.merge`: the selection rows from the n shards' results ({"select_shard": [...]} each, in
    shard order): the per-row scores merged (`merge_scores`), then rows and `choose` once, as one
    unsharded run. Raises ValueError when the shards do not cover every row exactly once."""
    cfg, rows = settings["select"], []
    for cell in cells:
        pieces = [next(r for r in part["select_shard"] if r["cell_id"] == cell.id) for part in parts]
        scored = {**pieces[0], "scores": merge_scores([p["scores"] for p in pieces])}
        rows += selection_rows(cell, payload["candidates"], payload["separations"], cfg, scored)
    return {"selection": rows}
