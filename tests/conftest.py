"""Shared fixtures: a clean environment, real servers on loopback, log capture.

Servers are session-scoped, bound to free loopback ports and stopped by PID.
If a server cannot start, the tests that need it fail (never skip).
"""

from __future__ import annotations

import io
import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from broker.log import configure_logging, reset_logging
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
    reset_logging()
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


# -- a whole broker configuration against the real servers ----------------------------

DEV_CLIENT_ID = "dev-client"
DEV_CLIENT_SECRET = "dev-client-secret"
AUDIT_TEST_KEY = "audit-test-key-0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="session")
def mspc_simulator() -> Iterator[Any]:
    """The OEM/Vendor API simulator (default dev seed) in a thread, for the whole session."""
    from broker.testing.simulator import start_simulator_thread

    sim = start_simulator_thread()
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture
def sim(mspc_simulator: Any) -> Any:
    """The simulator, reset to its seed (no integrations, no faults)."""
    mspc_simulator.reset()
    return mspc_simulator


@pytest.fixture(params=["vault", "aws"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each test using it runs once per secret-store backend."""
    return str(request.param)


@pytest.fixture
def broker_config(
    request: pytest.FixtureRequest, backend: str, sim: Any, tmp_path: Path, repo_root: Path
) -> Callable[..., dict[str, Any]]:
    """A factory of plain settings dicts (``load_settings(**d)``) for ``backend``, unique paths per test."""
    server = request.getfixturevalue("openbao" if backend == "vault" else "moto_server")
    prefix = "t-" + secrets.token_hex(4)

    def make(**groups: dict[str, Any]) -> dict[str, Any]:
        config: dict[str, Any] = {
            "store": {
                "backend": backend,
                "vendor_key_path_template": f"{prefix}/vendor-keys/{{vendor_id}}",
                "partner_key_path_template": f"{prefix}/partner-keys/{{organization_id}}/{{vendor_id}}",
            },
            "engine": {
                "state_path_template": f"{prefix}/state/{{organization_id}}/{{vendor_id}}",
                "leader_path": f"{prefix}/leader",
            },
            "vault": {"url": server.url, "token": server.extra.get("root_token", "")},
            "aws": {"endpoint_url": server.url, "access_key_id": "testing", "secret_access_key": "testing"},
            "oem": {
                "base_url": sim.url,
                "client_id": DEV_CLIENT_ID,
                "client_secret": DEV_CLIENT_SECRET,
                "backoff_base_seconds": 0.01,
                "backoff_max_seconds": 0.1,
                "deadline_seconds": 10.0,
                "read_timeout_seconds": 2.0,
            },
            "audit": {"file_path": str(tmp_path / "audit" / "audit.jsonl"), "hmac_key": AUDIT_TEST_KEY},
            "policy": {"dir": str(repo_root / "policies")},
        }
        for group, values in groups.items():
            config.setdefault(group, {}).update(values)
        return config

    return make


def seed_vendor_key(backend: str, config: dict[str, Any], vendor_id: str, value: str) -> None:
    """Write a vendor key the way a platform team would: with the stock client, not the broker."""
    path = config["store"]["vendor_key_path_template"].format(vendor_id=vendor_id)
    if backend == "vault":
        import hvac

        client = hvac.Client(url=config["vault"]["url"], token=config["vault"]["token"])
        client.secrets.kv.v2.create_or_update_secret(path=path, secret={"vendor_api_key": value}, mount_point="secret")
        return
    import boto3

    sm = boto3.client(
        "secretsmanager",
        endpoint_url=config["aws"]["endpoint_url"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    body = json.dumps({"vendor_api_key": value})
    try:
        sm.create_secret(Name=path, SecretString=body)
    except sm.exceptions.ResourceExistsException:
        sm.put_secret_value(SecretId=path, SecretString=body)


@pytest.fixture
def seed_vendor(backend: str) -> Callable[[dict[str, Any], str, str], None]:
    """``seed_vendor(config, vendor_id, value)`` writes a vendor key with the stock client."""

    def write(config: dict[str, Any], vendor_id: str, value: str) -> None:
        seed_vendor_key(backend, config, vendor_id, value)

    return write
