"""Stage `steer` (interim: the declaration moves here from run.py)."""

from refusal_ray.stages.steer.run import *  # noqa: F401,F403
from refusal_ray.stages.steer.run import STAGE  # noqa: F401


def __getattr__(name):
    from refusal_ray.stages.steer import run

    return getattr(run, name)
