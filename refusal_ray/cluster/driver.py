"""The driver: plan -> ModelWorker actors -> rows streamed into the store.

Cells are grouped by (model, seed). Each model gets one or more actors (replicas), each loading
it once and serving any of its seeds: a seed's directions cell runs first, and its steering cells
are dispatched to any replica as soon as the directions are stored (the vectors travel with each
batch, so replicas hold no state). At most two batches are in flight per actor; results are
written to the store as they arrive (atomic files), so a crash never loses finished cells. A
failed batch is retried up to `MAX_ATTEMPTS` times, then its cells are stored as failed with
their error and the run goes on. After a worker crash its queue waits for a readiness probe
(Ray restarts the actor; a permanently dead one is replaced). An actor with nothing left to do is
killed at once, which is the only reliable way to free its memory for the next model.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

import ray
from tqdm import tqdm

from refusal_ray.cluster.placement import Placement, place
from refusal_ray.grid import Cell
from refusal_ray.plan import Plan, offload_mode
from refusal_ray.session import steering_inputs
from refusal_ray.store import Store

MAX_ATTEMPTS = 3
MAX_IN_FLIGHT = 2


@dataclass
class Task:
    stage: str
    seed: int
    cells: list[Cell]
    attempts: int = 0
    started: float = field(default_factory=time.time)


@dataclass
class WorkerState:
    """One actor (replica) of a model."""

    actor: object | None = None
    in_flight: int = 0
    probe: object | None = None       # pending readiness check; no batch is sent while set
    replacements: int = 0

    def can_take(self) -> bool:
        return self.actor is not None and self.probe is None and self.in_flight < MAX_IN_FLIGHT


@dataclass
class ModelState:
    name: str
    workers: list = field(default_factory=list)                      # WorkerState per replica
    ready: deque = field(default_factory=deque)                       # tasks that can run now
    waiting: dict = field(default_factory=lambda: defaultdict(list))  # seed -> steer tasks needing directions
    directions: dict = field(default_factory=dict)                    # seed -> (vectors, best)

    def no_work_left(self) -> bool:
        return not self.ready and not any(self.waiting.values())

    def task_count(self) -> int:
        return len(self.ready) + sum(len(v) for v in self.waiting.values())


def placements(plan: Plan, cluster: dict[str, float]) -> dict[str, Placement]:
    """{model name: Placement} for the models of a plan on a cluster. Raises PlacementError."""
    res = plan.spec.resources
    return {m.name: place(m, plan.models[m.name].params, plan.models[m.name].estimate_bytes, res, cluster,
                          res.highmem_params) for m in plan.spec.models}


def replica_counts(placement: dict[str, Placement], tasks: dict[str, int], cluster: dict[str, float]) -> dict[str, int]:
    """Actors per model: one each, plus spare concurrent slots given to the models with the most
    batches per replica (never fewer than two batches per replica)."""
    counts = {name: 1 for name in placement}
    slots = []
    for p in placement.values():
        need = {"CPU": p.num_cpus, "GPU": p.num_gpus, **p.resources}
        slots.append(min(math.floor(cluster.get(k, 0) / v) for k, v in need.items() if v > 0))
    spare = (min(slots) if slots else 0) - len(counts)
    while spare > 0:
        name = max(counts, key=lambda n: tasks.get(n, 0) / counts[n])
        if tasks.get(name, 0) / (counts[name] + 1) < 2:
            break
        counts[name] += 1
        spare -= 1
    return counts


def model_payload(plan: Plan, name: str, placement: Placement) -> dict:
    m = next(m for m in plan.spec.models if m.name == name)
    payload = m.model_dump(mode="json")
    if m.path is not None:
        payload["abs_path"] = os.path.abspath(m.path)
    if m.device == "auto":
        payload["device"] = placement.device
    payload["offload"] = offload_mode(m, plan.models[name].params, plan.spec.resources.highmem_params)
    return payload


def settings_payload(plan: Plan) -> dict:
    s = plan.spec
    return {"directions": s.stages.directions.model_dump(mode="json"),
            "steer": s.stages.steer.model_dump(mode="json") if s.stages.steer else None,
            "patch": s.stages.patch.model_dump(mode="json") if s.stages.patch else None,
            "scrub": s.stages.scrub.model_dump(mode="json") if s.stages.scrub else None,
            "generation": s.generation.model_dump(mode="json"), "judge": s.judge.model_dump(mode="json")}


def cells_per_task(plan: Plan) -> int:
    """Steering cells per actor call: about four full `generate` chunks of rows."""
    steer = plan.spec.stages.steer
    rows_per_cell = 2 * plan.spec.data.n_test
    return max(1, (4 * steer.batch_size) // rows_per_cell)


class Driver:
    """Runs the not-yet-done cells of a plan on Ray and writes everything to the store."""

    def __init__(self, plan: Plan, store: Store, placement: dict[str, Placement], cluster: dict | None = None,
                 progress: bool = True, log=print):
        self.plan, self.store, self.log, self.placement = plan, store, log, placement
        self.cluster = cluster or {}
        self.progress = progress
        self.failed: list[str] = []

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

    def _steering_inputs(self, direction_rows: list[dict]):
        """({layer: vector}, best layer) at resid_pre and the steering position."""
        steer = self.plan.spec.stages.steer
        return steering_inputs(direction_rows, "resid_pre", steer.position if steer else -1)

    # -- planning of tasks ----------------------------------------------------------------------
    def _initial_state(self, todo: list[Cell]) -> dict[str, ModelState]:
        states: dict[str, ModelState] = {}
        per_task = cells_per_task(self.plan) if self.plan.spec.stages.steer else 1
        groups: dict[tuple[str, int], list[Cell]] = defaultdict(list)
        for c in todo:
            groups[(c.model, c.seed)].append(c)
        stored_dirs = self.store.read("directions")
        for (model, seed), cells in groups.items():
            st = states.setdefault(model, ModelState(model))
            dirs = [c for c in cells if c.stage == "directions"]
            steer = [c for c in cells if c.stage == "steer"]
            tasks = [Task("steer", seed, steer[i: i + per_task]) for i in range(0, len(steer), per_task)]
            if dirs:
                st.ready.append(Task("directions", seed, dirs))
                st.waiting[seed].extend(tasks)
            elif tasks:
                rows = stored_dirs[(stored_dirs["model"] == model) & (stored_dirs["seed"] == seed)]
                st.directions[seed] = self._steering_inputs(rows.to_dict("records"))
                st.ready.extend(tasks)
            # circuit stages need no directions: one patch task per cell, the scrub hypotheses of a seed together
            st.ready.extend(Task("patch", seed, [c]) for c in cells if c.stage == "patch")
            scrub = [c for c in cells if c.stage == "scrub"]
            if scrub:
                st.ready.append(Task("scrub", seed, scrub))
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
        for ws in st.workers:
            while st.ready and ws.can_take():
                task = st.ready.popleft()
                task.attempts += 1
                task.started = time.time()
                vecs, best = st.directions.get(task.seed, (None, None))
                self._in_flight[ws.actor.run.remote(task.stage, task.cells, vecs, best)] = (st, ws, task)
                ws.in_flight += 1

    def _probe_done(self, st: ModelState, ws: WorkerState, ref) -> None:
        """The actor answered (ready) or is gone for good (replace it, at most MAX_ATTEMPTS times)."""
        ws.probe = None
        try:
            ray.get(ref)
        except ray.exceptions.ActorUnavailableError:   # still restarting: ask again
            time.sleep(0.5)
            self._probe(st, ws)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
            ws.replacements += 1
            if ws.replacements <= MAX_ATTEMPTS:
                self.log(f"replacing a worker of {st.name}: {type(e).__name__}")
                self._spawn(st, ws)
                return
            ws.actor = None
            if not any(w.actor is not None for w in st.workers):  # no replica left: the model's work fails
                error = {"error": f"worker cannot start: {type(e).__name__}: {e}".splitlines()[0]}
                for task in [*st.ready, *(t for ts in st.waiting.values() for t in ts)]:
                    self._fail(st, task, error)
                    self._bar.update(len(task.cells))
                st.ready.clear()
                st.waiting.clear()

    def _task_done(self, st: ModelState, ws: WorkerState, task: Task, ref) -> None:
        ws.in_flight -= 1
        try:
            result = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
            result = {"ok": False, "error": f"worker died: {type(e).__name__}"}
            if ws.probe is None and ws.actor is not None:
                self._probe(st, ws)  # hold this replica until the restarted (or a new) actor answers
        if result["ok"]:
            self._write_tables(st.name, result["tables"])
            self._record(task, "done", result)
            self._bar.update(len(task.cells))
            if task.stage == "directions":
                st.directions[task.seed] = self._steering_inputs(result["tables"]["directions"])
                st.ready.extend(st.waiting.pop(task.seed, []))
        elif task.attempts < MAX_ATTEMPTS:
            self.log(f"retrying {task.stage} batch of {st.name} seed {task.seed} "
                     f"(attempt {task.attempts}): {result['error']}")
            st.ready.appendleft(task)
        else:
            self._fail(st, task, result)
            self._bar.update(len(task.cells))
            if task.stage == "directions":
                for dep in st.waiting.pop(task.seed, []):
                    self._fail(st, dep, {"error": f"directions failed: {result['error']}"})
                    self._bar.update(len(dep.cells))

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
        states = self._initial_state(todo)
        self._prompts = plan.prompts
        self._settings = settings_payload(plan)
        self._threads = plan.spec.resources.torch_threads or max(1, int(plan.spec.resources.num_cpus))
        self._in_flight: dict = {}
        self._bar = tqdm(total=len(todo), desc=plan.spec.name, unit="cell", disable=not self.progress)
        counts = replica_counts({n: self.placement[n] for n in states}, {n: st.task_count() for n, st in states.items()},
                                self.cluster)
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


def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Join `address` (or RAY_ADDRESS); otherwise start a local Ray. Returns True if we started it.

    An already initialised Ray (a notebook, a test cluster) is used as it is.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    return True
