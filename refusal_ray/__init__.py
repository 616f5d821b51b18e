"""refusal-ray: distributed sweeps of refusal-direction experiments on Ray.

Public API (see DESIGN.md): `load_model`, `capture`, `read`. They are imported on first use, so
`python -m refusal_ray.cluster.head` and the CLI's help do not pay for torch and pandas.
"""

from __future__ import annotations

import importlib

__all__ = ["load_model", "capture", "read", "__version__"]
__version__ = "0.1.0"

_LAZY = {"load_model": "refusal_ray.models.loading", "capture": "refusal_ray.interventions",
         "read": "refusal_ray.store"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'refusal_ray' has no attribute {name!r}")
