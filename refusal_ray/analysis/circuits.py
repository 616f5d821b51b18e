"""Summaries of the circuit stages, now their read modules' (`refusal_ray.stages.patch.read`: recovery
per site with intervals, the attribution screen's agreement; `refusal_ray.stages.scrub.read`: scrubbing
verdicts pooled over seeds). Re-exported here so existing imports keep working."""

from __future__ import annotations

import pandas as pd

from refusal_ray.stages.patch.read import (COMPONENTS, SITE_KEYS, _tinterval, attribution_agreement,  # noqa: F401
                                           patch_columns, site_recovery)
from refusal_ray.stages.scrub.read import scrub_columns, scrub_verdicts  # noqa: F401


def circuit_columns(model: str, sites: pd.DataFrame, verdicts: pd.DataFrame) -> dict:
    """Summary-table columns of one model: patch's (`patch_columns`: the top component, its interval,
    the screen's rank correlation) then scrub's (`scrub_columns`: each hypothesis' faithfulness and verdict)."""
    return patch_columns(model, sites) | scrub_columns(model, verdicts)
