"""Causal scrubbing (resample ablation of the complement) and site patterns."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from refusal_ray import load_model
from refusal_ray.data import draw_pairs, left_pad
from refusal_ray.grid import Cell
from refusal_ray.interventions import forward
from refusal_ray.models.patterns import PatternError, expand
from refusal_ray.spec import PromptFile
from refusal_ray.stages.scrub import prompt_tokens, resample_indices, run_scrub, scrub_kl

from conftest import PROMPTS, TOY_MODELS, TOY_PROMPTS

CFG = {"scrubbed": ["blocks.*.attn.hook_z", "blocks.*.hook_resid_post"], "answer_tokens": 6, "resamples": 2,
       "threshold": 0.5, "batch_size": 48}


def _cell(name, protected, seed=0):
    return Cell(f"id-{name}", "scrub", "m", seed, {"hypothesis": name, "protected": protected})


@pytest.fixture(scope="module")
def toy():
    return load_model(str(TOY_MODELS / "toy-qwen-m"))


@pytest.fixture(scope="module")
def pairs():
    h = pd.read_json(TOY_PROMPTS / "harmful.jsonl", lines=True)
    b = pd.read_json(TOY_PROMPTS / "harmless.jsonl", lines=True)
    return draw_pairs(h, b, PromptFile(path="h", pair_column="pair_id"), PromptFile(path="b", pair_column="pair_id"), 6, 0)


def test_site_patterns_expand_to_sites_and_heads():
    sel = expand(["blocks.{1,2}.attn.hook_z", "blocks.{0..1}.hook_mlp_out", "blocks.3.attn.hook_z[0,2]",
                  "blocks.3.attn.hook_z[1..2]", "blocks.*.hook_resid_post"], n_layers=4, n_heads=4)
    assert sel["blocks.1.attn.hook_z"] is None and sel["blocks.2.attn.hook_z"] is None
    assert sel["blocks.3.attn.hook_z"] == frozenset({0, 1, 2})
    assert {s for s in sel if "mlp" in s} == {"blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"}
    assert {s for s in sel if "resid_post" in s} == {f"blocks.{i}.hook_resid_post" for i in range(4)}
    assert expand(["blocks.1.attn.hook_z[0]", "blocks.1.attn.hook_z"], 2, 2) == {"blocks.1.attn.hook_z": None}
    with pytest.raises(PatternError, match=r"layer 4 out of range in site pattern 'blocks.4.hook_mlp_out'"):
        expand(["blocks.4.hook_mlp_out"], 4, 4)
    with pytest.raises(PatternError, match=r"bad range '3..1'"):
        expand(["blocks.{3..1}.hook_mlp_out"], 4, 4)


def test_every_site_protected_gives_kl_zero_and_faithfulness_one(toy, pairs):
    everything = ["blocks.*.attn.hook_z", "blocks.*.hook_resid_post"]
    row = run_scrub(toy, [_cell("all", everything)], pairs, CFG, seed=0)[0]
    assert row["mean_kl"] == 0.0 and row["max_kl"] == 0.0 and row["faithfulness"] == 1.0
    assert row["verdict"] == "FAITHFUL" and row["n_scrubbed_sites"] == 0
    assert row["corrupted_kl"] > 0.1  # the resampled inputs do change the output


def test_scrubbing_everything_gives_the_kl_of_the_corrupted_run(toy, pairs):
    """Nothing protected and the last residual stream scrubbed: the output is the resampled run's, so
    the KL equals KL(full run || resampled run) computed independently."""
    row = run_scrub(toy, [_cell("none", [])], pairs, {**CFG, "resamples": 1}, seed=3)[0]
    tok = toy.tokenizer
    harmful, harmless = prompt_tokens(tok, pairs.harmful.instructions), prompt_tokens(tok, pairs.harmless.instructions)
    from refusal_ray.stages.scrub import answer_prefixes

    prefixes = answer_prefixes(toy, harmful, CFG["answer_tokens"], 8)
    picks = resample_indices(len(harmful), len(harmless), 1, seed=3)
    expected = []
    with torch.inference_mode():
        for i, (h, a) in enumerate(zip(harmful, prefixes)):
            w = len(a) + 1
            full = torch.log_softmax(forward(toy.model, *left_pad([h + a], tok.pad_token_id)).logits[0, -w:], -1)
            src = harmless[picks[i][0]] + a
            corr = torch.log_softmax(forward(toy.model, *left_pad([src], tok.pad_token_id)).logits[0, -w:], -1)
            expected.append(float((full.exp() * (full - corr)).sum(-1).mean()))
    assert row["kl_per_example"] == pytest.approx(expected, abs=1e-4)
    assert row["mean_kl"] == pytest.approx(row["corrupted_kl"], abs=1e-9)


def test_scrubbing_is_deterministic_for_a_seed(toy, pairs):
    cells = [_cell("late", ["blocks.{2,3}.attn.hook_z"]), _cell("none", [])]
    a = run_scrub(toy, cells, pairs, CFG, seed=5)
    b = run_scrub(toy, cells, pairs, CFG, seed=5)
    assert a == b
    assert resample_indices(6, 6, 2, 5) != resample_indices(6, 6, 2, 6)


def test_hypotheses_scrubbed_together_equal_each_alone(toy, pairs):
    cfg = {**CFG, "scrubbed": ["blocks.*.attn.hook_z", "blocks.*.hook_mlp_out"]}
    cells = [_cell("late", ["blocks.{2,3}.attn.hook_z"]), _cell("heads", ["blocks.1.attn.hook_z[0,2]"]),
             _cell("mlp", ["blocks.*.hook_mlp_out"])]
    together = run_scrub(toy, cells, pairs, cfg, seed=1)
    for cell, row in zip(cells, together):
        alone = run_scrub(toy, [cell], pairs, {**cfg, "batch_size": 3}, seed=1)[0]
        assert alone["kl_per_example"] == pytest.approx(row["kl_per_example"], abs=1e-5)
        assert alone["verdict"] == row["verdict"]


def test_scrub_kl_protected_heads_keep_their_values(tiny_lm):
    """On every family: protecting all heads of every scrubbed z site (named per head) is protecting
    the sites, so the KL is zero; protecting none of them is not."""
    tok, sites = tiny_lm.tokenizer, tiny_lm.sites
    ex = prompt_tokens(tok, [PROMPTS[0], PROMPTS[3]])
    src = prompt_tokens(tok, [PROMPTS[2], PROMPTS[1]])
    heads = ",".join(map(str, range(sites.n_heads)))
    scrubbed = expand(["blocks.*.attn.hook_z"], sites.n_layers, sites.n_heads)
    per_head = expand([f"blocks.*.attn.hook_z[{heads}]"], sites.n_layers, sites.n_heads)
    kl, corrupted = scrub_kl(tiny_lm.model, sites, ex, [[src[0]], [src[1]]], [3, 3], [per_head, {}], scrubbed,
                             tok.pad_token_id)
    assert torch.nan_to_num(kl[0]).abs().max() == 0
    assert torch.nan_to_num(kl[1]).max() > 0
    assert torch.isnan(kl[:, :, :, :0]).all() and torch.isfinite(kl[:, :, :, -3:]).all()


def test_scrub_kl_a_shorter_resampled_input_scrubs_every_position(tiny_lm, monkeypatch):
    """Every family: at every scrubbed site a hypothesis does not protect, every real position of
    the scrubbed row holds a value of the resampled run, read off the hooked activations of the
    pass itself. Positions aligned from the end take the aligned value; the example's leading
    positions that a shorter resampled input lacks take its first real position's value, so no
    harmful-only token keeps its own value there. A longer resampled input's extra leading
    positions go unused. Protected sites and heads hold the full run's values."""
    import refusal_ray.stages.scrub.run as scrub_mod
    from refusal_ray.interventions import capture

    tok, sites, model = tiny_lm.tokenizer, tiny_lm.sites, tiny_lm.model
    ex = prompt_tokens(tok, [PROMPTS[3]])[0] + prompt_tokens(tok, ["apple, rope."])[0][-3:]   # + an "answer"
    short = prompt_tokens(tok, ["Hi."])[0] + ex[-3:]
    long_ = prompt_tokens(tok, [PROMPTS[3] + " " + PROMPTS[2]])[0] + ex[-3:]
    assert len(ex) - len(short) >= 5 and len(long_) > len(ex)
    scrubbed = expand(["blocks.*.attn.hook_z", "blocks.*.hook_mlp_out", "blocks.*.hook_resid_post"],
                      sites.n_layers, sites.n_heads)
    protected = [expand(["blocks.1.attn.hook_z[0,2]", "blocks.0.hook_mlp_out"], sites.n_layers, sites.n_heads), {}]

    seen, masks = {}, []
    real_hooks = scrub_mod.hooks

    def recording_hooks(adapter, transforms):
        def wrap(name, fn):
            def run(x):
                out = fn(x)                      # the scrub body edits x in place
                seen[name] = (fn, (x if out is None else out).detach().clone())
                return out
            return run
        return real_hooks(adapter, {s: wrap(s, fn) for s, fn in transforms.items()})

    def read_mask(module, args, kwargs):
        masks.append(kwargs["attention_mask"].detach().cpu().bool())

    monkeypatch.setattr(scrub_mod, "hooks", recording_hooks)
    handle = model.register_forward_pre_hook(read_mask, with_kwargs=True)
    try:
        kl, _ = scrub_kl(model, sites, [ex], [[short, long_]], [4], protected, scrubbed, tok.pad_token_id)
    finally:
        handle.remove()
    assert len(masks) == 1 and set(seen) == set(scrubbed)
    mask = masks[0]
    width = mask.shape[1]
    reference = capture(model, *left_pad([short], tok.pad_token_id), sorted(scrubbed), sites)
    checked_unmatched = 0
    for s, (fn, x) in seen.items():
        x = x.cpu()
        for k in range(len(fn.rows)):
            row, full, src = int(fn.rows[k]), int(fn.full[k]), int(fn.source[k])
            n_ex, n_src = int(mask[full].sum()), int(mask[src].sum())
            assert n_ex == len(ex) and n_src in (len(short), len(long_))
            for p in range(width - n_ex, width):
                q = max(p, width - n_src)             # the resampled run's position scrubbed into p
                for j in range(fn.use_full.shape[1]):
                    head = (slice(None),) if x.dim() == 3 else (j,)
                    got = x[(row, p) + head]
                    if fn.use_full[k, j]:
                        assert torch.equal(got, x[(full, p) + head]), (s, k, p, j)
                    else:   # every hooked site here is in the scrubbed set
                        assert fn.use_source[k, j]
                        assert torch.equal(got, x[(src, q) + head]), (s, k, p, q, j)
                        checked_unmatched += q != p
            if n_src == len(short):   # the source row is the resampled run itself
                mine = x[src, width - n_src:].float()
                assert torch.allclose(mine, reference[s][0].float(), atol=1e-5), s
    assert checked_unmatched > 0
    assert torch.isfinite(kl[:, :, :, -4:]).all()
