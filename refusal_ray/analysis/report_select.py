"""Figures and tables of stage select for the report, now its read module's
(`refusal_ray.stages.select.read`); re-exported here so existing imports keep working."""

from refusal_ray.stages.select.read import SCORES, plot_selection, selection_table  # noqa: F401
