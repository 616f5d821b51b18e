"""Placement: the Ray resources each model's worker asks for. A pure function of the spec, the
plan's memory estimate and the cluster's resources, so `plan` can print it and tests can check it.

Rule (a model block's `resources` overrides any part of it):
  - the cluster has GPUs: a GPU share; models under `SHARE_BELOW_BYTES` take `GPU_SHARE` of one
    (several toy models share a GPU), bigger ones a whole GPU;
  - no GPUs (or `num_gpus: 0`): CPU only; models of `highmem_params` or more parameters (default 3B)
    also ask for the custom resource `highmem` and set Ray's `memory` to their estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SHARE_BELOW_BYTES = 2 * 2**30
GPU_SHARE = 0.25


class PlacementError(ValueError):
    pass


@dataclass(frozen=True)
class Placement:
    num_cpus: float
    num_gpus: float
    resources: dict = field(default_factory=dict)
    memory: int | None = None  # bytes, Ray's `memory` resource (CPU workers)

    @property
    def device(self) -> str:
        return "auto" if self.num_gpus > 0 else "cpu"  # Ray no longer hides GPUs from num_gpus=0 actors

    def describe(self) -> str:
        text = f"{self.num_gpus:g} GPU + {self.num_cpus:g} CPU" if self.num_gpus else f"{self.num_cpus:g} CPU"
        text += "".join(f" + {k}" for k in self.resources)
        if not self.memory:
            return text
        mem = f"{self.memory / 2**30:.1f} GiB" if self.memory >= 2**30 else f"{self.memory / 2**20:.1f} MiB"
        return f"{text}, memory {mem}"

    def ray_options(self) -> dict:
        opts = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            opts["resources"] = dict(self.resources)
        if self.memory:
            opts["memory"] = int(self.memory)
        return opts


def place(model, params: int, estimate_bytes: int, defaults, cluster: dict[str, float],
          highmem_params: float = 3e9, check: bool = True) -> Placement:
    """Placement of one model. `model`: ModelSpec; `defaults`: the spec's Resources block;
    `cluster`: `ray.cluster_resources()` (or a description of the target cluster).

    Raises PlacementError when the cluster cannot ever host the worker (instead of pending forever).
    """
    own = model.resources
    num_cpus = own.num_cpus if own and own.num_cpus is not None else defaults.num_cpus
    num_gpus = own.num_gpus if own and own.num_gpus is not None else defaults.num_gpus
    if num_gpus == "auto":
        if cluster.get("GPU", 0) >= 1:
            num_gpus = GPU_SHARE if estimate_bytes < SHARE_BELOW_BYTES else 1
        else:
            num_gpus = 0
    highmem = own.highmem if own and own.highmem is not None else (num_gpus == 0 and params >= highmem_params)
    placement = Placement(num_cpus, float(num_gpus), {"highmem": 1} if highmem else {},
                          estimate_bytes if num_gpus == 0 else None)
    if check:
        _check_feasible(model.name, placement, cluster)
    return placement


def _check_feasible(name: str, p: Placement, cluster: dict[str, float]) -> None:
    need = {"CPU": p.num_cpus, "GPU": p.num_gpus, **p.resources}
    for key, amount in need.items():
        if amount and cluster.get(key, 0) < amount:
            raise PlacementError(f"model {name!r} needs {amount:g} {key} but the cluster has "
                                 f"{cluster.get(key, 0):g}; change its resources or the cluster")
