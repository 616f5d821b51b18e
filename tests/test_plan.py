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


def test_big_models_offload_by_default_and_plan_says_so(tmp_path, tiny_qwen_path):
    """Models of resources.highmem_params or more load with accelerate offloading unless told otherwise."""
    from refusal_ray.plan import describe, offload_mode
    from refusal_ray.session import placement_kwargs

    spec = base_spec(tiny_qwen_path)
    spec["resources"] = {"highmem_params": 1000}        # the tiny model counts as big
    spec["models"].append({"name": "small-off", "path": str(tiny_qwen_path), "offload": "off"})
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    plan = make_plan(f)
    big, off = plan.spec.models
    assert offload_mode(big, plan.models["tiny"].params, 1000) == "auto"
    assert offload_mode(off, plan.models["small-off"].params, 1000) == "off"
    assert offload_mode(big, plan.models["tiny"].params, 3e9) == "off"
    text = describe(plan)
    assert "tiny: with GPUs" in text and "CPU-only 1 CPU + highmem" in text and "; offload auto" in text
    assert "small-off: with GPUs" in text and "; no offload" in text
    kwargs = placement_kwargs({"device": "cpu", "offload": "auto", "offload_folder": str(tmp_path / "off")}, 0)
    assert kwargs == {"device": "cpu", "device_map": "auto", "offload_folder": str(tmp_path / "off")}
    assert placement_kwargs({"device": "cpu", "offload": "off"}, 0) == {"device": "cpu", "device_map": None}


def test_plan_warns_when_a_scrubbed_residual_stream_erases_a_hypothesis(tmp_path, tiny_qwen_path):
    from refusal_ray.stages.scrub import scrub_warnings

    spec = base_spec(tiny_qwen_path)
    spec["stages"]["scrub"] = {"hypotheses": [{"name": "heads", "protected": ["blocks.1.attn.hook_z"]},
                                              {"name": "stream", "protected": ["blocks.2.hook_resid_post"]}]}
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    plan = make_plan(f)
    assert plan.counts()[("tiny", "scrub")] == 2
    assert scrub_warnings(plan) == ["warning: hypothesis 'heads' on tiny: blocks.2.hook_resid_post is scrubbed, "
                                    "which overwrites protected blocks.1.attn.hook_z"]
