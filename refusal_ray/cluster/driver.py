"""The driver: plan -> ModelWorker actors -> rows streamed into the store.

Cells are grouped by (model, seed) and by stage into tasks, as each stage declares
(`refusal_ray.stages`); the needs -> inputs -> skip bookkeeping is the loop shared with the
in-process runner (`refusal_ray.pipeline.executor`); the driver adds Ray: actors, retries, shards.
Each model gets one or more actors (replicas), each loading it once and serving any of its seeds.
A task waits until the stages it needs have finished for its (model, seed) (`Stage.needs`); their
rows, reduced by the stage's `inputs`, travel with each task, so replicas hold no state. Cells a
stage cannot run on those inputs (its `skip`) are stored as `skipped` with the reason. A task of a stage that declares `shards`/`merge`
is split across the model's live replicas when it has more than one: each shard runs on whichever
replica is free, a failed shard is retried alone (up to `MAX_ATTEMPTS`), and only when every shard
is in are they merged and the task's rows written, once; a shard that keeps failing fails the task
as a whole, so no partial rows are ever stored. At most two batches are in flight per actor; results are
written to the store as they arrive (atomic files), so a crash never loses finished cells. A
failed batch is retried up to `MAX_ATTEMPTS` times, then its cells are stored as failed with
their error and the run goes on. A model's work starts once all its first replicas have answered
their readiness probe (they load in parallel), so it spreads over all of them. After a worker
crash its queue waits for a readiness probe (Ray restarts the actor; a permanently dead one is replaced). A model that cannot load is not
restarted: the actor answers the probe with the load's exception, stored as every remaining
cell's error ("worker cannot start: OSError: ..."). An actor with nothing left to do is
killed at once, which is the only reliable way to free its memory for the next model.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

import ray
from tqdm import tqdm

from refusal_ray.core.cells import Cell
from refusal_ray.pipeline.executor import Executor, ModelWork, Task
from refusal_ray.pipeline.placement import Placement, place
from refusal_ray.plan import Plan, model_payload, settings_payload
from refusal_ray.session import start_error
from refusal_ray.store import Store

MAX_ATTEMPTS = 3
MAX_IN_FLIGHT = 2


__all__ = ["Driver", "MAX_ATTEMPTS", "MAX_IN_FLIGHT", "ModelState", "Shard", "Task", "connect", "model_payload",
           "placements", "replica_counts", "settings_payload"]


@dataclass
class Shard:
    """One piece of a split task: `run(stage, task.cells, payload)` on any replica of the model."""

    task: Task
    index: int
    payload: object
    attempts: int = 0


@dataclass
class WorkerState:
    """One actor (replica) of a model."""

    actor: object | None = None
    in_flight: int = 0
    probe: object | None = None       # pending readiness check; no batch is sent while set
    replacements: int = 0
    shards: int = 0                   # shards in flight (at most one: the next goes to another replica)

    def can_take(self) -> bool:
        return self.actor is not None and self.probe is None and self.in_flight < MAX_IN_FLIGHT


@dataclass
class ModelState(ModelWork):
    """A model's tasks (the shared loop's `ModelWork`: ready, waiting, finished needs) and its replicas.
    The ready queue also holds `Shard`s of split tasks, first in line."""

    workers: list = field(default_factory=list)                      # WorkerState per replica
    warming: bool = True              # until every first replica has answered its probe (or was dropped)


def placements(plan: Plan, cluster: dict[str, float]) -> dict[str, Placement]:
    """{model name: Placement} for the models of a plan on a cluster. Raises PlacementError."""
    res = plan.spec.resources
    return {m.name: place(m, plan.models[m.name].params, plan.models[m.name].estimate_bytes, res, cluster,
                          res.highmem_params) for m in plan.spec.models}


def cluster_placements(plan: Plan) -> tuple[dict[str, float], dict[str, Placement]]:
    """(the connected cluster's resources, `placements` on them). Raises SpecError naming `models` for a
    model the cluster cannot place."""
    from refusal_ray.errors import SpecError
    from refusal_ray.pipeline.placement import PlacementError

    cluster = ray.cluster_resources()
    try:
        return cluster, placements(plan, cluster)
    except PlacementError as e:
        raise SpecError(plan.spec_file, "models", str(e)) from None


def replica_counts(placement: dict[str, Placement], tasks: dict[str, int], cluster: dict[str, float],
                   shardable: dict[str, bool] | None = None) -> dict[str, int]:
    """Actors per model: one each, plus spare concurrent slots given to the models with the most
    batches per replica (never fewer than two batches per replica). Slots that rule leaves idle go
    to the models with a task that splits across replicas (`shardable`; a stage's `shards`), fewest
    replicas first: a one-model sweep's shardable stage then runs on every free slot."""
    counts = {name: 1 for name in placement}
    slots = []
    for p in placement.values():
        need = {"CPU": p.num_cpus, "GPU": p.num_gpus, **p.resources}
        slots.append(min(math.floor(cluster.get(k, 0) / v) for k, v in need.items() if v > 0))
    spare = (min(slots) if slots else 0) - len(counts)
    while spare > 0:
        name = max(counts, key=lambda n: tasks.get(n, 0) / counts[n])
        if tasks.get(name, 0) / (counts[name] + 1) < 2:
            wide = [n for n in counts if (shardable or {}).get(n)]
            if not wide:
                break
            name = min(wide, key=lambda n: counts[n])
        counts[name] += 1
        spare -= 1
    return counts


class Driver:
    """Runs the not-yet-done cells of a plan on Ray and writes everything to the store."""

    def __init__(self, plan: Plan, store: Store, placement: dict[str, Placement], cluster: dict | None = None,
                 progress: bool = True, log=print, shard: bool = True):
        """shard: split tasks of stages that declare `shards` across a model's replicas (False: one
        task, one replica, as before; for benchmarks)."""
        self.plan, self.store, self.log, self.placement = plan, store, log, placement
        self.cluster = cluster or {}
        self.progress = progress
        self.shard = shard
        self.failed: list[str] = []
        self.skipped = 0
        self.shards_run: dict[str, int] = defaultdict(int)   # stage -> shard results merged

    # -- bookkeeping ---------------------------------------------------------------------------
    def _record(self, task: Task, status: str, result: dict, error: str | None = None) -> None:
        now = time.time()
        rows = [{**c.row(), "status": status, "error": error, "attempts": task.attempts,
                 "node": result.get("node"), "worker": result.get("worker"), "device": result.get("device"),
                 "started": task.started, "finished": now, "seconds": result.get("seconds")}
                for c in task.cells]
        self.store.write("cells", task.cells[0].model, rows)

    def _write_tables(self, model: str, tables: dict[str, list[dict]]) -> None:
        for table, rows in tables.items():
            self.store.write(table, model, rows)

    # -- planning of tasks (the shared loop: refusal_ray.pipeline.executor) --------------------------
    def _stored(self, model: str, seed: int, stage: str) -> dict[str, list[dict]]:
        """A need finished in an earlier run: its rows for this plan's cells of (model, seed), read back."""
        ids = {c.id for c in self.plan.cells if c.stage == stage and c.model == model and c.seed == seed}
        out = {}
        for table in self._exec.stage(stage).tables:
            if table not in self._stored_tables:
                self._stored_tables[table] = self.store.read(table)
            df = self._stored_tables[table]
            rows = df[df["cell_id"].isin(ids)] if not df.empty else df   # this plan's cells only
            out[table] = rows.to_dict("records")
        return out

    def _initial_state(self, todo: list[Cell]) -> dict[str, ModelState]:
        states: dict[str, ModelState] = {}
        by_model: dict[str, list[Cell]] = defaultdict(list)
        for c in todo:
            by_model[c.model].append(c)
        self._stored_tables: dict = {}
        for model, cells in by_model.items():
            states[model] = self._exec.add(ModelState(model), cells)
        return states

    # -- the loop ------------------------------------------------------------------------------
    def _spawn(self, st: ModelState, ws: WorkerState) -> None:
        """Start (or replace) one replica's actor and gate it behind a readiness probe."""
        from refusal_ray.cluster.worker import ModelWorker

        p = self.placement[st.name]
        ws.actor = ModelWorker.options(**p.ray_options(), max_restarts=1, max_task_retries=0).remote(
            model_payload(self.plan, st.name, p), self._prompts, self._settings, self._threads)
        self._probe(st, ws)

    def _probe(self, st: ModelState, ws: WorkerState) -> None:
        ws.probe = ws.actor.info.remote()
        self._in_flight[ws.probe] = (st, ws, None)

    def _submit(self, st: ModelState) -> None:
        if st.warming:   # the replicas load in parallel; work waits for all of them, so it spreads over all
            if any(w.actor is not None and w.probe is not None for w in st.workers):
                return
            st.warming = False
        for ws in st.workers:
            while st.ready and ws.can_take():
                head = st.ready[0]
                if isinstance(head, Shard) and ws.shards and not head.task.over:
                    break   # one shard per replica at a time, so a free replica takes the next one
                task = st.ready.popleft()
                if isinstance(task, Shard):
                    if not task.task.over:
                        self._send(st, ws, task)
                    continue
                started = self._exec.start(st, task)
                if started.error is not None:
                    self._finish(st, task, {"ok": False, "error": started.error}, final=True)
                    continue
                payload = started.payload
                if started.skipped:
                    self._skip(st, task, started.skipped, started.skipped_cells)
                    if not task.cells:
                        self._finish(st, task, {"ok": True, "tables": {}}, final=True)
                        continue
                task.started = time.time()
                if self._split(st, task, payload):
                    continue
                task.attempts += 1
                self._in_flight[ws.actor.run.remote(task.stage, task.cells, payload)] = (st, ws, task)
                ws.in_flight += 1

    def _split(self, st: ModelState, task: Task, payload) -> bool:
        """Queue a task's shards first in line, when its stage splits and the model has more than one
        live replica; False: run it whole."""
        stage = self._exec.stage(task.stage)
        n = sum(w.actor is not None for w in st.workers)
        if not (self.shard and stage.shardable and n > 1):
            return False
        try:
            pieces = stage.shards(self._settings, payload, n)
        except Exception as e:  # noqa: BLE001 - a stage that cannot split these inputs: its cells fail
            self._finish(st, task, {"ok": False, "error": f"shards: {type(e).__name__}: {e}"}, final=True)
            return True
        task.parts = [None] * len(pieces)
        st.ready.extendleft(reversed([Shard(task, i, p) for i, p in enumerate(pieces)]))
        return True

    def _send(self, st: ModelState, ws: WorkerState, shard: Shard) -> None:
        shard.attempts += 1
        shard.task.attempts = max(shard.task.attempts, shard.attempts)
        ws.shards += 1
        self._in_flight[ws.actor.run.remote(shard.task.stage, shard.task.cells, shard.payload)] = (st, ws, shard)
        ws.in_flight += 1

    def _skip(self, st: ModelState, task: Task, reasons: dict[str, str], skipped: list[Cell]) -> None:
        """Store cells that cannot run on their inputs as `skipped`, with the reason (the shared loop
        has dropped them from the task)."""
        now = time.time()
        self.store.write("cells", st.name, [{**c.row(), "status": "skipped", "error": reasons[c.id], "attempts": 0,
                                             "node": None, "worker": None, "device": None, "started": now,
                                             "finished": now, "seconds": 0.0} for c in skipped])
        self.skipped += len(skipped)
        self.log(f"skipped {len(skipped)} {task.stage} cell(s) of {st.name} seed {task.seed}: "
                 f"{next(iter(reasons.values()))}")
        self._bar.update(len(skipped))

    def _probe_done(self, st: ModelState, ws: WorkerState, ref) -> None:
        """The actor answered: ready, or its model cannot load (the answer holds the root cause: the
        replica is dropped, never restarted); or it is gone for good (replace it, at most
        MAX_ATTEMPTS times)."""
        ws.probe = None
        try:
            info = ray.get(ref)
        except ray.exceptions.ActorUnavailableError:   # still restarting: ask again
            time.sleep(0.5)
            self._probe(st, ws)
            return
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
            ws.replacements += 1
            if ws.replacements <= MAX_ATTEMPTS:
                self.log(f"replacing a worker of {st.name}: {type(e).__name__}")
                self._spawn(st, ws)
                return
            self._drop(st, ws, start_error(e))
            return
        if info.get("error"):   # the load raised (ModelWorker keeps the cause): the same load would fail again
            self.log(f"a worker of {st.name} {info['error'].removeprefix('worker ')}")
            ray.kill(ws.actor)
            self._drop(st, ws, info["error"])

    def _drop(self, st: ModelState, ws: WorkerState, error: str) -> None:
        """Give up on a replica; with no replica of the model left, its remaining work fails with `error`."""
        ws.actor = None
        if not any(w.actor is not None for w in st.workers):  # no replica left: the model's work fails
            tasks = {id(t): t for t in (q.task if isinstance(q, Shard) else q for q in st.ready) if not t.over}
            for task in [*tasks.values(), *(t for ts in st.waiting.values() for t in ts)]:
                task.over = True
                self._fail(st, task, {"error": error})
                self._bar.update(len(task.cells))
            st.ready.clear()
            st.waiting.clear()

    def _result(self, st: ModelState, ws: WorkerState, ref) -> dict:
        ws.in_flight -= 1
        try:
            return ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
            if ws.probe is None and ws.actor is not None:
                self._probe(st, ws)  # hold this replica until the restarted (or a new) actor answers
            return {"ok": False, "error": f"worker died: {type(e).__name__}"}

    def _shard_done(self, st: ModelState, ws: WorkerState, shard: Shard, ref) -> None:
        """A shard is back: keep it; with every shard in, merge and finish the task once. A failed
        shard is retried alone; when it cannot be, the whole task fails (nothing of it is stored)."""
        result, task = self._result(st, ws, ref), shard.task
        ws.shards -= 1
        if task.over:
            return
        n = len(task.parts)
        if result["ok"]:
            task.parts[shard.index] = result
            if any(p is None for p in task.parts):
                return
            task.over = True
            parts = task.parts
            try:
                tables = self._exec.stage(task.stage).merge(self._settings, task.cells, self._exec.payload(st, task),
                                                         [p["tables"] for p in parts])
                merged = {"ok": True, "tables": tables, "seconds": sum(p.get("seconds") or 0.0 for p in parts),
                          "device": parts[0].get("device")}
                for key in ("node", "worker"):   # every replica that ran a shard
                    merged[key] = ",".join(dict.fromkeys(str(p.get(key)) for p in parts))
            except Exception as e:  # noqa: BLE001 - shards that do not fit together: the task fails
                merged = {"ok": False, "error": f"merge: {type(e).__name__}: {e}"}
            self.shards_run[task.stage] += n if merged["ok"] else 0
            self._finish(st, task, merged, final=True)
            return
        if shard.attempts < MAX_ATTEMPTS and any(w.actor is not None for w in st.workers):
            self.log(f"retrying {task.stage} shard {shard.index + 1}/{n} of {st.name} seed {task.seed} "
                     f"(attempt {shard.attempts}): {result['error']}")
            st.ready.appendleft(shard)
            return
        task.over = True
        self._finish(st, task, {**result, "error": f"shard {shard.index + 1}/{n}: {result['error']}"}, final=True)

    def _task_done(self, st: ModelState, ws: WorkerState, task: Task, ref) -> None:
        result = self._result(st, ws, ref)
        if not result["ok"] and task.attempts < MAX_ATTEMPTS and any(w.actor is not None for w in st.workers):
            self.log(f"retrying {task.stage} batch of {st.name} seed {task.seed} "
                     f"(attempt {task.attempts}): {result['error']}")
            st.ready.appendleft(task)
            return
        self._finish(st, task, result, final=True)

    def _finish(self, st: ModelState, task: Task, result: dict, final: bool) -> None:
        """A task is over: store its rows (or its failure), then release or fail what needs it."""
        if result["ok"]:   # stored first, so a crash from here on loses nothing that finished
            self._write_tables(st.name, result["tables"])
            if task.cells:
                self._record(task, "done", result)
            self._bar.update(len(task.cells))
            self._exec.done(st, task, result["tables"])
            return
        self._fail(st, task, result)
        self._bar.update(len(task.cells))
        for dependent, error in self._exec.fail(st, task, result.get("error")):   # what needs it fails too
            self._fail(st, dependent, {"error": error})
            self._bar.update(len(dependent.cells))

    def _release_idle(self, st: ModelState) -> None:
        """Kill replicas with nothing left to do (frees their CPU/GPU memory for other models)."""
        if not st.no_work_left():
            return
        for ws in st.workers:
            if ws.actor is not None and ws.in_flight == 0 and ws.probe is None:
                ray.kill(ws.actor)
                ws.actor = None

    def run(self, todo: list[Cell]) -> int:
        """Run `todo`; returns the number of failed cells."""
        plan = self.plan
        self._settings = settings_payload(plan)
        self._exec = Executor(plan.spec, self._settings, load_stored=self._stored)
        self._bar = tqdm(total=len(todo), desc=plan.spec.name, unit="cell", disable=not self.progress)
        states = self._initial_state(todo)
        self._prompts = plan.prompts
        self._threads = plan.spec.resources.torch_threads or max(1, int(plan.spec.resources.num_cpus))
        self._in_flight: dict = {}
        shardable = {n: self.shard and any(self._exec.stage(t.stage).shardable for t in st.tasks())
                     for n, st in states.items()}
        counts = replica_counts({n: self.placement[n] for n in states}, {n: st.task_count() for n, st in states.items()},
                                self.cluster, shardable)
        # largest models first, so big actors get their resources before the cluster fragments
        for name in sorted(states, key=lambda n: -plan.models[n].params):
            states[name].workers = [WorkerState() for _ in range(counts[name])]
            for ws in states[name].workers:
                self._spawn(states[name], ws)
        while self._in_flight:
            done, _ = ray.wait(list(self._in_flight), num_returns=1)
            st, ws, task = self._in_flight.pop(done[0])
            if task is None:
                self._probe_done(st, ws, done[0])
            elif isinstance(task, Shard):
                self._shard_done(st, ws, task, done[0])
            else:
                self._task_done(st, ws, task, done[0])
            self._submit(st)
            self._release_idle(st)
        self._bar.close()
        return len(self.failed)

    def _fail(self, st: ModelState, task: Task, result: dict) -> None:
        self._record(task, "failed", result, result.get("error"))
        self.failed.extend(c.id for c in task.cells)
        self.log(f"FAILED {len(task.cells)} {task.stage} cell(s) of {st.name} seed {task.seed}: {result.get('error')}")


# Ray >= 2.59 logs this warning on every local `ray.init()` whose RAY_AUTH_MODE is unset
# (ray/_private/authentication/authentication_token_setup.py, `_warn_token_auth_enabled`): the new
# local cluster gets token authentication, Ray's default, which is what we want, so the notice is noise.
# Only this one record is dropped; "Token authentication is disabled ..." and every other warning stay.
TOKEN_AUTH_BANNER = "Token authentication is enabled for this Ray cluster."
_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def _drop_token_auth_banner(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(TOKEN_AUTH_BANNER)


def quiet_token_auth_banner() -> None:
    """Keep Ray's token-authentication banner (TOKEN_AUTH_BANNER) off the terminal; idempotent."""
    logger = logging.getLogger(_AUTH_LOGGER)
    if _drop_token_auth_banner not in logger.filters:
        logger.addFilter(_drop_token_auth_banner)


def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Join `address` (or RAY_ADDRESS); otherwise start a local Ray. Returns True if we started it.

    An already initialised Ray (a notebook, a test cluster) is used as it is.
    """
    if ray.is_initialized():
        return False
    quiet_token_auth_banner()   # joining a cluster logs it too
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    return True
