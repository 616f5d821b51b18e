"""Activation patching and attribution patching: exact values, invariants, batched == one at a time."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from refusal_ray import load_model
from refusal_ray.data import Pairs, PromptSet, encode
from refusal_ray.grid import Cell
from refusal_ray.interventions import Patch, capture, forward, hooks
from refusal_ray.judges import DEFAULT_PHRASES
from refusal_ray.stages.patch import (RefusalScore, Target, attribution_patching, exact_patching, recovery,
                                      refusal_token_ids, run_patch, targets_for)

from conftest import PROMPTS, TOY_MODELS, TOY_PROMPTS

CLEAN = [PROMPTS[0], PROMPTS[3], PROMPTS[1]]
CORRUPTED = [PROMPTS[2], PROMPTS[1], "Reverse these words: torch, gloves."]
METRIC = RefusalScore([5, 17, 42])


def _batch(lm, clean=CLEAN, corrupted=CORRUPTED):
    return encode(lm.tokenizer, clean + corrupted)


def _all_targets(lm):
    return targets_for(lm.sites, ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z"],
                       list(range(lm.sites.n_layers)))


def reference_patching(lm, ids, mask, targets, positions, metric):
    """Independent recomputation, as TransformerLens' patching helpers do it: a clean cache, then one
    full forward pass per patch over the corrupted prompts (no batching of patches, no KV cache)."""
    n = ids.shape[0] // 2
    pos = torch.tensor(positions)
    cache = capture(lm.model, ids[:n], mask[:n], sorted({t.site for t in targets}), lm.sites)
    out = torch.empty(len(targets), n, dtype=torch.float64)
    with torch.inference_mode():
        for i, t in enumerate(targets):
            patch = Patch(cache[t.site][:, pos], pos, None if t.head is None else torch.tensor([t.head]))
            with hooks(lm.sites, {t.site: patch}):
                out[i] = metric(forward(lm.model, ids[n:], mask[n:], logits_to_keep=1).logits[:, -1]).double()
    return out


def test_refusal_score_is_log_odds_of_refusal_tokens():
    logits = torch.randn(4, 50, dtype=torch.float64)
    p = torch.softmax(logits, -1)[:, [5, 17, 42]].sum(-1)
    assert torch.allclose(METRIC(logits).double(), torch.log(p) - torch.log1p(-p), atol=1e-5)


def test_refusal_tokens_are_first_tokens_of_the_judge_phrases():
    lm = load_model(str(TOY_MODELS / "toy-qwen-s"))
    ids = refusal_token_ids(lm.tokenizer, DEFAULT_PHRASES)
    expected = sorted({lm.tokenizer(p, add_special_tokens=False)["input_ids"][0] for p in DEFAULT_PHRASES})
    assert ids == expected
    # the toy model's own refusals start with one of them
    assert lm.tokenizer("I cannot help with that.", add_special_tokens=False)["input_ids"][0] in ids
    with pytest.raises(ValueError, match="no refusal phrase gives a token"):
        refusal_token_ids(lm.tokenizer, [""])


def test_batched_patches_equal_one_at_a_time_and_the_reference_loop(tiny_lm):
    """Every family: many patches per pass (shared-prefix cache) == one patch per pass == TL-style loop."""
    ids, mask = _batch(tiny_lm)
    targets = _all_targets(tiny_lm)
    batched, clean, corr = exact_patching(tiny_lm.model, tiny_lm.sites, ids, mask, targets, [-2, -1], METRIC, 512)
    single, clean1, corr1 = exact_patching(tiny_lm.model, tiny_lm.sites, ids, mask, targets, [-2, -1], METRIC, 1)
    ref = reference_patching(tiny_lm, ids, mask, targets, [-2, -1], METRIC)
    assert torch.allclose(batched, single, atol=1e-4, rtol=1e-5)
    assert torch.allclose(batched, ref, atol=1e-4, rtol=1e-5)
    assert torch.allclose(clean, clean1, atol=1e-5) and torch.allclose(corr, corr1, atol=1e-5)
    n = len(CLEAN)
    with torch.inference_mode():
        direct = METRIC(forward(tiny_lm.model, ids, mask, logits_to_keep=1).logits[:, -1]).double()
    assert torch.allclose(clean, direct[:n], atol=1e-4) and torch.allclose(corr, direct[n:], atol=1e-4)


def test_patching_the_last_residual_stream_recovers_exactly_one(tiny_lm):
    """Clean into corrupted at the last layer's resid_post, at the scored position: the rest of the
    computation is the clean run's, so recovery is 1."""
    ids, mask = _batch(tiny_lm)
    last = Target("resid_post", tiny_lm.sites.n_layers - 1)
    patched, clean, corr = exact_patching(tiny_lm.model, tiny_lm.sites, ids, mask, [last], [-1], METRIC)
    assert torch.allclose(patched[0], clean, atol=1e-5, rtol=0)   # m_patched == m_clean (float32 rounding)
    _assert_recovery(patched, clean, corr, 1.0)


def _assert_recovery(patched, clean, corr, value):
    """Recovery equals `value` up to float32 rounding of the scores (1e-5), which the denominator
    m_clean - m_corrupted magnifies."""
    den = (clean - corr).abs()
    assert (den > 1e-3).all()
    err = (recovery(patched, clean, corr) - value).abs()
    assert (err <= 1e-5 / den).all(), err


def test_patching_a_whole_equal_length_stream_recovers_exactly_one():
    """Clean into clean: pairs of equal token length, the whole residual stream at a middle layer."""
    lm = load_model(str(TOY_MODELS / "toy-qwen-s"))
    harmful = pd.read_json(TOY_PROMPTS / "harmful.jsonl", lines=True)
    harmless = pd.read_json(TOY_PROMPTS / "harmless.jsonl", lines=True).set_index("pair_id")
    same = []
    for _, row in harmful[harmful["split"] == "test"].iterrows():
        twin = harmless.loc[row["pair_id"], "instruction"]
        if len(encode(lm.tokenizer, [row["instruction"]])[0][0]) == len(encode(lm.tokenizer, [twin])[0][0]):
            same.append((row["instruction"], twin))
        if len(same) == 3:
            break
    assert len(same) == 3
    ids, mask = encode(lm.tokenizer, [a for a, _ in same] + [b for _, b in same])
    everywhere = list(range(-ids.shape[1], 0))
    cuts = [Target("resid_pre", 2), Target("resid_mid", 2), Target("resid_post", 1), Target("resid_mid", 0)]
    patched, clean, corr = exact_patching(lm.model, lm.sites, ids, mask, cuts, everywhere,
                                          RefusalScore(refusal_token_ids(lm.tokenizer, DEFAULT_PHRASES)))
    assert (clean - corr).abs().min() > 1.0        # the toy model tells the pairs apart
    # every residual site is a full cut of the computation (resid_mid too: it carries on to resid_post)
    assert torch.allclose(recovery(patched, clean, corr), torch.ones_like(patched), atol=1e-5)


def test_a_site_that_cannot_influence_the_metric_recovers_zero(tiny_lm):
    """A later position than the scored one, and a head whose output projection is zero."""
    ids, mask = _batch(tiny_lm)
    sites = tiny_lm.sites
    later = [Target(k, layer) for layer in range(sites.n_layers) for k in ("resid_pre", "attn_out", "mlp_out")]
    patched, clean, corr = exact_patching(tiny_lm.model, sites, ids, mask, later, [-1], METRIC, metric_position=-2)
    assert torch.allclose(patched, corr.expand_as(patched), atol=1e-6, rtol=0)
    assert (clean - corr).abs().min() > 1e-4

    layer, head, dh = 1, 2, sites.d_head
    proj = sites.module("z", layer)
    with torch.no_grad():
        if isinstance(proj, nn.Linear):
            proj.weight[:, head * dh:(head + 1) * dh] = 0
        else:  # GPT-2 Conv1D: weight [in, out]
            proj.weight[head * dh:(head + 1) * dh, :] = 0
    patched, clean, corr = exact_patching(tiny_lm.model, sites, ids, mask, [Target("z", layer, head)], [-1], METRIC)
    assert torch.allclose(patched[0], corr, atol=1e-5, rtol=0)    # m_patched == m_corrupted (float32 rounding)
    _assert_recovery(patched, clean, corr, 0.0)


@pytest.mark.parametrize("kind", ["resid_post", "mlp_out"])
def test_attribution_equals_exact_where_the_metric_is_linear_in_the_site(tiny_qwen_path, kind):
    """Without the final norm, a logit is linear in the last layer's resid_post and mlp_out, so the
    first-order estimate is exact."""
    lm = load_model(str(tiny_qwen_path))
    lm.model.model.norm = nn.Identity()
    logit = lambda logits: logits[:, 7].float()  # noqa: E731 - a metric linear in the logits
    ids, mask = _batch(lm)
    last = lm.sites.n_layers - 1
    targets = [Target(kind, last)]
    est, a_clean, a_corr = attribution_patching(lm.model, lm.sites, ids, mask, targets, [-1], logit, batch_pairs=2)
    exact, clean, corr = exact_patching(lm.model, lm.sites, ids, mask, targets, [-1], logit)
    assert torch.allclose(a_corr + est, exact, atol=1e-4, rtol=1e-5)
    assert torch.allclose(a_clean, clean, atol=1e-4) and torch.allclose(a_corr, corr, atol=1e-4)
    # a nonlinear site (through the MLP) is only approximated
    early = [Target("attn_out", 0)]
    est0, _, _ = attribution_patching(lm.model, lm.sites, ids, mask, early, [-1], logit)
    exact0, _, _ = exact_patching(lm.model, lm.sites, ids, mask, early, [-1], logit)
    assert not torch.allclose(a_corr + est0, exact0, atol=1e-4)


def _whole_site_attribution(lm, ids, mask, kind, layer, position, metric):
    """Independent AtP for one whole site, without the package's hooks: plain torch pre-hooks on
    the module that reads the site (z: the attention output projection) read the clean input,
    and on the corrupted run swap in a leaf tensor whose .grad is dm/da. Returns the per-pair
    terms (a_clean - a_corrupted) * dm/da at `position` in float64, [n, width]."""
    n = ids.shape[0] // 2
    module = lm.sites.module(kind, layer)
    assert lm.sites.reads_input(kind)
    got = {}

    def read(mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        got["clean"] = x.detach().clone()

    def leaf(mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        got["leaf"] = x.detach().clone().requires_grad_(True)
        return ((got["leaf"], *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": got["leaf"]})

    h = module.register_forward_pre_hook(read, with_kwargs=True)
    with torch.no_grad():
        forward(lm.model, ids[:n], mask[:n], logits_to_keep=1)
    h.remove()
    h = module.register_forward_pre_hook(leaf, with_kwargs=True)
    try:
        with torch.enable_grad():
            metric(forward(lm.model, ids[n:], mask[n:], logits_to_keep=1).logits[:, -1]).sum().backward()
    finally:
        h.remove()
    a = got["leaf"]
    return (got["clean"][:, position].double() - a.detach()[:, position].double()) * a.grad[:, position].double()


def test_attribution_screen_per_head_sums_to_the_whole_z_site(tiny_lm):
    """Per-head scores of z are the head blocks of one dot product: they add up over heads to the
    whole z site's (a_clean - a_corrupted) . dm/da, computed here independently with plain torch
    hooks and autograd. Each head's score is its block of that product. Tolerance: the screen
    sums float32 products, so its error is bounded by ~1e-6 (a few float32 ulps, d_model terms)
    times the sum of |terms|; 1e-5 of that sum leaves a margin without letting a wrong head
    block through (any one head's share is far larger)."""
    ids, mask = _batch(tiny_lm)
    sites = tiny_lm.sites
    layer = 1
    heads = [Target("z", layer, h) for h in range(sites.n_heads)]
    est, _, _ = attribution_patching(tiny_lm.model, sites, ids, mask, heads + [Target("resid_pre", layer)], [-1],
                                     METRIC)
    assert est.shape == (sites.n_heads + 1, len(CLEAN))
    terms = _whole_site_attribution(tiny_lm, ids, mask, "z", layer, -1, METRIC)                  # [n, H * d_head]
    whole = terms.sum(-1)                                                                          # [n]
    tol = 1e-5 * terms.abs().sum(-1)
    per_head = terms.view(len(CLEAN), sites.n_heads, sites.d_head).sum(-1).T                       # [H, n]
    assert (whole.abs() > 100 * tol).all()          # a nonzero attribution to compare
    assert ((est[:-1].sum(0) - whole).abs() <= tol).all(), (est[:-1].sum(0), whole)
    assert ((est[:-1] - per_head).abs() <= tol).all(), (est[:-1], per_head)
    assert (per_head.std(0) > 100 * tol).all()      # the heads differ, so a wrong head order would show


def test_run_patch_confirms_the_top_k_of_the_screen():
    lm = load_model(str(TOY_MODELS / "toy-qwen-m"))
    harmful = pd.read_json(TOY_PROMPTS / "harmful.jsonl", lines=True).query("split == 'test'").head(4)
    harmless = pd.read_json(TOY_PROMPTS / "harmless.jsonl", lines=True).set_index("pair_id").loc[harmful["pair_id"]]
    pairs = Pairs(harmful["pair_id"].tolist(), PromptSet(harmful["id"].tolist(), harmful["instruction"].tolist(), [None] * 4),
                  PromptSet(harmless["id"].tolist(), harmless["instruction"].tolist(), [None] * 4))
    cfg = {"sites": ["resid_pre", "attn_out", "mlp_out", "z"], "layers": "all", "positions": [-1], "attribution": True,
           "confirm_top_k": 5, "batch_size": 64, "screen_batch_size": 2}
    rows = pd.DataFrame(run_patch(lm, Cell("c", "patch", "m", 0, {}), pairs, cfg, DEFAULT_PHRASES))
    n_targets = lm.sites.n_layers * (3 + lm.sites.n_heads)
    assert len(rows) == n_targets * 4
    assert rows["attribution"].notna().all()
    confirmed = rows[rows["recovery"].notna()]
    assert sorted(confirmed["attribution_rank"].unique()) == [1, 2, 3, 4, 5]
    assert rows.groupby("attribution_rank")["site"].nunique().eq(1).all()
    # confirmed values equal a full exact run at those sites
    full = pd.DataFrame(run_patch(lm, Cell("c", "patch", "m", 0, {}), pairs, {**cfg, "confirm_top_k": None},
                                  DEFAULT_PHRASES))
    key = ["site", "head", "pair_id"]
    merged = confirmed.merge(full, on=key, suffixes=("", "_full"))
    assert len(merged) == 5 * 4
    assert (merged["recovery"] - merged["recovery_full"]).abs().max() < 1e-6
