"""Stage `scrub`, the run side: causal scrubbing of circuit hypotheses, as the audits define it.

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
activation cache is kept.

Scrubbed positions. The example (length L_e) and the resampled input (length L_s) are aligned
from the end (left padding), so position -k of the example takes position -k of the resampled
run. Every real position of the example is scrubbed at a scrubbed, unprotected site:
  * positions -1 .. -min(L_e, L_s) take the aligned value of the resampled run;
  * where L_s < L_e, the example's L_e - L_s leading positions, which the resampled run lacks,
    take the value of the resampled run's FIRST real position (position -L_s);
  * where L_s > L_e, the resampled run's extra leading positions are unused.
So no position keeps a harmful-only value at a scrubbed site outside the hypothesis. The filler
value (a causal model's first position sees only its own token, in chat prompts the template's
first token) carries nothing of either prompt's content; repeating it over several positions is
off-distribution, like any resampled input of another length. Sample `resamples` > 1 and compare
against the corrupted run's KL when lengths differ widely. Pad positions of the scrubbed row
keep their own values (they are masked out).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import Tensor

from refusal_ray.data import Pairs, left_pad, prompt_tokens
from refusal_ray.models.chat import ChatOptions, cut_at_stop, greedy_config, neutral_defaults
from refusal_ray.core.cells import Cell
from refusal_ray.interventions import hooks, position_ids
from refusal_ray.models.loading import LoadedModel
from refusal_ray.models.patterns import Selection, expand
from refusal_ray.models.sites import SiteAdapter, parse_site

QUANTILES = (0.5, 0.9)


@torch.inference_mode()
def answer_prefixes(lm: LoadedModel, prompts: list[list[int]], n_tokens: int, batch_size: int,
                    chat=None) -> list[list[int]]:
    """The unmodified model's greedy answer to each prompt: up to `n_tokens` tokens, cut before the
    first stop token (EOS, the checkpoint's and the template's end of turn: `models.chat`)."""
    tok, out = lm.tokenizer, []
    config = greedy_config(lm.model, tok, chat or ChatOptions(), n_tokens)
    stop = set(config.eos_token_id) | ({tok.pad_token_id} - {None})
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start: start + batch_size], tok.pad_token_id)
        with neutral_defaults(lm.model, config):
            gen = lm.model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                                    generation_config=config)[:, ids.shape[1]:].tolist()
        out += [cut_at_stop(row, stop) for row in gen]
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
    """Hook body: scrubbed rows take the full row's value where protected and the resampled row's
    value where scrubbed, at every real position of the example: position p reads the resampled
    row at `source_pos[p]` (p itself when aligned from the end, else the resampled row's first
    real position; see the module docstring). Elsewhere (not hooked for this hypothesis, or pad
    positions of the example) rows keep their own values."""

    def __init__(self, rows, full, source, use_full, use_source, source_pos, example_real):
        self.rows, self.full, self.source = rows, full, source          # [m] row indices
        self.use_full, self.use_source = use_full, use_source          # [m, width] bool
        self.source_pos = source_pos                                    # [m, pos] long: position read in the source row
        self.example_real = example_real                                # [m, pos] bool: real positions of the example

    def __call__(self, x: Tensor) -> None:  # [batch, pos, d_model] or z [batch, pos, n_heads, d_head]
        """In place, so every consumer of the site sees the scrubbed value (see patch._CopyRows)."""
        dev = x.device
        m = torch.arange(len(self.rows), device=dev)[:, None]
        xt, xf = x[self.rows.to(dev)], x[self.full.to(dev)]
        xs = x[self.source.to(dev)][m, self.source_pos.to(dev)]        # the resampled value for every position
        if x.dim() == 4:    # z: per-head masks [m, 1, n_heads, 1]
            uf, us, real = self.use_full[:, None, :, None], self.use_source[:, None, :, None], \
                self.example_real[:, :, None, None]
        else:               # [m, 1, 1]
            uf, us, real = self.use_full[:, None, :], self.use_source[:, None, :], self.example_real[:, :, None]
        x[self.rows.to(dev)] = torch.where(uf.to(dev), xf, torch.where((us.to(dev) & real.to(dev)), xs, xt))


def source_positions(mask: Tensor, source: Tensor) -> Tensor:
    """[m, pos] position of the resampled row `source[k]` whose value scrubs position p of a
    left-padded pass with attention mask `mask` [batch, pos]: p itself where the resampled input
    has it (aligned from the end), else its first real position."""
    width = mask.shape[1]
    first = width - mask[source].long().sum(1)                                 # [m]
    return torch.maximum(torch.arange(width)[None, :], first[:, None])


@torch.inference_mode()
def scrub_kl(model, sites: SiteAdapter, examples: list[list[int]], sources: list[list[list[int]]],
             n_scored: list[int], protected: list[Selection], scrubbed: Selection, pad_id: int,
             batch_size: int = 48) -> tuple[Tensor, Tensor]:
    """KL(full || scrubbed) per hypothesis, example, resample and scored position.

    Args:
        examples: token ids of each full input (prompt + answer prefix), n of them.
        sources: sources[i][r]: the r-th resampled input for example i (same answer prefix), of
            any nonzero length: aligned from the end; where it is shorter than the example, its
            first position scrubs the example's leading positions it lacks (module docstring).
        n_scored: positions scored per example, counted from the end (answer prefix length + 1).
        protected: one selection per hypothesis; scrubbed: the scrubbed set.
    Returns:
        (kl [n_hyp, n, resamples, max(n_scored)], corrupted_kl [n, resamples, max(n_scored)]) in
        nats, float64; NaN at positions beyond an example's n_scored (leftmost entries).
    """
    n, n_res, n_hyp, width = len(examples), len(sources[0]), len(protected), max(n_scored)
    if any(not src for per in sources for src in per):
        raise ValueError("a resampled input is empty: it has no value to scrub with")
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
        real = mask.bool()[full]                                                      # [m, pos] the example's
        src_pos = source_positions(mask, source)                                      # [m, pos]
        transforms = {}
        for s in hooked:
            per_h = masks[s]
            uf = torch.stack([per_h[h][0] for h in range(n_hyp) for _ in range(gg * n_res)])   # [m, width]
            us = torch.stack([per_h[h][1] for h in range(n_hyp) for _ in range(gg * n_res)])
            transforms[s] = _Scrub(rows, full, source, uf, us, src_pos, real)
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


def run_scrub(lm: LoadedModel, cells: list[Cell], pairs: Pairs, cfg: dict, seed: int, chat=None) -> list[dict]:
    """Scrub every hypothesis cell of one (model, seed) in shared forward passes.

    Returns one row per hypothesis: faithfulness, mean / max KL and quantiles, per-example KLs,
    the fully corrupted run's KL, and the verdict against `cfg["threshold"]`.
    Raises PatternError for a site pattern out of range for this model.
    """
    sites, tok = lm.sites, lm.tokenizer
    scrubbed = expand(cfg["scrubbed"], sites.n_layers, sites.n_heads)
    protected = [expand(c.params["protected"], sites.n_layers, sites.n_heads) for c in cells]
    harmful = prompt_tokens(tok, pairs.harmful.instructions, chat)
    harmless = prompt_tokens(tok, pairs.harmless.instructions, chat)
    prefixes = answer_prefixes(lm, harmful, cfg["answer_tokens"], cfg["batch_size"], chat)
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


# -- the run side of the declaration (`STAGE.run`) ---------------------------------------------
def run_task(session, cells, payload) -> dict:
    """`STAGE.run`: the hypotheses of one (model, seed) in shared passes ({"scrubbing": rows})."""
    cfg = session.settings["scrub"]
    seed = cells[0].seed
    return {"scrubbing": session.halving(lambda bs: run_scrub(
        session.lm, cells, session.prompts[seed]["scrub"], {**cfg, "batch_size": bs}, seed, session.chat),
        cfg["batch_size"])}
