"""The one needs -> inputs -> skip -> run loop, shared by the Ray driver and the in-process runner.

Per model, a `ModelWork` holds the tasks of its cells (grouped as each stage declares, `Stage.group`),
per seed: the tasks waiting until every stage they need (`Stage.needs`, those the spec enables) has
finished for that (model, seed), the ready queue, and the rows of finished needs. `Executor` moves
a task through its life:

1. `add(work, cells)`: tasks per (seed, stage); the needs that this run has no task for (finished in
   an earlier run) are read back with `load_stored(model, seed, stage)`; tasks whose needs are in go
   to `work.ready`.
2. `start(work, task)`: the stage's `inputs(settings, needs)` (once per (seed, stage)) and the cells
   its `skip(cell, inputs)` refuses, with their reasons (dropped from the task; the caller stores them
   as `skipped`, never as a silent substitute). An exception from `inputs` fails the task
   (`Started.error`).
3. the caller runs the task: in process (`refusal_ray.cluster.local`) or on an actor, possibly split
   into `Stage.shards` and merged (`refusal_ray.cluster.driver`). This module never imports Ray.
4. `done(work, task, tables)`: the rows are kept where a waiting task needs them, and the tasks now
   unblocked are released; `fail(work, task, error)`: returns every waiting task of the seed that
   needs the stage, directly or through another, removed from the queue, with the error their cells
   get (`"<stage> failed: <error>"`).

The caller writes each finished task's rows to the store as it finishes, so a crash never loses
finished results; this module keeps no row it is not asked to.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from refusal_ray.core.cells import Cell


@dataclass
class Task:
    """The cells of one stage and (model, seed) that run as one call (`Stage.group`)."""

    stage: str
    seed: int
    cells: list[Cell]
    attempts: int = 0
    started: float = field(default_factory=time.time)
    parts: list | None = None     # split into shards: each shard's result, None until it is in
    over: bool = False            # split: finished (merged or failed); later shard results are dropped


@dataclass
class ModelWork:
    """One model's tasks: waiting per seed, ready, and the finished needs' rows."""

    name: str
    ready: deque = field(default_factory=deque)                       # tasks that can run now
    waiting: dict = field(default_factory=lambda: defaultdict(list))  # seed -> tasks whose needs are unfinished
    pending: dict = field(default_factory=lambda: defaultdict(int))   # (seed, stage) -> unfinished tasks
    results: dict = field(default_factory=dict)                       # (seed, stage) -> {table: rows}
    payloads: dict = field(default_factory=dict)                      # (seed, stage) -> the stage's inputs

    def no_work_left(self) -> bool:
        return not self.ready and not any(self.waiting.values())

    def task_count(self) -> int:
        return len(self.ready) + sum(len(v) for v in self.waiting.values())

    def tasks(self) -> list[Task]:
        return [*self.ready, *(t for ts in self.waiting.values() for t in ts)]


@dataclass
class Started:
    """What `Executor.start` decided for a task: its inputs, the cells skipped (id -> reason; already
    dropped from `task.cells`), or the error that fails it."""

    payload: object = None
    skipped: dict = field(default_factory=dict)
    skipped_cells: list = field(default_factory=list)
    error: str | None = None


class Executor:
    """The stage bookkeeping of a run, on the stage declarations only (no stage named, no Ray).

    Args:
        spec: the Spec (which stages are enabled; `Stage.group` reads it).
        settings: every stage's settings block as a dict (`refusal_ray.plan.settings_payload`), what
            `Stage.inputs` and `Stage.shards` / `merge` are given.
        stages: the stage declarations in dependency order (default `refusal_ray.stages.STAGES`).
        load_stored: (model, seed, stage name) -> {table: rows} of a need finished in an earlier run
            (the driver reads the store); None: every need must run in this one.
    """

    def __init__(self, spec, settings: dict, stages=None,
                 load_stored: Callable[[str, int, str], dict] | None = None):
        if stages is None:
            from refusal_ray.stages import STAGES as stages
        self.spec, self.settings, self.stages = spec, settings, tuple(stages)
        self.by_name = {s.name: s for s in self.stages}
        self.load_stored = load_stored

    def stage(self, name: str):
        return self.by_name[name]

    def needs(self, stage: str) -> list[str]:
        """The stages `stage` needs that this spec enables."""
        return [n for n in self.by_name[stage].needs if self.by_name[n].enabled(self.spec)]

    # -- 1. tasks ----------------------------------------------------------------------------------
    def add(self, work: ModelWork, cells: list[Cell]) -> ModelWork:
        """Queue the tasks of `cells` (one model's), seed by seed in stage order, and release those
        whose needs are in. Raises LookupError when a need has neither a task here nor `load_stored`."""
        by_seed: dict[int, list[Cell]] = defaultdict(list)
        for c in cells:
            by_seed[c.seed].append(c)
        for seed, mine in by_seed.items():
            for stage in self.stages:
                of_stage = [c for c in mine if c.stage == stage.name]
                if not of_stage:
                    continue
                work.pending[(seed, stage.name)] = 0
                for group in stage.group(of_stage, self.spec):
                    work.waiting[seed].append(Task(stage.name, seed, group))
                    work.pending[(seed, stage.name)] += 1
            needed = {n for t in work.waiting[seed] for n in self.needs(t.stage)}
            for n in sorted(needed - {s for (sd, s) in work.pending if sd == seed}):   # finished in an earlier run
                if self.load_stored is None:
                    raise LookupError(f"stage {n} of {work.name} seed {seed} is needed but has no task")
                work.results[(seed, n)] = self.load_stored(work.name, seed, n)
            self.release(work, seed)
        return work

    def release(self, work: ModelWork, seed: int) -> None:
        """Move a seed's tasks whose needs have all finished to the ready queue (in their order)."""
        still = []
        for task in work.waiting.get(seed, []):
            if all(work.pending.get((seed, n), 0) == 0 and (seed, n) in work.results for n in self.needs(task.stage)):
                work.ready.append(task)
            else:
                still.append(task)
        work.waiting[seed] = still

    # -- 2. inputs and skips -------------------------------------------------------------------------
    def payload(self, work: ModelWork, task: Task):
        """The stage's inputs for a task, from its needs' rows (computed once per (seed, stage))."""
        key = (task.seed, task.stage)
        if key not in work.payloads:
            needs = {n: work.results[(task.seed, n)] for n in self.needs(task.stage)}
            work.payloads[key] = self.by_name[task.stage].inputs(self.settings, needs)
        return work.payloads[key]

    def start(self, work: ModelWork, task: Task) -> Started:
        """Inputs and skips of a ready task; skipped cells leave `task.cells`."""
        try:
            payload = self.payload(work, task)
        except Exception as e:  # noqa: BLE001 - stored rows the stage cannot use: its cells fail
            return Started(error=f"inputs: {type(e).__name__}: {e}")
        stage = self.by_name[task.stage]
        skipped = {c.id: r for c in task.cells if (r := stage.skip(c, payload))}
        skipped_cells = [c for c in task.cells if c.id in skipped]
        task.cells = [c for c in task.cells if c.id not in skipped]
        return Started(payload, skipped, skipped_cells)

    # -- 4. the end of a task ----------------------------------------------------------------------
    def done(self, work: ModelWork, task: Task, tables: dict[str, list[dict]]) -> None:
        """A task's rows are in (already stored by the caller): keep what a waiting task needs, release."""
        key = (task.seed, task.stage)
        if any(task.stage in self.by_name[t.stage].needs for t in work.waiting.get(task.seed, [])):
            acc = work.results.setdefault(key, {})
            for table, rows in tables.items():
                acc.setdefault(table, []).extend(rows)
        work.pending[key] -= 1
        self.release(work, task.seed)

    def fail(self, work: ModelWork, task: Task, error: str | None) -> list[tuple[Task, str]]:
        """A task failed: returns [(dependent task, its error)] for every waiting task of the seed that
        needs its stage, directly or through another stage; they leave the queue."""
        work.pending[(task.seed, task.stage)] -= 1
        lost, keep, out = {task.stage}, [], []
        for t in work.waiting.get(task.seed, []):
            if lost & set(self.needs(t.stage)):
                lost.add(t.stage)
                out.append((t, f"{task.stage} failed: {error}"))
            else:
                keep.append(t)
        work.waiting[task.seed] = keep
        return out
