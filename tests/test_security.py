"""Secure defaults: a non-loopback --address needs token authentication (checked before connecting)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from refusal_ray.cli import app
from refusal_ray.cluster.security import check_address, is_loopback, token_configured
from refusal_ray.errors import SpecError


@pytest.mark.parametrize("address,loop", [
    ("auto", True), ("127.0.0.1:6379", True), ("ray://127.0.0.1:10001", True), ("http://localhost:8265", True),
    ("[::1]:6379", True), ("10.0.0.5:6379", False), ("ray://head.example:10001", False), ("192.168.1.2", False),
])
def test_loopback_detection(address, loop):
    assert is_loopback(address) is loop


def test_token_configuration(tmp_path):
    token_file = tmp_path / "tok"
    token_file.write_text("secret")
    assert not token_configured({})
    assert not token_configured({"RAY_AUTH_TOKEN": "x"})                      # mode not enabled
    assert token_configured({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "x"})
    assert token_configured({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)})
    assert not token_configured({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")})
    check_address("10.0.0.5:6379", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "x"})  # allowed, no connection made
    with pytest.raises(SpecError, match="refusing to join '10.0.0.5:6379' without token authentication"):
        check_address("10.0.0.5:6379", {})


def test_run_refuses_remote_address_without_token(tmp_path, monkeypatch):
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("refusal_ray.cluster.security.DEFAULT_TOKEN_PATH", tmp_path / "no-token")
    result = CliRunner().invoke(app, ["run", "sweeps/quickstart.yaml", "--address", "10.0.0.5:6379",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.startswith("error: --address: refusing to join '10.0.0.5:6379' without token")
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_no_secret_reaches_the_manifest(monkeypatch, tmp_path):
    import json

    from refusal_ray.plan import make_plan
    from refusal_ray.runner import manifest

    from conftest import REPO

    secret = "s3cr3t-token-value-0123456789abcdef"
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secret)
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.chdir(REPO)
    text = json.dumps(manifest(make_plan("sweeps/quickstart.yaml")))
    assert secret not in text and "RAY_AUTH_TOKEN" not in text
