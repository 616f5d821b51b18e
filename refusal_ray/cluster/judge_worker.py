"""The JudgeWorker actor: one local judge model loaded once, many chunks of completions."""

from __future__ import annotations

import time

import ray


@ray.remote
class JudgeWorker:
    def __init__(self, cfg: dict, torch_threads: int = 1):
        import torch
        from pydantic import TypeAdapter
        from transformers.utils import logging as hf_logging

        from refusal_ray.judges import make_judge
        from refusal_ray.judges.config import JudgeSpec

        hf_logging.disable_progress_bar()
        torch.set_num_threads(torch_threads)
        self.judge_obj, self.error = None, None
        try:   # a judge that cannot start answers every call with its root cause (an actor that dies in
            self.judge_obj = make_judge(TypeAdapter(JudgeSpec).validate_python(cfg))   # __init__ loses it)
        except Exception as e:  # noqa: BLE001
            from refusal_ray.errors import describe

            self.error = f"judge cannot start: {describe(e)}"

    def judge(self, items: list[tuple[str, str]]) -> tuple[list[dict], float]:
        """[(prompt, completion)] -> ([Verdict as dict], seconds)."""
        from refusal_ray.judges.base import Item, Verdict

        if self.error is not None:
            return [Verdict(error=self.error).row() for _ in items], 0.0
        t0 = time.perf_counter()
        verdicts = self.judge_obj.judge([Item(p, c) for p, c in items])
        return [v.row() for v in verdicts], time.perf_counter() - t0
