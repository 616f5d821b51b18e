"""The quickstart's steering cells, timed on two checkouts in one run: a regression check.

Each checkout (e.g. the commit before a refactor and the working tree) runs, in its own subprocess,
the quickstart spec restricted to directions + select + steer (no capability, no judges) on one toy
model through the Ray-free runner (`run_local`), and reports the seconds spent in stage steer's tasks
(`ModelSession.run` for stage "steer": building the per-row edits, `generate`, judging) and the cells'
number of steering rows. The two are measured alternately, `--repeats` times each, in the same run,
so machine load affects both alike; the ratio of medians is printed.

    git worktree add /tmp/before <commit>
    python benchmarks/steer_before_after.py --before /tmp/before --after . --model qwen-m

Steering rows must match byte for byte between the two (the refactor keeps stored data): the script
compares the steering rows (rate, refusals, n, per cell id) and says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time, yaml, tempfile, os
root, model, out = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, root)
os.chdir(root)
import torch
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
spec = yaml.safe_load(open("sweeps/quickstart.yaml"))
spec["models"] = [m for m in spec["models"] if m["name"] == model]
spec["stages"].pop("capability", None)
spec.pop("judges", None)
spec["name"] = "bench"
# prompt paths stay relative to the checkout: write the spec beside them
path = os.path.join(root, "sweeps", ".bench_before_after.yaml")
yaml.safe_dump(spec, open(path, "w"))
try:
    from refusal_ray.plan import make_plan
    from refusal_ray.session import ModelSession
    from refusal_ray.cluster.local import run_local
    spent = {"steer": 0.0}
    orig = ModelSession.run
    def timed(self, stage, cells, payload=None, *a, **k):
        t = time.perf_counter()
        r = orig(self, stage, cells, payload, *a, **k)
        spent[stage] = spent.get(stage, 0.0) + time.perf_counter() - t
        return r
    ModelSession.run = timed
    plan = make_plan(path)
    tables = run_local(plan, log=lambda *a, **k: None)
finally:
    os.remove(path)
rows = sorted(({k: r.get(k) for k in ("cell_id", "prompt_set", "n", "refusals", "rate")}
               for r in tables.get("steering", [])), key=lambda r: (r["cell_id"], r["prompt_set"]))
json.dump({"steer_seconds": spent["steer"], "rows": rows}, open(out, "w"))
"""


def measure(root: Path, model: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    subprocess.run([sys.executable, "-c", CHILD, str(root), model, out], check=True)
    return json.loads(Path(out).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="checkout of the code before the change")
    ap.add_argument("--after", type=Path, default=REPO, help="checkout of the code after (default: this one)")
    ap.add_argument("--model", default="qwen-m", help="quickstart model to run (default qwen-m, the largest)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    times: dict[str, list[float]] = {"before": [], "after": []}
    rows: dict[str, list] = {}
    for i in range(args.repeats):
        for name, root in (("before", args.before), ("after", args.after)):
            r = measure(root.resolve(), args.model)
            times[name].append(r["steer_seconds"])
            rows[name] = r["rows"]
            print(f"repeat {i}: {name:6s} steer {r['steer_seconds']:.2f} s ({len(r['rows'])} steering rows)", flush=True)
    b, a = statistics.median(times["before"]), statistics.median(times["after"])
    same = rows["before"] == rows["after"]
    print(json.dumps({"model": args.model, "before_s": times["before"], "after_s": times["after"],
                      "median_before_s": round(b, 3), "median_after_s": round(a, 3),
                      "throughput_after_over_before": round(b / a, 4),
                      "steering_rows_identical": same, "n_rows": len(rows["after"])}, indent=2))


if __name__ == "__main__":
    main()
