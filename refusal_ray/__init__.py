"""refusal-ray: distributed sweeps of refusal-direction experiments on Ray.

Public API (see DESIGN.md): `load_model`, `capture`, `read`.
"""

from refusal_ray.interventions import capture
from refusal_ray.models.loading import load_model
from refusal_ray.store import read

__all__ = ["load_model", "capture", "read", "__version__"]
__version__ = "0.1.0"
