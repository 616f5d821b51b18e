"""A loaded model and the stage calls it serves; the Ray actor is a thin shell around this.

It never imports Ray, so everything a worker does is testable in-process.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path

import torch

from refusal_ray.grid import Cell
from refusal_ray.judges import SubstringJudge
from refusal_ray.models.chat import ChatOptions
from refusal_ray.models.loading import load_model


def resolve_path(path: str | None, abs_path: str | None) -> str | None:
    """The absolute path when it exists on this node, else the relative one (job working dir)."""
    if abs_path and os.path.exists(abs_path):
        return abs_path
    return path


def placement_kwargs(model: dict, visible_gpus: int) -> dict:
    """device / device_map for `load_model` on a worker that sees `visible_gpus` GPUs.

    Ray sets CUDA_VISIBLE_DEVICES for the actor, so ordinals are local: with `num_gpus: k > 1`
    accelerate splits the model across the actor's k GPUs (`device_map="auto"`), with one GPU it
    goes there whole, with none it stays on the CPU. An explicit `device_map` in the spec wins.
    `offload: auto` (the default for models over the size threshold, resolved by the driver) loads
    with accelerate's `device_map="auto"`: what does not fit on the GPUs / in memory (`max_memory`)
    spills to the CPU and then to a disk folder (the spec's `offload_folder`, else a temporary
    one). Offloaded weights are the checkpoint's own; no modified weight is ever written.
    """
    if model.get("device_map") is not None:
        return {"device": "cpu", "device_map": model["device_map"]}
    device = model["device"]
    if device == "auto":
        device = "cuda" if visible_gpus else "cpu"
    if model.get("offload") == "auto":
        folder = model.get("offload_folder") or tempfile.mkdtemp(prefix="refusal-ray-offload-")
        return {"device": device, "device_map": "auto", "offload_folder": folder}
    if device == "cuda" and visible_gpus > 1:
        return {"device": device, "device_map": "auto"}
    return {"device": device, "device_map": None}


class ModelSession:
    """One model loaded once; runs batches of cells of any seed and stage.

    Args:
        model: ModelSpec as a dict (with `abs_path` and the resolved direction `positions` added by
            the driver; `chat_template`, when set, replaces the tokenizer's template in every stage:
            the text, or a .jinja/.txt file, which the driver has already read).
        prompts: {seed: {"train"|"val"|"test": {"harmful": PromptSet, "harmless": PromptSet},
                  <stage name>: what that stage's `prepare` drew, e.g. its prompt pairs}}
        settings: each enabled stage's block, and the generation / judge / chat blocks, as dicts.
    Stages read `lm`, `prompts`, `settings`, `judge`, `chat`, `positions` and call `halving`.
    """

    def __init__(self, model: dict, prompts: dict, settings: dict, torch_threads: int | None = None):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.settings = settings
        self.prompts = prompts
        source = resolve_path(model.get("path"), model.get("abs_path")) or model["hub_id"]
        started = time.perf_counter()
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        self.lm = load_model(
            source, dtype=model["dtype"], **{"offload_folder": model.get("offload_folder"),
                                             **placement_kwargs(model, gpus)},
            max_memory=model.get("max_memory"), quantization=model.get("quantization"), revision=model.get("revision"),
            trust_remote_code=model.get("trust_remote_code", False),
            attn_implementation=model.get("attn_implementation"), chat_template=model.get("chat_template"))
        self.load_seconds = time.perf_counter() - started
        self.judge = SubstringJudge(settings["judge"].get("phrases"))
        self.chat = ChatOptions(**settings.get("chat", {}))
        self.positions = model.get("positions") or [-1]

    def info(self) -> dict:
        return {"device": str(self.lm.device), "load_seconds": self.load_seconds,
                "n_layers": self.lm.sites.n_layers, "d_model": self.lm.sites.d_model}

    @staticmethod
    def halving(fn, batch_size: int):
        return halving_on_oom(fn, batch_size)

    def run(self, stage: str, cells: list[Cell], payload=None) -> dict:
        """Run a batch of one stage's cells; never raises for a cell error:
        returns {"ok": bool, "tables": {table: rows}, "error": str, "seconds", "device"}."""
        from refusal_ray.stages import STAGE_BY_NAME

        _maybe_crash(STAGE_BY_NAME.get(stage))
        started = time.perf_counter()
        try:
            tables = STAGE_BY_NAME[stage].run(self, cells, payload)
            return {"ok": True, "tables": tables, "seconds": time.perf_counter() - started,
                    "device": str(self.lm.device)}
        except Exception as e:  # noqa: BLE001 - reported per cell by the driver
            return {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                    "seconds": time.perf_counter() - started, "device": str(self.lm.device)}


def start_error(e: BaseException) -> str:
    """The error stored for every cell of a model whose session cannot start: the root cause's
    type and the first line of its message (e.g. "worker cannot start: OSError: no safetensors
    weights in ...")."""
    from refusal_ray.errors import describe

    return f"worker cannot start: {describe(e)}"


def halving_on_oom(fn, batch_size: int):
    """`fn(batch_size)`, halving the batch size after each out-of-memory error (down to 1).

    Results do not depend on the batch size (batched equals unbatched), so a retry is exact.
    """
    while True:
        try:
            return fn(batch_size)
        except torch.OutOfMemoryError:
            if batch_size <= 1:
                raise
            batch_size //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _maybe_crash(stage) -> None:
    """Fault injection for tests: REFUSAL_RAY_CRASH_ONCE=<marker path> kills this worker process
    (os._exit, as an OOM kill or a segfault would) once per marker, at the first batch of the stage
    named by REFUSAL_RAY_CRASH_STAGE, or without it, of a stage that reads others' results (`needs`),
    so that finished results are already stored when the worker dies."""
    marker = os.environ.get("REFUSAL_RAY_CRASH_ONCE")
    if stage is None:   # an unknown stage: `run` reports it
        return
    wanted = os.environ.get("REFUSAL_RAY_CRASH_STAGE")
    hit = stage.name == wanted if wanted else bool(stage.needs)
    if marker and hit and not Path(marker).exists():
        Path(marker).touch()
        os._exit(1)
