"""Spec blocks of the judge kinds (one pydantic class per kind, discriminated by `kind`).

A sweep's `judges:` list (and a `refusal-ray judge --judges FILE`) holds these. Every block has a
`name` (unique; "substring" is the inline `judge:` block's). `label_fields` of each class are the
settings that change labels: they make up the judge's content hash (`judge_hash`), which is in every
judgement row's id; batch sizes, concurrency, retries and resources are not.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from refusal_ray.judges.base import content_hash
from refusal_ray.judges.rubric import DEFAULT_RUBRIC, answers, check_rubric

INLINE = "substring"   # the name of the inline `judge:` block's labels (completions.refusal)

# What a judge's stored binary label (`refusal`, True/False) answers, per judge kind and prompt set.
# REFUSED: "did the model refuse?" (a refusal label: rates, verdicts and agreement read it as one).
# SAFE: "is the completion safe?" (LlamaGuard-style guards). A guard's `refusal` column is its "safe"
# label on every set; on harmful prompts a safe completion is a refusal proxy (Arditi et al. 2024,
# Sec. 3, report this safety score beside the refusal score), so it answers REFUSED there; on
# harmless prompts a safe completion is the expected answer whether or not the model refused, so
# the label answers SAFE, is no refusal label, and no rate, verdict or refusal agreement reads it.
REFUSED, SAFE = "refused", "safe"
QUESTION_TEXT = {REFUSED: "did the model refuse?", SAFE: "is the completion safe?"}
PROMPT_SETS = ("harmful", "harmless")
QUESTIONS: dict[str, dict[str, str]] = {
    "substring": {"harmful": REFUSED, "harmless": REFUSED},
    "chat": {"harmful": REFUSED, "harmless": REFUSED},
    "openai": {"harmful": REFUSED, "harmless": REFUSED},
    "classifier": {"harmful": REFUSED, "harmless": REFUSED},
    "guard": {"harmful": REFUSED, "harmless": SAFE},
}


def question(kind: str | None, prompt_set: str) -> str:
    """What judge kind `kind`'s stored label answers on `prompt_set` (REFUSED or SAFE; table
    QUESTIONS). A kind not in the table (None: a store without `judge_kind`) is a refusal judge, as
    every judge was read before guards were told apart. ValueError for an unknown prompt set."""
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {prompt_set!r}; known: {', '.join(PROMPT_SETS)}")
    return QUESTIONS.get(kind or INLINE, QUESTIONS[INLINE])[prompt_set]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JudgeResources(_Strict):
    """Ray resources of a local judge's actor."""

    num_cpus: float = Field(1, gt=0, description="CPUs of the judge actor.")
    num_gpus: float | Literal["auto"] = Field("auto", description="GPU share of the judge actor; 'auto': 0.25 of "
                                                                   "a GPU when the cluster has GPUs, else 0.")


SAMPLE = 1 << 20   # bytes hashed at each end of a weight file


def checkpoint_fingerprint(path: Path) -> dict:
    """What identifies a local checkpoint cheaply: the sha256 of its config, tokenizer and template files,
    and per safetensors file its size and the sha256 of its first and last MiB (the header, which
    names every tensor, and the last tensors' values), so retrained weights of the same shape differ."""
    import hashlib

    out = {}
    for p in sorted(path.iterdir()):
        if p.suffix == ".safetensors":
            size = p.stat().st_size
            with p.open("rb") as f:
                head = f.read(SAMPLE)
                f.seek(max(0, size - SAMPLE))
                tail = f.read(SAMPLE)
            out[p.name] = f"{size}:{hashlib.sha256(head + tail).hexdigest()[:16]}"
        elif p.name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                        "special_tokens_map.json", "generation_config.json"):
            out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return out


class _Judge(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Judge name (rows, summary columns).")
    calibration: str | None = Field(
        None, description="A labelled file (refusal_ray/judges/calibrate.py's format, e.g. "
                          "data/judges/toy_heldout.jsonl) to calibrate this judge against after a run: agreement, "
                          "Cohen's kappa and Wilson intervals go to the store's calibration.json and the report's "
                          "'Judge calibration' section. Not a label setting (not in the judge's hash); absent from "
                          "the spec's dump when None.")

    @field_validator("calibration")
    @classmethod
    def _calibration_file(cls, v):
        if v is not None:
            from refusal_ray.judges.calibrate import SUFFIXES

            if not v.lower().endswith(SUFFIXES):   # the file itself: plan.check_calibration (the driver's cwd)
                raise ValueError(f"calibration file {v!r}: unknown suffix (expected .csv, .jsonl or .json lines)")
        return v

    @model_serializer(mode="wrap")
    def _absent_when_unset(self, handler):
        out = handler(self)
        if isinstance(out, dict) and self.calibration is None:   # judges written before the field dump as before
            out.pop("calibration", None)
        return out

    def label_fields(self) -> dict:
        """The settings that determine labels (the content hash's input)."""
        skip = {"name", "batch_size", "resources", "max_concurrency", "requests_per_second", "timeout_s",
                "max_retries", "api_key_env", "trust_remote_code", "calibration"}
        out = self.model_dump(mode="json", exclude=skip)
        if hasattr(self, "rubric_text"):
            out["rubric"] = self.rubric_text()     # the default rubric's text too: editing it changes the hash
        path = getattr(self, "path", None)
        if path is not None and Path(path).is_dir():   # a local checkpoint: its files, wherever it lies
            out["files"] = checkpoint_fingerprint(Path(path))
            out.pop("path")
        return out

    def judge_hash(self) -> str:
        return content_hash(self.label_fields())

    def uses_model(self) -> bool:
        return False


class SubstringJudgeSpec(_Judge):
    """Refusal = any phrase found (refusal_ray/judges/substring.py)."""

    kind: Literal["substring"]
    phrases: list[str] | None = Field(None, description="Refusal phrases; None: the documented default list.")

    def label_fields(self) -> dict:
        from refusal_ray.judges.substring import DEFAULT_PHRASES

        return super().label_fields() | {"phrases": list(DEFAULT_PHRASES if self.phrases is None else self.phrases)}


class _LocalModel(_Judge):
    path: str = Field(description="Local checkpoint directory or hub id (safetensors weights only).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights and compute dtype.")
    trust_remote_code: bool = Field(False, description="Allow the checkpoint's own code (off unless asked).")
    batch_size: int = Field(32, ge=1, description="Completions per forward/generate call.")
    resources: JudgeResources = Field(default_factory=JudgeResources)

    def uses_model(self) -> bool:
        return True


def _rubric(v: str | None) -> str | None:
    if v is None:
        return None
    text = Path(v).read_text() if "\n" not in v and v.endswith((".txt", ".md")) and Path(v).is_file() else v
    return check_rubric(text)


class ChatJudgeSpec(_LocalModel):
    """A Hugging Face chat model grading compliance and coherence with a rubric (refusal_ray/judges/rubric.py)."""

    kind: Literal["chat"]
    rubric: str | None = Field(None, description="Rubric text (or a .txt/.md file) with {prompt} and {completion}; "
                                                 "None: the documented DEFAULT_RUBRIC.")
    max_new_tokens: int = Field(24, ge=1, description="Tokens the judge may generate.")
    score_answers: list[Literal["refusal", "compliance", "coherence"]] | None = Field(
        None, description="None: greedy generation, parsed by the rubric's rules (may be malformed). A list of "
                          "label lines, e.g. [refusal, compliance, coherence]: score every answer the rules accept "
                          "made of those lines by its log-probability and take the most likely (never malformed; "
                          "refusal_ray.judges.rubric.answers). Absent from the judge's hash when None.")

    _check = field_validator("rubric")(classmethod(lambda cls, v: _rubric(v)))

    @field_validator("score_answers")
    @classmethod
    def _answers(cls, v):
        if v is not None:
            answers(v)          # ValueError naming the rule
        return v

    @model_serializer(mode="wrap")
    def _absent_when_unset(self, handler):
        out = handler(self)
        if isinstance(out, dict):       # judges written before these fields dump (and hash) as before
            for key in ("calibration", "score_answers"):
                if getattr(self, key) is None:
                    out.pop(key, None)
        return out

    def rubric_text(self) -> str:
        return self.rubric or DEFAULT_RUBRIC


class ClassifierJudgeSpec(_LocalModel):
    """A sequence-classification checkpoint; `labels` maps its label names to refusal / compliance."""

    kind: Literal["classifier"]
    labels: dict[str, Literal["refusal", "compliance"]] | None = Field(
        None, validate_default=True,
        description="Every label name of the checkpoint's config.id2label -> 'refusal' or 'compliance' (required).")
    input: Literal["completion", "prompt_completion"] = Field(
        "completion", description="Classify the completion alone, or the (prompt, completion) text pair.")
    max_length: int = Field(512, ge=8, description="Tokens per input (truncated beyond).")

    @field_validator("labels")
    @classmethod
    def _labels(cls, v):
        if not v:
            raise ValueError("a classifier needs a label map (its label names -> refusal / compliance)")
        return v


class GuardJudgeSpec(_LocalModel):
    """A LlamaGuard-style safety model: the conversation in its own chat template, 'safe' / 'unsafe' from
    the first generated token (Llama Guard 2 model card; Arditi et al. 2024 Sec. 3's safety score)."""

    kind: Literal["guard"]
    max_new_tokens: int = Field(8, ge=1, description="Tokens generated (the first decides; the rest is kept raw).")


class OpenAIJudgeSpec(_Judge):
    """Any OpenAI-compatible chat endpoint (vLLM, a hosted API) grading with the rubric, through the
    `openai` client. The key is read from the environment variable `api_key_env` only."""

    kind: Literal["openai"]
    base_url: str = Field(description="Endpoint base URL, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(description="Model name the endpoint serves.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key "
                                                          "(never stored; must be set when the judge runs).")
    rubric: str | None = Field(None, description="As in the chat judge.")
    max_new_tokens: int = Field(24, ge=1, description="max_tokens of each request.")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature (0: greedy).")
    max_concurrency: int = Field(8, ge=1, description="Requests in flight at most.")
    requests_per_second: float | None = Field(None, gt=0, description="Rate limit (None: none).")
    timeout_s: float = Field(60.0, gt=0, description="httpx timeout of each phase of a request (connect, each "
                                                     "read, ...), not a cap on the whole request.")
    max_retries: int = Field(4, ge=0, description="Retries per request by the openai client (backoff 0.5 s "
                                                  "doubling to 8 s, jittered; Retry-After honoured) on timeouts, "
                                                  "connection errors, HTTP 408, 409, 429 and 5xx; other 4xx "
                                                  "fail at once.")

    _check = field_validator("rubric")(classmethod(lambda cls, v: _rubric(v)))

    @field_validator("api_key_env")
    @classmethod
    def _key_set(cls, v):
        if not os.environ.get(v):
            raise ValueError(f"environment variable {v} is not set (the key is read from it only)")
        return v

    def rubric_text(self) -> str:
        return self.rubric or DEFAULT_RUBRIC


JudgeSpec = Annotated[SubstringJudgeSpec | ChatJudgeSpec | ClassifierJudgeSpec | GuardJudgeSpec | OpenAIJudgeSpec,
                      Field(discriminator="kind")]


class JudgesFile(_Strict):
    """A `refusal-ray judge --judges FILE`: the judges to (re-)judge a store with."""

    judges: list[JudgeSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _names(self):
        check_names(self.judges)
        return self


def check_names(judges: list) -> None:
    names = [j.name for j in judges]
    if INLINE in names:
        raise ValueError(f"judge name {INLINE!r} is the inline `judge:` block's; pick another")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate judge name {dup[0]!r}")
