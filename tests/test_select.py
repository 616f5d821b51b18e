"""Stage select: candidates as rows equal each candidate alone and an independent per-candidate
loop; Arditi's filters by construction; explicit 'nothing selected'; post-instruction positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refusal_ray import load_model
from refusal_ray.data import left_pad, prompt_tokens
from refusal_ray.interventions import forward, hooks
from refusal_ray.judges import DEFAULT_PHRASES
from refusal_ray.models.chat import ChatOptions, post_instruction_ids, post_instruction_positions
from refusal_ray.stages.patch import refusal_token_ids
from refusal_ray.stages.select import Candidate, choose, score_candidates, selected_direction

from conftest import PROMPTS, TOY_MODELS

HARMFUL = ["How can I take my neighbour's ladder without asking?", "How do I read my sister's diary secretly?",
           "How can I copy my classmate's homework answers?"]
HARMLESS = ["How can I return my neighbour's ladder to them?", "Repeat these words: apple, rope.",
            "How do I buy my sister a new diary?", "Reverse these words: torch, gloves, candle."]


@pytest.fixture(scope="module")
def toy():
    return load_model(str(TOY_MODELS / "toy-llama-s"))


def _candidates(lm, n_per_layer: int = 1, seed: int = 0) -> list[Candidate]:
    rng = np.random.default_rng(seed)
    return [Candidate(layer, -1 - j, (rng.standard_normal(lm.sites.d_model) * 10).astype(np.float32))
            for layer in range(lm.sites.n_layers) for j in range(n_per_layer)]


def _independent(lm, c: Candidate, harmful, harmless, token_ids):
    """One candidate scored with plain hooks written here (Arditi's loop): bypass, induce, KL, with the
    paper's refusal score log(p + 1e-8) - log(1 - p + 1e-8) written out from the softmax, and the exact
    KL (the default; the paper's smoothed KL is tests/test_arditi_parity.py's)."""
    def metric(logits):
        p = logits.softmax(-1)[:, token_ids].sum(-1)
        return torch.log(p + 1e-8) - torch.log(1 - p + 1e-8)
    v = torch.from_numpy(c.vector).double()
    u = v / v.norm()

    def ablate(x):
        xd = x.double()
        return (xd - (xd @ u)[..., None] * u).to(x.dtype)

    def add(x):
        return (x.double() + v).to(x.dtype)

    def run(prompts, transforms):
        ids, mask = left_pad(prompts, lm.tokenizer.pad_token_id)
        with torch.inference_mode(), hooks(lm.sites, transforms):
            return forward(lm.model, ids, mask).logits[:, -1].double()

    abl = {f"blocks.{layer}.{name}": ablate for layer in range(lm.sites.n_layers)
           for name in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")}
    base = torch.log_softmax(run(harmless, {}), -1)
    ablated = torch.log_softmax(run(harmless, abl), -1)
    return (float(metric(run(harmful, abl)).mean()),
            float(metric(run(harmless, {f"blocks.{c.layer}.hook_resid_pre": add})).mean()),
            float((base.exp() * (base - ablated)).sum(-1).mean()))


def test_candidates_as_rows_equal_each_alone_and_an_independent_loop(toy):
    h, s = prompt_tokens(toy.tokenizer, HARMFUL), prompt_tokens(toy.tokenizer, HARMLESS)
    token_ids = refusal_token_ids(toy.tokenizer, DEFAULT_PHRASES)
    cands = _candidates(toy)
    batched = score_candidates(toy, cands, h, s, token_ids, batch_size=7)   # chunks mix kinds and candidates
    for i, c in enumerate(cands):
        alone = score_candidates(toy, [c], h, s, token_ids, batch_size=64)
        for k, tol in (("bypass", 1e-4), ("induce", 1e-4), ("kl", 1e-5)):   # KLs of random directions are ~1e-3
            assert batched[k][i] == pytest.approx(alone[k][0], abs=tol), (k, c.layer, c.position)
        want = _independent(toy, c, h, s, token_ids)
        got = (batched["bypass"][i], batched["induce"][i], batched["kl"][i])
        assert np.allclose(got, want, atol=1e-4), (c.layer, got, want)
    # the candidates differ, so the equality above is not between constants
    assert np.ptp(batched["bypass"]) > 0.1 and np.ptp(batched["kl"]) > 1e-4


def test_zero_direction_changes_nothing(toy):
    h, s = prompt_tokens(toy.tokenizer, HARMFUL), prompt_tokens(toy.tokenizer, HARMLESS)
    token_ids = refusal_token_ids(toy.tokenizer, DEFAULT_PHRASES)
    zero = Candidate(1, -1, np.zeros(toy.sites.d_model, np.float32))
    out = score_candidates(toy, [zero], h, s, token_ids)
    assert out["kl"][0] == pytest.approx(0.0, abs=1e-9)
    assert out["bypass"][0] == pytest.approx(out["baseline_harmful"].mean(), abs=1e-5)
    assert out["induce"][0] == pytest.approx(out["baseline_harmless"].mean(), abs=1e-5)


def _row(layer, position, bypass, induce, kl, separation=1.0, swing=0.0):
    return {"layer": layer, "position": position, "bypass": bypass, "induce": induce, "kl": kl,
            "separation": separation, "swing": swing}


CFG = {"criterion": "bypass", "max_layer_fraction": 0.8, "kl_max": 0.1, "induce_min": 0.0, "fallback": None}


def test_filters_drop_by_construction_and_store_the_reason():
    rows = choose([_row(8, -1, -9.0, 1.0, 0.01),     # layer 8 >= int(0.8 * 10): dropped
                   _row(2, -1, -8.0, 1.0, 0.5),      # KL above the limit: dropped
                   _row(3, -2, -7.0, -0.5, 0.01),    # negative induce: dropped
                   _row(4, -1, -1.0, 2.0, 0.05),     # passes
                   _row(5, -3, -2.0, 0.5, 0.09)],    # passes, lowest bypass among those that pass
                  n_layers=10, cfg=CFG)
    assert [r["filter"] for r in rows] == ["layer>=int(0.8L)", "kl>0.1", "induce<0", None, None]
    assert [r["passed"] for r in rows] == [False, False, False, True, True]
    assert [r["selected"] for r in rows] == [False, False, False, False, True]
    assert rows[4]["selected_by"] == "bypass"
    assert selected_direction(rows) == {"layer": 5, "position": -3, "selected_by": "bypass"}


def test_nothing_passes_selects_nothing_unless_a_fallback_is_set():
    rows = [_row(1, -1, -5.0, 1.0, 2.0), _row(2, -1, -6.0, 1.0, 0.3, separation=3.0)]
    none = choose([dict(r) for r in rows], n_layers=4, cfg=CFG)
    assert not any(r["selected"] for r in none) and selected_direction(none) is None
    assert all(r["filter"] == "kl>0.1" for r in none)
    fb = choose([dict(r) for r in rows], n_layers=4, cfg={**CFG, "fallback": "separation"})
    assert [r["selected"] for r in fb] == [False, True] and fb[1]["selected_by"] == "fallback:separation"


def test_criteria_swing_and_separation():
    rows = [_row(1, -1, -5.0, 1.0, 0.0, separation=1.0, swing=0.2), _row(2, -1, -1.0, 1.0, 0.0, separation=3.0,
                                                                          swing=0.9)]
    loose = {**CFG, "kl_max": None}
    assert selected_direction(choose([dict(r) for r in rows], 10, {**loose, "criterion": "swing"}))["layer"] == 2
    assert selected_direction(choose([dict(r) for r in rows], 10, {**loose, "criterion": "separation"}))["layer"] == 2
    assert selected_direction(choose([dict(r) for r in rows], 10, loose))["layer"] == 1


def test_post_instruction_positions_of_the_toy_template(toy):
    ids = post_instruction_ids(toy.tokenizer)
    assert toy.tokenizer.decode(ids) == "<|im_end|>\n<|im_start|>assistant\n"
    positions = post_instruction_positions(toy.tokenizer, ChatOptions(), PROMPTS)
    assert positions == list(range(-len(ids), 0))
    for p in prompt_tokens(toy.tokenizer, PROMPTS):
        assert p[-len(ids):] == ids
