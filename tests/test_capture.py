"""Capture semantics: sites equal an independent recomputation; padding changes nothing."""

from __future__ import annotations

import pytest
import torch

from refusal_ray import capture
from refusal_ray.data import encode
from refusal_ray.interventions import forward, hooks
from refusal_ray.models.sites import parse_site, site_name

from conftest import PROMPTS

KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z")


def all_sites(n_layers):
    return [site_name(k, layer) for layer in range(n_layers) for k in KINDS]


def test_site_names_round_trip():
    for k in KINDS:
        assert parse_site(site_name(k, 7)) == (k, 7)
    with pytest.raises(ValueError, match="unknown site 'blocks.0.hook_nope'"):
        parse_site("blocks.0.hook_nope")


def test_capture_matches_hidden_states_and_residual_algebra(tiny_lm):
    model, tok, sites = tiny_lm
    ids, mask = encode(tok, PROMPTS)
    acts = capture(model, ids, mask, all_sites(sites.n_layers), sites)
    with torch.no_grad():
        hs = forward(model, ids, mask, output_hidden_states=True).hidden_states
    real = mask.bool()
    for layer in range(sites.n_layers):
        pre, mid, post = (acts[site_name(k, layer)] for k in ("resid_pre", "resid_mid", "resid_post"))
        attn, mlp, z = (acts[site_name(k, layer)] for k in ("attn_out", "mlp_out", "z"))
        assert z.shape == (*ids.shape, sites.n_heads, sites.d_head)
        assert pre.shape == (*ids.shape, sites.d_model)
        torch.testing.assert_close(pre[real], hs[layer][real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mid[real], (pre + attn)[real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(post[real], (mid + mlp)[real], rtol=1e-5, atol=1e-5)
        if layer + 1 < sites.n_layers:
            torch.testing.assert_close(acts[site_name("resid_pre", layer + 1)][real], post[real])
        # z through the output projection gives the attention output where no norm intervenes
        if sites.layout.z.rsplit(".", 1)[0] == sites.layout.attn_out:
            o_proj = sites.module("z", layer)
            with torch.no_grad():
                recomputed = o_proj(z.flatten(-2))
            torch.testing.assert_close(recomputed[real], attn[real], rtol=1e-5, atol=1e-5)


def test_hooks_leave_model_unchanged(tiny_lm):
    model, tok, sites = tiny_lm
    ids, mask = encode(tok, PROMPTS)
    installed = {id(m): (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()}
    with torch.no_grad():
        before = forward(model, ids, mask).logits
        with hooks(sites, {site_name("resid_pre", 1): lambda x: x * 0}):
            during = forward(model, ids, mask).logits
        after = forward(model, ids, mask).logits
    assert not torch.allclose(before, during)
    assert torch.equal(before, after)
    # only load_model's own head hook (a contiguous input) stays
    assert {id(m): (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()} == installed
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 1


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padded_batch_equals_sequential(tiny_path, attn):
    from refusal_ray import load_model

    try:
        model, tok, sites = load_model(str(tiny_path), attn_implementation=attn)
    except ValueError as e:
        if "does not support an attention implementation" in str(e):
            pytest.skip(f"{tiny_path.name}: no {attn} attention in this transformers version")
        raise
    names = all_sites(sites.n_layers)
    ids, mask = encode(tok, PROMPTS)
    batched = capture(model, ids, mask, names, sites)
    for i, prompt in enumerate(PROMPTS):
        one_ids, one_mask = encode(tok, [prompt])
        alone = capture(model, one_ids, one_mask, names, sites)
        n = one_ids.shape[1]
        for name in names:
            got, want = batched[name][i, -n:], alone[name][0]
            assert torch.isfinite(got).all(), name
            rel = (got - want).abs().max() / want.abs().max().clamp_min(1e-12)
            assert rel <= 1e-5, (name, float(rel))


def test_adapter_reports_unknown_family():
    from refusal_ray.models.sites import UnsupportedFamilyError, layout_for

    with pytest.raises(UnsupportedFamilyError, match=r"unsupported model family 'bert'; supported: gemma2, "):
        layout_for("bert")


def test_output_head_gets_a_contiguous_input(tiny_qwen_path):
    """load_model's head pre-hook: logits_to_keep slices a non-contiguous view (slow in CPU bf16)."""
    from refusal_ray import load_model

    lm = load_model(str(tiny_qwen_path), dtype="bfloat16")
    seen = []
    handle = lm.model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    ids, mask = encode(lm.tokenizer, PROMPTS)
    with torch.no_grad():
        kept = forward(lm.model, ids, mask, logits_to_keep=2).logits
        full = forward(lm.model, ids, mask).logits
    handle.remove()
    assert seen[0].shape[1] == 2 and seen[0].is_contiguous()
    torch.testing.assert_close(kept, full[:, -2:])
