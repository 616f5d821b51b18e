"""The `openai` judge: any OpenAI-compatible chat endpoint (vLLM, a hosted API) grading with the rubric.

Each item is one `chat.completions` request: a single user message, the rubric rendered with the
item (rubric.render), `model`, `max_tokens=max_new_tokens`, `temperature`. The reply text is parsed
with rubric.parse, so an output off the format is a malformed Verdict with its raw text kept.

Requests, retries, timeouts (the `openai` client's own machinery, one client shared by all threads):
  - concurrency: at most `max_concurrency` requests in flight (a thread pool of that many workers);
  - timeout: `timeout_s` is httpx's per-phase timeout (connect, write, pool wait, and each read of
    the response), not a wall-clock cap on a whole request; a request that exceeds it is an
    APITimeoutError;
  - retries: up to `max_retries` retries per item, on timeouts, connection errors, HTTP 408, 409,
    429 and 5xx (a server's `x-should-retry: true|false` header overrides). Other statuses (400,
    401, 403, 404, 422, ...) fail the item at once. The wait before retry k (k = 0, 1, ...) is
    min(0.5 * 2**k, 8) seconds times a jitter factor drawn from (0.75, 1] -- 0.5, 1, 2, 4, 8, 8, ...
    (openai 3.x _base_client: INITIAL_RETRY_DELAY 0.5, MAX_RETRY_DELAY 8.0) -- unless the response
    carries `Retry-After` / `retry-after-ms` of at most 120 s, which is waited instead; a
    `Retry-After` above 120 s is not retried;
  - rate limit: with `requests_per_second` set, every HTTP attempt (retries included) waits its turn
    so that attempt starts are at least 1 / requests_per_second apart, across all threads (a start
    clock under a lock; no bursts). The wait happens before the request is sent, so it does not
    count against `timeout_s`;
  - an item that still fails after its retries (or whose response is unusable) is
    Verdict(error="<ExceptionClass>: <message>"); judge() never raises for one item.

The key rule: the API key is read only from os.environ[cfg.api_key_env], when the judge is built
(ValueError naming the variable when it is unset). It lives only inside the openai client; it is
never logged, never in a Verdict (error texts are scrubbed of it), and a pickled judge (Ray) carries
only its spec: the receiving process reads the key from its own environment. The client's
environment fallbacks that would send other credentials or ids to this endpoint are off: no
OpenAI-Organization / OpenAI-Project headers from OPENAI_ORG_ID / OPENAI_PROJECT_ID.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import openai

from refusal_ray.judges import rubric
from refusal_ray.judges.base import Item, Verdict

MAX_ERROR_CHARS = 300


class _Pacer:
    """Thread-safe rate limiter: `wait()` returns at start times at least `1 / rate` seconds apart.

    Each caller books the next free slot under the lock (max(now, last slot + interval)) and sleeps
    outside it until its slot, so waiting callers start in booking order and never in a burst."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self, *_request) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


class EndpointJudge:
    """An OpenAI-compatible chat endpoint scoring compliance / coherence (see the module docstring)."""

    kind = "openai"

    def __init__(self, cfg):
        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise ValueError(f"environment variable {cfg.api_key_env} is not set "
                             f"(the {cfg.name!r} judge reads its API key from it only)")
        self.cfg = cfg
        self.name = cfg.name
        self.hash = cfg.judge_hash()
        self._rubric = cfg.rubric_text()
        self._pacer = _Pacer(cfg.requests_per_second) if cfg.requests_per_second else None
        hooks = {"request": [self._pacer.wait]} if self._pacer else {}
        self._client = openai.OpenAI(
            base_url=cfg.base_url, api_key=key, timeout=cfg.timeout_s, max_retries=cfg.max_retries,
            default_headers={"OpenAI-Organization": openai.Omit(), "OpenAI-Project": openai.Omit()},
            http_client=openai.DefaultHttpxClient(event_hooks=hooks))

    def __repr__(self) -> str:
        return f"EndpointJudge(name={self.name!r}, model={self.cfg.model!r}, base_url={self.cfg.base_url!r})"

    def __reduce__(self):
        # pickle the spec only; the unpickling process reads the key from its own environment
        return (type(self), (self.cfg,))

    def judge(self, items: list[Item], progress=None) -> list[Verdict]:
        """One Verdict per item, in input order. `progress(1)` is called as each item finishes."""
        out: list[Verdict | None] = [None] * len(items)
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=min(self.cfg.max_concurrency, len(items)),
                                thread_name_prefix=f"judge-{self.name}") as pool:
            futures = {pool.submit(self._one, item): i for i, item in enumerate(items)}
            for fut in as_completed(futures):
                out[futures[fut]] = fut.result()
                if progress is not None:
                    progress(1)
        return out

    def _one(self, item: Item) -> Verdict:
        try:
            resp = self._client.chat.completions.create(
                model=self.cfg.model, max_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                messages=[{"role": "user", "content": rubric.render(self._rubric, item)}])
            if not resp.choices:
                return Verdict(error="EmptyResponse: the endpoint returned no choices")
            choice = resp.choices[0]
            verdict = rubric.parse(self._scrub(choice.message.content or ""),
                                   finished=choice.finish_reason != "length")   # cut at max_tokens: malformed
            return verdict
        except Exception as e:  # one item's failure is its Verdict, never the batch's
            return Verdict(error=self._error_text(e))

    def _scrub(self, text: str) -> str:
        key = self._client.api_key
        return text.replace(key, "[api key]") if key else text

    def _error_text(self, e: Exception) -> str:
        """`<ExceptionClass>: <message>`, shortened, with the API key scrubbed out."""
        text = self._scrub(f"{type(e).__name__}: {e}")
        return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."
