"""The driver: plan -> ModelWorker actors -> rows streamed into the store.

Cells are grouped by (model, seed). Each model gets one actor that loads it once and serves
all its seeds: a seed's directions cell runs first, and its steering cells are dispatched as
soon as the directions are stored. At most two batches are in flight per actor; results are
written to the store as they arrive (atomic files), so a crash never loses finished cells. A
failed batch is retried up to `MAX_ATTEMPTS` times, then its cells are stored as failed with
their error and the run goes on. When a model's work is done its actor is killed, which is
the only reliable way to free its memory.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

import ray
from tqdm import tqdm

from refusal_ray.grid import Cell
from refusal_ray.plan import Plan
from refusal_ray.session import split_for_seed, steering_inputs
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
class ModelState:
    name: str
    worker: object | None = None
    ready: deque = field(default_factory=deque)                       # tasks that can run now
    waiting: dict = field(default_factory=lambda: defaultdict(list))  # seed -> steer tasks needing directions
    directions: dict = field(default_factory=dict)                    # seed -> (vectors, best)
    in_flight: int = 0

    def idle(self) -> bool:
        return not self.ready and not self.in_flight and not any(self.waiting.values())


def worker_options(plan: Plan, name: str) -> dict:
    """Ray resources for one model's actor: CPUs, and a GPU when the cluster has any."""
    res = plan.spec.resources
    gpus = res.num_gpus
    if gpus == "auto":
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return {"num_cpus": res.num_cpus, "num_gpus": gpus, "max_restarts": 1, "max_task_retries": 0}


def model_payload(plan: Plan, name: str) -> dict:
    m = next(m for m in plan.spec.models if m.name == name)
    payload = m.model_dump(mode="json")
    if m.path is not None:
        payload["abs_path"] = os.path.abspath(m.path)
    return payload


def settings_payload(plan: Plan) -> dict:
    s = plan.spec
    return {"directions": s.stages.directions.model_dump(mode="json"),
            "steer": s.stages.steer.model_dump(mode="json") if s.stages.steer else None,
            "generation": s.generation.model_dump(mode="json"), "judge": s.judge.model_dump(mode="json")}


def cells_per_task(plan: Plan) -> int:
    """Steering cells per actor call: about four full `generate` chunks of rows."""
    steer = plan.spec.stages.steer
    rows_per_cell = 2 * plan.spec.data.n_test
    return max(1, (4 * steer.batch_size) // rows_per_cell)


class Driver:
    """Runs the not-yet-done cells of a plan on Ray and writes everything to the store."""

    def __init__(self, plan: Plan, store: Store, progress: bool = True, log=print):
        self.plan, self.store, self.log = plan, store, log
        self.progress = progress
        self.failed: list[str] = []

    # -- bookkeeping ---------------------------------------------------------------------------
    def _record(self, task: Task, status: str, result: dict, error: str | None = None) -> None:
        now = time.time()
        rows = [{**c.row(), "status": status, "error": error, "attempts": task.attempts,
                 "node": result.get("node"), "device": result.get("device"),
                 "started": task.started, "finished": now, "seconds": result.get("seconds")}
                for c in task.cells]
        self.store.write("cells", task.cells[0].model, [{k: v for k, v in r.items() if k != "model"} for r in rows])

    def _write_tables(self, model: str, tables: dict[str, list[dict]]) -> None:
        for table, rows in tables.items():
            self.store.write(table, model, rows)

    # -- planning of tasks ----------------------------------------------------------------------
    def _initial_state(self, todo: list[Cell]) -> dict[str, ModelState]:
        states: dict[str, ModelState] = {}
        per_task = cells_per_task(self.plan) if self.plan.spec.stages.steer else 1
        groups: dict[tuple[str, int], list[Cell]] = defaultdict(list)
        for c in todo:
            groups[(c.model, c.seed)].append(c)
        stored_dirs = self.store.read("directions")
        steer_cfg = self.plan.spec.stages.steer
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
                st.directions[seed] = steering_inputs(rows.to_dict("records"), "resid_pre", steer_cfg.position)
                st.ready.extend(tasks)
        return states

    # -- the loop ------------------------------------------------------------------------------
    def run(self, todo: list[Cell]) -> int:
        """Run `todo`; returns the number of failed cells."""
        from refusal_ray.cluster.worker import ModelWorker

        states = self._initial_state(todo)
        plan = self.plan
        prompts = {seed: split_for_seed(plan.frames, plan.spec.data, seed) for seed in plan.spec.seeds}
        settings = settings_payload(plan)
        threads = plan.spec.resources.torch_threads or max(1, int(plan.spec.resources.num_cpus))
        # largest models first, so big actors get their resources before the cluster fragments
        order = sorted(states, key=lambda n: -plan.models[n].params)
        for name in order:
            states[name].worker = ModelWorker.options(**worker_options(plan, name)).remote(
                model_payload(plan, name), prompts, settings, threads)
        in_flight: dict = {}
        bar = tqdm(total=len(todo), desc=f"{plan.spec.name}", unit="cell", disable=not self.progress)

        def submit(st: ModelState) -> None:
            while st.ready and st.in_flight < MAX_IN_FLIGHT:
                task = st.ready.popleft()
                task.attempts += 1
                task.started = time.time()
                vecs, best = st.directions.get(task.seed, (None, None))
                ref = st.worker.run.remote(task.stage, task.cells, vecs, best)
                in_flight[ref] = (st, task)
                st.in_flight += 1

        for name in order:
            submit(states[name])
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            st, task = in_flight.pop(done[0])
            st.in_flight -= 1
            try:
                result = ray.get(done[0])
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                result = {"ok": False, "error": f"worker died: {type(e).__name__}"}
            if result["ok"]:
                self._write_tables(st.name, result["tables"])
                self._record(task, "done", result)
                bar.update(len(task.cells))
                if task.stage == "directions":
                    st.directions[task.seed] = steering_inputs(
                        result["tables"]["directions"], "resid_pre",
                        plan.spec.stages.steer.position if plan.spec.stages.steer else -1)
                    st.ready.extend(st.waiting.pop(task.seed, []))
            elif task.attempts < MAX_ATTEMPTS:
                self.log(f"retrying {task.stage} batch of {st.name} seed {task.seed} "
                         f"(attempt {task.attempts}): {result['error']}")
                st.ready.appendleft(task)
            else:
                self._fail(st, task, result)
                bar.update(len(task.cells))
                if task.stage == "directions":
                    for dep in st.waiting.pop(task.seed, []):
                        self._fail(st, dep, {"error": f"directions failed: {result['error']}"})
                        bar.update(len(dep.cells))
            submit(st)
            if st.idle() and st.worker is not None:
                ray.kill(st.worker)
                st.worker = None
        bar.close()
        return len(self.failed)

    def _fail(self, st: ModelState, task: Task, result: dict) -> None:
        self._record(task, "failed", result, result.get("error"))
        self.failed.extend(c.id for c in task.cells)
        self.log(f"FAILED {len(task.cells)} {task.stage} cell(s) of {st.name} seed {task.seed}: {result.get('error')}")


def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Join `address` (or RAY_ADDRESS); otherwise start a local Ray. Returns True if we started it."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    return True
