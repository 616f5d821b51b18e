"""The Ray-free middle layer: from a plan to stage calls. `executor.py` is the one needs -> inputs ->
skip -> run loop that the Ray driver (`refusal_ray.cluster.driver`) and the in-process runner
(`refusal_ray.cluster.local`) share; `placement.py` the Ray resources a model's worker asks for.
`refusal_ray.plan`, `refusal_ray.grid` and `refusal_ray.session` belong to this layer too (kept at
their old paths)."""
