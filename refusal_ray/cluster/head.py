"""Wait for a Ray head's job agent, so that `ray job submit` right after `ray start` does not fail.

`ray start --head` returns once the GCS, raylet and dashboard are up; the head's dashboard *agent*
(which runs submitted jobs) may come up later, and seconds later still on a busy machine. Until
it has registered, `ray job submit` gets HTTP 500 "No available agent to submit job, please try
again later." (Ray 2.60, `dashboard/modules/job/job_head.py`: the dashboard waits 10 s for the
head node's agent address in the GCS, then gives up), while `ray job list` and GET /api/jobs/
already succeed: they are answered by the dashboard alone and prove nothing about the agent.

So the probe takes the submit path itself: POST /api/jobs/ with an entrypoint label selector the
dashboard passes on (its request check is only about types) and the agent's JobManager rejects
(`validate_label_selector`) before it stores anything. The answer then names our invalid value,
which only the agent can have produced; "No available agent" means not yet. The probe also warms
what a first submission needs (the dashboard's agent client, the agent's connection to Ray and
its JobManager). Each probe leaves an exception in the dashboard's log, and no job. Should a
future Ray accept the probe (HTTP 200), that counts as ready too: the job runs `true`.

    python -m refusal_ray.cluster.head wait --address http://127.0.0.1:8265 [--timeout 120]

exits 0 once the agent answers, 1 (one line on stderr) on timeout or an authentication error.
Token authentication follows Ray's client rules: with RAY_AUTH_MODE=token the token is
RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, sent as a bearer token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Mapping

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
NO_AGENT = "No available agent to submit job"
PROBE_LABEL = "refusal-ray-probe"
PROBE_VALUE = "not a label value"  # spaces: invalid as a label selector value, so the agent refuses it


class AuthError(RuntimeError):
    """The dashboard refused our credentials (HTTP 401/403): waiting will not help."""


def _normalize(address: str) -> str:
    address = address.strip().rstrip("/")
    return address if "://" in address else f"http://{address}"


def _auth_headers(env: Mapping[str, str]) -> dict[str, str]:
    """Ray's client rule: a bearer token only when RAY_AUTH_MODE=token."""
    if env.get("RAY_AUTH_MODE", "").lower() != "token":
        return {}
    token = env.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
        try:
            token = path.read_text().strip()
        except OSError:
            token = ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def _one_line(text: str, limit: int = 300) -> str:
    """The most telling line of an answer (a traceback's last line), whitespace collapsed."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = " ".join((lines[-1] if lines else "").split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _probe(url: str, headers: dict[str, str], timeout: float) -> str | None:
    """None when the job agent answered; else why not (one line). Raises AuthError on 401/403."""
    body = {
        "entrypoint": "true",
        "submission_id": f"refusal-ray-agent-probe-{uuid.uuid4().hex[:12]}",
        "entrypoint_label_selector": {PROBE_LABEL: PROBE_VALUE},
        "metadata": {"refusal_ray": "job agent readiness probe"},
    }
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None  # 200: the agent accepted a job (a Ray that no longer checks the selector)
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        if e.code in (401, 403):
            raise AuthError(f"HTTP {e.code}: {_one_line(text)}") from None
        if PROBE_VALUE in text and "label selector" in text:
            return None  # the agent's JobManager refused our selector: it is up and answering
        if NO_AGENT in text:
            return f"HTTP {e.code}: {NO_AGENT}"
        return f"HTTP {e.code}: {_one_line(text) or e.reason}"
    except TimeoutError:  # socket.timeout is TimeoutError
        return f"no answer within {timeout:.0f}s"
    except urllib.error.URLError as e:
        return f"no answer within {timeout:.0f}s" if isinstance(e.reason, TimeoutError) else str(e.reason)
    except (OSError, ValueError) as e:  # connection reset, a malformed answer
        return f"{type(e).__name__}: {e}"


def wait_for_job_agent(address: str, timeout_s: float = 120, poll_s: float = 1.0, *,
                       env: Mapping[str, str] | None = None) -> None:
    """Return once the job agent of the Ray head whose dashboard is at `address` accepts submissions.

    Polls every `poll_s` seconds for at most `timeout_s` seconds (each request is bounded by the
    time left); raises RuntimeError naming the address, the time waited and the last error on
    timeout, or at once when the dashboard refuses our token. `env` (default os.environ) supplies
    RAY_AUTH_MODE / RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH.
    """
    base = _normalize(address)
    url = f"{base}/api/jobs/"
    headers = _auth_headers(os.environ if env is None else env)
    start = time.monotonic()
    deadline = start + timeout_s
    last_error, last_answer = "no attempt made", ""  # last_answer: the latest error that was not a timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            error = _probe(url, headers, timeout=max(left, 0.1))
        except AuthError as e:
            hint = ("" if headers else "; set RAY_AUTH_MODE=token and the cluster's token "
                    "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
            raise RuntimeError(f"Ray dashboard at {base} refused authentication after "
                               f"{time.monotonic() - start:.1f}s: {e}{hint}") from None
        if error is None:
            return
        if not error.startswith("no answer"):
            last_answer = error
        last_error = error if error == last_answer or not last_answer else f"{error} (before that: {last_answer})"
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(poll_s, left))
    hint = (" (the head's dashboard agent has not registered: see dashboard_agent.log and raylet.out in the "
            "head's session logs; a busy port, e.g. --dashboard-agent-listen-port 52365 taken by another Ray on "
            "the same machine, does this)") if NO_AGENT in last_error else ""
    raise RuntimeError(f"Ray job agent at {base} not ready after {time.monotonic() - start:.1f}s "
                       f"(timeout {timeout_s:g}s); last error: {last_error}{hint}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refusal_ray.cluster.head",
                                     description="Helpers for a Ray head started with `ray start --head`.")
    commands = parser.add_subparsers(dest="command", required=True)
    wait = commands.add_parser("wait", help="wait until the head's job agent accepts `ray job submit`")
    wait.add_argument("--address", default=DEFAULT_ADDRESS,
                      help=f"the dashboard's HTTP address (default {DEFAULT_ADDRESS})")
    wait.add_argument("--timeout", type=float, default=120.0, help="seconds to wait at most (default 120)")
    wait.add_argument("--poll", type=float, default=1.0, help="seconds between attempts (default 1)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        wait_for_job_agent(args.address, timeout_s=args.timeout, poll_s=args.poll)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"Ray job agent at {_normalize(args.address)} ready after {time.monotonic() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
