"""A model's `chat_template` (spec option): base models without a template, and overriding a
checkpoint's. Every stage renders prompts with it (plan: positions, stop tokens, fingerprints;
workers: the loaded tokenizer), and a model whose worker cannot load stores the root cause."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from refusal_ray.cli import app
from refusal_ray.plan import make_plan

from conftest import TOY_MODELS
from test_bad_input import base_spec

# not ChatML: a plain question/answer format whose turns end with <|im_end|> (a special token of the
# tiny tokenizer), so the end of turn is found by rendering an assistant turn
BASE_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}"
                 "{{ 'Question: ' + message['content'] + '\\n' }}"
                 "{% else %}{{ 'Answer: ' + message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'Answer:' }}{% endif %}")


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, tiny_qwen_path) -> Path:
    """The tiny qwen2 model without a chat template (a base model)."""
    d = tmp_path_factory.mktemp("base") / "base"
    shutil.copytree(tiny_qwen_path, d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def _spec(tmp_path: Path, model_path: Path, name: str = "spec", **model_fields) -> Path:
    raw = base_spec(model_path)
    raw["models"][0] |= model_fields
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


def test_base_model_with_template_text_plans(tmp_path, base_model):
    from transformers import AutoTokenizer

    from refusal_ray.models.chat import NoTemplateError, post_instruction_ids, render
    from refusal_ray.plan import describe

    with pytest.raises(NoTemplateError):   # the checkpoint alone cannot render a prompt
        render(AutoTokenizer.from_pretrained(base_model), ["Hi"])
    spec = _spec(tmp_path, base_model, chat_template=BASE_TEMPLATE)
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert result.exit_code == 0, result.output
    plan = make_plan(spec)
    mp = plan.models["tiny"]
    example = mp.chat["example_prompt"]
    assert example.startswith("Question: ") and example.endswith("\nAnswer:") and "<|im_start|>" not in example
    tok = AutoTokenizer.from_pretrained(base_model)
    tok.chat_template = BASE_TEMPLATE
    eoi = post_instruction_ids(tok)                      # "\nAnswer:" as tokens
    assert len(eoi) >= 2 and mp.positions == list(range(-len(eoi), 0))
    assert mp.chat["stop_tokens"] == ["<|im_end|>"] and mp.chat["end_of_turn_id"] == tok.convert_tokens_to_ids(
        "<|im_end|>")
    assert mp.chat["chat_template"].startswith("spec text (sha256 ")
    assert mp.chat_template == BASE_TEMPLATE
    assert f"tiny: chat template {mp.chat['chat_template']}; direction positions {mp.positions}" in describe(plan)


def test_template_file_is_read_relative_to_the_working_directory(tmp_path, base_model, monkeypatch):
    from refusal_ray.cluster.driver import model_payload, placements

    text_plan = make_plan(_spec(tmp_path, base_model, "text", chat_template=BASE_TEMPLATE))
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "qa.jinja").write_text(BASE_TEMPLATE)
    (tmp_path / "templates" / "qa.txt").write_text(BASE_TEMPLATE)
    monkeypatch.chdir(tmp_path)
    for name in ("qa.jinja", "qa.txt"):
        plan = make_plan(_spec(tmp_path, base_model, name, chat_template=f"templates/{name}"))
        mp = plan.models["tiny"]
        assert mp.chat["chat_template"] == f"templates/{name} (sha256 {mp.chat['chat_template'][-13:-1]})"
        assert mp.chat["chat_template"][-13:-1] == text_plan.models["tiny"].chat["chat_template"][-13:-1]
        # the same template text: the same prompts, so the same cells as the inline text
        assert plan.fingerprints == text_plan.fingerprints
        assert [c.id for c in plan.cells] == [c.id for c in text_plan.cells]
        # workers get the text, not the file name (a job's working directory or another node lacks the file)
        payload = model_payload(plan, "tiny", placements(plan, {"CPU": 2})["tiny"])
        assert payload["chat_template"] == BASE_TEMPLATE


def test_overriding_a_checkpoints_template_changes_the_cells(tmp_path):
    toy = TOY_MODELS / "toy-qwen-xs"
    own = (toy / "chat_template.jinja").read_text()
    base = make_plan(_spec(tmp_path, toy, "own"))
    assert base.models["tiny"].chat["chat_template"] == "tokenizer"
    same = make_plan(_spec(tmp_path, toy, "same", chat_template=own))   # the checkpoint's own text: same prompts
    assert [c.id for c in same.cells] == [c.id for c in base.cells]
    sure = own.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\nSure'")
    assert sure != own
    changed = make_plan(_spec(tmp_path, toy, "sure", chat_template=sure))
    assert changed.models["tiny"].chat["example_prompt"].endswith("assistant\nSure")
    assert changed.fingerprints["tiny"] != base.fingerprints["tiny"]
    assert not {c.id for c in changed.cells} & {c.id for c in base.cells}


def test_workers_render_prompts_with_the_template(tmp_path, base_model):
    """load_model and ModelSession install the template, so a worker's prompts are the plan's (same
    fingerprint), and every stage runs on a base model."""
    from refusal_ray import load_model
    from refusal_ray.cluster.local import run_local
    from refusal_ray.models.chat import TemplateError, render
    from refusal_ray.plan import prompt_fingerprint, settings_payload
    from refusal_ray.session import ModelSession

    with pytest.raises(TemplateError, match="template file not found: nowhere/qa.jinja"):
        load_model(str(base_model), chat_template="nowhere/qa.jinja")
    file = tmp_path / "qa.jinja"
    file.write_text(BASE_TEMPLATE)
    lm = load_model(str(base_model), chat_template=str(file))
    assert lm.tokenizer.chat_template == BASE_TEMPLATE
    assert render(lm.tokenizer, ["Hi"]) == ["Question: Hi\nAnswer:"]

    plan = make_plan(_spec(tmp_path, base_model, chat_template=BASE_TEMPLATE))
    m = plan.spec.models[0]
    session = ModelSession(m.model_dump(mode="json") | {"positions": plan.models["tiny"].positions},
                           plan.prompts, settings_payload(plan))
    assert session.lm.tokenizer.chat_template == BASE_TEMPLATE
    assert prompt_fingerprint(plan.data_fingerprint, session.lm.tokenizer, plan.prompts[0],
                              session.chat) == plan.fingerprints["tiny"][0]
    out = run_local(plan, log=lambda msg: None)
    assert {r["status"] for r in out["cells"]} == {"done"} and len(out["cells"]) == len(plan.cells)
    assert out["completions"]


def test_start_error_keeps_the_root_cause():
    from refusal_ray.session import start_error

    assert start_error(OSError("no safetensors weights in /m (...)\nmore")) == \
        "worker cannot start: OSError: no safetensors weights in /m (...)"
    assert start_error(ValueError()) == "worker cannot start: ValueError"


@pytest.mark.slow
def test_a_worker_that_cannot_start_stores_its_root_cause(tmp_path, tiny_qwen_path):
    """The checkpoint loses its safetensors weights after `plan` (or a hub id has none): every cell
    stores the load's exception, the actor is not restarted, and the run exits 1 (a rerun retries)."""
    import refusal_ray
    from refusal_ray.runner import run

    model = tmp_path / "model"
    shutil.copytree(tiny_qwen_path, model)
    plan = make_plan(_spec(tmp_path, model))
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    logs: list[str] = []
    assert run(plan, tmp_path / "out", progress=False, log=logs.append) == len(plan.cells)
    cells = refusal_ray.read(tmp_path / "out", "cells")
    assert len(cells) == len(plan.cells) and set(cells["status"]) == {"failed"}
    [error] = set(cells["error"])
    assert error.startswith(f"worker cannot start: OSError: no safetensors weights in {model} "
                            f"(it has pytorch_model.bin; "), error
    assert "safe_serialization=True" in error
    assert not any("replacing a worker" in line or "retrying" in line for line in logs), logs
    assert any(line.startswith("a worker of tiny cannot start: OSError: no safetensors") for line in logs), logs
