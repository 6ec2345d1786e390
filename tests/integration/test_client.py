"""Workload clients against a running broker: `broker token` (init container, --watch) and the SDK."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from stack_support import REF, Stack, build_stack

from broker.client import AsyncBrokerClient, BrokerClient, BrokerClientError
from broker.engine.desired import DesiredIntegration
from broker.models import IntegrationRef
from broker.testing.jwt import DevIssuer
from broker.testing.servers import free_port


@pytest.fixture
def issuer() -> Iterator[DevIssuer]:
    dev = DevIssuer().start()
    yield dev
    dev.stop()


@pytest.fixture
def stack(
    broker_config: Callable[..., dict[str, Any]], seed_vendor: Callable[..., None], tmp_path: Path, issuer: DevIssuer
) -> Iterator[Stack]:
    config = broker_config()
    seed_vendor(config, REF.vendor_id, "acme-vendor-key-dev")
    s = build_stack(config, tmp_path, issuer)
    yield s
    s.broker.stop()


def sa_token_file(tmp_path: Path, issuer: DevIssuer, account: str = "payments") -> Path:
    path = tmp_path / "sa-token"
    path.write_text(issuer.mint("apps", account, ttl_seconds=600))
    return path


def broker_token(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", "token", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


class TestTokenCommand:
    def test_init_container_writes_token_atomically(self, stack: Stack, issuer: DevIssuer, tmp_path: Path) -> None:
        """`broker token --out` writes the token (0600) and its metadata; stdout names versions, never the token."""
        out = tmp_path / "run" / "token"
        sa = sa_token_file(tmp_path, issuer)
        result = broker_token(
            "--org",
            REF.organization_id,
            "--vendor",
            REF.vendor_id,
            "--out",
            str(out),
            "--broker-url",
            stack.broker.url,
            "--sa-token-file",
            str(sa),
        )
        assert result.returncode == 0, result.stderr
        token = out.read_text()
        assert base64.b64decode(token).decode().startswith("acme-vendor-key-dev:")
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        meta = json.loads(Path(f"{out}.json").read_text())
        assert meta["ttl_seconds"] == 300 and meta["partner_key_version"] and "token" not in meta
        assert stat.S_IMODE(Path(f"{out}.json").stat().st_mode) == 0o600
        assert token not in result.stdout + result.stderr
        assert "partner key version" in result.stdout
        assert sorted(p.name for p in out.parent.iterdir()) == ["token", "token.json"]  # no temp files left

    def test_waits_for_an_integration_being_provisioned(self, stack: Stack, issuer: DevIssuer, tmp_path: Path) -> None:
        """Deployed with its integration, the init container gets 503 INTEGRATION_PENDING, retries, then succeeds."""
        pending = IntegrationRef("org-fabrikam", REF.vendor_id)
        stack.runtime.desired.add(DesiredIntegration(pending))
        out = tmp_path / "token"
        argv = ["--org", pending.organization_id, "--vendor", pending.vendor_id, "--out", str(out)]
        argv += ["--broker-url", stack.broker.url, "--sa-token-file", str(sa_token_file(tmp_path, issuer))]
        process = subprocess.Popen(
            [sys.executable, "-m", "broker", "token", *argv, "--deadline-seconds", "120"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            registry = stack.runtime.metrics.registry
            deadline = time.monotonic() + 60
            while not registry.get_sample_value("broker_tokens_denied_total", {"code": "INTEGRATION_PENDING"}):
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, "the client never asked"
                time.sleep(0.05)
            assert stack.runtime.engine.provision(DesiredIntegration(pending)).ok  # the leader's pass, in effect
            _, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert process.returncode == 0, stderr
        assert base64.b64decode(out.read_text()).decode().startswith("acme-vendor-key-dev:")

    def test_denied_fails_at_once_with_the_code(self, stack: Stack, issuer: DevIssuer, tmp_path: Path) -> None:
        """A policy denial is not retried: exit 1 at once with POLICY_DENIED."""
        start = time.monotonic()
        result = broker_token(
            "--org",
            REF.organization_id,
            "--vendor",
            REF.vendor_id,
            "--out",
            str(tmp_path / "t"),
            "--broker-url",
            stack.broker.url,
            "--sa-token-file",
            str(sa_token_file(tmp_path, issuer, "stranger")),
        )
        assert result.returncode == 1
        assert "POLICY_DENIED" in result.stderr
        assert time.monotonic() - start < 15
        assert not (tmp_path / "t").exists()

    def test_broker_down_fails_after_the_deadline(self, tmp_path: Path) -> None:
        """With no broker listening, the command retries until its deadline, then exits 1 with a clear message."""
        (tmp_path / "sa").write_text("x.y.z")
        start = time.monotonic()
        result = broker_token(
            "--org",
            "o",
            "--vendor",
            "v",
            "--out",
            str(tmp_path / "t"),
            "--deadline-seconds",
            "2",
            "--broker-url",
            f"http://127.0.0.1:{free_port()}",
            "--sa-token-file",
            str(tmp_path / "sa"),
        )
        elapsed = time.monotonic() - start
        assert result.returncode == 1
        assert "BROKER_UNREACHABLE" in result.stderr and "gave up after" in result.stderr
        assert 1.0 <= elapsed < 20
        assert "Traceback" not in result.stderr

    def test_watch_refreshes_before_expiry(self, stack: Stack, issuer: DevIssuer, tmp_path: Path) -> None:
        """--watch rewrites the token at about two thirds of its TTL and stops cleanly on SIGTERM."""
        out = tmp_path / "token"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "broker",
                "token",
                "--org",
                REF.organization_id,
                "--vendor",
                REF.vendor_id,
                "--out",
                str(out),
                "--watch",
                "--broker-url",
                stack.broker.url,
                "--sa-token-file",
                str(sa_token_file(tmp_path, issuer, "short")),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            leases: list[str] = []
            deadline = time.monotonic() + 30
            while len(leases) < 3:
                assert time.monotonic() < deadline, f"saw {leases}"
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                meta = Path(f"{out}.json")
                if meta.exists():
                    lease = json.loads(meta.read_text())["lease_id"]
                    if not leases or leases[-1] != lease:
                        leases.append(lease)
                time.sleep(0.05)
            assert len(set(leases)) == 3
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        assert proc.returncode == 0


class TestSdk:
    def test_caches_and_refreshes(self, stack: Stack, issuer: DevIssuer) -> None:
        """The client reuses a fresh token and fetches a new one once two thirds of its TTL have passed."""
        now = [time.time()]
        client = BrokerClient(
            stack.broker.url,
            organization_id=REF.organization_id,
            vendor_id=REF.vendor_id,
            sa_token=SecretStr(issuer.mint("apps", "payments")),
            clock=lambda: now[0],
        )
        first = client.token()
        assert client.token() is first
        now[0] += first.ttl_seconds * 0.7
        second = client.token()
        assert second.lease_id != first.lease_id
        client.close()

    def test_auth_refreshes_once_on_401(self, stack: Stack, issuer: DevIssuer, sim: Any) -> None:
        """After break-glass revoke, the Vendor API refuses the cached token; MspcAuth refetches and succeeds."""
        client = BrokerClient(
            stack.broker.url,
            organization_id=REF.organization_id,
            vendor_id=REF.vendor_id,
            sa_token=SecretStr(issuer.mint("apps", "payments")),
        )
        with httpx.Client(base_url=sim.url, auth=client.auth(), timeout=10) as vendor_api:
            assert vendor_api.get("/api/vendor-api/organization/accounts").status_code == 200
            old = client.token()
            assert stack.runtime.engine.revoke(DesiredIntegration(REF)).ok
            response = vendor_api.get("/api/vendor-api/organization/accounts")
            assert response.status_code == 200
            assert client.token().partner_key_version != old.partner_key_version
            probes = [r for r in sim.requests("vendor_api.accounts.list") if r["status"] == 401]
            assert len(probes) == 1  # exactly one refused attempt, then the refreshed token
        client.close()

    def test_async_client(self, stack: Stack, issuer: DevIssuer, sim: Any) -> None:
        """AsyncBrokerClient and its httpx.Auth work with httpx.AsyncClient."""

        async def go() -> int:
            client = AsyncBrokerClient(
                stack.broker.url,
                organization_id=REF.organization_id,
                vendor_id=REF.vendor_id,
                sa_token=SecretStr(issuer.mint("apps", "payments")),
            )
            async with httpx.AsyncClient(base_url=sim.url, auth=client.auth(), timeout=10) as vendor_api:
                status = (await vendor_api.get("/api/vendor-api/organization/accounts")).status_code
            await client.aclose()
            return status

        assert asyncio.run(go()) == 200

    def test_errors_carry_the_broker_code(self, stack: Stack, issuer: DevIssuer) -> None:
        """A refusal surfaces as BrokerClientError with the problem code and status."""
        client = BrokerClient(
            stack.broker.url,
            organization_id="org-fabrikam",
            vendor_id=REF.vendor_id,
            sa_token=SecretStr(issuer.mint("apps", "payments")),
        )
        with pytest.raises(BrokerClientError) as info:
            client.token()
        assert (info.value.code, info.value.status) == ("INTEGRATION_NOT_FOUND", 404)
        client.close()

    def test_unreadable_sa_token(self, tmp_path: Path) -> None:
        """A missing service-account token file is a clear local error, not a network call."""
        client = BrokerClient(
            "http://127.0.0.1:9", organization_id="o", vendor_id="v", sa_token_file=tmp_path / "missing"
        )
        with pytest.raises(BrokerClientError) as info:
            client.token()
        assert info.value.code == "SA_TOKEN_UNREADABLE"
        assert os.fspath(tmp_path / "missing") in info.value.message
