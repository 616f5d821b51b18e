"""Per-row interventions: ablation invariant, mixed batches equal rows alone, steering batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refusal_ray.data import PromptSet, encode
from refusal_ray.grid import Cell
from refusal_ray.interventions import RowEdit, capture, forward, hooks, row_edits
from refusal_ray.models.sites import site_name
from refusal_ray.ops.base import SteerInputs, control_direction
from refusal_ray.stages.steer import Row, build_edits, run_steer

from conftest import PROMPTS


def _unit(d, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    return u / u.norm()


def test_ablated_activations_have_zero_projection(tiny_lm):
    model, tok, sites = tiny_lm
    ids, mask = encode(tok, PROMPTS)
    n = ids.shape[0]
    u = _unit(sites.d_model, 0)
    edits = {(k, layer): RowEdit(u.expand(n, -1).clone(), torch.ones(n))
             for layer in range(sites.n_layers) for k in ("resid_pre", "attn_out", "mlp_out")}
    seen = {}
    with row_edits(sites, edits):
        # registered after the edits, so these readers see the edited activations
        with hooks(sites, {site_name(k, layer): (lambda name: lambda x: seen.__setitem__(name, x.clone()))(
                site_name(k, layer)) for layer in range(sites.n_layers) for k in ("resid_pre", "attn_out", "mlp_out")}):
            with torch.no_grad():
                forward(model, ids, mask)
    real = mask.bool()
    for name, x in seen.items():
        x = x[real]
        proj = (x @ u).abs()
        assert (proj <= 1e-5 * x.norm(dim=-1)).all(), (name, float(proj.max()))


def _logits_with(model, sites, ids, mask, edits):
    with row_edits(sites, edits), torch.no_grad():
        return forward(model, ids, mask).logits


def test_mixed_batch_equals_each_row_alone(tiny_lm):
    model, tok, sites = tiny_lm
    d, n = sites.d_model, len(PROMPTS)
    v = torch.randn(d, generator=torch.Generator().manual_seed(1)) * 3
    # row 0: addition at layer 0 c=+2; row 1: addition at layer 2 c=-1 (random control);
    # row 2: ablation everywhere; row 3: untouched
    ctl = torch.from_numpy(control_direction("cell-x", v.numpy()))
    add0, add2 = torch.zeros(n, d), torch.zeros(n, d)
    add0[0], add2[1] = 2 * v, -1 * ctl
    dirs, alpha = torch.zeros(n, d), torch.zeros(n)
    dirs[2], alpha[2] = v / v.norm(), 1.0
    edits = {("resid_pre", 0): RowEdit(add=add0), ("resid_pre", 2): RowEdit(add=add2)}
    for layer in range(sites.n_layers):
        for k in ("resid_pre", "attn_out", "mlp_out"):
            e = edits.get((k, layer), RowEdit())
            edits[(k, layer)] = RowEdit(dirs, alpha, e.add)
    ids, mask = encode(tok, PROMPTS)
    mixed = _logits_with(model, sites, ids, mask, edits)
    for i, prompt in enumerate(PROMPTS):
        one_ids, one_mask = encode(tok, [prompt])
        one = {key: RowEdit(None if e.ablate_dirs is None else e.ablate_dirs[i:i + 1],
                            None if e.ablate_alpha is None else e.ablate_alpha[i:i + 1],
                            None if e.add is None else e.add[i:i + 1]) for key, e in edits.items()}
        alone = _logits_with(model, sites, one_ids, one_mask, one)
        L = one_ids.shape[1]
        assert (mixed[i, -L:] - alone[0]).abs().max() <= 1e-4
    plain = _logits_with(model, sites, ids, mask, {})
    assert torch.equal(mixed[3], plain[3]) or (mixed[3] - plain[3]).abs().max() <= 1e-6
    assert (mixed[0] - plain[0]).abs().max() > 1e-3  # the edit did something


def test_control_direction_is_norm_matched_and_seeded():
    v = np.arange(16, dtype=np.float32)
    a, b = control_direction("c1", v), control_direction("c1", v)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, control_direction("c2", v))
    assert np.isclose(np.linalg.norm(a), np.linalg.norm(v), rtol=1e-5)


def _cells():
    base = {"layer": None, "coefficient": 0.0, "alpha": 0.0, "direction_layer": None, "control": False}
    arms = [{**base, "mode": "baseline"},
            {**base, "mode": "addition", "layer": 1, "coefficient": 3.0, "direction_layer": 1},
            {**base, "mode": "addition", "layer": 0, "coefficient": -2.0, "direction_layer": 0, "control": True},
            {**base, "mode": "ablation", "alpha": 1.0, "direction_layer": "best"}]
    return [Cell(f"cell{i}", "steer", "tiny", 0, p) for i, p in enumerate(arms)]


def test_steering_batched_equals_unbatched(tiny_lm):
    """One generate call for all arms x prompts gives the same completions as one call per row."""
    model, tok, sites = tiny_lm
    rng = np.random.default_rng(0)
    directions = {layer: rng.standard_normal(sites.d_model).astype(np.float32) * 2 for layer in range(sites.n_layers)}
    prompts = {"harmful": PromptSet(["a", "b"], PROMPTS[:2], [None, None]),
               "harmless": PromptSet(["c", "d"], PROMPTS[2:], [None, "x"])}
    kw = dict(max_new_tokens=6)
    inputs = SteerInputs(directions, best=1)
    batched, comps_b = run_steer(tiny_lm, _cells(), prompts, inputs, batch_size=64, **kw)
    single, comps_s = run_steer(tiny_lm, _cells(), prompts, inputs, batch_size=1, **kw)
    assert [c["completion"] for c in comps_b] == [c["completion"] for c in comps_s]
    assert len(batched) == 2 * len(_cells())
    # the edits differ between arms: not every arm produced the same text
    assert len({c["completion"] for c in comps_b}) > 1


def test_build_edits_routes_rows(tiny_lm):
    _, _, sites = tiny_lm
    directions = {layer: np.full(sites.d_model, layer + 1.0, np.float32) for layer in range(sites.n_layers)}
    cells = _cells()
    rows = [Row(c, "harmful", 0) for c in cells]
    edits = build_edits(rows, SteerInputs(directions, best=2), ablation_layers=[0, 1], d_model=sites.d_model)
    assert torch.allclose(edits[("resid_pre", 1)].add[1], torch.full((sites.d_model,), 3.0 * 2))
    assert edits[("resid_pre", 1)].add[[0, 2, 3]].abs().sum() == 0
    ctl = edits[("resid_pre", 0)].add[2]
    assert np.isclose(float(ctl.norm()), 2 * float(np.linalg.norm(directions[0])), rtol=1e-5)
    u = edits[("mlp_out", 1)].ablate_dirs[3]
    assert torch.allclose(u, torch.full((sites.d_model,), 1 / sites.d_model ** 0.5))  # best = layer 2
    assert edits[("mlp_out", 1)].ablate_alpha.tolist() == [0, 0, 0, 1]
    assert ("attn_out", 2) not in edits


def test_capture_positions_select_last_token(tiny_lm):
    model, tok, sites = tiny_lm
    ids, mask = encode(tok, PROMPTS)
    name = site_name("resid_post", 1)
    full = capture(model, ids, mask, [name], sites)[name]
    last = capture(model, ids, mask, [name], sites, positions=torch.tensor([-1]))[name]
    assert torch.equal(full[:, -1:], last)


def test_directions_batched_equal_sequential(tiny_lm):
    from refusal_ray.stages.directions import fit_directions

    harm = PromptSet(["h1", "h2", "h3"], [PROMPTS[0], PROMPTS[3], PROMPTS[0] + " Please."], [None] * 3)
    safe = PromptSet(["s1", "s2", "s3"], [PROMPTS[1], PROMPTS[2], "Count these words: apple."], [None] * 3)
    kw = dict(sites=["resid_pre", "resid_post"], positions=[-2, -1])
    batched = fit_directions(tiny_lm, (harm, safe), (harm, safe), batch_size=64, **kw)
    single = fit_directions(tiny_lm, (harm, safe), (harm, safe), batch_size=1, **kw)
    assert len(batched) == 2 * tiny_lm.sites.n_layers * 2
    for a, b in zip(batched, single):
        va, vb = np.asarray(a["vector"], np.float64), np.asarray(b["vector"], np.float64)
        if min(a["norm"], b["norm"]) < 1e-9:  # e.g. layer-0 template tokens: one embedding for every prompt
            assert max(a["norm"], b["norm"]) < 1e-9
            continue
        cos = va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb))
        assert cos >= 0.9999, (a["site"], a["layer"], a["position"], cos)
        assert a["norm"] == pytest.approx(b["norm"], rel=1e-5)


def test_direction_equals_manual_difference_of_means(tiny_lm):
    from refusal_ray.stages.directions import fit_directions

    harm = PromptSet(["h1", "h2"], [PROMPTS[0], PROMPTS[3]], [None] * 2)
    safe = PromptSet(["s1", "s2"], [PROMPTS[1], PROMPTS[2]], [None] * 2)
    rows = fit_directions(tiny_lm, (harm, safe), (harm, safe))
    model, tok, sites = tiny_lm
    with torch.no_grad():
        hs_h = [forward(model, *encode(tok, [p]), output_hidden_states=True).hidden_states for p in harm.instructions]
        hs_s = [forward(model, *encode(tok, [p]), output_hidden_states=True).hidden_states for p in safe.instructions]
    for r in rows:
        L = r["layer"]
        want = (torch.stack([h[L][0, -1] for h in hs_h]).double().mean(0)
                - torch.stack([h[L][0, -1] for h in hs_s]).double().mean(0))
        np.testing.assert_allclose(r["vector"], want.numpy(), rtol=1e-4, atol=1e-5)


def test_out_of_memory_halves_the_batch_and_gives_the_same_result(tiny_qwen_path, monkeypatch):
    from refusal_ray.session import halving_on_oom
    from refusal_ray import load_model

    lm = load_model(str(tiny_qwen_path))
    original = lm.model.generate
    sizes = []

    def small_memory_generate(**kw):
        sizes.append(kw["input_ids"].shape[0])
        if kw["input_ids"].shape[0] > 3:
            raise torch.OutOfMemoryError("simulated")
        return original(**kw)

    rng = np.random.default_rng(0)
    directions = {layer: rng.standard_normal(lm.sites.d_model).astype(np.float32) for layer in range(lm.sites.n_layers)}
    prompts = {"harmful": PromptSet(["a", "b"], PROMPTS[:2], [None, None]),
               "harmless": PromptSet(["c", "d"], PROMPTS[2:], [None, None])}
    inputs = SteerInputs(directions, best=1)
    want = run_steer(lm, _cells(), prompts, inputs, batch_size=64, max_new_tokens=5)
    monkeypatch.setattr(lm.model, "generate", small_memory_generate)
    got = halving_on_oom(lambda bs: run_steer(lm, _cells(), prompts, inputs, batch_size=bs,
                                              max_new_tokens=5), 16)
    assert sizes[:3] == [16, 8, 4] and max(sizes[3:]) <= 2           # 16 -> 8 -> 4 -> 2 rows per call
    assert [c["completion"] for c in got[1]] == [c["completion"] for c in want[1]]


def test_a_replaced_resid_mid_carries_on_into_the_residual_stream(tiny_qwen_path):
    """resid_mid feeds the pre-MLP norm *and* the residual add: resid_post = edited resid_mid + mlp_out."""
    from refusal_ray import load_model

    lm = load_model(str(tiny_qwen_path))
    ids, mask = encode(lm.tokenizer, PROMPTS)
    v = torch.randn(lm.sites.d_model)
    with hooks(lm.sites, {"blocks.1.hook_resid_mid": lambda x: x + v}):
        acts = capture(lm.model, ids, mask, ["blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out",
                                             "blocks.1.hook_resid_post"], lm.sites)
    plain = capture(lm.model, ids, mask, ["blocks.1.hook_resid_mid"], lm.sites)
    real = mask.bool()
    torch.testing.assert_close(acts["blocks.1.hook_resid_mid"][real], (plain["blocks.1.hook_resid_mid"] + v)[real])
    torch.testing.assert_close(acts["blocks.1.hook_resid_post"][real],
                               (acts["blocks.1.hook_resid_mid"] + acts["blocks.1.hook_mlp_out"])[real],
                               rtol=1e-5, atol=1e-5)
