"""The stages, one module each, in dependency order (directions -> select -> steer, capability; patch, scrub).

Each module declares `STAGE` (refusal_ray.stages.base.Stage); the grid, plan, driver, session
and store read these declarations and know no stage by name. A new stage is a new module here
plus one entry below (and its tables' names in `refusal_ray/core/tables.py`).
"""

from refusal_ray.core.tables import check_declared
from refusal_ray.stages._pending import adopt
from refusal_ray.stages.base import Stage
from refusal_ray.stages.capability import STAGE as CAPABILITY
from refusal_ray.stages.directions import STAGE as DIRECTIONS
from refusal_ray.stages.patch import STAGE as PATCH
from refusal_ray.stages.scrub import STAGE as SCRUB
from refusal_ray.stages.select import STAGE as SELECT
from refusal_ray.stages.steer import STAGE as STEER

STAGES: tuple[Stage, ...] = tuple(adopt(s) for s in (DIRECTIONS, SELECT, STEER, CAPABILITY, PATCH, SCRUB))
STAGE_BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
TABLES: tuple[str, ...] = ("cells", *(t for s in STAGES for t in s.tables))
check_declared(STAGES)   # the store knows the tables without importing the stages
