"""End to end: `python -m broker serve` as a subprocess, real store, simulator, JWKS issuer and SDK."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from serve_support import REF, VENDOR_KEY, Served, serve_broker

from broker.audit import verify_chain
from broker.engine.leader import LEASE_FIELD
from broker.engine.state import PARTNER_KEY_FIELD
from broker.models import Stage
from broker.mspc_token import compose
from broker.settings import load_settings
from broker.stores.factory import build_store

pytestmark = pytest.mark.e2e


@pytest.fixture
def served(
    broker_config: Callable[..., dict[str, Any]], seed_vendor: Callable[..., None], tmp_path: Path
) -> Iterator[Served]:
    with serve_broker(broker_config, seed_vendor, tmp_path) as running:
        yield running


class TestServe:
    def test_workload_gets_a_token_and_calls_the_vendor_api(self, served: Served, sim: Any) -> None:
        """A workload authenticates with its SA token, gets an MSPC_TOKEN, and the Vendor API accepts it."""
        client = served.client()
        with httpx.Client(base_url=sim.url, auth=client.auth(), timeout=10) as vendor_api:
            assert vendor_api.get("/api/vendor-api/organization/accounts").status_code == 200
        token = client.token()
        assert token.ttl_seconds == 3 and token.partner_key_version
        client.close()
        # `broker serve` does not say what answers (no Server header).
        livez = httpx.get(f"{served.url}/livez", timeout=10)
        assert livez.status_code == 200
        assert "server" not in livez.headers

    def test_rotation_under_load_has_zero_failed_calls(self, served: Served, sim: Any) -> None:
        """Workloads call the Vendor API through a rotation and its grace: no call fails; then the old key dies."""
        settings = load_settings(**served.config)
        store = build_store(settings)
        path = settings.store.partner_key_path_template.format(
            organization_id=REF.organization_id, vendor_id=REF.vendor_id
        )
        old = store.read(path, stage=Stage.CURRENT)
        results: list[int] = []
        refused: list[int] = []
        stop = threading.Event()

        def workload() -> None:
            client = served.client()
            with httpx.Client(base_url=sim.url, auth=client.auth(), timeout=10) as vendor_api:
                while not stop.is_set():
                    results.append(vendor_api.get("/api/vendor-api/organization/accounts").status_code)
            client.close()

        threads = [threading.Thread(target=workload) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            while len(results) < 20:
                time.sleep(0.01)
            rotated = httpx.post(
                f"{served.url}/v1/integrations/{REF.organization_id}/{REF.vendor_id}/rotate",
                headers=served.admin(),
                timeout=30,
            )
            assert rotated.status_code == 200 and rotated.json()["action"] == "rotated", rotated.text
            # Keep calling through the grace period until the old key is revoked at the OEM.
            deadline = time.monotonic() + 30
            old_id = old.field("integration_id").get_secret_value()
            while any(i["id"] == old_id and i["live"] for i in sim.integrations()):
                assert time.monotonic() < deadline, "the old key was never revoked"
                time.sleep(0.1)
            mark = len(results)
            while len(results) < mark + 20:
                time.sleep(0.01)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        refused = [code for code in results if code != 200]
        assert len(results) > 100
        assert refused == []
        stale_token = compose(SecretStr(VENDOR_KEY), old.field(PARTNER_KEY_FIELD))
        probe = httpx.get(
            f"{sim.url}/api/vendor-api/organization/accounts",
            headers={"Authorization": f"Bearer {stale_token.get_secret_value()}"},
            timeout=10,
        )
        assert probe.status_code == 401
        store.close()

    def test_sigterm_is_clean(self, served: Served) -> None:
        """SIGTERM: /readyz drains to 503 while requests still succeed, then exit 0, lease released, chain closed."""
        body = {"organization_id": REF.organization_id, "vendor_id": REF.vendor_id}
        headers = {"Authorization": "Bearer " + served.issuer.mint("apps", "payments")}
        outcomes: list[str] = []
        started = threading.Event()
        endpoint_removed = threading.Event()  # what Kubernetes does once the pod is not ready

        def caller() -> None:
            with httpx.Client(timeout=20) as client:
                while not endpoint_removed.is_set():
                    try:
                        response = client.post(f"{served.url}/v1/tokens", json=body, headers=headers)
                        outcomes.append(str(response.status_code))
                    except httpx.HTTPError as exc:
                        outcomes.append(type(exc).__name__)
                        return
                    started.set()

        threads = [threading.Thread(target=caller) for _ in range(8)]
        for t in threads:
            t.start()
        assert started.wait(30)
        served.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(f"{served.url}/readyz", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "readyz never reported the drain"
        during_drain = len(outcomes)
        endpoint_removed.set()
        for t in threads:
            t.join(timeout=30)
        assert served.process.wait(timeout=30) == 0, served.log_path.read_text()[-3000:]
        assert set(outcomes) == {"201"}, outcomes
        assert len(outcomes) >= during_drain > 0

        records = [json.loads(line) for line in served.audit_file.read_text().splitlines()]
        # The stop record is the last event; the log then seals the chain with a signed checkpoint.
        assert [r["action"] for r in records[-2:]] == ["broker.stopped", "audit.checkpoint"]
        assert verify_chain([served.audit_file]).ok
        settings = load_settings(**served.config)
        store = build_store(settings)
        lease = json.loads(store.read(settings.engine.leader_path).field(LEASE_FIELD).get_secret_value())
        assert lease["holder"] is None
        store.close()
