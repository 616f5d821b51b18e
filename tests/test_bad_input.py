"""The bad-input corpus: every broken spec exits 2 with one line naming file and field, writing nothing."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from refusal_ray.cli import app

from conftest import REPO, TOY_PROMPTS


def base_spec(model_path: Path) -> dict:
    return {
        "name": "broken",
        "models": [{"name": "tiny", "path": str(model_path)}],
        "data": {"harmful": {"path": str(TOY_PROMPTS / "harmful.jsonl")},
                 "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl"), "reference_column": "reference"},
                 "n_train": 8, "n_val": 4, "n_test": 2},
        "seeds": [0],
        # the tests built on this spec are about something other than selection: ablate the
        # highest-separation direction (direction_layer 'selected' would need a stages.select block)
        "stages": {"steer": {"addition": {"coefficients": [1.0]}, "ablation": {"direction_layer": "best"}}},
        "generation": {"max_new_tokens": 4},
        "decision_rule": {
            "control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25,
                               "addition_coefficient": 1.0, "ablation_alpha": 1.0},
            "steering_labels": {"strong": 0.5, "weak": 0.2}},
    }


def _set(d: dict, path: str, value):
    keys = path.split(".")
    for k in keys[:-1]:
        d = d[int(k)] if isinstance(d, list) else d[k]
    last = keys[-1]
    if value is DELETE:
        del d[last]
    elif isinstance(d, list):
        d[int(last)] = value
    else:
        d[last] = value


DELETE = object()
# Gemma-2-like: a system message raises
NO_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PAIRED = {"data.harmful.pair_column": "pair_id", "data.harmless.pair_column": "pair_id"}
BROKEN_TEMPLATE = "{% for message in messages %}{{ message['content'] }"   # Jinja: unexpected '}'

# (case id, edits {dotted path: value}, expected field, expected words in the message)
CASES = [
    ("unknown-top-key", {"colour": "red"}, "colour", "unknown key"),
    ("unknown-model-key", {"models.0.weights": "x"}, "models.0.weights", "unknown key"),
    ("unknown-data-key", {"data.harmful.column": "x"}, "data.harmful.column", "unknown key"),
    ("unknown-stage-key", {"stages.steer.addition.strength": 2}, "stages.steer.addition.strength", "unknown key"),
    ("unknown-rule-key", {"decision_rule.control_margin.margin": 1}, "decision_rule.control_margin.margin",
     "unknown key"),
    ("wrong-type-seeds", {"seeds": "zero"}, "seeds", "valid list"),
    ("wrong-type-n", {"data.n_train": "many"}, "data.n_train", "valid integer"),
    ("unknown-dtype", {"models.0.dtype": "float8"}, "models.0.dtype", "'float32', 'bfloat16' or 'float16'"),
    ("missing-rule-field", {"decision_rule.control_margin.baseline_min": DELETE},
     "decision_rule.control_margin.baseline_min", "Field required"),
    ("missing-rule", {"decision_rule": DELETE}, "decision_rule", "Field required"),
    ("missing-name", {"name": DELETE}, "name", "Field required"),
    ("duplicate-models", {"models.1": "DUP"}, "models", "duplicate model name 'tiny'"),
    ("missing-prompt-file", {"data.harmful.path": "nowhere/harmful.jsonl"}, "data.harmful.path",
     "file not found: nowhere/harmful.jsonl"),
    ("empty-prompt-file", {"data.harmless.path": "EMPTY"}, "data.harmless.path", "prompt file is empty"),
    ("missing-column", {"data.harmful.instruction_column": "prompt"}, "data.harmful.instruction_column",
     "column 'prompt' not in"),
    ("missing-model-dir", {"models.0.path": "no/such/model"}, "models.0.path", "directory not found: no/such/model"),
    ("layer-out-of-range", {"stages.steer.addition.layers": [99]}, "stages.steer.addition.layers",
     "layer 99 out of range: model 'tiny' has 3 layers (0..2)"),
    ("ablation-direction-out-of-range", {"stages.steer.ablation": {"direction_layer": 7, "alphas": [1.0]}},
     "stages.steer.ablation.direction_layer", "layer 7 out of range"),
    ("positive-position", {"stages.directions": {"positions": [3]}}, "stages.directions.positions", "must be negative"),
    ("split-too-small", {"data.n_test": 100000}, "data.harmful", "split 'test' has 200 rows, n_test asks for 100000"),
    ("rule-arm-not-in-grid", {"decision_rule.control_margin.addition_coefficient": 5.0}, "",
     "addition_coefficient 5.0 is not in stages.steer.addition.coefficients"),
    ("negative-n", {"data.n_val": -1}, "data.n_val", "greater than or equal to 2"),
    ("offload-without-folder", {"models.0.max_memory": {"cpu": "1GiB", "disk": "8GiB"}}, "models.0.offload_folder",
     "disk offload needs an offload_folder"),
    ("4bit-cpu-unpackable", {"models.0.quantization": "4bit", "models.0.device": "cpu"}, "models.0.quantization",
     "4-bit quantisation on CPU needs layer widths divisible by 64"),
    ("unknown-quantization", {"models.0.quantization": "3bit"}, "models.0.quantization", "'8bit' or '4bit'"),
    ("unsupported-family", {"models.0.path": "BERT"}, "models.0.path", "unsupported model family 'bert'"),
    # weights load from safetensors only: model.safetensors, or model.safetensors.index.json and its shards
    ("bin-weights-only", {"models.0.path": "BINONLY"}, "models.0.path",
     "(it has pytorch_model.bin; expected model.safetensors, or model.safetensors.index.json and its shards): "
     "weights load from safetensors only; convert with transformers' save_pretrained(out_dir, "
     "safe_serialization=True) or use a safetensors checkpoint"),
    ("sharded-shard-missing", {"models.0.path": "SHARDMISSING"}, "models.0.path",
     "shards listed in model.safetensors.index.json are missing from"),
    # circuit stages
    ("patch-without-pairs", {"stages.patch": {}}, "", "stages.patch needs data.harmful.pair_column"),
    ("patch-layer-out-of-range", {"stages.patch": {"layers": [3]}, **PAIRED}, "stages.patch.layers",
     "layer 3 out of range: model 'tiny' has 3 layers (0..2)"),
    ("patch-unknown-site", {"stages.patch": {"sites": ["hook_q"]}, **PAIRED}, "stages.patch.sites.0",
     "'resid_pre', 'resid_mid', 'resid_post', 'attn_out', 'mlp_out' or 'z'"),
    ("patch-top-k-without-screen", {"stages.patch": {"attribution": False, "confirm_top_k": 3}, **PAIRED},
     "stages.patch", "confirm_top_k needs attribution: true"),
    ("patch-too-many-pairs", {"stages.patch": {"n_pairs": 500}, **PAIRED}, "stages.patch.n_pairs",
     "split 'test' has 200 harmful/harmless pairs, 500 asked for"),
    ("scrub-bad-pattern", {"stages.scrub": {"hypotheses": [{"name": "h", "protected": ["blocks.x.hook_z"]}]}},
     "stages.scrub.hypotheses.0.protected", "bad site pattern 'blocks.x.hook_z'"),
    ("scrub-layer-out-of-range", {"stages.scrub": {"hypotheses": [{"name": "h", "protected": ["blocks.{1,5}.attn.hook_z"]}]}},
     "stages.scrub.hypotheses.0.protected",
     "layer 5 out of range in site pattern 'blocks.{1,5}.attn.hook_z' (the model has 3) (model 'tiny')"),
    ("scrub-head-out-of-range", {"stages.scrub": {"hypotheses": [{"name": "h", "protected": ["blocks.1.attn.hook_z[4]"]}]}},
     "stages.scrub.hypotheses.0.protected", "head 4 out of range"),
    ("scrub-heads-on-mlp", {"stages.scrub": {"hypotheses": [{"name": "h", "protected": ["blocks.1.hook_mlp_out[0]"]}]}},
     "stages.scrub.hypotheses.0.protected", "head selection needs attn.hook_z"),
    ("scrub-duplicate-hypothesis", {"stages.scrub": {"hypotheses": [{"name": "h", "protected": []}] * 2}},
     "stages.scrub.hypotheses", "duplicate hypothesis name 'h'"),
    ("scrub-no-hypotheses", {"stages.scrub": {"hypotheses": []}}, "stages.scrub.hypotheses", "at least 1 item"),
    # direction selection, positions and chat templates
    ("select-unknown-criterion", {"stages.select": {"criterion": "foo"}}, "stages.select.criterion",
     "'bypass', 'swing' or 'separation'"),
    ("selected-without-select", {"stages.steer.ablation.direction_layer": "selected"}, "",
     "stages.steer.ablation.direction_layer 'selected' needs a stages.select block"),
    ("positive-position-one", {"stages.directions": {"positions": [1]}}, "stages.directions.positions",
     "must be negative"),
    ("no-chat-template", {"models.0.path": "NOTEMPLATE"}, "models.0.path",
     "the tokenizer has no chat template (a base model?): set models.0.chat_template to the template text or a "
     ".jinja/.txt file (model 'tiny')"),
    ("chat-template-file-missing", {"models.0.chat_template": "templates/chatml.jinja"}, "models.0.chat_template",
     "template file not found: templates/chatml.jinja"),
    ("chat-template-not-a-file-name", {"models.0.chat_template": "chatml"}, "models.0.chat_template",
     "'chatml' is neither a Jinja template (no {{ or {%) nor a .jinja/.txt file"),
    ("chat-template-syntax-error", {"models.0.path": "NOTEMPLATE", "models.0.chat_template": BROKEN_TEMPLATE},
     "models.0.chat_template",
     "the chat template does not render: TemplateSyntaxError: unexpected '}' (template line 1) (model 'tiny')"),
    ("chat-template-type-error", {"models.0.chat_template": "{{ messages[0]['content'] + 1 }}"},
     "models.0.chat_template", "the chat template does not render: TypeError: can only concatenate str (not \"int\") "
                               "to str (model 'tiny')"),
    ("chat-template-drops-message", {"models.0.chat_template": "{{ '<|im_start|>assistant\\n' }}"},
     "models.0.chat_template",
     "the chat template leaves out the user's message (no message['content'] in it) (model 'tiny')"),
    ("checkpoint-template-syntax-error", {"models.0.path": "BADTEMPLATE"}, "models.0.path",
     "the chat template does not render: TemplateSyntaxError: unexpected '}' (template line 1) (model 'tiny')"),
    ("system-prompt-refused", {"models.0.path": "NOSYSTEM", "chat": {"system_prompt": "Be brief."}},
     "chat.system_prompt", "the chat template refuses a system prompt"),
    # judges
    ("judge-unknown-kind", {"judges": [{"name": "j", "kind": "oracle"}]}, "judges.0.kind",
     "unknown kind 'oracle'; expected one of 'substring', 'chat', 'classifier', 'guard', 'openai'"),
    ("judge-missing-endpoint-variable", {"judges": [{"name": "j", "kind": "openai", "base_url": "http://127.0.0.1:9/v1",
                                                     "model": "m", "api_key_env": "REFUSAL_RAY_TEST_NO_SUCH_KEY"}]},
     "judges.0.api_key_env", "environment variable REFUSAL_RAY_TEST_NO_SUCH_KEY is not set"),
    ("judge-rubric-without-placeholder", {"judges": [{"name": "j", "kind": "chat", "path": "TINY",
                                                      "rubric": "Grade this: {completion}"}]},
     "judges.0.rubric", "rubric lacks the placeholder {prompt} (the rubric needs both {prompt} and {completion})"),
    ("judge-classifier-without-labels", {"judges": [{"name": "j", "kind": "classifier", "path": "TINY"}]},
     "judges.0.labels", "a classifier needs a label map (its label names -> refusal / compliance)"),
    ("judge-classifier-unmapped-label", {"judges": [{"name": "j", "kind": "classifier", "path": "CLASSIFIER",
                                                     "labels": {"LABEL_0": "compliance"}}]},
     "judges.0.labels", "label 'LABEL_1' of the checkpoint is not mapped (its labels: LABEL_0, LABEL_1)"),
    ("judge-bin-weights-only", {"judges": [{"name": "j", "kind": "chat", "path": "BINONLY"}]}, "judges.0.path",
     "no safetensors weights in"),
    ("judge-reserved-name", {"judges": [{"name": "substring", "kind": "substring"}]}, "judges",
     "judge name 'substring' is the inline `judge:` block's; pick another"),
    ("judge-duplicate-name", {"judges": [{"name": "j", "kind": "substring"}] * 2}, "judges",
     "duplicate judge name 'j'"),
    ("rule-judge-unknown", {"decision_rule.judge": "gpt"}, "",
     "decision_rule.judge 'gpt' names no judge (known: substring)"),
]


def sharded_copy(model_path: Path, out: Path) -> Path:
    """The model saved as a sharded safetensors checkpoint (model.safetensors.index.json + shards)."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(model_path, out)
    (out / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(model_path).save_pretrained(out, max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    return out


@pytest.fixture(scope="module")
def fixtures_dir(tmp_path_factory, tiny_qwen_path):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.jsonl").write_text("")
    bert = d / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 2, "hidden_size": 8,
                                                  "num_attention_heads": 2, "intermediate_size": 8, "vocab_size": 10}))
    # the tiny model without a chat template (a base model), and with a template that refuses a system role
    for name, template in (("notemplate", None), ("nosystem", NO_SYSTEM_TEMPLATE), ("badtemplate", BROKEN_TEMPLATE)):
        shutil.copytree(tiny_qwen_path, d / name)
        (d / name / "chat_template.jinja").unlink(missing_ok=True)
        config = json.loads((d / name / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        if template is not None:
            config["chat_template"] = template
        (d / name / "tokenizer_config.json").write_text(json.dumps(config))
    # a model (or judge) directory with pytorch_model.bin only, a sharded checkpoint that lost a shard,
    # and a classifier config with two labels
    binonly = d / "binonly"
    shutil.copytree(tiny_qwen_path, binonly)
    for f in binonly.glob("*.safetensors"):
        f.rename(binonly / "pytorch_model.bin")
    shard_missing = sharded_copy(tiny_qwen_path, d / "shardmissing")
    sorted(shard_missing.glob("model-*.safetensors"))[-1].unlink()
    classifier = d / "classifier"
    shutil.copytree(tiny_qwen_path, classifier)
    config = json.loads((classifier / "config.json").read_text())
    (classifier / "config.json").write_text(json.dumps(config | {"id2label": {"0": "LABEL_0", "1": "LABEL_1"}}))
    return d


def _write_case(tmp_path, fixtures_dir, tiny_qwen_path, edits) -> Path:
    spec = base_spec(tiny_qwen_path)
    for path, value in edits.items():
        if value == "DUP":
            spec["models"].append(copy.deepcopy(spec["models"][0]))
            continue
        if value == "EMPTY":
            value = str(fixtures_dir / "empty.jsonl")
        if value in ("BERT", "NOTEMPLATE", "NOSYSTEM", "BADTEMPLATE", "BINONLY", "SHARDMISSING"):
            value = str(fixtures_dir / value.lower())
        if path == "judges":
            value = [{k: (str(tiny_qwen_path) if v == "TINY" else str(fixtures_dir / v.lower())
                          if v in ("BINONLY", "CLASSIFIER") else v) for k, v in j.items()} for j in value]
        _set(spec, path, value)
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    return f


@pytest.mark.parametrize("case,edits,field,words", CASES, ids=[c[0] for c in CASES])
def test_broken_spec_exits_2_naming_file_and_field(case, edits, field, words, tmp_path, fixtures_dir, tiny_qwen_path):
    spec_file = _write_case(tmp_path, fixtures_dir, tiny_qwen_path, edits)
    out = tmp_path / "out"
    for command in (["validate", str(spec_file)], ["run", str(spec_file), "--out", str(out)]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1, result.output
        prefix = f"error: {spec_file}: {field}: " if field else f"error: {spec_file}: "
        assert lines[0].startswith(prefix), lines[0]
        assert words in lines[0], lines[0]
    assert not out.exists()


def test_yaml_syntax_error(tmp_path):
    f = tmp_path / "spec.yaml"
    f.write_text("name: x\nmodels: [\n  {name: a\n")
    result = CliRunner().invoke(app, ["run", str(f), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {f}: line ")
    assert "YAML syntax error" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_spec_not_a_mapping_and_missing_file(tmp_path):
    f = tmp_path / "spec.yaml"
    f.write_text("- a\n- b\n")
    result = CliRunner().invoke(app, ["validate", str(f)])
    assert (result.exit_code, result.output.strip()) == (2, f"error: {f}: a spec must be a YAML mapping")
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert (result.exit_code, result.output.strip()) == (2, f"error: {tmp_path / 'nope.yaml'}: spec file not found")


def test_unknown_model_flag(tmp_path, fixtures_dir, tiny_qwen_path):
    spec_file = _write_case(tmp_path, fixtures_dir, tiny_qwen_path, {})
    result = CliRunner().invoke(app, ["run", str(spec_file), "--models", "nope", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --models: unknown model 'nope'; the spec has tiny"
    assert not (tmp_path / "o").exists()


def test_quickstart_validates(monkeypatch):
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(app, ["validate", "sweeps/quickstart.yaml"])
    assert result.exit_code == 0, result.output


def test_sharded_safetensors_checkpoint_validates_and_loads(tmp_path, tiny_qwen_path):
    """model.safetensors.index.json and its shards are safetensors weights: validate passes, load_model loads them."""
    import torch

    from refusal_ray import load_model

    sharded = sharded_copy(tiny_qwen_path, tmp_path / "sharded")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(base_spec(sharded)))
    result = CliRunner().invoke(app, ["validate", str(spec_file)])
    assert result.exit_code == 0, result.output
    a, b = load_model(str(sharded)).model, load_model(str(tiny_qwen_path)).model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_load_model_names_the_fix_for_bin_weights(fixtures_dir):
    """A worker loading a .bin-only directory (e.g. one that changed after `plan`) stores why and what to do."""
    from refusal_ray import load_model

    with pytest.raises(OSError, match=r"no safetensors weights in .*binonly \(it has pytorch_model.bin; .*"
                                      r"save_pretrained\(out_dir, safe_serialization=True\)"):
        load_model(str(fixtures_dir / "binonly"))
