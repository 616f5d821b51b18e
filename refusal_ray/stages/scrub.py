"""Stage `scrub`: causal scrubbing of circuit hypotheses, as the audits define it.

Plainly: this is resample ablation of the complement of the hypothesis. For each harmful example
(the "full" run: its prompt plus the model's own greedy answer prefix), the scrubbed run keeps the
hypothesis' protected sites at their values on the full run and replaces every other site of the
scrubbed set with its value on a resampled harmless input (another prompt, seeded, followed by
the same answer prefix). It is not Redwood's path-level causal scrubbing (Chan et al. 2022): a
protected site reads a residual stream in which every upstream unprotected write was resampled,
and scrubbing `hook_resid_post` at a layer overwrites everything upstream of it.

Measure, per example: KL(full || scrubbed) of the next-token distribution at every scored position
(the last prompt token and each answer-prefix token before any end of turn), averaged over the
positions; faithfulness = exp(-mean KL over examples), with the max KL and quantiles of the
per-example KLs (a per-example divergence cannot cancel, unlike "loss recovered"; Scheurer et al.
2023). Verdict: FAITHFUL when faithfulness >= the spec's threshold. The KL of the fully corrupted
run (full vs the resampled input itself) is reported beside it for scale.

One forward pass holds, for a group of examples, the full rows, the resampled rows and one
scrubbed row per (hypothesis, resample); hooks copy values between rows inside the pass, so no
activation cache is kept. Positions are aligned from the end (left padding); where the resampled
input is shorter than the example, the leading positions it lacks keep their own values.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import Tensor

from refusal_ray.data import Pairs, chat_prompts, left_pad
from refusal_ray.grid import Cell
from refusal_ray.interventions import hooks, position_ids
from refusal_ray.models.loading import LoadedModel
from refusal_ray.models.patterns import Selection, expand
from refusal_ray.models.sites import SiteAdapter, parse_site

QUANTILES = (0.5, 0.9)


def prompt_tokens(tokenizer, instructions: list[str]) -> list[list[int]]:
    """Token ids of each instruction in the chat template (with the generation prompt)."""
    return tokenizer(chat_prompts(tokenizer, instructions), add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def answer_prefixes(lm: LoadedModel, prompts: list[list[int]], n_tokens: int, batch_size: int) -> list[list[int]]:
    """The unmodified model's greedy answer to each prompt: up to `n_tokens` tokens, cut before the
    first end-of-sequence token."""
    tok, out = lm.tokenizer, []
    stop = {tok.eos_token_id, tok.pad_token_id} - {None}
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start: start + batch_size], tok.pad_token_id)
        gen = lm.model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                                max_new_tokens=n_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                eos_token_id=tok.eos_token_id)[:, ids.shape[1]:].tolist()
        for row in gen:
            cut = next((i for i, t in enumerate(row) if t in stop), len(row))
            out.append(row[:cut])
    return out


def _masks(sel_protected: Selection, sel_scrubbed: Selection, site: str, n_heads: int) -> tuple[Tensor, Tensor]:
    """(use_full, use_source) for one hypothesis at one site: [n_heads] for z, [1] otherwise."""
    width = n_heads if parse_site(site)[0] == "z" else 1

    def mask(sel: Selection) -> Tensor:
        m = torch.zeros(width, dtype=torch.bool)
        if site in sel:
            heads = sel[site]
            if heads is None:
                m[:] = True
            else:
                m[list(heads)] = True
        return m

    full = mask(sel_protected)
    return full, mask(sel_scrubbed) & ~full


class _Scrub:
    """Hook body: scrubbed rows take the full row's value where protected, the resampled row's
    value where scrubbed (at positions the resampled input has), and keep their own elsewhere."""

    def __init__(self, rows, full, source, use_full, use_source, source_real):
        self.rows, self.full, self.source = rows, full, source          # [m] row indices
        self.use_full, self.use_source = use_full, use_source          # [m, width] bool
        self.source_real = source_real                                  # [m, pos] bool

    def __call__(self, x: Tensor) -> None:  # [batch, pos, d_model] or z [batch, pos, n_heads, d_head]
        """In place, so every consumer of the site sees the scrubbed value (see patch._CopyRows)."""
        dev = x.device
        xt, xf, xs = x[self.rows.to(dev)], x[self.full.to(dev)], x[self.source.to(dev)]
        if x.dim() == 4:    # z: per-head masks [m, 1, n_heads, 1]
            uf, us, real = self.use_full[:, None, :, None], self.use_source[:, None, :, None], \
                self.source_real[:, :, None, None]
        else:               # [m, 1, 1]
            uf, us, real = self.use_full[:, None, :], self.use_source[:, None, :], self.source_real[:, :, None]
        x[self.rows.to(dev)] = torch.where(uf.to(dev), xf, torch.where((us.to(dev) & real.to(dev)), xs, xt))


@torch.inference_mode()
def scrub_kl(model, sites: SiteAdapter, examples: list[list[int]], sources: list[list[list[int]]],
             n_scored: list[int], protected: list[Selection], scrubbed: Selection, pad_id: int,
             batch_size: int = 48) -> tuple[Tensor, Tensor]:
    """KL(full || scrubbed) per hypothesis, example, resample and scored position.

    Args:
        examples: token ids of each full input (prompt + answer prefix), n of them.
        sources: sources[i][r]: the r-th resampled input for example i (same answer prefix).
        n_scored: positions scored per example, counted from the end (answer prefix length + 1).
        protected: one selection per hypothesis; scrubbed: the scrubbed set.
    Returns:
        (kl [n_hyp, n, resamples, max(n_scored)], corrupted_kl [n, resamples, max(n_scored)]) in
        nats, float64; NaN at positions beyond an example's n_scored (leftmost entries).
    """
    n, n_res, n_hyp, width = len(examples), len(sources[0]), len(protected), max(n_scored)
    hooked = sorted(set(scrubbed).union(*protected))
    masks = {s: [_masks(p, scrubbed, s, sites.n_heads) for p in protected] for s in hooked}
    device = model.get_input_embeddings().weight.device
    kl = torch.full((n_hyp, n, n_res, width), float("nan"), dtype=torch.float64)
    corrupted = torch.full((n, n_res, width), float("nan"), dtype=torch.float64)
    g = max(1, batch_size // (1 + n_res + n_hyp * n_res))
    for e0 in range(0, n, g):
        gg = min(g, n - e0)
        seqs = examples[e0: e0 + gg] + [s for i in range(e0, e0 + gg) for s in sources[i]]
        seqs += [examples[e0 + i] for _ in range(n_hyp) for i in range(gg) for _ in range(n_res)]
        ids, mask = left_pad(seqs, pad_id)
        # rows: full i -> i; source (i, r) -> gg + i*R + r; scrubbed (h, i, r) -> gg + gg*R + h*gg*R + i*R + r
        src_row = lambda i, r: gg + i * n_res + r  # noqa: E731
        rows = torch.arange(gg + gg * n_res, len(seqs))
        full = torch.tensor([i for _ in range(n_hyp) for i in range(gg) for _ in range(n_res)])
        source = torch.tensor([src_row(i, r) for _ in range(n_hyp) for i in range(gg) for r in range(n_res)])
        real = mask.bool()[source]                                                    # [m, pos]
        transforms = {}
        for s in hooked:
            per_h = masks[s]
            uf = torch.stack([per_h[h][0] for h in range(n_hyp) for _ in range(gg * n_res)])   # [m, width]
            us = torch.stack([per_h[h][1] for h in range(n_hyp) for _ in range(gg * n_res)])
            transforms[s] = _Scrub(rows, full, source, uf, us, real)
        ids, mask = ids.to(device), mask.to(device)
        with hooks(sites, transforms):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False,
                           logits_to_keep=width).logits                                 # [rows, width, vocab]
        logp = torch.log_softmax(logits.float(), -1).cpu()
        p_full = logp[:gg].exp()
        for i in range(gg):
            w = n_scored[e0 + i]
            f, pf = logp[i, -w:], p_full[i, -w:]                                         # [w, vocab]
            for r in range(n_res):
                corrupted[e0 + i, r, -w:] = (pf * (f - logp[src_row(i, r), -w:])).sum(-1).double()
                for h in range(n_hyp):
                    row = gg + gg * n_res + h * gg * n_res + i * n_res + r
                    kl[h, e0 + i, r, -w:] = (pf * (f - logp[row, -w:])).sum(-1).double()
    return kl.clamp(min=0), corrupted.clamp(min=0)


def summarize_kl(kl: Tensor, threshold: float) -> dict:
    """Per-hypothesis numbers from kl [n, resamples, positions] (NaN = not scored)."""
    per_example = torch.nanmean(kl.flatten(1), dim=1).numpy()       # [n]: mean over resamples x positions
    mean_kl = float(per_example.mean())
    faithfulness = float(np.exp(-mean_kl))
    out = {"mean_kl": mean_kl, "faithfulness": faithfulness, "max_kl": float(np.nanmax(kl.numpy())),
           "kl_per_example": per_example.tolist(), "threshold": threshold,
           "verdict": "FAITHFUL" if faithfulness >= threshold else "UNFAITHFUL"}
    for q in QUANTILES:
        out[f"kl_q{int(q * 100)}"] = float(np.quantile(per_example, q))
    return out


def resample_indices(n_examples: int, n_sources: int, resamples: int, seed: int) -> list[list[int]]:
    """sources[i][r]: the harmless input for example i in resample r (seeded permutations)."""
    rng = np.random.default_rng([seed, 0x5C2B])
    perms = [rng.permutation(n_sources)[:n_examples] if n_sources >= n_examples
             else rng.integers(0, n_sources, n_examples) for _ in range(resamples)]
    return [[int(perms[r][i]) for r in range(resamples)] for i in range(n_examples)]


def run_scrub(lm: LoadedModel, cells: list[Cell], pairs: Pairs, cfg: dict, seed: int) -> list[dict]:
    """Scrub every hypothesis cell of one (model, seed) in shared forward passes.

    Returns one row per hypothesis: faithfulness, mean / max KL and quantiles, per-example KLs,
    the fully corrupted run's KL, and the verdict against `cfg["threshold"]`.
    Raises PatternError for a site pattern out of range for this model.
    """
    sites, tok = lm.sites, lm.tokenizer
    scrubbed = expand(cfg["scrubbed"], sites.n_layers, sites.n_heads)
    protected = [expand(c.params["protected"], sites.n_layers, sites.n_heads) for c in cells]
    harmful = prompt_tokens(tok, pairs.harmful.instructions)
    harmless = prompt_tokens(tok, pairs.harmless.instructions)
    prefixes = answer_prefixes(lm, harmful, cfg["answer_tokens"], cfg["batch_size"])
    picks = resample_indices(len(harmful), len(harmless), cfg["resamples"], seed)
    examples = [h + a for h, a in zip(harmful, prefixes)]
    sources = [[harmless[j] + prefixes[i] for j in picks[i]] for i in range(len(harmful))]
    kl, corrupted = scrub_kl(lm.model, sites, examples, sources, [len(a) + 1 for a in prefixes], protected, scrubbed,
                             tok.pad_token_id, cfg["batch_size"])
    corr = summarize_kl(corrupted, cfg["threshold"])
    n_scrubbed = len(set(scrubbed))
    rows = []
    for h, cell in enumerate(cells):
        replaced = sum(1 for s, heads in scrubbed.items() if s not in protected[h] or
                       (protected[h][s] is not None and (heads is None or heads - protected[h][s])))
        rows.append({
            "cell_id": cell.id, "seed": cell.seed, "hypothesis": cell.params["hypothesis"],
            "protected": json.dumps(cell.params["protected"]), "n_protected_sites": len(protected[h]),
            "n_scrubbed_sites": replaced, "n_scrubbed_set": n_scrubbed, "n_examples": len(examples),
            "resamples": cfg["resamples"], "answer_tokens": cfg["answer_tokens"],
            "example_ids": list(pairs.harmful.ids), **summarize_kl(kl[h], cfg["threshold"]),
            "corrupted_kl": corr["mean_kl"], "corrupted_faithfulness": corr["faithfulness"],
        })
    return rows
