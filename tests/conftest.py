"""Shared fixtures: a clean environment, real servers on loopback, log capture.

Servers are session-scoped, bound to free loopback ports and stopped by PID.
If a server cannot start, the tests that need it fail (never skip).
"""

from __future__ import annotations

import io
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from broker.log import configure_logging
from broker.testing.servers import RunningServer, reset_moto, start_moto, start_openbao

_AMBIENT_PREFIXES = ("VAULT_", "BAO_", "AWS_", "BROKER_", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Strip ambient Vault / AWS / proxy / broker variables so no test leans on them."""
    for key in list(os.environ):
        if key.upper().startswith(_AMBIENT_PREFIXES):
            monkeypatch.delenv(key, raising=False)
    # Make sure nothing finds real AWS credentials or a ~/.vault-token.
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(autouse=True)
def reset_structlog() -> Iterator[None]:
    """Each test starts with the default structlog configuration."""
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def captured_logs() -> io.StringIO:
    """Configure JSON logging into a buffer; read ``.getvalue()`` to scan it."""
    buffer = io.StringIO()
    configure_logging(level="debug", fmt="json", stream=buffer)
    return buffer


@pytest.fixture
def canary() -> str:
    """A unique secret-looking value; tests assert it never leaks."""
    return "CANARY-" + secrets.token_hex(12)


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A real OpenBao dev server (KV v2 at secret/), root token in ``.extra['root_token']``."""
    server = start_openbao(workdir=tmp_path_factory.mktemp("openbao"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A real moto server (AWS API emulator) over HTTP."""
    server = start_moto(workdir=tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_moto(moto_server: RunningServer) -> RunningServer:
    """The moto server, emptied before the test."""
    reset_moto(moto_server)
    return moto_server


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
