"""`ray start --head` on loopback, wait for its job agent, `ray job submit` of the quickstart (one model), stop it.

Also the wait itself (refusal_ray.cluster.head) against nothing and against a fake dashboard.
"""

from __future__ import annotations

import http.server
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import refusal_ray
from refusal_ray.cluster.head import NO_AGENT, PROBE_VALUE, wait_for_job_agent
from refusal_ray.plan import make_plan

from conftest import REPO

BIN = Path(sys.executable).parent
WAIT = [sys.executable, "-m", "refusal_ray.cluster.head", "wait"]
HEAD_ATTEMPTS = 2     # a fresh head when Ray's own start-up fails (below)
AGENT_WAIT_S = 240    # generous: the e2e test must pass with both CPUs busy


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# ---------------------------------------------------------------- the wait, without Ray

def test_wait_times_out_where_nothing_listens():
    (port,) = free_ports(1)
    address = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        wait_for_job_agent(address, timeout_s=2, poll_s=0.2)
    took = time.monotonic() - start
    message = str(info.value)
    assert 2 <= took < 5, took
    assert "\n" not in message and address in message and "(timeout 2s)" in message
    assert "refused" in message.lower(), message


def test_wait_is_bounded_when_the_dashboard_never_answers():
    with socket.socket() as listener:  # connections are queued, never accepted: each request hangs
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"not ready after 2\.\d+s \(timeout 2s\); last error: no answer"):
            wait_for_job_agent(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout_s=2, poll_s=0.2, env={})
        assert time.monotonic() - start < 5


def test_wait_command_exits_1_with_one_line():
    (port,) = free_ports(1)
    start = time.monotonic()
    done = subprocess.run([*WAIT, "--address", f"127.0.0.1:{port}", "--timeout", "1.5", "--poll", "0.2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and f"http://127.0.0.1:{port}" in done.stderr, done.stderr
    assert "not ready after" in done.stderr and "(timeout 1.5s)" in done.stderr
    assert time.monotonic() - start < 120  # includes importing refusal_ray (torch, pandas) on a busy machine


class FakeDashboard(http.server.ThreadingHTTPServer):
    """Answers POST /api/jobs/ as Ray 2.60's dashboard does: NO_AGENT `busy` times, then as the agent does."""

    def __init__(self, busy: int, status_when_ready: int = 500, token: str | None = None):
        self.busy, self.status_when_ready, self.token = busy, status_when_ready, token
        self.posts: list[dict] = []
        super().__init__(("127.0.0.1", 0), FakeHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FakeHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, status: int, text: str):
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # the dashboard alone answers this: it must not count as ready
        self.answer(200, "[]")

    def do_POST(self):
        server: FakeDashboard = self.server
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.posts.append(request)
        if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
            return self.answer(401, "Unauthorized: Missing authentication token")
        if len(server.posts) <= server.busy:
            return self.answer(500, f"{NO_AGENT}, please try again later.")
        if server.status_when_ready == 200:
            return self.answer(200, json.dumps({"job_id": "x", "submission_id": "x"}))
        value = request["entrypoint_label_selector"]["refusal-ray-probe"]
        self.answer(500, "Traceback (most recent call last):\n  ...\nRuntimeError: Request failed with status code "
                         "400: Traceback (most recent call last):\n  ...\nValueError: Invalid label selector value "
                         f"`{value}`. The label selector value should contain optional operators and a label value.")


def test_wait_returns_once_the_agent_answers():
    token = secrets.token_hex(32)
    server = FakeDashboard(busy=3, token=token)
    try:
        wait_for_job_agent(server.address, timeout_s=30, poll_s=0.05,
                           env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    finally:
        server.shutdown()
    assert len(server.posts) == 4
    probe = server.posts[-1]
    assert probe["entrypoint_label_selector"] == {"refusal-ray-probe": PROBE_VALUE}
    assert len({p["submission_id"] for p in server.posts}) == 4  # never reused


def test_wait_accepts_an_agent_that_takes_the_probe():
    server = FakeDashboard(busy=1, status_when_ready=200)
    try:
        wait_for_job_agent(server.address, timeout_s=30, poll_s=0.05, env={})
    finally:
        server.shutdown()
    assert len(server.posts) == 2


def test_wait_names_no_agent_on_timeout():
    server = FakeDashboard(busy=10**9)
    try:
        with pytest.raises(RuntimeError, match=f"not ready after 1.*{NO_AGENT}.*dashboard_agent.log"):
            wait_for_job_agent(server.address, timeout_s=1, poll_s=0.1, env={})
    finally:
        server.shutdown()
    assert len(server.posts) > 1


def test_wait_stops_at_once_without_the_token():
    server = FakeDashboard(busy=0, token=secrets.token_hex(32))
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="refused authentication.*RAY_AUTH_MODE=token"):
            wait_for_job_agent(server.address, timeout_s=30, poll_s=0.05, env={})
    finally:
        server.shutdown()
    assert len(server.posts) == 1 and time.monotonic() - start < 10


# ---------------------------------------------------------------- a real head

def _stop(head: subprocess.Popen) -> None:
    """`ray start --block` stops what it started, and only that, on SIGTERM to its process group."""
    try:
        os.killpg(head.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)


def _raylet_error(temp_dir: str) -> str:
    """The raylet's last fatal line, if any (Ray 2.60 aborts when the agent misses its 15 s port window)."""
    for log in sorted(Path(temp_dir).glob("session_*/logs/raylet.out")):
        fatal = [line for line in log.read_text(errors="replace").splitlines() if " C " in line[:40]]
        if fatal:
            return fatal[-1][:300]
    return ""


def _wait_while_alive(head: subprocess.Popen, address: str, env: dict) -> str | None:
    """wait_for_job_agent in 15 s slices (what the wait command runs), stopping early if `ray start` exits.

    None when jobs are accepted, else why not.
    """
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            wait_for_job_agent(address, timeout_s=min(15.0, max(deadline - time.monotonic(), 0.1)), env=env)
            return None
        except RuntimeError as e:
            error = str(e)
        if head.poll() is not None or "refused authentication" in error or time.monotonic() >= deadline:
            return error


@pytest.fixture
def ray_head():
    """A head of our own: loopback, free ports (the agent's too), its own temp dir and token; ready for jobs.

    `ray start --head` returns before the head's job agent is up; the wait (the documented step, here in
    process: `python -m refusal_ray.cluster.head` pays for importing refusal_ray) returns once `ray job
    submit` would be accepted. On a busy machine Ray's own start-up can fail (the raylet aborts when its
    agent takes over 15 s to report its ports; `ray start --block` then exits): a fresh head is started
    then, HEAD_ATTEMPTS times in all.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}
    failures = []
    for attempt in range(HEAD_ATTEMPTS):
        gcs, dashboard, client, agent = free_ports(4)
        temp_dir = tempfile.mkdtemp(prefix="rrh", dir="/tmp")  # short: Ray puts unix sockets here
        start = time.monotonic()
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
             f"--dashboard-agent-listen-port={agent}",  # default 52365: taken if another Ray runs here
             "--num-cpus=2", f"--temp-dir={temp_dir}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        address = f"http://127.0.0.1:{dashboard}"
        try:
            error = _wait_while_alive(head, address, env)
            if error is None and head.poll() is None:
                print(f"head attempt {attempt + 1}: jobs accepted {time.monotonic() - start:.1f}s after ray start")
                yield address, env
                return
            state = "running" if head.poll() is None else f"exited {head.returncode}"
            failures.append(f"attempt {attempt + 1}: ray start {state} after {time.monotonic() - start:.0f}s; "
                            f"wait: {error}; raylet: {_raylet_error(temp_dir) or '-'}")
            if "refused authentication" in (error or ""):
                break
        finally:
            _stop(head)
    pytest.fail("no Ray head ready for jobs: " + " | ".join(failures))


@pytest.mark.slow
def test_job_submit_runs_the_quickstart(ray_head, tmp_path, monkeypatch):
    address, env = ray_head
    out = tmp_path / "store"  # absolute: the job runs in a copy of the working directory
    entry = [sys.executable, "-m", "refusal_ray.cli", "run", "sweeps/quickstart.yaml", "--models", "qwen-xs",
             "--address", "auto", "--no-progress", "--out", str(out)]
    # no retry: the wait's probe made the dashboard find (and cache) the head's agent, so this POST cannot
    # get NO_AGENT (Ray 2.60 job_head.py keeps the agent client once found)
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", "quickstart-test",
         "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml", "--", *entry],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    cells = refusal_ray.read(out, "cells")
    monkeypatch.chdir(REPO)  # the spec's paths are relative to the repository
    planned = {cell.id for cell in make_plan("sweeps/quickstart.yaml", ["qwen-xs"]).cells}  # what `plan` prints
    assert len(cells) == len(planned) and set(cells["cell_id"]) == planned
    # the paper's layer filter leaves the 2-layer qwen-xs nothing to select (sweeps/quickstart.yaml): the arms
    # that ablate the selection are stored as skipped with the reason, everything else is done
    skipped = cells["status"] == "skipped"
    assert (cells.loc[~skipped, "status"] == "done").all()
    assert cells.loc[skipped, "error"].str.startswith(("no direction selected", "no subspace")).all()
    assert skipped.any() and cells.loc[cells["stage"].isin(["directions", "select"]), "status"].eq("done").all()
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", address, "quickstart-test"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert "qwen-xs" in logs.stdout and "decision rule hash" in logs.stdout
