"""The token service over real HTTP: real JWTs (JWKS), policies, audit, OpenBao / moto, the simulator."""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from stack_support import REF, VENDOR_KEY, Stack, build_stack

from broker.audit import verify_chain
from broker.engine.desired import DesiredIntegration
from broker.models import IntegrationRef
from broker.testing.jwt import DevIssuer
from broker.testing.servers import RunningServer, start_moto, start_openbao


@pytest.fixture
def issuer() -> Iterator[DevIssuer]:
    dev = DevIssuer().start()
    yield dev
    dev.stop()


@pytest.fixture
def stack(
    broker_config: Callable[..., dict[str, Any]],
    seed_vendor: Callable[..., None],
    tmp_path: Path,
    issuer: DevIssuer,
) -> Iterator[Stack]:
    config = broker_config()
    seed_vendor(config, REF.vendor_id, VENDOR_KEY)
    s = build_stack(config, tmp_path, issuer)
    yield s
    s.broker.stop()


class TestIssue:
    def test_issues_a_token_the_vendor_api_accepts(self, stack: Stack, sim: Any) -> None:
        """POST /v1/tokens answers 201 with a token the Vendor API accepts, and its lineage."""
        response = stack.post_token()
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["token_type"] == "Bearer" and body["stale"] is False
        assert body["ttl_seconds"] == 300  # policy cap below the 900 s default
        assert body["partner_key_version"] and body["vendor_key_version"] and body["lease_id"]
        vendor, _, partner = base64.b64decode(body["token"]).decode().partition(":")
        assert vendor == VENDOR_KEY and partner
        probe = httpx.get(
            f"{sim.url}/api/vendor-api/organization/accounts",
            headers={"Authorization": f"Bearer {body['token']}"},
            timeout=5,
        )
        assert probe.status_code == 200

    def test_ttl_cap_and_min_ttl(self, stack: Stack) -> None:
        """A rule's cap bounds the TTL; asking for more than it allows is a 409 with a code."""
        capped = stack.post_token(account="capped")
        assert capped.status_code == 201 and capped.json()["ttl_seconds"] == 60
        body = {"organization_id": REF.organization_id, "vendor_id": REF.vendor_id, "min_ttl_seconds": 120}
        refused = stack.post_token(body, account="capped")
        assert refused.status_code == 409
        assert refused.json()["code"] == "TTL_UNSATISFIABLE"

    def test_denied_before_any_secret_read(self, stack: Stack) -> None:
        """A subject no rule allows gets 403 problem+json, and no secret was read for it."""
        before = stack.reads()
        response = stack.post_token(account="stranger")
        assert response.status_code == 403
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["code"] == "POLICY_DENIED"
        assert stack.reads() == before

    def test_explicit_deny_wins(self, stack: Stack) -> None:
        """A deny rule beats an allow rule for the same subject."""
        response = stack.post_token(account="blocked")
        assert response.status_code == 403
        assert "apps-deny-blocked" in response.json()["detail"]

    def test_unknown_integration_is_404(self, stack: Stack) -> None:
        """An allowed pair that was never provisioned is 404 INTEGRATION_NOT_FOUND."""
        response = stack.post_token({"organization_id": "org-fabrikam", "vendor_id": "vendor-acme"})
        assert response.status_code == 404
        assert response.json()["code"] == "INTEGRATION_NOT_FOUND"

    def test_desired_but_not_yet_provisioned_is_503_pending_then_issued(self, stack: Stack) -> None:
        """A desired pair the leader has not provisioned yet is retryable (503 + Retry-After), not a 404.

        A workload deployed together with its integration must wait for it, not give up: clients retry 503.
        """
        pending = IntegrationRef("org-fabrikam", REF.vendor_id)
        stack.runtime.desired.add(DesiredIntegration(pending))
        body = {"organization_id": pending.organization_id, "vendor_id": pending.vendor_id}
        response = stack.post_token(body)
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "INTEGRATION_PENDING"
        assert response.headers["Retry-After"] == "5"
        records = [json.loads(line) for line in stack.audit_path.read_text().splitlines()]
        denied = [r for r in records if r["action"] == "token.denied"]
        assert denied[-1]["organization_id"] == "org-fabrikam"
        assert denied[-1]["details"]["error_code"] == "INTEGRATION_PENDING"

        assert stack.runtime.engine.provision(DesiredIntegration(pending)).ok  # what the leader's pass does
        assert stack.post_token(body).status_code == 201

    @pytest.mark.parametrize(
        ("headers", "reason"),
        [
            ({}, "missing"),
            ({"Authorization": "Bearer not.a.jwt"}, "garbage"),
            ({"Authorization": "Basic dXNlcjpwYXNz"}, "basic"),
        ],
    )
    def test_unauthenticated(self, stack: Stack, headers: dict[str, str], reason: str) -> None:
        """No, malformed or non-bearer credentials give 401 UNAUTHENTICATED with WWW-Authenticate."""
        body = {"organization_id": REF.organization_id, "vendor_id": REF.vendor_id}
        response = httpx.post(f"{stack.broker.url}/v1/tokens", json=body, headers=headers, timeout=10)
        assert response.status_code == 401, reason
        assert response.json()["code"] == "UNAUTHENTICATED"
        assert response.headers["www-authenticate"].startswith("Bearer")

    def test_wrong_audience_refused(self, stack: Stack) -> None:
        """A token minted for another audience (e.g. vault) is refused."""
        response = stack.post_token(audience="vault")
        assert response.status_code == 401

    @pytest.mark.parametrize(
        ("body", "code"),
        [
            ({"organization_id": "../etc", "vendor_id": "vendor-acme"}, "INVALID_IDENTIFIER"),
            ({"organization_id": "org-contoso"}, "INVALID_INPUT"),
            ({"organization_id": "org-contoso", "vendor_id": "vendor-acme", "extra": 1}, "INVALID_INPUT"),
            ({"organization_id": 5, "vendor_id": "vendor-acme"}, "INVALID_INPUT"),
            ({"organization_id": "org-contoso", "vendor_id": "vendor-acme", "min_ttl_seconds": -1}, "INVALID_INPUT"),
        ],
    )
    def test_bad_input_is_400(self, stack: Stack, body: dict[str, Any], code: str) -> None:
        """Malformed bodies and unsafe ids give 400 with a stable code, never a 500."""
        response = stack.post_token(body)
        assert response.status_code == 400, response.text
        assert response.json()["code"] == code

    def test_invalid_json_is_400(self, stack: Stack) -> None:
        """A body that is not JSON is a 400 problem."""
        response = httpx.post(
            f"{stack.broker.url}/v1/tokens",
            content=b"{nope",
            headers={**stack.bearer(), "Content-Type": "application/json"},
            timeout=10,
        )
        assert response.status_code == 400
        assert response.json()["code"] == "INVALID_INPUT"

    def test_issuance_is_audited_without_secrets(self, stack: Stack) -> None:
        """Issued and denied tokens are in the audit chain, which verifies; the token appears only as an HMAC."""
        issued = stack.post_token().json()
        stack.post_token(account="stranger")
        stack.runtime.audit.close()
        raw = stack.audit_path.read_text()
        assert issued["token"] not in raw
        partner = base64.b64decode(issued["token"]).decode().partition(":")[2]
        assert partner not in raw and VENDOR_KEY not in raw
        records = [json.loads(line) for line in raw.splitlines()]
        actions = [r["action"] for r in records]
        assert "token.issued" in actions and "token.denied" in actions
        mine = next(r for r in records if r["action"] == "token.issued")
        assert mine["details"]["lease_id"] == issued["lease_id"]
        assert mine["principal"]["namespace"] == "apps"
        assert verify_chain([stack.audit_path]).ok

    def test_logs_carry_no_secrets(self, stack: Stack, captured_logs: Any) -> None:
        """The canonical request log line names principal and rule but never the token or keys."""
        issued = stack.post_token().json()
        out = captured_logs.getvalue()
        assert issued["token"] not in out and VENDOR_KEY not in out
        line = next(json.loads(x) for x in out.splitlines() if '"route": "/v1/tokens"' in x)
        assert line["principal"] == "apps/payments" and line["rule_id"] == "apps-payments"
        assert line["status"] == 201 and "request_id" in line and "latency_ms" in line

    def test_requests_off_the_hot_path_are_served_logged_and_counted_once(
        self, stack: Stack, captured_logs: Any
    ) -> None:
        """A body the hot path leaves to FastAPI (coercible or refused): served there, logged and counted once."""
        registry = stack.runtime.metrics.registry

        def counted(status: str) -> float:
            labels = {"route": "/v1/tokens", "method": "POST", "status": status}
            return registry.get_sample_value("broker_http_requests_total", labels) or 0.0

        before = {status: counted(status) for status in ("201", "400")}
        coerced = stack.post_token(
            {"organization_id": REF.organization_id, "vendor_id": REF.vendor_id, "min_ttl_seconds": "60"}
        )
        assert coerced.status_code == 201, coerced.text
        fast = stack.post_token()
        assert list(coerced.json()) == list(fast.json())  # the same response model, field for field
        refused = httpx.post(
            f"{stack.broker.url}/v1/tokens",
            content=json.dumps({"organization_id": REF.organization_id, "vendor_id": REF.vendor_id}),
            headers={**stack.bearer(), "Content-Type": "text/plain", "X-Request-Id": "req-refused"},
            timeout=10,
        )
        assert refused.status_code == 400 and refused.json()["code"] == "INVALID_INPUT"
        assert refused.headers.get_list("x-request-id") == ["req-refused"]
        assert counted("201") - before["201"] == 2 and counted("400") - before["400"] == 1
        lines = [json.loads(x) for x in captured_logs.getvalue().splitlines() if '"route": "/v1/tokens"' in x]
        assert [line["status"] for line in lines] == [201, 201, 400]
        assert lines[2]["request_id"] == "req-refused"


class TestAdmin:
    def test_admin_endpoints_and_their_policy(self, stack: Stack) -> None:
        """Admins list, inspect, rotate and roll back; workloads get 403 on the same routes."""
        url = stack.broker.url
        admin = stack.bearer("platform", "admin")
        listed = httpx.get(f"{url}/v1/integrations", headers=admin, timeout=10)
        assert listed.status_code == 200
        [row] = listed.json()
        assert row["state"] == "ok" and row["current_version"]
        assert "partner" not in json.dumps(row).lower().replace("partner_key_version", "")
        assert httpx.get(f"{url}/v1/integrations", headers=stack.bearer(), timeout=10).status_code == 403

        path = f"{url}/v1/integrations/{REF.organization_id}/{REF.vendor_id}"
        assert httpx.post(f"{path}/rotate", headers=stack.bearer(), timeout=10).status_code == 403
        rotated = httpx.post(f"{path}/rotate", headers=admin, timeout=30)
        assert rotated.status_code == 200 and rotated.json()["action"] == "rotated"
        detail = httpx.get(path, headers=admin, timeout=10).json()
        assert detail["current_version"] == rotated.json()["version"]
        assert detail["previous_version"] == row["current_version"]
        # a token issued now carries the new partner key version (the cache was invalidated)
        assert stack.post_token().json()["partner_key_version"] == rotated.json()["version"]

        back = httpx.post(f"{path}/rollback", headers=admin, timeout=30)
        assert back.status_code == 200 and back.json()["version"] == row["current_version"]
        unknown = httpx.get(f"{url}/v1/integrations/org-x/vendor-y", headers=admin, timeout=10)
        assert unknown.status_code == 404

    def test_add_integration_provisions_it(self, stack: Stack, sim: Any) -> None:
        """POST /v1/integrations adds a desired pair and provisions it at once."""
        admin = stack.bearer("platform", "admin")
        body = {"organization_id": "org-contoso", "vendor_id": "vendor-globex"}
        stack.config["store"]  # the vendor key for globex is written below, as a platform team would
        created = httpx.post(f"{stack.broker.url}/v1/integrations", json=body, headers=admin, timeout=30)
        # no vendor key yet: provisioning stops at the probe and reports it
        assert created.status_code == 201
        assert created.json()["ok"] is False

    def test_authz_check(self, stack: Stack) -> None:
        """The dry run says which rule decides, for the caller or (for admins) another subject."""
        url = f"{stack.broker.url}/v1/authz/check"
        body: dict[str, Any] = {"integration": {"organization_id": REF.organization_id, "vendor_id": REF.vendor_id}}
        mine = httpx.post(url, json=body, headers=stack.bearer(), timeout=10).json()
        assert mine["allowed"] is True and mine["rule_id"] == "apps-payments" and mine["ttl_cap_seconds"] == 300
        other = httpx.post(
            url, json={**body, "subject": "apps/blocked"}, headers=stack.bearer("platform", "admin"), timeout=10
        ).json()
        assert other["allowed"] is False and other["rule_id"] == "apps-deny-blocked"
        refused = httpx.post(url, json={**body, "subject": "apps/blocked"}, headers=stack.bearer(), timeout=10)
        assert refused.status_code == 403


class TestHealth:
    def test_livez_readyz_metrics(self, stack: Stack) -> None:
        """livez is up; readyz turns ready after the first checks; metrics expose the counters."""
        url = stack.broker.url
        assert httpx.get(f"{url}/livez", timeout=5).status_code == 200
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, httpx.get(f"{url}/readyz", timeout=5).text
            time.sleep(0.05)
        stack.post_token()
        text = httpx.get(f"{url}/metrics", timeout=5).text
        assert "broker_tokens_issued_total" in text and "broker_http_request_seconds_bucket" in text
        assert "broker_cache_events_total" in text

    def test_openapi_document(self, stack: Stack) -> None:
        """/openapi.json documents the token and admin routes."""
        doc = httpx.get(f"{stack.broker.url}/openapi.json", timeout=5).json()
        assert "/v1/tokens" in doc["paths"] and "/v1/authz/check" in doc["paths"]


class TestHerd:
    @pytest.fixture
    def stack(
        self,
        broker_config: Callable[..., dict[str, Any]],
        seed_vendor: Callable[..., None],
        tmp_path: Path,
        issuer: DevIssuer,
    ) -> Iterator[Stack]:
        # This test is about read coalescing; a loaded CI machine must not turn it into an audit-latency test.
        config = broker_config(audit={"write_timeout_ms": 10000})
        seed_vendor(config, REF.vendor_id, VENDOR_KEY)
        s = build_stack(config, tmp_path, issuer)
        yield s
        s.broker.stop()

    def test_thousand_cold_requests_one_read_per_secret(self, stack: Stack) -> None:
        """1,000 concurrent first requests for one integration cause one backend read per secret."""
        stack.runtime.cache.invalidate()
        before = stack.reads()
        headers = stack.bearer()
        body = {"organization_id": REF.organization_id, "vendor_id": REF.vendor_id}

        host, port = stack.broker.url.removeprefix("http://").split(":")
        payload = json.dumps(body).encode()
        request = (
            f"POST /v1/tokens HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: {headers['Authorization']}\r\nContent-Length: {len(payload)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode() + payload

        async def one(gate: asyncio.Event) -> int:
            # One connection per request, opened first, all sent at once: a real herd.
            reader, writer = await asyncio.open_connection(host, int(port))
            await gate.wait()
            writer.write(request)
            await writer.drain()
            status_line = await reader.readline()
            await reader.read()
            writer.close()
            return int(status_line.split()[1])

        async def herd() -> list[int]:
            gate = asyncio.Event()
            tasks = [asyncio.create_task(one(gate)) for _ in range(1000)]
            await asyncio.sleep(0)
            gate.set()
            return await asyncio.gather(*tasks)

        codes = asyncio.run(herd())
        assert codes.count(201) == 1000, collections.Counter(codes)
        assert stack.reads() - before == 2  # the vendor key and the partner key, once each


class TestOutage:
    @pytest.fixture
    def own_backend(self, backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
        server = (start_openbao if backend == "vault" else start_moto)(workdir=tmp_path_factory.mktemp("own"))
        yield server
        os.kill(server.pid, signal.SIGCONT)
        server.stop()

    def test_stale_then_503_then_recovery(
        self,
        own_backend: RunningServer,
        backend: str,
        broker_config: Callable[..., dict[str, Any]],
        seed_vendor: Callable[..., None],
        tmp_path: Path,
        issuer: DevIssuer,
    ) -> None:
        """With the store frozen, tokens come from cache marked stale, then 503 + Retry-After, then recover."""
        config = broker_config(
            tokens={"cache_ttl_seconds": 0.5, "max_stale_seconds": 2.0},
            vault={"url": own_backend.url, "token": own_backend.extra.get("root_token", ""), "timeout_seconds": 0.5},
            aws={
                "endpoint_url": own_backend.url,
                "connect_timeout_seconds": 0.5,
                "read_timeout_seconds": 0.5,
                "max_attempts": 1,
            },
        )
        seed_vendor(config, REF.vendor_id, VENDOR_KEY)
        s = build_stack(config, tmp_path, issuer)
        try:
            assert s.post_token().json()["stale"] is False
            os.kill(own_backend.pid, signal.SIGSTOP)
            deadline = time.monotonic() + 20
            seen_stale = False
            while True:
                response = s.post_token()
                if response.status_code == 201 and response.json()["stale"]:
                    seen_stale = True
                if response.status_code == 503:
                    break
                assert response.status_code == 201, response.text
                assert time.monotonic() < deadline
            assert seen_stale, "no token was served stale before the budget ran out"
            assert response.json()["code"] == "STORE_UNAVAILABLE"
            assert int(response.headers["Retry-After"]) >= 1
            os.kill(own_backend.pid, signal.SIGCONT)
            deadline = time.monotonic() + 20
            while (response := s.post_token()).status_code != 201:
                assert time.monotonic() < deadline, response.text
            assert response.json()["stale"] is False
        finally:
            os.kill(own_backend.pid, signal.SIGCONT)
            s.broker.stop()


class _PausableFifoReader:
    """The far end of a FIFO audit sink: reads while ``reading`` is set, stalls the writer otherwise."""

    def __init__(self, path: Path) -> None:
        self.reading = threading.Event()
        self.reading.set()
        self._stop = threading.Event()
        self._path = path
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fd = os.open(self._path, os.O_RDONLY)
        try:
            while not self._stop.is_set():
                if not self.reading.wait(0.05):
                    continue
                if not os.read(fd, 65536):
                    return
        finally:
            os.close(fd)

    def stop(self) -> None:
        self._stop.set()
        self.reading.set()
        self._thread.join(10)


class TestAuditFailClosed:
    def test_stalled_sink_gives_503_within_the_bound_then_recovers(
        self,
        broker_config: Callable[..., dict[str, Any]],
        seed_vendor: Callable[..., None],
        tmp_path: Path,
        issuer: DevIssuer,
    ) -> None:
        """When the audit sink stops taking writes, issuance answers 503 AUDIT_UNAVAILABLE within the bound
        instead of an unaudited token, and works again once the sink drains."""
        fifo = tmp_path / "audit.fifo"
        os.mkfifo(fifo)
        reader = _PausableFifoReader(fifo)
        config = broker_config(audit={"file_path": str(fifo), "write_timeout_ms": 200})
        seed_vendor(config, REF.vendor_id, VENDOR_KEY)
        s = build_stack(config, tmp_path, issuer)
        try:
            assert s.post_token().status_code == 201
            reader.reading.clear()  # the pipe fills (64 KiB), then every write blocks
            for _ in range(2000):
                start = time.monotonic()
                response = s.post_token()
                elapsed = time.monotonic() - start
                if response.status_code != 201:
                    break
            assert response.status_code == 503, response.text
            assert response.json()["code"] == "AUDIT_UNAVAILABLE"
            assert "Retry-After" in response.headers
            assert elapsed < 0.2 + 1.0  # the bound plus HTTP and scheduling overhead
            assert "token" not in response.json()
            failures = s.runtime.metrics.registry.get_sample_value("broker_audit_failures_total", {"reason": "timeout"})
            assert failures and failures >= 1
            reader.reading.set()
            deadline = time.monotonic() + 20
            while (response := s.post_token()).status_code != 201:
                assert time.monotonic() < deadline, response.text
        finally:
            reader.reading.set()
            s.broker.stop()
            reader.stop()
