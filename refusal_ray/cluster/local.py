"""Run a plan's cells in this process, without Ray: one ModelSession per model.

For a machine without Ray (a GPU box that cannot install it, a notebook, the tests): the same stage
declarations, inputs and skip rules as the driver (the shared loop, `refusal_ray.pipeline.executor`),
no scheduling, no retries, no shards. Rows go to a store when one is given (as the driver writes
them, task by task) and are returned either way.
"""

from __future__ import annotations

from collections import defaultdict

from refusal_ray.pipeline.executor import Executor, ModelWork
from refusal_ray.plan import Plan, model_payload, settings_payload
from refusal_ray.session import ModelSession


def run_local(plan: Plan, store=None, torch_threads: int | None = None, log=print) -> dict[str, list[dict]]:
    """Run every cell of `plan` here. Returns {table: rows} (each row with its `model`), including a
    `cells` table with status done / skipped / failed. Raises nothing for a failing cell: it is
    recorded as failed (with the error) and the cells that need it fail too ("<stage> failed: ...").
    Tasks run seed by seed, in stage order."""
    settings = settings_payload(plan)
    executor = Executor(plan.spec, settings)
    order = {s.name: i for i, s in enumerate(executor.stages)}
    out: dict[str, list[dict]] = defaultdict(list)

    def write(model: str, table: str, rows: list[dict]) -> None:
        if store is not None:
            store.write(table, model, rows)
        out[table] += [{"model": model, **r} for r in rows]

    def cells(model: str, task_cells, status: str, error: str | None) -> None:
        write(model, "cells", [{**c.row(), "status": status, "error": error} for c in task_cells])

    for m in plan.spec.models:
        mine = [c for c in plan.cells if c.model == m.name]
        if not mine:
            continue
        session = ModelSession(model_payload(plan, m.name), plan.prompts, settings, torch_threads)
        work = executor.add(ModelWork(m.name), mine)
        while work.ready:
            task = min(work.ready, key=lambda t: (t.seed, order[t.stage]))   # seed by seed, stages in order
            work.ready.remove(task)
            started = executor.start(work, task)
            if started.skipped_cells:
                for c in started.skipped_cells:
                    cells(m.name, [c], "skipped", started.skipped[c.id])
            if started.error is None and task.cells:
                r = session.run(task.stage, task.cells, started.payload)
                result = r if r["ok"] else {"ok": False, "error": r["error"]}
            else:
                result = {"ok": started.error is None, "tables": {}, "error": started.error}
            if result["ok"]:
                for table, rows in result["tables"].items():
                    write(m.name, table, rows)
                cells(m.name, task.cells, "done", None)
                executor.done(work, task, result["tables"])
                continue
            log(f"FAILED {task.stage} of {m.name} seed {task.seed}: {result['error']}")
            cells(m.name, task.cells, "failed", result["error"])
            for dependent, error in executor.fail(work, task, result["error"]):
                cells(m.name, dependent.cells, "failed", error)
    if store is not None and plan.spec.judges:   # the spec's judges, in this process
        from refusal_ray.cluster.judging import judge_store

        judge_store(store, list(plan.spec.judges), source=plan.spec_file, use_ray=False, progress=False, log=log)
    return dict(out)
