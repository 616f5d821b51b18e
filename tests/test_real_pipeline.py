"""The quickstart's stages on a real chat checkpoint (SmolLM2-135M-Instruct, `real` tier), run in
process with the Ray-free runner: directions at every layer x post-instruction position, selection
on a few layers, steering with the selected direction, on a handful of prompts. SmolLM2 barely
refuses, so this checks the machinery (template positions, stop tokens, system prompt, ids), not
the science."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from refusal_ray.cluster.local import run_local
from refusal_ray.plan import make_plan

from conftest import TOY_PROMPTS

pytestmark = pytest.mark.real


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _spec(tmp_path, model_path, **changes) -> str:
    raw = {
        "name": "smol", "models": [{"name": "smollm2", "path": str(model_path)}],
        "data": {"harmful": {"path": str(TOY_PROMPTS / "harmful.jsonl")},
                 "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl"), "reference_column": "reference"},
                 "n_train": 4, "n_val": 2, "n_test": 2},
        "seeds": [0],
        "stages": {"directions": {"positions": "post_instruction"},
                   "select": {"layers": [6, 12], "kl_max": None, "induce_min": None, "fallback": "bypass"},
                   "steer": {"addition": {"layers": [12], "coefficients": [4.0]},
                             "ablation": {"layers": "all", "alphas": [1.0], "direction_layer": "selected"}}},
        "generation": {"max_new_tokens": 12},
        "decision_rule": {"control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25,
                                             "addition_coefficient": 4.0, "ablation_alpha": 1.0},
                          "steering_labels": {"strong": 0.5, "weak": 0.2}},
    }
    raw |= changes
    path = tmp_path / "smol.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_quickstart_stages_on_smollm2(tmp_path, smollm2_path):
    plan = make_plan(_spec(tmp_path, smollm2_path))
    mp = plan.models["smollm2"]
    assert mp.positions == [-6, -5, -4, -3, -2, -1]          # <|im_end|> \n <|im_start|> assistant \n
    assert mp.chat["stop_tokens"] == ["<|im_end|>"]
    assert mp.chat["default_system_prompt"].startswith("You are a helpful AI assistant named SmolLM")
    assert "SmolLM" not in mp.chat["example_prompt"]          # system_prompt: none
    out = run_local(plan, torch_threads=1)
    dirs = out["directions"]
    assert len(dirs) == 30 * 6 and all(np.isfinite(r["norm"]) for r in dirs)
    sel = out["selection"]
    assert sorted({(r["layer"], r["position"]) for r in sel}) == [(layer, p) for layer in (6, 12) for p in mp.positions]
    assert all(np.isfinite([r["bypass"], r["induce"], r["kl"]]).all() for r in sel)
    chosen = [r for r in sel if r["selected"]]
    assert len(chosen) == 1 and chosen[0]["selected_by"] == "bypass"   # no filters: the lowest bypass wins
    assert chosen[0]["bypass"] == min(r["bypass"] for r in sel)
    steering = out["steering"]
    abl = [r for r in steering if r["mode"] == "ablation" and not r["control"]]
    assert {(r["direction_layer"], r["direction_position"]) for r in abl} == {(chosen[0]["layer"],
                                                                                chosen[0]["position"])}
    assert all(r["status"] == "done" for r in out["cells"])
    for c in out["completions"]:                              # cut at the end of turn: no template text
        assert "<|im_end|>" not in c["completion"] and "<|im_start|>" not in c["completion"]
