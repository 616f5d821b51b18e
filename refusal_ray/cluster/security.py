"""Secure defaults: never join a non-loopback Ray cluster without token authentication.

Ray's dashboard, job API and GCS accept anyone who can reach them unless token authentication
(Ray >= 2.52: RAY_AUTH_MODE=token) is on. We refuse, before any connection is attempted, to join
a cluster at a non-loopback address unless a token is configured; the token itself is never
logged or written to the manifest.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from urllib.parse import urlsplit

from refusal_ray.errors import SpecError

LOCAL_WORDS = {"auto", "local", "localhost"}
DEFAULT_TOKEN_PATH = Path.home() / ".ray" / "auth_token"


def address_host(address: str) -> str:
    """Host part of a Ray address: 'ray://h:10001', 'http://h:8265', 'h:6379' or '[::1]:6379'."""
    if "://" not in address:
        address = f"ray://{address}"
    return urlsplit(address).hostname or ""


def is_loopback(address: str) -> bool:
    if address in LOCAL_WORDS:
        return True
    host = address_host(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: not known to be loopback
        return False


def token_configured(env: dict | None = None) -> bool:
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_MODE", "").lower() != "token":
        return False
    path = env.get("RAY_AUTH_TOKEN_PATH")
    return bool(env.get("RAY_AUTH_TOKEN")) or (Path(path).is_file() if path else DEFAULT_TOKEN_PATH.is_file())


def check_address(address: str | None, env: dict | None = None) -> None:
    """Raise SpecError('--address', ...) for a non-loopback address without token authentication."""
    if not address or is_loopback(address) or token_configured(env):
        return
    raise SpecError("--address", "", f"refusing to join {address!r} without token authentication: Ray's APIs "
                                     "accept anyone who can reach them; set RAY_AUTH_MODE=token and a token "
                                     "(`ray get-auth-token --generate`, or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) "
                                     "on the cluster and here, or reach it through an SSH tunnel on 127.0.0.1 "
                                     "(see cluster/README.md)")
