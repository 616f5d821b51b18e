"""Stage `search`, run side (torch): a batch of trials, or the held-out arms, on a loaded model.

Every arm here is directional ablation with per-layer weights, x <- x - w(l) (x . r_l) r_l at the named sites
(`ArmEdit`: attn_out / mlp_out for heretic's kernel; resid_pre, attn_out, mlp_out at weight 1 for plain
ablation, Arditi et al. 2024 Sec. 2.4). The arms of one call share batched forward passes: rows are
(arm, prompt) pairs, each row's weights and directions are its own (`refusal_ray.interventions.RowEdit`), so row b
of a mixed batch equals that arm run alone.

- objectives on val prompts (`evaluate`): first-token KL(P_base || P_arm) on harmless prompts (nats, mean over
  prompts; Arditi et al. 2024 Sec. 4.2, heretic's KL; with `kl_prompts: answered` only over the harmless prompts
  the unedited model answers, so undoing its false refusals is not counted as damage) and the refusal rate on harmful prompts (greedy completions
  under the substring judge, or the first-token refusal score: a prompt counts as refused when the probability
  mass of the refusal tokens exceeds 1/2, i.e. log p - log(1 - p) > 0). A trial whose KL exceeds `kl_bound` is
  pruned: its refusals are not counted (heretic #312).
- held-out (`heldout`): baseline, each picked trial, its norm-matched random control (same weights, Gaussian unit
  directions seeded by the study and trial number) and plain ablation of its direction, on the test split:
  refusal counts with Wilson intervals on both prompt sets, and first-token KL on the harmless test prompts.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from refusal_ray.capability.measures import first_token_kl
from refusal_ray.data import left_pad, prompt_tokens
from refusal_ray.interventions import RowEdit, forward, row_edits
from refusal_ray.models.chat import generate, greedy_config
from refusal_ray.stages.search.space import kernel_weights, layer_directions
from refusal_ray.stats import wilson


@dataclass
class ArmEdit:
    """Directional ablation with per-layer weights: {site kind: (weights [n_layers], directions [n_layers, d_model])}.
    An empty dict is the baseline."""

    sites: dict

    @classmethod
    def kernel(cls, params: dict, directions: dict, n_layers: int, components) -> ArmEdit:
        dirs = layer_directions(params, directions, n_layers)
        return cls({c: (kernel_weights(params, c, n_layers), dirs) for c in components})

    @classmethod
    def plain(cls, direction: np.ndarray, n_layers: int) -> ArmEdit:
        """Arditi's directional ablation: weight 1 at resid_pre, attn_out and mlp_out of every layer."""
        dirs = np.repeat(np.asarray(direction, np.float64)[None], n_layers, 0)
        return cls({k: (np.ones(n_layers), dirs) for k in ("resid_pre", "attn_out", "mlp_out")})

    def control(self, seed_key: str) -> ArmEdit:
        """The same weights with Gaussian unit directions (one per distinct direction of this arm), seeded by
        `seed_key` (norm-matched: every direction here is a unit vector)."""
        rng = np.random.default_rng(int(hashlib.sha256(seed_key.encode()).hexdigest()[:15], 16))
        out, drawn = {}, {}
        for kind, (w, dirs) in self.sites.items():
            new = np.empty_like(dirs)
            for layer in range(len(dirs)):
                key = dirs[layer].tobytes()
                if key not in drawn:
                    g = rng.standard_normal(dirs.shape[1])
                    drawn[key] = g / np.linalg.norm(g)
                new[layer] = drawn[key]
            out[kind] = (w, new)
        return ArmEdit(out)


def site_edits(arms: list[ArmEdit], row_arm: list[int], d_model: int) -> dict:
    """{(site kind, layer): RowEdit} for one chunk whose row b runs arm `row_arm[b]` (zero rows elsewhere)."""
    keys = sorted({(k, layer) for a in arms for k, (w, _) in a.sites.items() for layer in np.flatnonzero(w)})
    edits = {}
    for kind, layer in keys:
        dirs = torch.zeros(len(row_arm), d_model)
        alpha = torch.zeros(len(row_arm))
        for b, a in enumerate(row_arm):
            site = arms[a].sites.get(kind)
            if site is not None and site[0][layer] != 0:
                dirs[b] = torch.as_tensor(site[1][layer], dtype=torch.float32)
                alpha[b] = float(site[0][layer])
        edits[(kind, int(layer))] = RowEdit(ablate_dirs=dirs, ablate_alpha=alpha)
    return edits


@torch.inference_mode()
def arm_logprobs(lm, arms: list[ArmEdit], seqs: list[list[int]], batch_size: int) -> torch.Tensor:
    """[n_arms, n_prompts, vocab] float64 log-probabilities of the first generated token, every (arm, prompt) row
    in chunks of `batch_size` rows."""
    rows = [(a, i) for a in range(len(arms)) for i in range(len(seqs))]
    out = torch.empty(len(arms), len(seqs), 0, dtype=torch.float64)
    got: dict = {}
    pad = lm.tokenizer.pad_token_id or 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        ids, mask = left_pad([seqs[i] for _, i in chunk], pad)
        with row_edits(lm.sites, site_edits(arms, [a for a, _ in chunk], lm.sites.d_model)):
            logits = forward(lm.model, ids.to(lm.device), mask.to(lm.device), logits_to_keep=1).logits[:, -1]
        lp = torch.log_softmax(logits.double(), -1).cpu()
        for j, key in enumerate(chunk):
            got[key] = lp[j]
    if rows:
        out = torch.stack([torch.stack([got[(a, i)] for i in range(len(seqs))]) for a in range(len(arms))])
    return out


@torch.inference_mode()
def arm_completions(session, arms: list[ArmEdit], instructions: list[str], max_new_tokens: int,
                    batch_size: int) -> list[list[str]]:
    """Greedy completions [n_arms][n_prompts] (`refusal_ray.models.chat.generate`), rows in chunks."""
    lm = session.lm
    seqs = prompt_tokens(lm.tokenizer, instructions, session.chat)
    rows = [(a, i) for a in range(len(arms)) for i in range(len(seqs))]
    rows.sort(key=lambda r: len(seqs[r[1]]))
    config = greedy_config(lm.model, lm.tokenizer, session.chat, max_new_tokens)
    out = [[""] * len(seqs) for _ in arms]
    pad = lm.tokenizer.pad_token_id or 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        ids, mask = left_pad([seqs[i] for _, i in chunk], pad)
        with row_edits(lm.sites, site_edits(arms, [a for a, _ in chunk], lm.sites.d_model)):
            texts = generate(lm, ids, mask, session.chat, max_new_tokens, config)
        for (a, i), t in zip(chunk, texts):
            out[a][i] = t
    return out


def _base_logprobs(session, key, seqs, batch_size) -> torch.Tensor:
    cache = session.__dict__.setdefault("_search_base", {})
    if key not in cache:
        cache[key] = arm_logprobs(session.lm, [ArmEdit({})], seqs, batch_size)[0]
    return cache[key]


def answered(session, instructions: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """The prompts among `instructions` that the unedited model answers (its greedy completion is not a refusal
    under the session's judge), in order; cached per session."""
    cache = session.__dict__.setdefault("_search_answered", {})
    key = (tuple(instructions), max_new_tokens)
    if key not in cache:
        refused = session.judge(arm_completions(session, [ArmEdit({})], instructions, max_new_tokens, batch_size)[0])
        cache[key] = [x for x, r in zip(instructions, refused) if not r]
    return cache[key]


def _refused(session, cfg, arms, harmful: list[str], batch_size: int, max_new_tokens: int) -> list[list[bool]]:
    """[n_arms][n_prompts] refusals under the study's objective (substring judge or first-token refusal score)."""
    if not arms:
        return []
    if cfg["objective"] == "refusal_score":
        ids = cfg["refusal_token_ids"]
        lp = arm_logprobs(session.lm, arms, prompt_tokens(session.lm.tokenizer, harmful, session.chat), batch_size)
        p = lp[..., ids].exp().sum(-1).clamp(1e-12, 1 - 1e-12)          # [n_arms, n_prompts]
        return (torch.log(p) - torch.log1p(-p) > 0).tolist()
    comps = arm_completions(session, arms, harmful, max_new_tokens, batch_size)
    return [session.judge(c) for c in comps]


def evaluate(session, payload: dict) -> list[dict]:
    """Objective rows of a batch of trials ({"number", "params"} each) on the val prompts: one row per trial with
    kl (mean first-token KL on harmless val, nats), refusal (rate on harmful val; None when pruned), pruned,
    n_harmful, n_harmless, seconds (this call's, shared by its trials) and trials_in_call."""
    started, t_start = time.perf_counter(), time.time()
    cfg, lm = payload["config"], session.lm
    val = session.prompts[payload["seed"]]["val"]
    harmful = val["harmful"].instructions[: cfg["n_val"]]
    harmless = val["harmless"].instructions[: cfg["n_val"]]
    n_layers, bs = lm.sites.n_layers, cfg["batch_size"]
    directions = {int(k): np.asarray(v) for k, v in payload["directions"].items()}
    arms = [ArmEdit.kernel(t["params"], directions, n_layers, cfg["components"]) for t in payload["trials"]]
    if cfg.get("kl_prompts", "all") == "answered":   # not the harmless prompts the model wrongly refuses
        harmless = answered(session, harmless, cfg["max_new_tokens"], bs)
        if not harmless:
            raise ValueError("stages.search.kl_prompts 'answered': the model refuses every harmless val prompt")
    seqs = prompt_tokens(lm.tokenizer, harmless, session.chat)
    base = _base_logprobs(session, (payload["seed"], "val", tuple(harmless)), seqs, bs)
    kl = [float(first_token_kl(base, lp).mean()) for lp in arm_logprobs(lm, arms, seqs, bs)]
    bound = cfg.get("kl_bound")
    live = [i for i, v in enumerate(kl) if bound is None or v <= bound]
    refused = dict(zip(live, _refused(session, cfg, [arms[i] for i in live], harmful, bs, cfg["max_new_tokens"])))
    seconds = time.perf_counter() - started
    return [{"number": t["number"], "kl": kl[i], "pruned": i not in refused,
             "refusal": (sum(refused[i]) / len(harmful)) if i in refused else None,
             "n_harmful": len(harmful), "n_harmless": len(harmless), "seconds": seconds,
             "trials_in_call": len(arms), "t_start": t_start, "t_end": time.time()} for i, t in enumerate(payload["trials"])]


def heldout(session, payload: dict) -> list[dict]:
    """Rows of the held-out arms on the test split: per picked trial its `trial`, `control` and `plain` arms, and one
    `baseline`: refusals / n / rate / Wilson interval on harmful and harmless test prompts (greedy completions,
    substring judge), and kl (mean first-token KL on the harmless test prompts) with its standard error."""
    cfg, lm = payload["config"], session.lm
    test = session.prompts[payload["seed"]]["test"]
    n_layers, bs = lm.sites.n_layers, cfg["batch_size"]
    directions = {int(k): np.asarray(v) for k, v in payload["directions"].items()}
    from refusal_ray.stages.search.space import interpolated

    arms, labels = [ArmEdit({})], [(None, "baseline")]
    for t in payload["trials"]:
        arm = ArmEdit.kernel(t["params"], directions, n_layers, cfg["components"])
        arms += [arm, arm.control(f"{payload['study']}#{t['number']}"),
                 ArmEdit.plain(interpolated(directions, t["params"]["direction_index"]), n_layers)]
        labels += [(t["number"], "trial"), (t["number"], "control"), (t["number"], "plain")]
    seqs = prompt_tokens(lm.tokenizer, test["harmless"].instructions, session.chat)
    lps = arm_logprobs(lm, arms, seqs, bs)
    kls = [first_token_kl(lps[0], lp).numpy() for lp in lps]
    rows = [{"number": n, "arm": arm, "kl": float(k.mean()),
             "kl_stderr": float(k.std(ddof=1) / np.sqrt(len(k))) if len(k) > 1 else None}
            for (n, arm), k in zip(labels, kls)]
    for pset in ("harmful", "harmless"):
        texts = test[pset].instructions
        comps = arm_completions(session, arms, texts, cfg["max_new_tokens"], bs)
        for row, c in zip(rows, comps):
            k = int(sum(session.judge(c)))
            lo, hi = wilson(k, len(texts))
            row.update({f"{pset}_refusals": k, f"{pset}_n": len(texts), f"{pset}_rate": k / len(texts),
                        f"{pset}_ci_low": lo, f"{pset}_ci_high": hi})
    return rows


def run(session, cells, payload) -> dict:
    """Stage.run: payload {"kind": "trials" | "heldout", ...}; {"trials": rows} or {"heldout": rows}. The study's
    driver (`refusal_ray.stages.search.study`) sends these; an ordinary sweep plans no search cells."""
    if payload["kind"] == "trials":
        return {"trials": evaluate(session, payload)}
    if payload["kind"] == "heldout":
        return {"heldout": heldout(session, payload)}
    raise ValueError(f"unknown search payload kind {payload['kind']!r}")
