"""Stage `patch`, the run side: exact activation patching and the attribution-patching screen.

Denoising (DESIGN.md): clean = harmful prompt, corrupted = its harmless twin (same pair id).
A patch copies one site's clean activation (at the patched positions; for `z`, one head) into the
corrupted run. Metric: the refusal score at the last prompt position,

    m = log p - log(1 - p),   p = sum of softmax(logits)[t] over the refusal first tokens t,

where the refusal first tokens are the first token of each judge phrase, tokenized as the start
of the answer (`refusal_token_ids`). Recovery = (m_patched - m_corrupted) / (m_clean - m_corrupted):
1 means the patch restores the clean behaviour, 0 means it does nothing.

Exact patching (`exact_patching`) puts many patches in one forward pass as batch rows: each chunk
holds g clean rows, g corrupted rows and g rows per patch; hooks copy the clean row's value into
the patched rows inside the same pass, so no activation cache is kept at all. Because a patch at
position p cannot change anything before p, the tokens before the earliest patched position are
run once per pair group and their key/value cache is shared by every patch row; each patch then
costs only the last few tokens (the shared-prefix trick of auto-circuit).

Attribution patching (`attribution_patching`; Nanda 2023, "Attribution Patching"; AtP in Kramar
et al. 2024, arXiv 2403.00745, Sec. 2) estimates every patch at once from one clean forward pass,
one corrupted forward pass and one backward pass:
    Delta m ~= (a_clean - a_corrupted) . dm/da |corrupted
keeping only the per-site scores (gradients are reduced in tensor hooks, never stored). The
screen ranks sites by |mean estimated recovery| and `confirm_top_k` re-measures the top k exactly.
Known false negatives of AtP (attention saturation, cancellation; Kramar et al. Sec. 3) are why
the exact confirmation exists.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from refusal_ray.data import Pairs, encode
from refusal_ray.core.cells import Cell, layer_list
from refusal_ray.interventions import forward, hooks, position_ids
from refusal_ray.models.kv import returned_cache, with_cache
from refusal_ray.models.loading import LoadedModel
from refusal_ray.models.refusal_tokens import first_tokens
from refusal_ray.models.sites import SiteAdapter, site_name


@dataclass(frozen=True)
class Target:
    """One patch: a site at one layer, and for `z` one head."""

    kind: str
    layer: int
    head: int | None = None

    @property
    def site(self) -> str:
        return site_name(self.kind, self.layer)


def targets_for(sites: SiteAdapter, kinds: list[str], layers: list[int]) -> list[Target]:
    """Every patch of a grid of site kinds x layers; `z` expands into one target per head."""
    out: list[Target] = []
    for layer in layers:
        for kind in kinds:
            out += ([Target(kind, layer, h) for h in range(sites.n_heads)] if kind == "z"
                    else [Target(kind, layer)])
    return out


def refusal_token_ids(tokenizer, phrases: list[str]) -> list[int]:
    """The first token of each phrase, tokenized as the start of an answer (no special tokens,
    no leading space: the answer follows the chat template's generation prompt). Sorted, unique.
    Raises ValueError when no phrase gives a token. (`refusal_ray.models.refusal_tokens.first_tokens`.)"""
    return first_tokens(tokenizer, phrases)


class RefusalScore:
    """m = log p - log(1 - p) with p the probability of the refusal first tokens (DESIGN.md).

    Computed stably as logsumexp(logits[refusal]) - logsumexp(logits[other]), in float32 (float64
    when given float64 logits, as stage select and train filtering do).

    With `epsilon` (stage select: Arditi et al.'s `refusal_score`, epsilon 1e-8, in
    `pipeline/submodules/select_direction.py`): m = log(p + eps) - log(1 - p + eps), which caps a
    prompt's score near +-log(1/eps) (18.42 for 1e-8), so one prompt with p = 1e-14 cannot dominate a
    mean over prompts. p and 1 - p are each computed from their own partition of the softmax (no
    cancellation in 1 - p when p is near 1). The sign of m, and so "refused" (m > 0, i.e. p > 1/2), is
    the same with and without epsilon.
    Call: logits [batch, vocab] -> [batch].
    """

    def __init__(self, token_ids: list[int], epsilon: float | None = None):
        self.token_ids = list(token_ids)
        self.epsilon = epsilon

    def __call__(self, logits: Tensor) -> Tensor:
        logits = logits if logits.dtype == torch.float64 else logits.float()
        refusal = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        refusal[self.token_ids] = True
        log_r, log_o = torch.logsumexp(logits[:, refusal], -1), torch.logsumexp(logits[:, ~refusal], -1)
        if self.epsilon is None:
            return log_r - log_o
        total = torch.logaddexp(log_r, log_o)
        return torch.log((log_r - total).exp() + self.epsilon) - torch.log((log_o - total).exp() + self.epsilon)


class _CopyRows:
    """Hook body: rows[i] <- rows src[i] at `positions` (and head heads[i] for z), same pass.

    Writes in place, so a site read by two consumers changes for both: `hook_resid_mid` is the
    pre-MLP norm's input *and* the residual that the MLP output is added to, and both see the patch.
    """

    def __init__(self, rows: Tensor, src: Tensor, heads: Tensor | None, positions: Tensor):
        self.rows, self.src, self.heads, self.positions = rows, src, heads, positions

    def __call__(self, x: Tensor) -> None:  # [batch, pos, d_model] or z [batch, pos, n_heads, d_head]
        r, s, p = self.rows.to(x.device)[:, None], self.src.to(x.device)[:, None], self.positions.to(x.device)[None, :]
        if self.heads is None:
            x[r, p] = x[s, p]                                     # [m, n_pos, d_model]
        else:
            h = self.heads.to(x.device)[:, None]
            x[r, p, h] = x[s, p, h]                               # [m, n_pos, d_head]


def _select_cache(cache, index: Tensor):
    """A copy of a key/value cache holding batch rows `index` (the original is left intact)."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    new.batch_select_indices(index)
    return new


def suffix_length(positions: list[int], metric_position: int, seq_len: int) -> int:
    """Tokens re-run per patch: from the earliest patched (or scored) position to the end."""
    k = max(-min(positions), -metric_position)
    if k > seq_len:
        raise ValueError(f"position {-k} is before the start of a {seq_len}-token batch")
    return k


@torch.inference_mode()
def exact_patching(model, sites: SiteAdapter, input_ids: Tensor, attention_mask: Tensor, targets: list[Target],
                   positions: list[int], metric, batch_size: int = 256, metric_position: int = -1,
                   share_prefix: bool = True, progress=None) -> tuple[Tensor, Tensor, Tensor]:
    """Exact denoising activation patching of every target on every pair.

    Args:
        input_ids, attention_mask: [2n, pos], left padded to one length; rows 0..n-1 are the clean
            inputs and row n+i is the corrupted twin of row i.
        targets: the patches; positions: negative positions patched together.
        metric: logits [batch, vocab] -> [batch], read at `metric_position`.
        batch_size: rows per forward pass (clean + corrupted + patched rows of a chunk).
        share_prefix: reuse the key/value cache of the tokens before the earliest patched position
            (False: every patch row runs the whole sequence; for benchmarks).
    Returns:
        (patched [n_targets, n], clean [n], corrupted [n]) metric values, float64.
    Raises:
        ValueError: a position before the start of the batch.
    """
    n, seq_len = input_ids.shape[0] // 2, input_ids.shape[1]
    split = seq_len - suffix_length(positions, metric_position, seq_len) if share_prefix else 0
    device = model.get_input_embeddings().weight.device
    ids, mask = input_ids.to(device), attention_mask.to(device)
    pos_ids = position_ids(mask)
    pos = torch.tensor(positions)
    g = min(n, max(1, batch_size // 32))                 # pairs per chunk
    per_chunk = max(1, (batch_size - 2 * g) // g)        # patches per chunk
    patched = torch.empty(len(targets), n, dtype=torch.float64)
    clean, corrupted = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    for p0 in range(0, n, g):
        gg = min(g, n - p0)
        base = torch.cat([torch.arange(p0, p0 + gg), torch.arange(n + p0, n + p0 + gg)]).to(device)  # [2gg]
        prefix = None
        if split > 0:  # the shared prefix: run once, reused by every patch row of these pairs
            prefix = returned_cache(model(input_ids=ids[base, :split], attention_mask=mask[base, :split],
                                          position_ids=pos_ids[base, :split], use_cache=True, logits_to_keep=1))
        for t0 in range(0, len(targets), per_chunk):
            chunk = targets[t0: t0 + per_chunk]
            corr = torch.arange(gg, 2 * gg)
            local = torch.cat([torch.arange(2 * gg), corr.repeat(len(chunk))])        # rows into `base`
            rows = base[local.to(device)]
            transforms = _copy_hooks(chunk, gg, pos)
            kwargs = with_cache(model, _select_cache(prefix, local.to(device))) if prefix is not None else \
                     {"use_cache": False}
            with hooks(sites, transforms):
                logits = model(input_ids=ids[rows, split:], attention_mask=mask[rows],
                               position_ids=pos_ids[rows, split:], logits_to_keep=-metric_position,
                               **kwargs).logits[:, 0]          # [rows, vocab] at metric_position
            m = metric(logits).double().cpu()
            if t0 == 0:
                clean[p0: p0 + gg], corrupted[p0: p0 + gg] = m[:gg], m[gg: 2 * gg]
            patched[t0: t0 + len(chunk), p0: p0 + gg] = m[2 * gg:].view(len(chunk), gg)
            if progress is not None:
                progress(len(chunk) * gg)
    return patched, clean, corrupted


def _copy_hooks(chunk: list[Target], gg: int, pos: Tensor) -> dict[str, _CopyRows]:
    """{site: hook} for one chunk: patch j's rows are 2gg + j*gg + i, copying clean row i."""
    by_site: dict[str, list[tuple[int, Target]]] = {}
    for j, t in enumerate(chunk):
        by_site.setdefault(t.site, []).append((j, t))
    out = {}
    for site, items in by_site.items():
        rows = torch.cat([2 * gg + j * gg + torch.arange(gg) for j, _ in items])
        src = torch.arange(gg).repeat(len(items))
        heads = None if items[0][1].head is None else torch.tensor([t.head for _, t in items]).repeat_interleave(gg)
        out[site] = _CopyRows(rows, src, heads, pos)
    return out


def attribution_patching(model, sites: SiteAdapter, input_ids: Tensor, attention_mask: Tensor,
                         targets: list[Target], positions: list[int], metric, batch_pairs: int = 16,
                         progress=None) -> tuple[Tensor, Tensor, Tensor]:
    """Attribution patching (AtP): linear estimates of every target's effect on the metric.

    Per pair group: a clean forward pass (no gradients) reads the sites at the patched positions;
    a corrupted forward pass with gradients and one backward pass of sum(metric) give, for each
    site, (a_clean - a_corrupted) . dm/da summed over the patched positions (and per head for z).
    Gradients are reduced inside tensor hooks; only the per-site scores are kept.

    Args: as `exact_patching`; `batch_pairs` pairs per backward pass (the memory knob).
    Returns:
        (estimated patched - corrupted metric [n_targets, n], clean [n], corrupted [n]), float64.
    """
    n = input_ids.shape[0] // 2
    device = model.get_input_embeddings().weight.device
    pos = torch.tensor(positions)
    site_names = sorted({t.site for t in targets})
    est = torch.empty(len(targets), n, dtype=torch.float64)
    clean_m, corr_m = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    for p0 in range(0, n, batch_pairs):
        gg = min(batch_pairs, n - p0)
        c_ids, c_mask = input_ids[p0: p0 + gg].to(device), attention_mask[p0: p0 + gg].to(device)
        k_ids, k_mask = input_ids[n + p0: n + p0 + gg].to(device), attention_mask[n + p0: n + p0 + gg].to(device)
        clean_acts: dict[str, Tensor] = {}

        def reader(name):
            def read(x):
                clean_acts[name] = x[:, pos.to(x.device)].detach().clone()
            return read

        with torch.inference_mode(), hooks(sites, {s: reader(s) for s in site_names}):
            clean_m[p0: p0 + gg] = metric(forward(model, c_ids, c_mask, logits_to_keep=1).logits[:, -1]).double().cpu()
        scores: dict[str, Tensor] = {}

        def scorer(name):
            def score(x):
                delta = (clean_acts[name].to(x.device) - x[:, pos.to(x.device)].detach()).float()

                def on_grad(grad):  # grad: same shape as x
                    prod = delta * grad[:, pos.to(grad.device)].float()   # [gg, n_pos, d] or [gg, n_pos, H, dh]
                    scores[name] = (prod.sum((1, 3)) if prod.dim() == 4 else prod.sum((1, 2))).double().cpu()
                x.register_hook(on_grad)
                return x   # returned so that a z view takes part in the graph
            return score

        emb = model.get_input_embeddings()
        handle = emb.register_forward_hook(lambda mod, args, out: out.requires_grad_(True))
        try:
            with torch.enable_grad(), hooks(sites, {s: scorer(s) for s in site_names}):
                m = metric(forward(model, k_ids, k_mask, logits_to_keep=1).logits[:, -1])
                m.sum().backward()
        finally:
            handle.remove()
        corr_m[p0: p0 + gg] = m.detach().double().cpu()
        for i, t in enumerate(targets):
            s = scores[t.site]
            est[i, p0: p0 + gg] = s if t.head is None else s[:, t.head]
        if progress is not None:
            progress(len(targets) * gg)
    return est, clean_m, corr_m


def recovery(patched: Tensor, clean: Tensor, corrupted: Tensor) -> Tensor:
    """(m_patched - m_corrupted) / (m_clean - m_corrupted) per pair; NaN where clean == corrupted."""
    denom = clean - corrupted
    return torch.where(denom != 0, (patched - corrupted) / denom, torch.full_like(patched, float("nan")))


def top_targets(estimates: Tensor, k: int) -> list[int]:
    """Indices of the k targets with the largest |mean estimate over pairs| (AtP's ranking)."""
    score = torch.nan_to_num(estimates.nanmean(dim=1).abs(), nan=-1.0)
    return torch.argsort(score, descending=True, stable=True)[:k].tolist()


def run_patch(lm: LoadedModel, cell: Cell, pairs: Pairs, cfg: dict, phrases: list[str], progress=None,
              chat=None) -> list[dict]:
    """One patch cell: the optional attribution screen, then exact patching (all or top k).

    Returns one row per (target, pair): site, kind, layer, head, pair id, the clean / corrupted /
    patched refusal scores, exact `recovery` (None where not measured) and the screen's
    `attribution` estimate of recovery with its `attribution_rank` (None without a screen).
    """
    model, sites = lm.model, lm.sites
    targets = targets_for(sites, cfg["sites"], layer_list(cfg["layers"], sites.n_layers))
    ids, mask = encode(lm.tokenizer, pairs.harmful.instructions + pairs.harmless.instructions, chat)
    metric = RefusalScore(refusal_token_ids(lm.tokenizer, phrases))
    n = len(pairs)
    att = ranks = None
    chosen = list(range(len(targets)))
    if cfg["attribution"]:
        est, a_clean, a_corr = attribution_patching(model, sites, ids, mask, targets, cfg["positions"], metric,
                                                    cfg["screen_batch_size"], progress)
        att = recovery(a_corr + est, a_clean, a_corr)                    # [n_targets, n]
        order = top_targets(att, len(targets))
        ranks = {t: r + 1 for r, t in enumerate(order)}
        if cfg["confirm_top_k"] is not None:
            chosen = sorted(order[: cfg["confirm_top_k"]])
    patched, clean, corr = exact_patching(model, sites, ids, mask, [targets[i] for i in chosen], cfg["positions"],
                                          metric, cfg["batch_size"], progress=progress)
    rec = recovery(patched, clean, corr)
    exact = {t: j for j, t in enumerate(chosen)}
    rows = []
    for i, t in enumerate(targets):
        j = exact.get(i)
        for p in range(n):
            rows.append({
                "cell_id": cell.id, "seed": cell.seed, "site": t.site, "kind": t.kind, "layer": t.layer,
                "head": t.head, "positions": json.dumps(cfg["positions"]), "pair_id": pairs.pair_ids[p],
                "clean_score": float(clean[p]), "corrupted_score": float(corr[p]),
                "patched_score": None if j is None else float(patched[j, p]),
                "recovery": None if j is None else _finite(rec[j, p]),
                "attribution": None if att is None else _finite(att[i, p]),
                "attribution_rank": None if ranks is None else ranks[i],
            })
    return rows


def _finite(x: Tensor) -> float | None:
    v = float(x)
    return v if np.isfinite(v) else None


# -- the run side of the declaration (`STAGE.run`) ---------------------------------------------
def run_task(session, cells, payload) -> dict:
    """`STAGE.run`: every patch cell of a task on the session's model ({"patching": rows})."""
    cfg = session.settings["patch"]
    rows = []
    for cell in cells:
        rows += session.halving(lambda bs, cell=cell: run_patch(
            session.lm, cell, session.prompts[cell.seed]["patch"], {**cfg, "batch_size": bs}, session.judge.phrases,
            chat=session.chat), cfg["batch_size"])
    return {"patching": rows}
