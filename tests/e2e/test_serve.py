"""End to end: `python -m broker serve` as a subprocess, real store, simulator, JWKS issuer and SDK."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from broker.audit import verify_chain
from broker.client import BrokerClient
from broker.engine.leader import LEASE_FIELD
from broker.engine.state import PARTNER_KEY_FIELD
from broker.models import IntegrationRef, Stage
from broker.mspc_token import compose
from broker.settings import load_settings, settings_env
from broker.stores.factory import build_store
from broker.testing.jwt import DevIssuer
from broker.testing.servers import free_port

pytestmark = pytest.mark.e2e

REF = IntegrationRef("org-contoso", "vendor-acme")
VENDOR_KEY = "acme-vendor-key-dev"
POLICY = """
version: 1
rules:
  - id: e2e-workload
    effect: allow
    subjects: [{namespace: apps, service_account: payments}]
    integrations: [{organization: "*", vendor: "vendor-acme"}]
    actions: [token:issue]
  - id: e2e-admin
    effect: allow
    subjects: [{namespace: platform, service_account: admin}]
    actions: ["integration:*"]
"""


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    url: str
    config: dict[str, Any]
    issuer: DevIssuer
    log_path: Path

    def client(self) -> BrokerClient:
        return BrokerClient(
            self.url,
            organization_id=REF.organization_id,
            vendor_id=REF.vendor_id,
            sa_token=SecretStr(self.issuer.mint("apps", "payments")),
        )

    def admin(self) -> dict[str, str]:
        return {"Authorization": "Bearer " + self.issuer.mint("platform", "admin")}

    @property
    def audit_file(self) -> Path:
        return Path(self.config["audit"]["file_path"])


@pytest.fixture
def served(
    broker_config: Callable[..., dict[str, Any]], seed_vendor: Callable[..., None], tmp_path: Path
) -> Iterator[Served]:
    issuer = DevIssuer().start()
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "e2e.yaml").write_text(POLICY)
    desired = tmp_path / "integrations.yaml"
    desired.write_text(f"integrations:\n  - {{organizationId: {REF.organization_id}, vendorId: {REF.vendor_id}}}\n")
    port = free_port()
    config = broker_config(
        identity={"mode": "jwks", "issuer": issuer.issuer},
        policy={"dir": str(policies)},
        tokens={"default_ttl_seconds": 3, "max_ttl_seconds": 3},
        engine={
            "desired_file": str(desired),
            "grace_seconds": 4,
            "reconcile_interval_seconds": 0.5,
            "reconcile_jitter_ratio": 0.0,
        },
        server={"port": port, "shutdown_grace_seconds": 15, "drain_seconds": 1.0},
        log={"format": "json"},
    )
    seed_vendor(config, REF.vendor_id, VENDOR_KEY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(settings_env(config))
    log_path = tmp_path / "broker.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve"], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    url = f"http://127.0.0.1:{port}"
    served = Served(process, url, config, issuer, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "broker not ready: " + log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        yield served
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
        issuer.stop()


class TestServe:
    def test_workload_gets_a_token_and_calls_the_vendor_api(self, served: Served, sim: Any) -> None:
        """A workload authenticates with its SA token, gets an MSPC_TOKEN, and the Vendor API accepts it."""
        client = served.client()
        with httpx.Client(base_url=sim.url, auth=client.auth(), timeout=10) as vendor_api:
            assert vendor_api.get("/api/vendor-api/organization/accounts").status_code == 200
        token = client.token()
        assert token.ttl_seconds == 3 and token.partner_key_version
        client.close()

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
