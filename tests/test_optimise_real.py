"""Stage optimise on a real chat checkpoint (SmolLM2-135M-Instruct, the `real` tier): the optimisation runs
through a real Llama-family model on a few toy prompts for a few steps and the loss falls; the weights stay
bit for bit. No rank claim: the model barely refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from refusal_ray.interventions import capture
from refusal_ray.models.loading import load_model
from refusal_ray.models.refusal_tokens import resolve
from refusal_ray.stages.optimise.run import make_batch, optimise, prompt_ids

from conftest import TOY_PROMPTS

pytestmark = pytest.mark.real


def _instructions(name: str, n: int) -> list[str]:
    rows = [json.loads(line) for line in (TOY_PROMPTS / f"{name}.jsonl").read_text().splitlines()]
    return [r["instruction"] for r in rows[:n]]


def test_optimise_runs_on_smollm2_and_the_loss_falls(smollm2_path):
    lm = load_model(str(smollm2_path))
    before = {n: p.detach().clone() for n, p in lm.model.state_dict().items()}
    h = prompt_ids(lm.tokenizer, _instructions("harmful", 3))
    s = prompt_ids(lm.tokenizer, _instructions("harmless", 3))
    layer = lm.sites.n_layers // 3
    site = f"blocks.{layer}.hook_resid_pre"

    def acts(seqs):
        b = make_batch(seqs, lm.tokenizer.pad_token_id, "cpu", 1)
        return capture(lm.model, b.ids, b.mask, [site], lm.sites)[site][:, -1].double()

    dim = (acts(h).mean(0) - acts(s).mean(0)).float().numpy()
    tokens = resolve("family", lm.tokenizer, "llama", [])
    res = optimise(lm, h, s, dim=1, layer=layer, alpha=float(np.linalg.norm(dim)), token_ids=tokens, steps=3,
                   batch_size=3, seed=0, lr=0.003)
    print(f"smollm2: loss {res.loss_initial:.4f} -> {res.loss_final:.4f}, losses {res.losses}, "
          f"{res.seconds:.1f} s, peak {res.peak_memory_mb:.0f} MB, terms {res.terms}")
    assert res.loss_final < res.loss_initial
    assert res.vectors.shape == (1, lm.sites.d_model) and res.stopped == "steps"
    after = lm.model.state_dict()
    assert all(torch.equal(t, after[n]) for n, t in before.items())
