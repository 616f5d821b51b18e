"""Figures and tables of the circuit stages for the report, now their read modules'
(`refusal_ray.stages.patch.read`: recovery maps, top sites; `refusal_ray.stages.scrub.read`:
faithfulness bars); re-exported here so existing imports keep working."""

from refusal_ray.stages.patch.read import KIND_ORDER, plot_recovery, top_sites_table  # noqa: F401
from refusal_ray.stages.scrub.read import plot_faithfulness  # noqa: F401
