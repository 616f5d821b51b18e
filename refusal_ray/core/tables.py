"""The store's table names, below the stages that write them, so the store can tell a table no cell
wrote yet (read back empty) from a typo without importing the stages (an upward import).

`refusal_ray.stages` checks at import that every stage's `tables` are listed here: a new stage's
table is one more name below.
"""

from __future__ import annotations

STAGE_TABLES: tuple[str, ...] = ("directions", "selection", "steering", "completions", "capability", "patching",
                                 "scrubbing",
                                 "rank", "rank_bases",   # stage rank
                                 "optimised",   # stage optimise
                                 "trials", "pareto")   # stage search
TABLES: tuple[str, ...] = ("cells", *STAGE_TABLES, "judgements")   # every table a store can hold (and summary)


def check_declared(stages) -> None:
    """Raise RuntimeError naming a stage whose table is not in STAGE_TABLES."""
    for stage in stages:
        for table in stage.tables:
            if table not in STAGE_TABLES:
                raise RuntimeError(f"stage {stage.name!r} writes table {table!r}, which refusal_ray/core/tables.py "
                                   f"does not list: add it to STAGE_TABLES")
