"""The ModelWorker actor: one model loaded once, many batches of cells.

A thin shell around `refusal_ray.session.ModelSession`; results are small rows (lists and
floats), never tensors, so nothing large crosses the object store. A model that cannot load
(no safetensors weights, a missing file, an unknown family, out of memory) does not kill the
actor: `__init__` keeps the exception's type and message, and `info` (the driver's readiness
probe) and `run` answer with it, so the driver stores the root cause for the model's cells
instead of restarting an actor whose death would hide it.
"""

from __future__ import annotations

import ray

from refusal_ray.session import ModelSession, start_error


@ray.remote
class ModelWorker:
    def __init__(self, model: dict, prompts: dict, settings: dict, torch_threads: int | None = None):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.session, self.error = None, None
        try:
            self.session = ModelSession(model, prompts, settings, torch_threads)
        except Exception as e:  # noqa: BLE001 - answered by info() and run(); an actor dying in __init__ loses it
            self.error = start_error(e)
        context = ray.get_runtime_context()
        self.node, self.worker = context.get_node_id(), context.get_actor_id()

    def info(self) -> dict:
        """The loaded model's device and sizes, or {"error": "worker cannot start: <Type>: <message>"}."""
        where = {"node": self.node, "worker": self.worker}
        return ({"error": self.error} if self.error is not None else self.session.info()) | where

    def run(self, stage: str, cells: list, payload=None) -> dict:
        if self.error is not None:
            return {"ok": False, "error": self.error, "node": self.node, "worker": self.worker}
        return self.session.run(stage, cells, payload) | {"node": self.node, "worker": self.worker}
