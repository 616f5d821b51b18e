"""The directions table's per-class means (`mean_harmful`, `mean_harmless`): the train means the
difference of means is fitted from, checked against an independent recomputation from the model's
own hidden states (one prompt per forward pass: no padding, no capture hooks), and against the
stored vector; the stage's rows carry them through a run (`run_local`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refusal_ray.data import PromptSet, encode
from refusal_ray.interventions import forward

from conftest import PROMPTS

HARM = PromptSet(["h1", "h2", "h3"], [PROMPTS[0], PROMPTS[3], PROMPTS[0] + " Please."], [None] * 3)
SAFE = PromptSet(["s1", "s2"], [PROMPTS[1], PROMPTS[2]], [None] * 2)


def _hidden(lm, prompts: PromptSet) -> list[tuple]:
    """hidden_states of each prompt run alone: hidden_states[L] is resid_pre[L] ([1, pos, d_model])."""
    with torch.no_grad():
        return [forward(lm.model, *encode(lm.tokenizer, [p]), output_hidden_states=True).hidden_states
                for p in prompts.instructions]


@pytest.fixture(scope="module")
def qwen(tiny_qwen_path):
    from refusal_ray import load_model

    return load_model(str(tiny_qwen_path), attn_implementation="eager")


def test_means_are_the_train_class_means(qwen):
    from refusal_ray.stages.directions import fit_directions

    rows = fit_directions(qwen, (HARM, SAFE), (HARM, SAFE), positions=[-2, -1], batch_size=2)
    hs_h, hs_s = _hidden(qwen, HARM), _hidden(qwen, SAFE)
    assert len(rows) == qwen.sites.n_layers * 2
    for r in rows:
        L, p = r["layer"], r["position"]
        want_h = torch.stack([h[L][0, p] for h in hs_h]).double().mean(0).numpy()
        want_s = torch.stack([h[L][0, p] for h in hs_s]).double().mean(0).numpy()
        for key, want in (("mean_harmful", want_h), ("mean_harmless", want_s)):
            got = np.asarray(r[key])
            assert got.dtype == np.float64 and got.shape == (qwen.sites.d_model,)   # a plain float list
            assert np.asarray(r[key], np.float32).tolist() == r[key]               # float32 values
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        # the vector is their difference, up to float32 rounding of the three (rounded from float64)
        diff = np.asarray(r["mean_harmful"], np.float64) - np.asarray(r["mean_harmless"], np.float64)
        scale = max(np.abs(r["mean_harmful"]).max(), np.abs(r["mean_harmless"]).max())
        np.testing.assert_allclose(np.asarray(r["vector"], np.float64), diff, rtol=0, atol=4e-7 * scale)


def test_the_stage_stores_the_means(tmp_path):
    """Through `run_local` on the toy family: every stored direction row has both means, of d_model."""
    import yaml

    from refusal_ray.cluster.local import run_local
    from refusal_ray.plan import make_plan

    from conftest import TOY_MODELS, TOY_PROMPTS

    spec = {"name": "means", "models": [{"name": "qwen-xs", "path": str(TOY_MODELS / "toy-qwen-xs")}],
            "data": {"harmful": {"path": str(TOY_PROMPTS / "harmful.jsonl")},
                     "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl")},
                     "n_train": 6, "n_val": 4, "n_test": 2},
            "seeds": [0], "stages": {"directions": {}, "steer": None},
            "decision_rule": {"control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5,
                                                 "control_margin": 0.25, "addition_coefficient": 1.0,
                                                 "ablation_alpha": 1.0},
                              "steering_labels": {"strong": 0.5, "weak": 0.2}}}
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    out = run_local(make_plan(str(f)), log=lambda *a: None)
    rows = out["directions"]
    assert rows
    for r in rows:
        d = len(r["vector"])
        assert len(r["mean_harmful"]) == d and len(r["mean_harmless"]) == d
        diff = np.asarray(r["mean_harmful"], np.float64) - np.asarray(r["mean_harmless"], np.float64)
        np.testing.assert_allclose(r["vector"], diff, rtol=0, atol=1e-5)
