"""The shared needs -> inputs -> skip -> run loop (refusal_ray.pipeline.executor) on fake stages, and
the two callers on it: the in-process runner (run_local) and the driver's task bookkeeping."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from refusal_ray.core.cells import Cell
from refusal_ray.pipeline.executor import Executor, ModelWork
from refusal_ray.stages.base import Stage


def _stages(calls: list | None = None):
    """fit -> pick -> use (pick needs fit, use needs fit and pick); `off` is disabled. `pick`'s inputs
    are fit's row values; `use` skips a cell whose param `k` is not among them; use runs 2 cells a task."""
    calls = calls if calls is not None else []

    def run(name):
        def _run(session, cells, payload):
            calls.append((name, [c.id for c in cells], payload))
            return {name: [{"cell_id": c.id, "value": c.params.get("k", 0)} for c in cells]}
        return _run

    fit = Stage("fit", ("fit",), cells=None, id_key=None, run=run("fit"))
    pick = Stage("pick", ("pick",), cells=None, id_key=None, run=run("pick"), needs=("fit", "off"),
                 inputs=lambda settings, needs: sorted(r["value"] for r in needs["fit"]["fit"]))
    use = Stage("use", ("use",), cells=None, id_key=None, run=run("use"), needs=("fit", "pick"),
                group=lambda cells, spec: [cells[i:i + 2] for i in range(0, len(cells), 2)],
                inputs=lambda settings, needs: {r["value"] for r in needs["fit"]["fit"]},
                skip=lambda cell, payload: None if cell.params["k"] in payload else f"k={cell.params['k']} not fitted")
    off = Stage("off", ("off",), cells=None, id_key=None, run=run("off"))
    return (fit, pick, use, off), calls


SPEC = SimpleNamespace(stages=SimpleNamespace(fit={}, pick={}, use={}, off=None))


def _cells(seed=0, uses=(0, 1, 2)):
    return [Cell(f"fit{seed}", "fit", "m", seed, {"k": 1}), Cell(f"fitb{seed}", "fit", "m", seed, {"k": 2}),
            Cell(f"pick{seed}", "pick", "m", seed, {}),
            *(Cell(f"use{seed}-{k}", "use", "m", seed, {"k": k}) for k in uses)]


def _drain(executor, work, fail=()):
    """Run the ready queue in process as run_local does; returns [(task stage, cell ids, status)]."""
    log = []
    while work.ready:
        task = work.ready.popleft()
        started = executor.start(work, task)
        for c in started.skipped_cells:
            log.append((task.stage, [c.id], "skipped: " + started.skipped[c.id]))
        if task.stage in fail:
            log.append((task.stage, [c.id for c in task.cells], "failed"))
            for dep, error in executor.fail(work, task, "boom"):
                log.append((dep.stage, [c.id for c in dep.cells], error))
            continue
        tables = executor.stage(task.stage).run(None, task.cells, started.payload) if task.cells else {}
        log.append((task.stage, [c.id for c in task.cells], "done"))
        executor.done(work, task, tables)
    return log


def test_needs_gate_inputs_and_skips():
    stages, calls = _stages()
    ex = Executor(SPEC, {}, stages)
    assert ex.needs("pick") == ["fit"]                       # a disabled need is absent
    work = ex.add(ModelWork("m"), _cells())
    assert [t.stage for t in work.ready] == ["fit", "fit"]   # pick and use wait for fit
    log = _drain(ex, work)
    assert log == [("fit", ["fit0"], "done"), ("fit", ["fitb0"], "done"), ("pick", ["pick0"], "done"),
                   ("use", ["use0-0"], "skipped: k=0 not fitted"), ("use", ["use0-1"], "done"),
                   ("use", ["use0-2"], "done")]
    assert ("pick", ["pick0"], [1, 2]) in calls              # inputs from both fit tasks' rows
    assert [c for c in calls if c[0] == "use"][0][2] == {1, 2}
    assert work.no_work_left()


def test_inputs_are_computed_once_per_seed_and_stage():
    stages, _ = _stages()
    seen = []
    use = stages[2]
    counted = Stage(use.name, use.tables, cells=None, id_key=None, run=use.run, needs=use.needs, group=use.group,
                    inputs=lambda s, n: seen.append(1) or use.inputs(s, n), skip=use.skip)
    ex = Executor(SPEC, {}, (stages[0], stages[1], counted, stages[3]))
    _drain(ex, ex.add(ModelWork("m"), _cells(uses=(1, 2, 1, 2, 1))))   # three use tasks
    assert len(seen) == 1


def test_a_failure_fails_what_needs_it_directly_or_through_another_stage():
    stages, calls = _stages()
    ex = Executor(SPEC, {}, stages)
    work = ex.add(ModelWork("m"), _cells(0) + _cells(1))
    log = _drain(ex, work, fail={"fit"})
    failed = {tuple(ids): status for stage, ids, status in log if stage != "fit"}
    assert failed[("pick0",)] == "fit failed: boom" and failed[("pick1",)] == "fit failed: boom"
    assert failed[("use0-0", "use0-1")] == "fit failed: boom"   # use needs fit directly (and pick)
    assert not [c for c in calls if c[0] != "fit"] and work.no_work_left()


def test_a_failed_pick_fails_use_but_not_the_other_seed():
    stages, _ = _stages()
    ex = Executor(SPEC, {}, stages)
    work = ex.add(ModelWork("m"), _cells(0) + _cells(1))
    log = []
    while work.ready:   # fail seed 0's pick only
        task = work.ready.popleft()
        started = ex.start(work, task)
        if task.stage == "pick" and task.seed == 0:
            log += [(d.stage, d.seed, e) for d, e in ex.fail(work, task, "no")]
            continue
        ex.done(work, task, ex.stage(task.stage).run(None, task.cells, started.payload) if task.cells else {})
        log.append((task.stage, task.seed, "done"))
    assert ("use", 0, "pick failed: no") in log and ("use", 1, "done") in log
    assert not [x for x in log if x[:2] == ("use", 0) and x[2] == "done"]


def test_a_need_finished_earlier_is_read_back():
    stages, calls = _stages()
    stored = []

    def load(model, seed, stage):
        stored.append((model, seed, stage))
        return {"fit": [{"cell_id": "old", "value": 2}]}

    ex = Executor(SPEC, {}, stages, load_stored=load)
    work = ex.add(ModelWork("m"), [c for c in _cells() if c.stage == "use"] + [Cell("pick0", "pick", "m", 0, {})])
    assert stored == [("m", 0, "fit")] and [t.stage for t in work.ready] == ["pick"]
    log = _drain(ex, work)
    assert log == [("pick", ["pick0"], "done"), ("use", ["use0-0"], "skipped: k=0 not fitted"),
                   ("use", ["use0-1"], "skipped: k=1 not fitted"), ("use", [], "done"),   # every cell skipped
                   ("use", ["use0-2"], "done")]
    assert ("pick", ["pick0"], [2]) in calls                 # the stored rows are the inputs
    with pytest.raises(LookupError, match="stage fit of m seed 0 is needed but has no task"):
        Executor(SPEC, {}, stages).add(ModelWork("m"), [Cell("pick0", "pick", "m", 0, {})])


def test_inputs_that_raise_fail_the_task():
    stages, _ = _stages()
    bad = Stage("pick", ("pick",), cells=None, id_key=None, run=stages[1].run, needs=("fit",),
                inputs=lambda s, n: 1 / 0)
    ex = Executor(SPEC, {}, (stages[0], bad, stages[2], stages[3]))
    work = ex.add(ModelWork("m"), _cells())
    while work.ready and work.ready[0].stage == "fit":
        t = work.ready.popleft()
        ex.done(work, t, ex.stage("fit").run(None, t.cells, None))
    started = ex.start(work, work.ready.popleft())
    assert started.error == "inputs: ZeroDivisionError: division by zero"


def test_sharded_stage_on_the_driver_merges_as_one_run():
    """A shardable stage's shards run separately and merge to the rows of one unsharded run
    (the driver's path: Stage.shards / merge on the executor's payload)."""
    def run(session, cells, payload):
        return {"t": [{"cell_id": cells[0].id, "x": x} for x in payload]}

    stage = Stage("s", ("t",), cells=None, id_key=None, run=run, inputs=lambda s, n: [1, 2, 3, 4, 5],
                  shards=lambda s, payload, n: [payload[i::n] for i in range(n)],
                  merge=lambda s, cells, payload, parts: {"t": sorted((r for p in parts for r in p["t"]),
                                                                     key=lambda r: r["x"])})
    ex = Executor(SimpleNamespace(stages=SimpleNamespace(s={})), {}, (stage,))
    work = ex.add(ModelWork("m"), [Cell("c", "s", "m", 0, {})])
    task = work.ready.popleft()
    started = ex.start(work, task)
    parts = [run(None, task.cells, p) for p in stage.shards({}, started.payload, 2)]
    assert stage.merge({}, task.cells, ex.payload(work, task), parts) == run(None, task.cells, started.payload)
    assert stage.shardable


def test_run_local_and_the_driver_use_the_shared_loop():
    import inspect

    from refusal_ray.cluster import driver, local

    for module in (local, driver):
        src = inspect.getsource(module)
        assert "Executor(" in src
        assert ".inputs(" not in src and ".skip(" not in src   # both come from the executor only


def test_orchestration_names_no_stage():
    """plan, runner, session, grid, the driver, run_local and the executor read stage declarations only:
    no stage's name appears in their code as a name (spec.stages.<name>) or a string ("<name>")."""
    import ast
    import importlib
    import inspect

    from refusal_ray.stages import STAGES

    names = {s.name for s in STAGES}
    for module in ("refusal_ray.plan", "refusal_ray.runner", "refusal_ray.session", "refusal_ray.grid",
                   "refusal_ray.cluster.driver", "refusal_ray.cluster.local", "refusal_ray.cluster.worker",
                   "refusal_ray.pipeline.executor"):
        tree = ast.parse(inspect.getsource(importlib.import_module(module)))
        used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        used |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        used |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not names & used, f"{module} names stage(s) {sorted(names & used)}"
