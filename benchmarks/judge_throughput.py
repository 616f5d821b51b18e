"""Judge throughput: a local chat judge batched on the cluster vs one completion at a time.

The judge is the toy chat judge (data/models/toy-judge, TOY_RUBRIC, default max_new_tokens 24,
float32). The completions are the labelled set's 40 (prompt, completion) rows
(data/judges/toy_labelled.jsonl) cycled to N (row i is labelled row i mod 40, under its own
prompt id; 64 rows per cell id), so every mode judges the same texts.
  cluster    `judge_store` on a temporary store holding the N rows as a `completions` table, on a
             local Ray started here with 2 CPUs: one JudgeWorker actor (resources num_cpus 2,
             2 torch threads), batches of --batch-size, chunks of 4 batches. Timed from the call
             to its return, actor start and model load included; a second, fresh store is timed
             the same way, and the actor start + model load is also timed alone (an actor judging
             an empty list), so the load is visible.
  in-process the same judge loaded in this process, all N in batches of --batch-size (no Ray, no
             store: the batching alone).
  one        the same judge in this process with batch_size 1, `judge.judge([item])` per item, on
             the first --one items, timed before and after the rest (best of the two kept); its
             rate is extrapolated to N (per completion, as measured).
Reported as ratios measured in the same run; labels of the cluster run and the one-at-a-time run
are compared on their common items. The ratio's target (>= 5x) is for the whole judge_store call;
the fixed cost (actor start, imports, model load) is printed with the N where it is paid back.
Run: python benchmarks/judge_throughput.py [--n 256] [--batch-size 64] [--one 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from refusal_ray.judges import make_judge
from refusal_ray.judges.base import Item
from refusal_ray.judges.config import ChatJudgeSpec, JudgeResources
from refusal_ray.store import Store
from refusal_ray.toy.judge import TOY_RUBRIC

REPO = Path(__file__).resolve().parent.parent
JUDGE = REPO / "data" / "models" / "toy-judge"
LABELLED = REPO / "data" / "judges" / "toy_labelled.jsonl"
MODEL = "bench"          # the completions' model partition
PER_CELL = 64


def labelled() -> list[dict]:
    return [json.loads(line) for line in LABELLED.read_text().splitlines() if line.strip()]


def completion_rows(n: int) -> list[dict]:
    """N completions rows: the labelled rows cycled, each under its own (cell_id, prompt_id)."""
    src = labelled()
    rows = []
    for i in range(n):
        r = src[i % len(src)]
        rows.append({"cell_id": f"bench-{i // PER_CELL:03d}", "seed": 0, "prompt_set": "harmful",
                     "prompt_id": f"{i:05d}", "prompt": r["prompt"], "completion": r["completion"],
                     "refusal": bool(r["refusal"]), "label": r["id"]})
    return rows


def _none(x):
    """A stored null (None, NaN, pd.NA) as None; numpy scalars as Python ones."""
    if x is None or (isinstance(x, float) and x != x) or x is pd.NA:
        return None
    return x.item() if hasattr(x, "item") else x


def label(v) -> tuple:
    """What counts as a label (the raw text is compared separately)."""
    return tuple(_none(v[k]) for k in ("refusal", "compliance", "coherence", "error")) + (bool(v["malformed"]),)


def cluster_run(root: Path, rows: list[dict], cfg) -> dict:
    """judge_store on a fresh store of `rows` (Ray already up); seconds from call to return."""
    from refusal_ray.cluster.judging import judge_store

    store = Store(root)
    store.write("completions", MODEL, [{k: v for k, v in r.items() if k != "label"} for r in rows])
    t = time.perf_counter()
    run = judge_store(store, [cfg], source="benchmark", progress=False, log=lambda *_: None)
    seconds = time.perf_counter() - t
    if run.total_written != len(rows) or run.total_failed:
        raise RuntimeError(f"judge_store wrote {run.total_written} rows, {run.total_failed} failed")
    j = store.read("judgements")
    # `seconds` of a judgement row is its chunk's in-actor judging time / rows: the sum is the compute
    return {"seconds": seconds, "in_actor": float(j["seconds"].sum()),
            "verdicts": {r["prompt_id"]: r for r in j.to_dict("records")}}


def actor_start(cfg) -> float:
    """Seconds to start a JudgeWorker (process, imports, model load) and have it answer once."""
    import ray

    from refusal_ray.cluster.judge_worker import JudgeWorker

    t = time.perf_counter()
    actor = JudgeWorker.options(num_cpus=cfg.resources.num_cpus, num_gpus=0, max_restarts=0).remote(
        cfg.model_dump(mode="json"), int(cfg.resources.num_cpus))
    ray.get(actor.judge.remote([]))
    seconds = time.perf_counter() - t
    ray.kill(actor)
    time.sleep(1.0)   # let the killed actor's CPUs return before the next judge_store asks for them
    return seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256, help="completions judged (labelled rows cycled)")
    ap.add_argument("--batch-size", type=int, default=64, help="the judge's batch_size (batched modes)")
    ap.add_argument("--one", type=int, default=64, help="items judged one at a time (extrapolated to --n)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads here and CPUs / threads of the actor")
    args = ap.parse_args()
    wall = time.perf_counter()
    torch.set_num_threads(args.threads)
    import ray

    rows = completion_rows(args.n)
    items = [Item(r["prompt"], r["completion"]) for r in rows]
    truth = {r["id"]: r for r in labelled()}
    cfg = ChatJudgeSpec(name="toy-judge", kind="chat", path=str(JUDGE), rubric=TOY_RUBRIC,
                        batch_size=args.batch_size, resources=JudgeResources(num_cpus=args.threads, num_gpus=0))
    print(f"judge {JUDGE.name}: {args.n} completions ({len(truth)} labelled rows cycled), "
          f"batch_size {args.batch_size}, {args.threads} threads; load average {os.getloadavg()[0]:.2f}")

    # -- one at a time (also timed again at the end: the best of the two is kept) -----------------
    t = time.perf_counter()
    judge1 = make_judge(cfg.model_copy(update={"batch_size": 1}))
    load_one = time.perf_counter() - t
    m = min(args.one, args.n)

    def one_at_a_time():
        t = time.perf_counter()
        verdicts = [judge1.judge([it])[0] for it in items[:m]]
        return verdicts, time.perf_counter() - t

    one, one_s = one_at_a_time()

    # -- cluster: judge_store on a local Ray ---------------------------------------------------
    t = time.perf_counter()
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    ray_init = time.perf_counter() - t
    try:
        with tempfile.TemporaryDirectory(prefix="judge-bench-") as tmp:
            first = cluster_run(Path(tmp) / "a", rows, cfg)
            start = actor_start(cfg)
            second = cluster_run(Path(tmp) / "b", rows, cfg)
    finally:
        ray.shutdown()

    # -- in-process batched (no Ray, no store) --------------------------------------------------
    t = time.perf_counter()
    judge = make_judge(cfg)
    load_batched = time.perf_counter() - t
    t = time.perf_counter()
    here = judge.judge(items)
    inproc = time.perf_counter() - t
    del judge

    one_again, one_s2 = one_at_a_time()
    one_s = min(one_s, one_s2)
    per_one = one_s / m

    # -- table ------------------------------------------------------------------------------------
    n = args.n
    best = min(first["seconds"], second["seconds"])
    in_actor = min(first["in_actor"], second["in_actor"])
    table = [
        ("cluster: judge_store call to return (run 1)", n, first["seconds"]),
        ("cluster: judge_store call to return (run 2)", n, second["seconds"]),
        (f"cluster: judging in the actor ({first['in_actor']:.2f} / {second['in_actor']:.2f} s)", n, in_actor),
        (f"in-process batched, batch {args.batch_size}", n, inproc),
        (f"one at a time (measured on {m}, best of 2)", m, one_s),
        ("one at a time, extrapolated", n, per_one * n),
    ]
    print(f"\n{'mode':<52} {'completions':>11} {'seconds':>9} {'compl./s':>9}")
    for mode, k, s in table:
        print(f"{mode:<52} {k:>11} {s:>9.2f} {k / s:>9.1f}")
    print(f"\nfixed costs: ray.init {ray_init:.2f} s; actor start + model load alone {start:.2f} s; "
          f"in-process model load {load_batched:.2f} s (batched), {load_one:.2f} s (batch_size 1, the first)")
    ratio = (n / best) * per_one
    steady = (n / in_actor) * per_one
    print(f"ratio batched on the cluster / one at a time: {ratio:.1f}x (call to return, best of 2 runs; "
          f"target >= 5x); judging alone in the actor: {steady:.1f}x; in-process batched: "
          f"{(n / inproc) * per_one:.1f}x")
    # break-even: the fixed cost of the cluster call is paid back after this many completions
    fixed = best - in_actor
    rate_b, rate_1 = n / in_actor, 1 / per_one
    if rate_b > 5 * rate_1:
        print(f"the cluster call's fixed cost ({fixed:.1f} s) reaches 5x one at a time from about "
              f"{5 * fixed * rate_1 * rate_b / (rate_b - 5 * rate_1):.0f} completions")
    print(f"load average at the end {os.getloadavg()[0]:.2f} (other jobs on the 2 cores slow every figure)")

    # -- labels -----------------------------------------------------------------------------------
    cl = [first["verdicts"][r["prompt_id"]] for r in rows]
    one_rows = [v.row() for v in one]
    diff = sum(label(a) != label(b) for a, b in zip(cl[:m], one_rows))
    raw_diff = sum(a["raw"] != b["raw"] for a, b in zip(cl[:m], one_rows))
    runs_diff = sum(label(first["verdicts"][k]) != label(second["verdicts"][k]) for k in first["verdicts"])
    again_diff = sum(label(a.row()) != label(b.row()) for a, b in zip(one, one_again))
    here_diff = sum(label(a) != label(b.row()) for a, b in zip(cl, here))
    if diff == 0 and raw_diff == 0:
        print(f"labels: identical on the {m} common items (cluster vs one at a time; raw text too)")
    else:
        print(f"labels: {diff} of {m} common items differ between cluster and one at a time "
              f"(raw text differs on {raw_diff})")
    print(f"labels: cluster run 1 vs run 2 differ on {runs_diff} of {n}; cluster vs in-process batched on "
          f"{here_diff} of {n}; one at a time, first vs second pass on {again_diff} of {m}")
    agree = sum(a["refusal"] == bool(truth[r["label"]]["refusal"])
                and a["compliance"] == float(truth[r["label"]]["compliance"])
                and a["coherence"] == float(truth[r["label"]]["coherence"]) for a, r in zip(cl, rows))
    print(f"cluster labels equal to the human labels on {agree} of {n}")

    out = {"n": n, "batch_size": args.batch_size, "threads": args.threads,
           "cluster_s": [round(first["seconds"], 2), round(second["seconds"], 2)],
           "in_actor_s": [round(first["in_actor"], 2), round(second["in_actor"], 2)], "actor_start_s": round(start, 2),
           "ray_init_s": round(ray_init, 2), "in_process_batched_s": round(inproc, 2),
           "one_at_a_time_per_item_ms": round(1000 * per_one, 2), "one_measured": m,
           "ratio_call_to_return": round(ratio, 1), "ratio_in_actor": round(steady, 1),
           "label_diffs": diff, "raw_diffs": raw_diff, "wall_s": round(time.perf_counter() - wall, 1)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
