"""Behavioural metrics of a toy model: refusal rates and task accuracy on a split."""

from __future__ import annotations

from pathlib import Path

from refusal_ray.data import PromptSet
from refusal_ray.core.cells import Cell
from refusal_ray.models.loading import load_model
from refusal_ray.ops.base import SteerInputs
from refusal_ray.stages.steer import run_steer
from refusal_ray.toy.dataset import ToyRow

BASELINE = Cell("baseline", "steer", "toy", 0, {"mode": "baseline", "layer": None, "coefficient": 0.0,
                                                 "alpha": 0.0, "direction_layer": None, "control": False})


def prompt_set(rows: list[ToyRow], split: str) -> PromptSet:
    rows = [r for r in rows if r.split == split]
    return PromptSet([r.id for r in rows], [r.instruction for r in rows], [r.reference for r in rows])


def evaluate(model_dir: Path, harmful: list[ToyRow], harmless: list[ToyRow], split: str = "test",
             max_new_tokens: int = 24) -> dict:
    """Greedy decoding on `split`: harmful/harmless refusal rate (substring judge), task exact match."""
    lm = load_model(str(model_dir))
    prompts = {"harmful": prompt_set(harmful, split), "harmless": prompt_set(harmless, split)}
    arms, _ = run_steer(lm, [BASELINE], prompts, SteerInputs({}, 0), max_new_tokens=max_new_tokens, batch_size=200)
    by_set = {a["prompt_set"]: a for a in arms}
    return {"n": len(prompts["harmful"]), "harmful_refusal": by_set["harmful"]["rate"],
            "harmless_refusal": by_set["harmless"]["rate"],
            "task_accuracy": by_set["harmless"]["task_accuracy"]}
