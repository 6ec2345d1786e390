"""Starting `python -m broker serve` as a subprocess for the end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from broker.client import BrokerClient
from broker.models import IntegrationRef
from broker.settings import settings_env
from broker.testing.jwt import DevIssuer
from broker.testing.servers import free_port

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


@contextmanager
def serve_broker(
    broker_config: Callable[..., dict[str, Any]],
    seed_vendor: Callable[..., None],
    tmp_path: Path,
    *,
    server: dict[str, Any] | None = None,
) -> Iterator[Served]:
    """`broker serve` on a free port with the e2e policy and one desired integration; stopped by SIGTERM."""
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
        server={"port": port, "shutdown_grace_seconds": 15, "drain_seconds": 1.0, **(server or {})},
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
