"""The ModelWorker actor: one model loaded once, many batches of cells.

A thin shell around `refusal_ray.session.ModelSession`; results are small rows (lists and
floats), never tensors, so nothing large crosses the object store.
"""

from __future__ import annotations

import ray

from refusal_ray.session import ModelSession


@ray.remote
class ModelWorker:
    def __init__(self, model: dict, prompts: dict, settings: dict, torch_threads: int | None = None):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.session = ModelSession(model, prompts, settings, torch_threads)
        context = ray.get_runtime_context()
        self.node, self.worker = context.get_node_id(), context.get_actor_id()

    def info(self) -> dict:
        return self.session.info() | {"node": self.node, "worker": self.worker}

    def run(self, stage: str, cells: list, payload=None) -> dict:
        return self.session.run(stage, cells, payload) | {"node": self.node, "worker": self.worker}
