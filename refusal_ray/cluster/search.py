"""Stage search on Ray: a pool of one model's `ModelWorker` actors for the study's driver
(`refusal_ray.stages.search.study`, Optuna ask/tell there; the actors keep the model loaded across trials).

Replicas follow the cluster's resources: as many actors as the model's placement fits (`num_cpus` / `num_gpus` /
custom resources of `refusal_ray.pipeline.placement`), capped by `stages.search.concurrency` when set. A call
goes to the actor with the fewest calls in flight; a dead actor answers its calls as failed trials (the study
records them as `failed` and asks new ones), the rest of the study goes on.
"""

from __future__ import annotations

import math

import ray

from refusal_ray.errors import SpecError
from refusal_ray.plan import Plan, model_payload, settings_payload


def fitting_replicas(placement, cluster: dict[str, float]) -> int:
    """How many actors of this placement the cluster holds at once (at least 1)."""
    need = {"CPU": placement.num_cpus, "GPU": placement.num_gpus, **placement.resources}
    fits = [math.floor(cluster.get(k, 0) / v) for k, v in need.items() if v > 0]
    return max(1, min(fits) if fits else 1)


class RayPool:
    """`replicas` actors of one model; `slots` calls in flight (one per actor unless `slots` says more)."""

    def __init__(self, plan: Plan, name: str, placement, replicas: int, slots: int | None = None,
                 torch_threads: int | None = None):
        from refusal_ray.cluster.worker import ModelWorker

        prompts, settings = ray.put(plan.prompts), settings_payload(plan)
        self.actors = [ModelWorker.options(**placement.ray_options(), max_restarts=0).remote(
            model_payload(plan, name, placement), prompts, settings, torch_threads) for _ in range(replicas)]
        infos = ray.get([a.info.remote() for a in self.actors])
        bad = [i["error"] for i in infos if i.get("error")]
        if bad:
            self.close()
            raise RuntimeError(f"model {name!r}: {bad[0]}")
        self.slots = slots or replicas
        self._load = {i: 0 for i in range(replicas)}
        self._pending: dict = {}
        self._n = 0

    def submit(self, payload) -> int:
        i = min(self._load, key=lambda k: (self._load[k], k))
        self._load[i] += 1
        self._n += 1
        self._pending[self.actors[i].run.remote("search", [], payload)] = (self._n, i)
        return self._n

    def next(self):
        ready, _ = ray.wait(list(self._pending), num_returns=1)
        token, i = self._pending.pop(ready[0])
        self._load[i] -= 1
        try:
            return token, ray.get(ready[0])
        except ray.exceptions.RayError as e:   # a dead actor: its calls fail, the study goes on
            return token, {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []


def run_search(plan: Plan, store, address: str | None = None, log=print, stop_after: int | None = None,
               replicas: int | None = None) -> list[dict]:
    """Every study of the plan on Ray (the directions must be in `store` already). Returns the study summaries
    (`refusal_ray.stages.search.study.search`). Raises SpecError for a model the cluster cannot place."""
    from refusal_ray.cluster.driver import cluster_placements, connect
    from refusal_ray.stages.search.study import search

    if plan.spec.stages.search is None:
        raise SpecError(plan.spec_file, "stages.search", "the spec has no search block")
    started_here = connect(address)
    try:
        cluster, where = cluster_placements(plan)
        cap = plan.spec.stages.search.concurrency
        threads = plan.spec.resources.torch_threads or max(1, int(plan.spec.resources.num_cpus))

        def pools(name):
            n = replicas or min(fitting_replicas(where[name], cluster), cap or 10 ** 6)
            log(f"  {name}: {n} actor(s), {where[name].describe()} each")
            return RayPool(plan, name, where[name], n, cap, threads)

        return search(plan, store, pools, log, stop_after)
    finally:
        if started_here:
            ray.shutdown()
