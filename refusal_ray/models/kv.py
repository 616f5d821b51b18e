"""The KV cache's keyword across transformers 5.x: `past_key_values` was renamed `cache` (deprecated alias
until 5.40, where it is removed). One place decides which name a model's forward takes and reads the cache
back from its output, so call sites never name either."""

from __future__ import annotations

import functools
import inspect


def cache_kwarg(model) -> str:
    """The name `model.forward` takes the KV cache under: "cache" (transformers >= the rename) or
    "past_key_values" (earlier 5.x)."""
    return _kwarg(type(model))


@functools.lru_cache(maxsize=None)
def _kwarg(cls) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def with_cache(model, cache) -> dict:
    """Forward kwargs passing `cache` (a transformers Cache) under the model's name for it, use_cache on."""
    return {cache_kwarg(model): cache, "use_cache": True}


def returned_cache(output):
    """The KV cache a forward returned: `output.cache` where the output class has that field (None when no
    cache was asked for), else `output.past_key_values` (before the rename)."""
    fields = getattr(output, "__dataclass_fields__", None)     # transformers' ModelOutput is a dataclass
    has_cache = "cache" in fields if fields is not None else hasattr(output, "cache")
    return output.cache if has_cache else output.past_key_values   # None too: the alias would log a warning
