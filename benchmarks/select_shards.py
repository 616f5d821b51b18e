"""Stage select on one model, one seed, `resources.num_cpus: 1`, on a local Ray with 2 CPUs: as one
task on one replica (the driver's `shard=False`, the behaviour before issue 18 item 11) vs split
across two replicas (the default). Same plan, same process, runs interleaved (one, sharded, one,
sharded, ...) so a change of machine load hits both; every run's selection table must be bit-identical.

Reported per mode: the select cell's wall time (task submitted -> rows written, from the cells table;
it includes a second replica still loading), its compute seconds (the cells table's `seconds`: the
sum over shards of each shard's time in the stage), the whole run's wall time (actor start-up,
directions, select), and the replicas the select cell ran on.
Run: python benchmarks/select_shards.py [--model toy-qwen-m] [--n-val 64] [--batch-size 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import yaml

from refusal_ray.cluster.driver import Driver, placements
from refusal_ray.plan import make_plan
from refusal_ray.store import Store

REPO = Path(__file__).resolve().parent.parent


def spec_file(tmp: Path, model: str, n_val: int, batch_size: int) -> Path:
    prompts = REPO / "data" / "prompts" / "toy"
    spec = {
        "name": "select-shards",
        "models": [{"name": model, "path": str(REPO / "data" / "models" / model)}],
        "data": {"harmful": {"path": str(prompts / "harmful.jsonl")},
                 "harmless": {"path": str(prompts / "harmless.jsonl"), "reference_column": "reference"},
                 "n_train": 64, "n_val": n_val, "n_test": 8},
        "seeds": [0],
        "resources": {"num_cpus": 1},
        "stages": {"select": {"batch_size": batch_size}},
        "decision_rule": {
            "control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25,
                               "addition_coefficient": 1.0, "ablation_alpha": 1.0},
            "steering_labels": {"strong": 0.5, "weak": 0.2}},
    }
    f = tmp / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    return f


def one_run(plan, cluster, where, shard: bool) -> dict:
    out = Path(tempfile.mkdtemp(prefix="rr-select-shards-"))
    try:
        store = Store(out)
        t = time.perf_counter()
        failed = Driver(plan, store, where, cluster, progress=False, log=lambda m: None, shard=shard).run(plan.cells)
        total = time.perf_counter() - t
        assert failed == 0
        cells = store.read("cells").set_index("stage")
        sel = store.read("selection").sort_values(["layer", "position"])
        return {"select_s": float(cells.loc["select", "finished"] - cells.loc["select", "started"]),
                "compute_s": float(cells.loc["select", "seconds"]),
                "total_s": total, "replicas": len(str(cells.loc["select", "worker"]).split(",")),
                "scores": sel[["bypass", "induce", "kl"]].to_numpy(float), "rows": len(sel)}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="toy-qwen-m")
    ap.add_argument("--n-val", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rr-select-shards-spec-"))
    plan = make_plan(spec_file(tmp, args.model, args.n_val, args.batch_size))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cluster = ray.cluster_resources()
        where = placements(plan, cluster)
        runs = {False: [], True: []}
        for _ in range(args.repeats):
            for shard in (False, True):
                runs[shard].append(one_run(plan, cluster, where, shard))
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    ref = runs[False][0]["scores"]
    identical = all(np.array_equal(r["scores"], ref, equal_nan=True) for rs in runs.values() for r in rs)
    med = {k: {m: statistics.median(r[m] for r in rs) for m in ("select_s", "total_s")}
           for k, rs in runs.items()}
    print(json.dumps({
        "model": args.model, "n_val": args.n_val, "batch_size": args.batch_size, "candidates": ref.shape[0],
        "one_shard": {"select_s": [round(r["select_s"], 2) for r in runs[False]],
                      "compute_s": [round(r["compute_s"], 2) for r in runs[False]],
                      "total_s": [round(r["total_s"], 2) for r in runs[False]],
                      "replicas": [r["replicas"] for r in runs[False]]},
        "sharded": {"select_s": [round(r["select_s"], 2) for r in runs[True]],
                    "compute_s": [round(r["compute_s"], 2) for r in runs[True]],
                    "total_s": [round(r["total_s"], 2) for r in runs[True]],
                    "replicas": [r["replicas"] for r in runs[True]]},
        "select_speedup_median": round(med[False]["select_s"] / med[True]["select_s"], 2),
        "total_speedup_median": round(med[False]["total_s"] / med[True]["total_s"], 2),
        "scores_bit_identical": identical}), flush=True)


if __name__ == "__main__":
    main()
