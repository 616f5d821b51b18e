"""Interventions as operators: one module per operator, reached through the registry `OPS`.

`refusal_ray.ops.base` holds the contract (`Operator`), the registry and what operators share
(`SteerInputs`, `Chunk`, random controls). Every other module of this package (names starting with
"_" aside) is imported here, in name order, so that each registers its operator: adding an
operator is adding its module (README "Adding an operator").
"""

from __future__ import annotations

import importlib
import pkgutil

from refusal_ray.ops.base import OPS, Operator, get, on_change, register, unregister

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _m.name != "base" and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["OPS", "Operator", "get", "on_change", "register", "unregister"]
