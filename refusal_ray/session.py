"""A loaded model and the stage calls it serves; the Ray actor is a thin shell around this.

It never imports Ray, so everything a worker does is testable in-process.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from refusal_ray.grid import Cell
from refusal_ray.judges import SubstringJudge
from refusal_ray.models.loading import load_model
from refusal_ray.stages.directions import best_layer, fit_directions
from refusal_ray.stages.patch import run_patch
from refusal_ray.stages.scrub import run_scrub
from refusal_ray.stages.steer import run_steer


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
    """One model loaded once; runs batches of cells of any seed.

    Args:
        model: ModelSpec as a dict (with `abs_path` added by the driver).
        prompts: {seed: {"train"|"val"|"test": {"harmful": PromptSet, "harmless": PromptSet}}}
        settings: the spec's stages / generation / judge blocks as dicts.
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
            attn_implementation=model.get("attn_implementation"))
        self.load_seconds = time.perf_counter() - started
        self.judge = SubstringJudge(settings["judge"].get("phrases"))

    def info(self) -> dict:
        return {"device": str(self.lm.device), "load_seconds": self.load_seconds,
                "n_layers": self.lm.sites.n_layers, "d_model": self.lm.sites.d_model}

    def directions(self, cell: Cell) -> list[dict]:
        cfg = self.settings["directions"]
        p = self.prompts[cell.seed]
        rows = halving_on_oom(lambda bs: fit_directions(
            self.lm, (p["train"]["harmful"], p["train"]["harmless"]), (p["val"]["harmful"], p["val"]["harmless"]),
            cfg["sites"], cfg["positions"], bs), cfg["batch_size"])
        return [{"cell_id": cell.id, "seed": cell.seed, **r} for r in rows]

    def steer(self, cells: list[Cell], directions: dict[int, np.ndarray], best: int) -> tuple[list[dict], list[dict]]:
        cfg = self.settings["steer"]
        seed = cells[0].seed
        test = self.prompts[seed]["test"]
        ablation = cfg.get("ablation") or {"layers": "all"}
        return halving_on_oom(lambda bs: run_steer(
            self.lm, cells, test, directions, best, ablation_layers=ablation["layers"],
            max_new_tokens=self.settings["generation"]["max_new_tokens"], batch_size=bs, judge=self.judge),
            cfg["batch_size"])

    def patch(self, cell: Cell) -> list[dict]:
        cfg = self.settings["patch"]
        return halving_on_oom(lambda bs: run_patch(self.lm, cell, self.prompts[cell.seed]["patch"],
                                                   {**cfg, "batch_size": bs}, self.judge.phrases), cfg["batch_size"])

    def scrub(self, cells: list[Cell]) -> list[dict]:
        cfg = self.settings["scrub"]
        seed = cells[0].seed
        return halving_on_oom(lambda bs: run_scrub(self.lm, cells, self.prompts[seed]["scrub"],
                                                   {**cfg, "batch_size": bs}, seed), cfg["batch_size"])

    def run(self, stage: str, cells: list[Cell], directions: dict | None = None, best: int | None = None) -> dict:
        """Run a batch; never raises for a cell error: returns {"ok": bool, "tables": ..., "error": str}."""
        _maybe_crash(stage)
        started = time.perf_counter()
        try:
            if stage == "directions":
                tables = {"directions": [r for c in cells for r in self.directions(c)]}
            elif stage == "patch":
                tables = {"patching": [r for c in cells for r in self.patch(c)]}
            elif stage == "scrub":
                tables = {"scrubbing": self.scrub(cells)}
            else:
                arms, comps = self.steer(cells, directions, best)
                tables = {"steering": arms, "completions": comps}
            return {"ok": True, "tables": tables, "seconds": time.perf_counter() - started,
                    "device": str(self.lm.device)}
        except Exception as e:  # noqa: BLE001 - reported per cell by the driver
            return {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                    "seconds": time.perf_counter() - started, "device": str(self.lm.device)}


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


def _maybe_crash(stage: str) -> None:
    """Fault injection for tests: REFUSAL_RAY_CRASH_ONCE=<marker path> kills this worker process
    (os._exit, as an OOM kill or a segfault would) at its first steering batch, once per marker."""
    marker = os.environ.get("REFUSAL_RAY_CRASH_ONCE")
    if marker and stage == "steer" and not Path(marker).exists():
        Path(marker).touch()
        os._exit(1)


def steering_inputs(direction_rows: list[dict], site: str, position: int) -> tuple[dict[int, np.ndarray], int]:
    """({layer: vector}, best layer) from a seed's direction rows, for the steer stage."""
    vecs = {int(r["layer"]): np.asarray(r["vector"], np.float32) for r in direction_rows
            if r["site"] == site and int(r["position"]) == position}
    return vecs, best_layer(direction_rows, site, position)
