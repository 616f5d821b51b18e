"""Judges: substring (inline, in every steering row), and named judges of five kinds that label stored
completions into the `judgements` table (see README, "Judges").

  substring.py  phrase matching (the inline judge; also a named kind)
  rubric.py     the compliance / coherence rubric: prompt and parse rules (chat, openai)
  hf.py         local Hugging Face judges: chat, classifier, guard
  endpoint.py   OpenAI-compatible endpoints (bounded concurrency, retries, rate limit)
  config.py     the spec blocks; base.py the Item / Verdict types and content hashes
  calibrate.py  agreement with human labels
"""

from refusal_ray.judges.base import Item, Verdict
from refusal_ray.judges.substring import (ARDITI_PHRASES, AUDIT_PHRASES, DEFAULT_PHRASES, SubstringJudge,
                                          exact_match, normalize)

__all__ = ["ARDITI_PHRASES", "AUDIT_PHRASES", "DEFAULT_PHRASES", "Item", "SubstringJudge", "Verdict",
           "exact_match", "make_judge", "normalize"]


def make_judge(cfg):
    """A judge object from its spec block (refusal_ray.judges.config). Local models load here."""
    if cfg.kind == "substring":
        return SubstringJudge(cfg.phrases, name=cfg.name, hash=cfg.judge_hash())
    if cfg.kind == "openai":
        from refusal_ray.judges.endpoint import EndpointJudge

        return EndpointJudge(cfg)
    from refusal_ray.judges import hf

    return {"chat": hf.ChatJudge, "classifier": hf.ClassifierJudge, "guard": hf.GuardJudge}[cfg.kind](cfg)
