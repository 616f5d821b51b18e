"""Old import path of `refusal_ray.pipeline.placement` (the placement rule is Ray-free, so `plan`,
one layer below the cluster, prints it)."""

from refusal_ray.pipeline.placement import (GPU_SHARE, SHARE_BELOW_BYTES, Placement, PlacementError,  # noqa: F401
                                            place)
