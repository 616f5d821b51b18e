"""`ray start --head` on loopback, then `ray job submit` of the quickstart (one model), then stop that head."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import refusal_ray

from conftest import REPO

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def ray_head():
    """A head of our own: loopback, free ports, its own temp dir and token; stopped with its process group."""
    gcs, dashboard, client = free_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}
    temp_dir = tempfile.mkdtemp(prefix="rrh", dir="/tmp")  # short: Ray puts unix sockets here
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
         "--num-cpus=2", f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert head.poll() is None, "ray start exited"
            time.sleep(2)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)   # `ray start --block` stops what it started, and only that
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def test_job_submit_runs_the_quickstart(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "store"  # absolute: the job runs in a copy of the working directory
    entry = [sys.executable, "-m", "refusal_ray.cli", "run", "sweeps/quickstart.yaml", "--models", "qwen-xs",
             "--address", "auto", "--no-progress", "--out", str(out)]
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", "quickstart-test",
         "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml", "--", *entry],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    cells = refusal_ray.read(out, "cells")
    assert len(cells) == 2 * (1 + 1 + 2 * 6 * 2 + 2) and (cells["status"] == "done").all()
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", address, "quickstart-test"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert "qwen-xs" in logs.stdout and "decision rule hash" in logs.stdout
