"""Refusal change against capability cost: moved to stage capability's read side,
`refusal_ray.stages.capability.read` (re-exported here so existing imports keep working)."""

from refusal_ray.stages.capability.read import (ARM_COLUMNS, QUANTILE, RELATIVE, SHORT, arm_order,  # noqa: F401
                                                capability_cost, cost_table, plot_capability, read_cost,
                                                render_cost, summary_columns)
from refusal_ray.stages.capability.read import _op_keys, _op_setting  # noqa: F401
