"""The long-running reconcile loop and the vendor-key watcher.

``Reconciler.run`` wakes every ``reconcile_interval_seconds`` (plus jitter)
or when ``trigger()`` is called, and, while this replica holds the lease,
reconciles every desired integration. ``VendorKeyWatcher`` notices new
vendor-key versions with cheap metadata reads and tells its listeners.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

from broker.engine.core import Engine, Outcome
from broker.engine.desired import DesiredState
from broker.engine.leader import Lease
from broker.engine.ports import AuditPort, NullAudit
from broker.errors import BrokerError, SecretNotFound
from broker.log import get_logger
from broker.metrics import Metrics
from broker.models import Stage
from broker.stores.base import SecretStore

log = get_logger("reconcile")


class VendorKeyWatcher:
    """Polls vendor-key metadata; calls ``on_change(vendor_id, old, new)`` on a new version."""

    def __init__(
        self,
        store: SecretStore,
        path_for: Callable[[str], str],
        *,
        audit: AuditPort | None = None,
        on_change: Callable[[str, str | None, str], None] | None = None,
    ) -> None:
        self._store = store
        self._path_for = path_for
        self._audit: AuditPort = audit or NullAudit()
        self._on_change = on_change
        self._seen: dict[str, str] = {}

    def known_version(self, vendor_id: str) -> str | None:
        return self._seen.get(vendor_id)

    def check(self, vendor_ids: set[str]) -> list[str]:
        """Compare each vendor key's current version with the last seen; return changed ids."""
        changed: list[str] = []
        for vendor_id in sorted(vendor_ids):
            try:
                info = self._store.describe(self._path_for(vendor_id))
            except SecretNotFound:
                continue
            except BrokerError as exc:
                log.warning("vendor key check failed", vendor_id=vendor_id, code=exc.code)
                continue
            version = info.stages.get(Stage.CURRENT) or info.latest_version
            if version is None:
                continue
            old = self._seen.get(vendor_id)
            self._seen[vendor_id] = version
            if old is not None and old != version:
                changed.append(vendor_id)
                log.info("vendor key changed", vendor_id=vendor_id, old_version=old, new_version=version)
                try:
                    self._audit.record(
                        "vendor_key.version_changed",
                        "success",
                        vendor_id=vendor_id,
                        details={"old_version": old, "new_version": version},
                    )
                except BrokerError as exc:
                    log.error("audit record lost", action="vendor_key.version_changed", code=exc.code)
                if self._on_change is not None:
                    self._on_change(vendor_id, old, version)
        return changed


class Reconciler:
    """Runs ``Engine.reconcile_all`` on an interval, as leader only."""

    def __init__(
        self,
        engine: Engine,
        desired: DesiredState,
        lease: Lease,
        *,
        interval_seconds: float,
        jitter_ratio: float,
        watcher: VendorKeyWatcher | None = None,
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._engine = engine
        self._desired = desired
        self._lease = lease
        self._interval = interval_seconds
        self._jitter = jitter_ratio
        self._watcher = watcher
        self._metrics = metrics
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.first_sync_done = threading.Event()
        self.is_leader = False
        self.last_outcomes: list[Outcome] = []

    def trigger(self) -> None:
        """Reconcile as soon as possible (admin API, new desired integration)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def run_once(self) -> list[Outcome]:
        """One pass: vendor-key check, then (as leader) reconcile everything."""
        items = list(self._desired)
        if self._watcher is not None:
            self._watcher.check({i.ref.vendor_id for i in items})
        self.is_leader = self._lease.try_acquire()
        if self._metrics is not None:
            self._metrics.leader.set(1 if self.is_leader else 0)
        if not self.is_leader:
            self.first_sync_done.set()
            return []
        outcomes = self._engine.reconcile_all(items)
        self.last_outcomes = outcomes
        self.first_sync_done.set()
        failed = [o for o in outcomes if not o.ok]
        log.info("reconcile pass", integrations=len(outcomes), failed=len(failed))
        return outcomes

    def run(self) -> None:
        """Loop until ``stop()``; releases the lease on the way out."""
        try:
            while not self._stop.is_set():
                try:
                    self.run_once()
                except BrokerError as exc:
                    log.warning("reconcile pass failed", code=exc.code)
                delay = self._interval * (1 + self._rng.uniform(0, self._jitter))
                self._wake.wait(delay)
                self._wake.clear()
        finally:
            if self.is_leader:
                self._lease.release()
                if self._metrics is not None:
                    self._metrics.leader.set(0)
