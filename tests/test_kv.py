"""models.kv: the KV-cache keyword across transformers 5.x (past_key_values -> cache)."""

from __future__ import annotations

from pathlib import Path
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import transformers
from packaging.version import Version

from refusal_ray.models.kv import cache_kwarg, returned_cache, with_cache
from refusal_ray.models.loading import load_model

MODEL = Path(__file__).resolve().parents[1] / "data" / "models" / "toy-planted-k1"


class _Old(torch.nn.Module):
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):  # transformers before the rename
        return input_ids


class _New(torch.nn.Module):
    def forward(self, input_ids=None, cache=None, use_cache=None):
        return input_ids


def test_the_keyword_follows_the_forward_signature():
    assert cache_kwarg(_Old()) == "past_key_values" and cache_kwarg(_New()) == "cache"
    assert with_cache(_Old(), "C") == {"past_key_values": "C", "use_cache": True}
    assert with_cache(_New(), "C") == {"cache": "C", "use_cache": True}
    assert returned_cache(SimpleNamespace(past_key_values="old")) == "old"
    assert returned_cache(SimpleNamespace(cache="new", past_key_values="alias")) == "new"
    assert returned_cache(_Out(cache=None)) is None                     # a None field, not the deprecated alias


@dataclass
class _Out:
    cache: object = None

    @property
    def past_key_values(self):
        raise AssertionError("the deprecated alias was read")


def test_a_cached_continuation_equals_the_full_forward():
    """Prefill, then the rest on the returned cache under the model's own keyword: the logits of the full
    sequence (the judge's and stage patch's use)."""
    lm = load_model(str(MODEL))
    if Version(transformers.__version__) >= Version("5.25"):
        assert cache_kwarg(lm.model) == "cache"                          # the renamed keyword, no deprecation
    ids = torch.tensor([[5, 17, 40, 33, 9, 12]])
    with torch.no_grad():
        full = lm.model(input_ids=ids).logits
        out = lm.model(input_ids=ids[:, :4], use_cache=True)
        rest = lm.model(input_ids=ids[:, 4:], **with_cache(lm.model, returned_cache(out))).logits
    torch.testing.assert_close(rest, full[:, 4:], atol=1e-5, rtol=1e-5)
