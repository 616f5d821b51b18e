"""Stage `capability` (interim: the declaration moves here from run.py)."""

from refusal_ray.stages.capability.run import *  # noqa: F401,F403
from refusal_ray.stages.capability.run import STAGE  # noqa: F401


def __getattr__(name):
    from refusal_ray.stages.capability import run

    return getattr(run, name)
