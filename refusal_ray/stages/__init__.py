"""The stages, one package each, in dependency order (directions -> select -> steer, capability; patch, scrub).

Each package's `__init__` declares `STAGE` (refusal_ray.stages.base.Stage): its spec block, its
cross-field checks, its cells and run (in `run.py`) and its read side (`read.py`). The grid, plan,
driver, session, spec and analysis read these declarations and know no stage by name. A new stage
is a new package here plus one entry below (and its tables' names in `refusal_ray/core/tables.py`).

`STAGES` is a registry (`StageList`): iterating gives the stages in dependency order;
`STAGES.register(stage)` / `STAGES.unregister(name)` add or remove one at run time (a test's
throwaway stage), after which `refusal_ray.spec` rebuilds its `Stages` block (`on_change`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from refusal_ray.core.tables import check_declared
from refusal_ray.stages.base import Stage
from refusal_ray.stages.capability import STAGE as CAPABILITY
from refusal_ray.stages.directions import STAGE as DIRECTIONS
from refusal_ray.stages.optimise import STAGE as OPTIMISE
from refusal_ray.stages.patch import STAGE as PATCH
from refusal_ray.stages.rank import STAGE as RANK
from refusal_ray.stages.rank import needing_optimise
from refusal_ray.stages.scrub import STAGE as SCRUB
from refusal_ray.stages.search import STAGE as SEARCH
from refusal_ray.stages.select import STAGE as SELECT
from refusal_ray.stages.steer import STAGE as STEER

# the order of the spec's `stages:` blocks, as before stages declared them (spec dumps and the JSON
# schema keep their field order); a stage not named here comes after these, in STAGES order
BLOCK_ORDER: tuple[str, ...] = ("directions", "select", "steer", "patch", "scrub", "capability")


class StageList(Sequence):
    """The registered stages in dependency order (a read-only sequence that `register` / `unregister`
    change in place, so every module's `STAGES` sees the change). `register` raises ValueError for a
    name already registered; `unregister` KeyError for an unknown one; `on_change(fn)` calls `fn()`
    after each change (the spec's Stages block, `STAGE_BY_NAME`, `TABLES`)."""

    def __init__(self, stages):
        self._stages: list[Stage] = list(stages)
        self._listeners: list[Callable[[], None]] = []

    def __getitem__(self, i):
        return tuple(self._stages)[i] if isinstance(i, slice) else self._stages[i]

    def __len__(self) -> int:
        return len(self._stages)

    def __iter__(self) -> Iterator[Stage]:
        return iter(list(self._stages))

    def __repr__(self) -> str:
        return f"StageList({[s.name for s in self._stages]})"

    def register(self, stage: Stage) -> Stage:
        if any(s.name == stage.name for s in self._stages):
            raise ValueError(f"stage {stage.name!r} is already registered")
        check_declared([stage])
        self._stages.append(stage)
        self._changed()
        return stage

    def unregister(self, name: str) -> Stage:
        stage = next((s for s in self._stages if s.name == name), None)
        if stage is None:
            raise KeyError(name)
        self._stages.remove(stage)
        self._changed()
        return stage

    def on_change(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    def by_block_order(self) -> list[Stage]:
        """The stages in the order of the spec's `stages:` blocks (BLOCK_ORDER, then the rest in STAGES order)."""
        rank = {name: i for i, name in enumerate(BLOCK_ORDER)}
        return sorted(self._stages, key=lambda s: rank.get(s.name, len(rank)))

    def _changed(self) -> None:
        for fn in self._listeners:
            fn()


STAGES: StageList = StageList((DIRECTIONS, SELECT, STEER, CAPABILITY, PATCH, SCRUB,
                               OPTIMISE,   # optimise: reads directions (and select)
                               RANK,   # rank: after select (and optimise) whose rows it reads
                               SEARCH))   # search: its studies read directions
needing_optimise(STAGES)   # stage rank also needs stage optimise when that is registered
STAGE_BY_NAME: dict[str, Stage] = {}
TABLES: tuple[str, ...] = ()


def _index() -> None:
    global TABLES
    STAGE_BY_NAME.clear()
    STAGE_BY_NAME.update({s.name: s for s in STAGES})
    TABLES = ("cells", *(t for s in STAGES for t in s.tables))


_index()
STAGES.on_change(_index)
check_declared(STAGES)   # the store knows the tables without importing the stages
