"""Run a plan's cells in this process, without Ray: one ModelSession per model, stages in order.

For a machine without Ray (a GPU box that cannot install it, a notebook, the tests): the same stage
declarations, inputs and skip rules as the driver, no scheduling, no retries. Rows go to a store
when one is given (as the driver writes them) and are returned either way.
"""

from __future__ import annotations

from collections import defaultdict

from refusal_ray.plan import Plan, model_payload, settings_payload
from refusal_ray.session import ModelSession
from refusal_ray.stages import STAGE_BY_NAME, STAGES


def run_local(plan: Plan, store=None, torch_threads: int | None = None, log=print) -> dict[str, list[dict]]:
    """Run every cell of `plan` here. Returns {table: rows} (each row with its `model`), including a
    `cells` table with status done / skipped / failed. Raises nothing for a failing cell: it is
    recorded as failed (with the error) and the cells that need it fail too."""
    settings = settings_payload(plan)
    out: dict[str, list[dict]] = defaultdict(list)
    for m in plan.spec.models:
        mine = [c for c in plan.cells if c.model == m.name]
        if not mine:
            continue
        session = ModelSession(model_payload(plan, m.name), plan.prompts, settings, torch_threads)
        for seed in plan.spec.seeds:
            results: dict[str, dict] = {}
            for stage in STAGES:
                cells = stage_cells = [c for c in mine if c.seed == seed and c.stage == stage.name]
                if not cells:
                    continue
                needs = {n: results.get(n) for n in stage.needs if STAGE_BY_NAME[n].enabled(plan.spec)}
                missing = [n for n, r in needs.items() if r is None]
                status = {}
                if missing:
                    status = {c.id: ("failed", f"{missing[0]} failed") for c in cells}
                    cells = []
                inputs = stage.inputs(settings, needs) if cells else None
                for c in cells:
                    if (reason := stage.skip(c, inputs)) is not None:
                        status[c.id] = ("skipped", reason)
                cells = [c for c in cells if c.id not in status]
                tables: dict[str, list[dict]] = {}
                for group in stage.group(cells, plan.spec):
                    r = session.run(stage.name, group, inputs)
                    for c in group:
                        status[c.id] = ("done", None) if r["ok"] else ("failed", r["error"])
                    if r["ok"]:
                        for table, rows in r["tables"].items():
                            tables.setdefault(table, []).extend(rows)
                    else:
                        log(f"FAILED {stage.name} of {m.name} seed {seed}: {r['error']}")
                if all(status[c.id][0] in ("done", "skipped") for c in stage_cells):
                    results[stage.name] = tables
                cell_rows = [{**c.row(), "status": status[c.id][0], "error": status[c.id][1]}
                             for c in plan.cells if c.id in status]
                for table, rows in [*tables.items(), ("cells", cell_rows)]:
                    if store is not None:
                        store.write(table, m.name, rows)
                    out[table] += [{"model": m.name, **r} for r in rows]
    if store is not None and plan.spec.judges:   # the spec's judges, in this process
        from refusal_ray.cluster.judging import judge_store

        judge_store(store, list(plan.spec.judges), source=plan.spec_file, use_ray=False, progress=False, log=log)
    return dict(out)
