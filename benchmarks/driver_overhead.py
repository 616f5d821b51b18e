"""Driver overhead per cell, and the speedup from 1 to 2 workers on the toy quickstart.

1. 10,000 no-op steering cells (plus their directions and select cells) through the real driver,
   store and Ray scheduling, with a stub actor that returns one small row per cell at once: the
   time per cell is what the driver itself costs (target <= 5 ms).
2. The toy quickstart on a local Ray with 1 CPU (one worker at a time) and with 2 CPUs.
Run: python benchmarks/driver_overhead.py [--cells 10000] [--skip-speedup]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import ray

from refusal_ray.grid import Cell
from refusal_ray.plan import make_plan
from refusal_ray.runner import run
from refusal_ray.stages import STAGE_BY_NAME
from refusal_ray.store import Store

REPO = Path(__file__).resolve().parent.parent


@ray.remote
class NoopWorker:
    def __init__(self, model, prompts, settings, torch_threads=None):
        self.d = 8

    def info(self):
        return {}

    def run(self, stage, cells, payload=None):
        if stage == "directions":
            rows = [{"cell_id": c.id, "seed": c.seed, "site": "resid_pre", "layer": layer, "position": -1,
                     "vector": [0.0] * self.d, "norm": 0.0, "separation": float(layer)}
                    for c in cells for layer in range(2)]
            return {"ok": True, "tables": {"directions": rows}, "seconds": 0.0, "device": "cpu", "node": "n"}
        if stage == "select":   # one candidate per layer, the first one selected
            rows = [{"cell_id": c.id, "seed": c.seed, "layer": layer, "position": -1, "selected": layer == 0,
                     "selected_by": "bypass" if layer == 0 else None} for c in cells for layer in range(2)]
            return {"ok": True, "tables": {"selection": rows}, "seconds": 0.0, "device": "cpu", "node": "n"}
        rows = [{"cell_id": c.id, "seed": c.seed, "prompt_set": "harmful", "n": 1, "refusals": 0, "rate": 0.0}
                for c in cells]
        return {"ok": True, "tables": {"steering": rows}, "seconds": 0.0, "device": "cpu", "node": "n"}


def driver_overhead(n_cells: int) -> dict:
    import refusal_ray.cluster.worker as worker_module

    plan = make_plan(REPO / "sweeps" / "quickstart.yaml", ["qwen-xs"])
    seeds = plan.spec.seeds
    needed = [c for c in plan.cells if c.stage in ("directions", "select")]
    per_seed = n_cells // len(seeds)
    steer = [Cell(f"noop-{s}-{i:06d}", "steer", "qwen-xs", s, {"mode": "baseline"}) for s in seeds
             for i in range(per_seed)]
    plan.cells = needed + steer
    out = Path(tempfile.mkdtemp(prefix="rr-overhead-"))
    original = worker_module.ModelWorker
    worker_module.ModelWorker = NoopWorker
    # the no-op worker answers select with whole tables, so select is not split across replicas here
    select = STAGE_BY_NAME["select"]
    STAGE_BY_NAME["select"] = dataclasses.replace(select, shards=None, merge=None)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        t = time.perf_counter()
        failed = run(plan, out, progress=False, log=lambda m: None)
        seconds = time.perf_counter() - t
        assert failed == 0 and len(Store(out).done_cells()) == len(plan.cells)
    finally:
        worker_module.ModelWorker = original
        STAGE_BY_NAME["select"] = select
        ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)
    return {"cells": len(plan.cells), "seconds": round(seconds, 2), "ms_per_cell": round(1000 * seconds / len(plan.cells), 3)}


def speedup() -> dict:
    plan = make_plan(REPO / "sweeps" / "quickstart.yaml")
    times = {}
    for cpus in (1, 2):
        out = Path(tempfile.mkdtemp(prefix=f"rr-speedup{cpus}-"))
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        try:
            t = time.perf_counter()
            assert run(plan, out, progress=False, log=lambda m: None) == 0
            times[cpus] = time.perf_counter() - t
        finally:
            ray.shutdown()
            shutil.rmtree(out, ignore_errors=True)
    return {"one_worker_s": round(times[1], 1), "two_workers_s": round(times[2], 1),
            "speedup": round(times[1] / times[2], 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=10_000)
    ap.add_argument("--skip-speedup", action="store_true")
    args = ap.parse_args()
    print(json.dumps({"driver_overhead": driver_overhead(args.cells)}), flush=True)
    if not args.skip_speedup:
        print(json.dumps({"quickstart_1_to_2_workers": speedup()}), flush=True)


if __name__ == "__main__":
    main()
