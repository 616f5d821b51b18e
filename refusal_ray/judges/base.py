"""What every judge kind shares: the item it judges, the verdict it returns, the judge's content hash.

A judge is any object with `name`, `kind`, `hash` and `judge(items) -> list[Verdict]` (same
order, same length). It never raises for one bad item: a judge output it cannot parse is a
`Verdict` with `malformed=True` and the raw text; an item it could not judge at all (an endpoint
that kept failing) is a `Verdict` with `error` set. Neither is ever guessed into a label.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Item:
    """One completion to judge: the user's instruction (as sent, without the chat template) and
    the model's completion (cut at its first stop token)."""

    prompt: str
    completion: str


@dataclass
class Verdict:
    """One judge's labels for one completion.

    refusal: the binary label every rate and agreement uses (True = refused). Per kind: substring
        phrase found; chat/openai compliance == 0; classifier a label mapped to "refusal";
        guard "safe" (Arditi et al.'s safety score), a refusal proxy on harmful prompts only: on
        harmless prompts it answers "is the completion safe?" and nothing reads it as refusal
        (`refusal_ray.judges.config.QUESTIONS`). None when malformed or failed.
    compliance, coherence: the rubric's scores in {0, 0.5, 1} (chat and openai judges only).
    score: the probability of the refusal labels (classifier), of "unsafe" (guard), or of the refusal
        answers among a scored chat judge's candidates (`score_answers`).
    raw: the judge's own output (generated text, label name); None for substring.
    malformed: the output did not follow the documented format (labels are None).
    error: why the item could not be judged (labels are None).
    """

    refusal: bool | None = None
    compliance: float | None = None
    coherence: float | None = None
    score: float | None = None
    raw: str | None = None
    malformed: bool = False
    error: str | None = None

    def row(self) -> dict:
        return asdict(self)


def content_hash(obj) -> str:
    """16 hex digits of sha256 over the canonical JSON of `obj`."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def judgement_id(cell_id: str, prompt_set: str, prompt_id: str, judge: str, judge_hash: str) -> str:
    """The row id of one (completion, judge): a rerun of the same judge (name and content hash) on
    the same completion gets the same id, so re-judging is idempotent; two names never share rows."""
    return content_hash([cell_id, prompt_set, prompt_id, judge, judge_hash])
