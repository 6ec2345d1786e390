"""Process wiring: one ``Settings`` in, every client built once, injected, started, stopped.

``Runtime`` owns the secret store (and its cache), the OEM client, the audit
log, the policy store, the authenticator, the engine with its reconcile loop
and leader lease, a background health checker, and the ``BrokerService``
that the HTTP routes call. Nothing here runs at import time.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from broker.audit import AuditLog
from broker.engine.core import Engine
from broker.engine.desired import DesiredIntegration, DesiredState, load_desired
from broker.engine.leader import KubernetesLease, Lease, StoreLease
from broker.engine.ports import AuditPort, NullAudit, OemPort
from broker.engine.reconcile import Reconciler, VendorKeyWatcher
from broker.errors import BrokerError, ConfigError
from broker.identity import Authenticator
from broker.log import get_logger
from broker.metrics import Metrics
from broker.oem.client import HttpOemClient
from broker.policy import PolicyStore
from broker.service import BrokerService
from broker.settings import Settings
from broker.stores.base import SecretStore
from broker.stores.caching import CachingStore
from broker.stores.factory import build_store

log = get_logger("runtime")


@dataclass
class _Health:
    """When each dependency last answered (monotonic seconds), for /readyz."""

    last_ok: dict[str, float] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)


class Runtime:
    """Everything one broker process runs (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: SecretStore | None = None,
        oem: OemPort | None = None,
        authenticator: Authenticator | None = None,
        lease: Lease | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.audit = AuditLog(settings.audit, metrics=self.metrics)
        self.policy = PolicyStore(settings.policy, metrics=self.metrics, on_reload=self._policy_reloaded)
        self.store = store or build_store(settings, metrics=self.metrics)
        self.cache = CachingStore(
            self.store,
            ttl_seconds=settings.tokens.cache_ttl_seconds,
            max_stale_seconds=settings.tokens.max_stale_seconds,
            metrics=self.metrics,
        )
        self._owns_oem = oem is None
        self.oem: OemPort = oem or HttpOemClient(settings.oem, metrics=self.metrics)
        desired_file = settings.engine.desired_file
        self.desired = DesiredState(load_desired(desired_file) if desired_file else [])
        self.engine = Engine(
            settings,
            self.store,
            self.oem,
            audit=self.audit,
            metrics=self.metrics,
            on_key_change=lambda ref: self.cache.invalidate(self.engine.partner_path(ref)),
        )
        self.authenticator = authenticator or Authenticator(settings.identity, metrics=self.metrics)
        self.lease: Lease = lease or build_lease(settings, self.store, self.engine.owner)
        self.watcher = VendorKeyWatcher(
            self.store,
            self.engine.vendor_path,
            audit=self.audit,
            on_change=lambda vendor_id, _old, _new: self.cache.invalidate(self.engine.vendor_path(vendor_id)),
        )
        self.reconciler = Reconciler(
            self.engine,
            self.desired,
            self.lease,
            interval_seconds=settings.engine.reconcile_interval_seconds,
            jitter_ratio=settings.engine.reconcile_jitter_ratio,
            metrics=self.metrics,
        )
        self.service = BrokerService(
            settings,
            authenticator=self.authenticator,
            policy=self.policy,
            cache=self.cache,
            audit=self.audit,
            engine=self.engine,
            desired=self.desired,
            metrics=self.metrics,
            trigger_reconcile=self.reconciler.trigger,
        )
        self._health = _Health()
        self._draining = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle ------------------------------------------------------------------

    def _policy_reloaded(self, outcome: str, detail: str) -> None:
        self.audit.record(
            "policy.reloaded",
            "failure" if outcome == "rejected" else "success",
            reason=detail[:500],
            details={"outcome": outcome},
        )

    def start(self) -> None:
        """Start background work: audit writer, policy reload, reconcile loop, health checks."""
        self.audit.start()
        self.audit.record("broker.started", "success", details={"owner": self.engine.owner})
        self.policy.start()
        self._spawn("reconcile", self.reconciler.run)
        self._spawn("health", self._health_loop)

    def _spawn(self, name: str, target: Any) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        """Stop in reverse order; release the lease; close the audit chain with a stop record."""
        self._stop.set()
        self.reconciler.stop()
        for thread in self._threads:
            thread.join(timeout=30)
        self.policy.stop()
        try:
            self.audit.record("broker.stopped", "success", details={"owner": self.engine.owner})
        except BrokerError as exc:
            log.error("could not audit the stop", code=exc.code)
        self.audit.close()
        self.cache.close()
        if self._owns_oem and hasattr(self.oem, "close"):
            self.oem.close()
        self.authenticator.close()

    # -- health -----------------------------------------------------------------------

    def _check(self, name: str, probe: Any) -> None:
        try:
            probe()
        except (BrokerError, httpx.HTTPError, OSError) as exc:
            self._health.last_error[name] = getattr(exc, "code", type(exc).__name__)
        else:
            self._health.last_ok[name] = time.monotonic()
            self._health.last_error.pop(name, None)

    def _oem_reachable(self) -> None:
        httpx.get(self.settings.oem.base_url, timeout=self.settings.oem.connect_timeout_seconds)

    def check_dependencies(self) -> None:
        """One round of health checks and a vendor-key version check."""
        self._check("store", self.store.health)
        self._check("oem", self._oem_reachable)
        self.watcher.check({d.ref.vendor_id for d in self.desired})

    def _health_loop(self) -> None:
        period = min(self.settings.engine.vendor_key_poll_seconds, self.settings.server.readiness_max_age_seconds / 3)
        while True:
            self.check_dependencies()
            if self._stop.wait(period):
                return

    def begin_drain(self) -> None:
        """Shutdown started: report not-ready so traffic moves elsewhere, keep serving meanwhile."""
        self._draining = True
        log.info("draining: /readyz now reports 503", drain_seconds=self.settings.server.drain_seconds)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Cheap: reads what the background checks recorded."""
        now = time.monotonic()
        max_age = self.settings.server.readiness_max_age_seconds
        checks: dict[str, Any] = {
            "accepting": not self._draining,
            "policies": True,
            "first_sync": self.reconciler.first_sync_done.is_set(),
            "audit": self.audit.healthy,
        }
        for name in ("store", "oem"):
            seen = self._health.last_ok.get(name)
            checks[name] = seen is not None and now - seen <= max_age
            if name in self._health.last_error:
                checks[f"{name}_error"] = self._health.last_error[name]
        ok = all(v for k, v in checks.items() if not k.endswith("_error"))
        checks["leader"] = self.reconciler.is_leader
        return ok, checks


def in_kubernetes() -> bool:
    """True inside a pod (the API server's env vars are set)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def build_lease(settings: Settings, store: SecretStore, holder: str) -> Lease:
    """The leader lease ``engine.leader_election`` asks for (see ``broker.engine.leader``)."""
    engine = settings.engine
    choice = engine.leader_election
    if choice == "auto":
        choice = "kubernetes" if in_kubernetes() else "store"
    if choice == "store":
        return StoreLease(
            store,
            engine.leader_path,
            holder,
            lease_seconds=engine.leader_lease_seconds,
            renew_seconds=engine.leader_renew_seconds,
        )
    api_url = engine.kubernetes_api_url
    if api_url is None:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise ConfigError("BROKER_ENGINE__KUBERNETES_API_URL is needed outside a pod for a Kubernetes Lease")
        api_url = f"https://{host}:{port}"
    namespace = engine.lease_namespace
    if namespace is None:
        ns_file = engine.kubernetes_token_path.with_name("namespace")
        try:
            namespace = ns_file.read_text(encoding="utf-8").strip()
        except OSError:
            raise ConfigError(f"BROKER_ENGINE__LEASE_NAMESPACE is unset and {ns_file} is unreadable") from None
    return KubernetesLease(
        api_url=api_url,
        namespace=namespace,
        name=engine.lease_name,
        holder=holder,
        lease_seconds=engine.leader_lease_seconds,
        token_path=engine.kubernetes_token_path,
        ca_bundle_path=engine.kubernetes_ca_bundle_path,
    )


@dataclass
class EngineHandle:
    """An engine for one-shot commands (CLI, ``broker dev``) and what to close after it."""

    engine: Engine
    desired: list[DesiredIntegration]
    closers: list[Callable[[], None]]

    def close(self) -> None:
        for closer in reversed(self.closers):
            closer()


def build_engine(settings: Settings, *, audited: bool, desired_file: Path | None = None) -> EngineHandle:
    """Store, OEM client and (optionally) audit log for one-shot engine use.

    One writer per audit chain file: a running server holds the main file, so
    one-shot commands keep their own chain in ``<audit dir>/cli/`` (verify each).
    """
    metrics = Metrics()
    store = build_store(settings, metrics=metrics)
    closers: list[Callable[[], None]] = [store.close]
    oem = HttpOemClient(settings.oem, metrics=metrics)
    closers.append(oem.close)
    audit: AuditPort = NullAudit()
    if audited:
        audit_settings = settings.audit
        if audit_settings.file_path is not None:
            cli_file = audit_settings.file_path.parent / "cli" / audit_settings.file_path.name
            audit_settings = audit_settings.model_copy(update={"file_path": cli_file})
        log = AuditLog(audit_settings, metrics=metrics).start()
        closers.append(log.close)
        audit = log
    path = desired_file or settings.engine.desired_file
    desired = load_desired(path) if path else []
    return EngineHandle(Engine(settings, store, oem, audit=audit, metrics=metrics), desired, closers)
