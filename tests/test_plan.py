"""`plan`, `schema` and `validate` explain a spec without loading weights."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from refusal_ray.cli import app
from refusal_ray.plan import count_params, make_plan

from test_bad_input import base_spec


def test_plan_counts_cells_and_estimates_memory(tmp_path, tiny_qwen_path):
    spec = base_spec(tiny_qwen_path)
    spec["seeds"] = [0, 1]
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    plan = make_plan(f)
    # per seed: directions 1, baseline 1, 3 layers x 1 coefficient x 2 controls, ablation 1 alpha x 2 controls
    assert plan.counts() == {("tiny", "directions"): 2, ("tiny", "steer"): 2 * (1 + 6 + 2)}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_path)
    assert plan.models["tiny"].params == sum(p.numel() for p in model.parameters())
    assert plan.models["tiny"].weight_bytes == 4 * plan.models["tiny"].params
    result = CliRunner().invoke(app, ["plan", str(f), "--out", str(tmp_path / "none")])
    assert result.exit_code == 0, result.output
    assert "20 cells (0 already done)" in result.output
    assert "tiny" in result.output and "KiB" in result.output


def test_count_params_reads_no_weights():
    cfg = {"model_type": "llama", "vocab_size": 100, "hidden_size": 16, "intermediate_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "tie_word_embeddings": False}
    # embed + lm_head + 2 x (4 attn projections + 3 mlp projections + 2 norms) + final norm
    assert count_params(cfg) == 2 * 100 * 16 + 2 * (4 * 16 * 16 + 3 * 16 * 32 + 2 * 16) + 16


def test_schema_documents_defaults():
    result = CliRunner().invoke(app, ["schema"])
    schema = json.loads(result.output)
    props = schema["$defs"]["DataSpec"]["properties"]
    assert props["n_train"]["default"] == 64 and "description" in props["n_train"]
    assert "decision_rule" in schema["required"]


def test_memory_warning_names_the_model(tmp_path, tiny_qwen_path):
    from refusal_ray.plan import memory_warnings

    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(base_spec(tiny_qwen_path)))
    plan = make_plan(f)
    assert memory_warnings(plan, available=10**12) == []
    [warning] = memory_warnings(plan, available=1000)
    assert warning.startswith("warning: model 'tiny' needs about ") and "offload_folder" in warning
