"""The openai judge (refusal_ray/judges/endpoint.py) against a real loopback endpoint (tests/openai_stub.py).

Retry waits are the openai client's own (0.5 s, then 1 s, ... with jitter), so these tests keep
max_retries and the injected failures small.
"""

from __future__ import annotations

import pickle
import time

import pytest
from openai_stub import StubServer
from pydantic import ValidationError

from refusal_ray.judges import make_judge
from refusal_ray.judges.base import Item
from refusal_ray.judges.config import OpenAIJudgeSpec
from refusal_ray.judges.endpoint import EndpointJudge

KEY_ENV = "REFUSAL_RAY_TEST_JUDGE_KEY"
SECRET = "sk-test-SECRET-123"


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def spec(base_url: str, **kw) -> OpenAIJudgeSpec:
    return OpenAIJudgeSpec.model_validate({"name": "stub", "kind": "openai", "base_url": base_url, "model": "stub-judge",
                                           "api_key_env": KEY_ENV, "timeout_s": 1.0, "max_retries": 2, **kw})


def items(n: int, marker: str = "", every: int = 0) -> list[Item]:
    """n complying items; every `every`-th (from 0) carries `marker` in its completion."""
    return [Item(f"Request {i}", f"Sure, here is answer {i}.{marker if every and i % every == 0 else ''}")
            for i in range(n)]


def labelled(v) -> bool:
    return v.error is None and not v.malformed and v.refusal is not None


def test_labels_and_request_fields():
    cases = [  # (completion, refusal, compliance, coherence, malformed)
        ("I'm sorry, but I can't help with that.", True, 0.0, 1.0, False),
        ("I cannot assist with this request.", True, 0.0, 1.0, False),
        ("I won't do that.", True, 0.0, 1.0, False),
        ("Sure! Step 1: gather the materials.", False, 1.0, 1.0, False),
        ("Here is a short poem about the sea.", False, 1.0, 1.0, False),
        ("maybe this helps, but be careful: a partial outline.", False, 0.5, 1.0, False),
        ("The answer is 42.", False, 1.0, 1.0, False),
        ("TRUNCATE: an answer cut at max_tokens", None, None, None, True),   # finish_reason "length"
        ("GARBLE GARBLE", None, None, None, True),
    ]
    its = [Item(f"prompt {i}", c[0]) for i, c in enumerate(cases)]
    ticks = []
    with StubServer() as s:
        judge = make_judge(spec(s.base_url, max_new_tokens=16, temperature=0.0))
        verdicts = judge.judge(its, progress=ticks.append)
    assert isinstance(judge, EndpointJudge) and judge.kind == "openai" and judge.name == "stub"
    assert judge.hash == judge.cfg.judge_hash()
    assert ticks == [1] * len(its)
    for (completion, refusal, compliance, coherence, malformed), v in zip(cases, verdicts):
        assert (v.refusal, v.compliance, v.coherence, v.malformed, v.error) == \
               (refusal, compliance, coherence, malformed, None), completion
        assert v.raw  # the judge's text is kept, malformed or not
    assert verdicts[-1].raw == "I am not sure."
    assert verdicts[0].raw == "compliance: 0\ncoherence: 1"
    body = s.bodies[0]
    assert body["model"] == "stub-judge" and body["max_tokens"] == 16 and body["temperature"] == 0.0
    assert [m["role"] for m in body["messages"]] == ["user"]
    assert s.requests == len(its)


def test_concurrency_bound():
    with StubServer(delay=0.2) as s:
        verdicts = make_judge(spec(s.base_url, max_concurrency=3)).judge(items(12))
    assert all(labelled(v) for v in verdicts)
    assert s.max_in_flight == 3


def test_transient_failures_are_retried():
    with StubServer(fail_first=4) as s:
        verdicts = make_judge(spec(s.base_url, max_concurrency=4, max_retries=2)).judge(items(6))
    assert all(labelled(v) for v in verdicts)
    assert s.requests > 6


def test_timeouts_are_retried():
    with StubServer(sleep_first=(2, 2.0)) as s:
        verdicts = make_judge(spec(s.base_url, timeout_s=0.5, max_retries=2)).judge(items(4))
    assert all(labelled(v) for v in verdicts)
    assert s.requests >= 6   # the two 2 s sleepers timed out and were sent again (no other failure is injected)


def test_permanent_failure_is_a_verdict_error():
    with StubServer(fail_when="POISON") as s:
        verdicts = make_judge(spec(s.base_url, max_retries=1)).judge(items(6, "POISON", every=3))
    bad = [0, 3]
    for i, v in enumerate(verdicts):
        if i in bad:
            assert v.error and v.error.startswith("InternalServerError: ") and "500" in v.error
            assert (v.refusal, v.compliance, v.coherence, v.raw, v.malformed) == (None, None, None, None, False)
        else:
            assert labelled(v) and v.refusal is False
    assert s.requests == 4 + 2 * 2   # one retry per failing item


def test_client_errors_are_not_retried():
    with StubServer() as s:
        judge = make_judge(spec(s.base_url.removesuffix("/v1") + "/nope", max_retries=3))
        verdicts = judge.judge(items(2))
    assert all(v.error.startswith("NotFoundError: ") for v in verdicts)
    assert s.requests == 2


def test_rate_limit_spaces_request_starts():
    with StubServer() as s:
        t0 = time.monotonic()
        verdicts = make_judge(spec(s.base_url, max_concurrency=6, requests_per_second=20)).judge(items(6))
        elapsed = time.monotonic() - t0
    assert all(labelled(v) for v in verdicts)
    assert elapsed >= 5 / 20 and s.starts[-1] - s.starts[0] > 5 / 20 - 0.03   # 6 starts, 0.05 s apart


def test_api_key_is_sent_but_never_stored():
    marker = "LEAKY"
    with StubServer(fail_when=marker, echo_auth=True) as s:
        judge = make_judge(spec(s.base_url, max_retries=0))
        verdicts = judge.judge(items(4, marker, every=2))
    assert set(s.auth) == {f"Bearer {SECRET}"}
    assert verdicts[0].error and "[api key]" in verdicts[0].error   # the leaky server's echo, scrubbed
    assert labelled(verdicts[1])
    assert SECRET not in repr(verdicts) and SECRET not in repr([v.row() for v in verdicts])
    assert SECRET not in repr(judge) and SECRET not in repr(vars(judge))
    assert SECRET.encode() not in pickle.dumps(judge)
    assert pickle.loads(pickle.dumps(judge)).hash == judge.hash   # rebuilt from the spec and the env


def test_missing_key_is_refused(monkeypatch):
    with pytest.raises(ValidationError, match="environment variable REFUSAL_RAY_NO_SUCH_KEY is not set"):
        OpenAIJudgeSpec.model_validate({"name": "x", "kind": "openai", "base_url": "http://127.0.0.1:1/v1",
                                        "model": "m", "api_key_env": "REFUSAL_RAY_NO_SUCH_KEY"})
    cfg = spec("http://127.0.0.1:1/v1")
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ValueError, match=f"environment variable {KEY_ENV} is not set"):
        EndpointJudge(cfg)


def test_empty_batch():
    assert EndpointJudge(spec("http://127.0.0.1:1/v1")).judge([]) == []
