"""Transitional: the old home of hooks that now live in the stages' declarations. Only
`refusal_tokens` (now `refusal_ray.stages.base.refusal_tokens`) is left, for stage select's import;
this module goes when select imports it from `stages.base`."""

from refusal_ray.stages.base import refusal_tokens

__all__ = ["refusal_tokens"]
