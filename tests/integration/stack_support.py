"""A whole broker stack for HTTP-level tests: real JWTs, policies, audit, store and simulator."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from broker.engine.desired import DesiredIntegration
from broker.models import IntegrationRef
from broker.runtime import Runtime
from broker.settings import load_settings
from broker.testing.broker import BrokerThread, start_broker_thread
from broker.testing.jwt import DevIssuer

REF = IntegrationRef("org-contoso", "vendor-acme")
VENDOR_KEY = "acme-vendor-key-dev"

POLICY = """
version: 1
description: API test policy
rules:
  - id: apps-payments
    effect: allow
    subjects: [{namespace: apps, service_account: payments}]
    integrations: [{organization: "org-*", vendor: "vendor-acme"}]
    actions: [token:issue]
    max_ttl_seconds: 300
  - id: apps-capped
    effect: allow
    subjects: [{namespace: apps, service_account: capped}]
    integrations: [{organization: "*", vendor: "*"}]
    actions: [token:issue]
    max_ttl_seconds: 60
  - id: apps-short
    effect: allow
    subjects: [{namespace: apps, service_account: short}]
    integrations: [{organization: "*", vendor: "*"}]
    actions: [token:issue]
    max_ttl_seconds: 3
  - id: apps-deny-blocked
    effect: deny
    subjects: [{namespace: apps, service_account: blocked}]
    actions: ["*"]
  - id: apps-blocked-allow
    effect: allow
    subjects: [{namespace: apps, service_account: blocked}]
    integrations: [{organization: "*", vendor: "*"}]
    actions: [token:issue]
  - id: platform-admin
    effect: allow
    subjects: [{namespace: platform, service_account: admin}]
    actions: ["integration:*"]
"""


@dataclass
class Stack:
    broker: BrokerThread
    runtime: Runtime
    issuer: DevIssuer
    config: dict[str, Any]
    audit_path: Path

    def bearer(self, namespace: str = "apps", account: str = "payments", **kw: Any) -> dict[str, str]:
        return {"Authorization": "Bearer " + self.issuer.mint(namespace, account, **kw)}

    def post_token(self, body: dict[str, Any] | None = None, **who: Any) -> httpx.Response:
        body = body if body is not None else {"organization_id": REF.organization_id, "vendor_id": REF.vendor_id}
        return httpx.post(f"{self.broker.url}/v1/tokens", json=body, headers=self.bearer(**who), timeout=10)

    def reads(self) -> float:
        backend = self.runtime.settings.store.backend
        return (
            self.runtime.metrics.registry.get_sample_value(
                "broker_backend_calls_total", {"backend": backend, "operation": "read"}
            )
            or 0.0
        )


def build_stack(config: dict[str, Any], tmp_path: Path, issuer: DevIssuer) -> Stack:
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "test.yaml").write_text(POLICY)
    desired = tmp_path / "desired.yaml"
    desired.write_text(f"integrations:\n  - organizationId: {REF.organization_id}\n    vendorId: {REF.vendor_id}\n")
    config["policy"] = {"dir": str(policies), "reload_interval_seconds": 0}
    config["identity"] = {"mode": "jwks", "issuer": issuer.issuer, "audience": "mspc-broker"}
    config.setdefault("engine", {}).update({"desired_file": str(desired), "reconcile_interval_seconds": 3600})
    settings = load_settings(**config)
    runtime = Runtime(settings)
    assert runtime.engine.provision(DesiredIntegration(REF)).ok
    broker = start_broker_thread(runtime)
    # The first reconcile pass reads the store too; let it finish so tests count only their own reads.
    assert runtime.reconciler.first_sync_done.wait(30)
    return Stack(broker, runtime, issuer, config, Path(config["audit"]["file_path"]))
