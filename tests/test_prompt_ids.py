"""Cell ids hash the rendered prompts: the same files under another system prompt or template are
other cells; scheduling settings are not. The manifest states the effective generation settings."""

from __future__ import annotations

import yaml

from refusal_ray.plan import make_plan

from conftest import REPO, TOY_MODELS
from test_bad_input import base_spec


def _plan(tmp_path, name: str, **changes):
    raw = base_spec(TOY_MODELS / "toy-qwen-xs")
    raw |= changes
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return make_plan(path)


def test_system_prompt_and_template_change_every_cell_id(tmp_path):
    base = _plan(tmp_path, "a")
    same = _plan(tmp_path, "b", resources={"num_cpus": 2})
    system = _plan(tmp_path, "c", chat={"system_prompt": "Be brief."})
    ids = [c.id for c in base.cells]
    assert ids == [c.id for c in same.cells]
    more_seeds = _plan(tmp_path, "e", seeds=[0, 1])          # a new seed leaves seed 0's cells as they were
    assert ids == [c.id for c in more_seeds.cells if c.seed == 0]
    assert not set(ids) & {c.id for c in more_seeds.cells if c.seed == 1}
    assert not set(ids) & {c.id for c in system.cells}
    # another template over the same files: copy the model and change its chat template
    import shutil

    other = tmp_path / "toy-other-template"
    shutil.copytree(TOY_MODELS / "toy-qwen-xs", other)
    template = other / "chat_template.jinja"     # transformers 5 saves the template beside the tokenizer
    template.write_text(template.read_text().replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\nSure'"))
    changed = _plan(tmp_path, "d", models=[{"name": "tiny", "path": str(other)}])
    assert changed.models["tiny"].chat["example_prompt"].endswith("assistant\nSure")
    assert changed.fingerprints["tiny"] != base.fingerprints["tiny"]


def test_plan_states_positions_stop_tokens_and_generation(tmp_path):
    plan = _plan(tmp_path, "a")
    mp = plan.models["tiny"]
    assert mp.positions == list(range(-8, 0))            # <|im_end|> \n <|im_start|> ass ist an t \n
    assert mp.chat["stop_tokens"] == ["<|im_end|>"]
    gen = mp.chat["generation"]
    assert gen["do_sample"] is False and gen["repetition_penalty"] == 1.0 and gen["max_new_tokens"] == 4
    assert mp.chat["default_system_prompt"] is None
    assert mp.chat["example_prompt"].startswith("<|im_start|>user\n")
    assert (REPO / "sweeps" / "quickstart.yaml").is_file()
