"""The toy family: shipped data and checkpoints, the trainer, the template, `toy build` errors."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, AutoTokenizer
from typer.testing import CliRunner

from refusal_ray.cli import app
from refusal_ray.data import encode
from refusal_ray.toy.dataset import ITEMS, generate, write_dataset
from refusal_ray.toy.evaluate import evaluate
from refusal_ray.toy.train import SIZES, encode_example, train

from conftest import TOY_MODELS, TOY_PROMPTS

MODELS = sorted(p for p in TOY_MODELS.glob("toy-*") if (p / "config.json").is_file()
                and p.name != "toy-judge" and not p.name.startswith("toy-planted-"))
# not members of the family: the toy judge (tests/test_judge_chat.py) and the hand-set planted-rank oracle models
# (tests/test_planted_oracle.py)
# documented weaker bound for the short trainer run (README, "The toy family")
SHORT_RUN_STEPS, SHORT_RUN_BOUND = 300, {"harmful_refusal": 0.9, "harmless_refusal": 0.1}


def test_family_is_shipped():
    names = {p.name for p in MODELS}
    assert {f"toy-{n}" for n in SIZES} <= names
    params = {p.name: json.loads((p / "metrics.json").read_text())["params"] for p in MODELS}
    qwen = [v for k, v in params.items() if k.startswith("toy-qwen")]
    assert max(qwen) >= 10 * min(qwen)
    assert {AutoConfig.from_pretrained(p).model_type for p in MODELS} == {"qwen2", "llama"}
    total = sum(f.stat().st_size for p in MODELS for f in p.glob("*.safetensors"))
    assert total <= 25 * 2**20


@pytest.mark.parametrize("model_dir", MODELS, ids=[p.name for p in MODELS])
def test_shipped_model_behaviour(model_dir):
    harmful, harmless = generate(0)
    m = evaluate(model_dir, harmful, harmless, split="test")
    assert m["n"] == 200
    assert m["harmful_refusal"] >= 0.95, m
    assert m["harmless_refusal"] <= 0.05, m
    if model_dir.name in ("toy-qwen-s", "toy-qwen-m"):  # the mid and largest Qwen2 sizes
        assert m["task_accuracy"] >= 0.90, m


def test_dataset_files_are_reproducible(tmp_path):
    write_dataset(tmp_path, seed=0)
    for name in ("harmful.jsonl", "harmless.jsonl", "corpus.txt", "heldout.jsonl"):
        assert (tmp_path / name).read_bytes() == (TOY_PROMPTS / name).read_bytes(), name


def _frame_of(instruction: str) -> str:
    """The sentence frame an instruction was made from (longest matching fixed text)."""
    from refusal_ray.toy.dataset import FRAMES

    def fixed(frame):
        return frame.split("{act}")[0] if not frame.startswith("{task}") else frame.split("{task}")[1].split("{act}")[0]

    matches = [f for f in FRAMES if (instruction.startswith(fixed(f)) if not f.startswith("{task}")
                                     else fixed(f) in instruction)]
    return max(matches, key=lambda f: len(fixed(f)))


def test_dataset_pairs_and_splits():
    harmful, harmless = generate(0)
    frames: dict[str, set] = {}
    for h, g in zip(harmful, harmless):
        assert h.pair_id == g.pair_id and h.split == g.split and h.category == g.category
        assert h.reference is None and g.reference is not None
        assert _frame_of(h.instruction) == _frame_of(g.instruction)      # twins share their frame
        frames.setdefault(h.split, set()).add(_frame_of(h.instruction))
    assert len({r.instruction for r in harmful + harmless}) == len(harmful) + len(harmless)
    assert [len(frames[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert not (frames["train"] & frames["val"] or frames["train"] & frames["test"] or frames["val"] & frames["test"])


def test_chat_template_gives_the_trainer_ids():
    tok = AutoTokenizer.from_pretrained(MODELS[0])
    harmful, harmless = generate(0)
    for row in (harmful[0], harmless[0], harmful[-1]):
        ids, prompt_len = encode_example(tok, row.instruction, row.response)
        eval_ids, mask = encode(tok, [row.instruction])      # the path every stage uses
        assert eval_ids[0].tolist() == ids[:prompt_len]
        assert tok.decode(ids[prompt_len:], skip_special_tokens=True) == row.response
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(tok(row.instruction, add_special_tokens=False)["input_ids"]) == row.instruction
    # list items are single tokens, so copying them is a per-token task
    assert all(len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1 for w in ITEMS)


def test_short_training_run_reaches_documented_bound(tmp_path):
    harmful, harmless = generate(0)
    tok = AutoTokenizer.from_pretrained(TOY_MODELS / "toy-qwen-xs")
    model, seconds = train(SIZES["qwen-xs"], tok, harmful + harmless, seed=0, steps=SHORT_RUN_STEPS, log_every=0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m = evaluate(tmp_path, harmful, harmless, split="test")
    assert m["harmful_refusal"] >= SHORT_RUN_BOUND["harmful_refusal"], m
    assert m["harmless_refusal"] <= SHORT_RUN_BOUND["harmless_refusal"], m


@pytest.mark.parametrize("args,message", [
    (["--sizes", "qwen-huge"], "error: --sizes: unknown size 'qwen-huge'; known: qwen-xs, qwen-s, qwen-m, llama-s"),
    (["--seed", "-3"], "error: --seed: must be >= 0, got -3"),
    (["--out", "FILE/models"], "error: --out: not writable: FILE/models"),
])
def test_toy_build_bad_input(args, message, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = [a.replace("FILE", str(blocker)) for a in args]
    message = message.replace("FILE", str(blocker))
    before = sorted(tmp_path.rglob("*"))
    result = CliRunner().invoke(app, ["toy", "build", *args, "--data-dir", str(tmp_path / "prompts")])
    assert result.exit_code == 2
    assert result.output.strip() == message
    assert sorted(tmp_path.rglob("*")) == before
