"""Search throughput: the study concurrent on the Ray cluster against sequential in one process, in one run.

Shape: sweeps/toy/search.yaml's study on one toy model (default toy-qwen-s), the same trial budget and sampler seed:
  concurrent  Optuna ask/tell in the driver, trials on the model's Ray actors (as many as the cluster's CPUs hold),
              `trials_per_call` trials per batched forward, one call in flight per actor (`refusal-ray search`)
  sequential  one in-process session, one trial per call, one call at a time (heretic's loop)
Both read the same stored directions (computed once, first). Reported: trials per minute of each (study wall time,
model loads excluded and listed apart), the ratio, and the front each reached at equal wall time (the sequential
run's trials finished within the concurrent run's wall time): its hypervolume against the reference point
(refusal 1, KL = the largest KL any trial of either run reached) and its lowest val refusal.
Run: python benchmarks/search.py [--trials 32] [--model qwen-s]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent


def hypervolume(points, ref) -> float:
    """Area dominated by 2-D minimisation points up to `ref` (exact, sweep over the front)."""
    pts = sorted((min(a, ref[0]), min(b, ref[1])) for a, b in points)
    area, best_b = 0.0, ref[1]
    for a, b in pts:                      # by refusal ascending: each new lower KL adds a strip
        if b < best_b:
            area += (ref[0] - a) * (best_b - b)
            best_b = b
    return area


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--model", default="qwen-s")
    ap.add_argument("--trials-per-call", type=int, default=2)
    args = ap.parse_args()

    import ray

    from refusal_ray.cluster.driver import connect, placements
    from refusal_ray.cluster.local import run_local
    from refusal_ray.cluster.search import RayPool, fitting_replicas
    from refusal_ray.plan import make_plan, model_payload, settings_payload
    from refusal_ray.session import ModelSession
    from refusal_ray.stages.search.study import LocalPool, run_study
    from refusal_ray.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="search-bench-"))
    spec = yaml.safe_load((REPO / "sweeps/toy/search.yaml").read_text())
    spec["models"] = [m | {"path": str(REPO / m["path"])} for m in spec["models"] if m["name"] == args.model]
    for k in ("harmful", "harmless"):
        spec["data"][k]["path"] = str(REPO / spec["data"][k]["path"])
    spec["stages"]["search"] |= {"n_trials": args.trials, "n_startup_trials": min(16, args.trials)}
    runs = {}
    for name, tpc in (("concurrent", args.trials_per_call), ("sequential", 1)):
        s = json.loads(json.dumps(spec))
        s["stages"]["search"]["trials_per_call"] = tpc
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(s))
        runs[name] = make_plan(tmp / f"{name}.yaml")
    # the directions once, copied into both stores
    base = Store(tmp / "directions")
    run_local(runs["sequential"], base, log=lambda m: None)
    out = {}
    for name, plan in runs.items():
        store = Store(tmp / name)
        store.write("directions", args.model, base.read("directions").drop(columns=["model"]).to_dict("records"))
        t0 = time.perf_counter()
        if name == "concurrent":
            connect(None)
            cluster = ray.cluster_resources()
            where = placements(plan, cluster)
            n = fitting_replicas(where[args.model], cluster)
            pool = RayPool(plan, args.model, where[args.model], n, None, 1)
        else:
            n = 1
            pool = LocalPool(ModelSession(model_payload(plan, args.model), plan.prompts, settings_payload(plan), 1))
        load = time.perf_counter() - t0
        t1 = time.time()
        summary = run_study(plan, store, args.model, 0, pool, log=lambda m: None)
        wall = time.time() - t1
        pool.close()
        trials = store.read("trials")
        trials = trials[trials["state"] == "complete"]
        out[name] = {"workers": n, "load_s": load, "wall_s": wall, "trials": summary["finished"],
                     "trials_per_min": 60 * summary["finished"] / wall, "t0": t1,
                     "points": list(zip(trials["refusal_rate"], trials["kl"], trials["t_end"] - t1))}
    if ray.is_initialized():
        ray.shutdown()
    ref = (1.0, max(p[1] for r in out.values() for p in r["points"]))
    at = out["concurrent"]["wall_s"]
    for r in out.values():
        upto = [(a, b) for a, b, t in r["points"] if t <= at]
        r |= {"hypervolume_at_equal_time": hypervolume(upto, ref), "trials_at_equal_time": len(upto),
              "lowest_refusal_at_equal_time": min((a for a, _ in upto), default=None)}
        r.pop("points"), r.pop("t0")
    ratio = out["concurrent"]["trials_per_min"] / out["sequential"]["trials_per_min"]
    print(json.dumps({"model": args.model, "budget": args.trials, "reference_point": ref, **out,
                      "ratio_trials_per_min": ratio}, indent=2))


if __name__ == "__main__":
    main()
