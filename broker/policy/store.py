"""``PolicyStore``: the live policy set, reloaded when the files change.

``reload_if_changed()`` reads the directory, compares the SHA-256 of file
names and contents with the set in force, and, if they differ, validates the
new set and swaps it in atomically. Contents are hashed on every check
rather than trusting mtime and size: policy directories are small, and
Kubernetes ConfigMap updates swap symlinks, which a stat-based check can miss.
An invalid new set is refused and the last good one stays in force; the
outcome is logged, counted in ``broker_policy_reloads_total{outcome}`` and
passed to ``on_reload(outcome, detail)`` (where the audit trail hooks in).
A refused version is reported once, not at every check.

``start()`` runs the check every ``reload_interval_seconds`` in a daemon
thread; tests and apps with their own loop call ``reload_if_changed()``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from broker.errors import PolicyInvalid
from broker.log import get_logger
from broker.metrics import Metrics
from broker.models import Decision, IntegrationRef, Principal
from broker.policy.engine import PolicyEngine
from broker.policy.loader import PolicySet, fingerprint, parse_policy_set, read_policy_dir
from broker.settings import PolicySettings

ReloadOutcome = Literal["loaded", "reloaded", "unchanged", "rejected"]
OnReload = Callable[[ReloadOutcome, str], None]

log = get_logger("policy")


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What one check did: ``loaded`` (start), ``reloaded``, ``unchanged`` or ``rejected`` (old set kept)."""

    outcome: ReloadOutcome
    detail: str
    fingerprint: str


class PolicyStore:
    """Holds the policy set in force and its engine; loads at construction (raises ``PolicyInvalid``)."""

    def __init__(
        self, settings: PolicySettings, *, metrics: Metrics | None = None, on_reload: OnReload | None = None
    ) -> None:
        self.settings = settings
        self._metrics = metrics
        self._on_reload = on_reload
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        files = read_policy_dir(settings.dir)
        policy_set = parse_policy_set(settings.dir, files)
        self._policy_set = policy_set
        self._engine = PolicyEngine.from_policy_set(policy_set)
        self._seen = policy_set.fingerprint
        self._report(ReloadResult("loaded", self._summary(policy_set), policy_set.fingerprint))

    @property
    def policy_set(self) -> PolicySet:
        return self._policy_set

    @property
    def engine(self) -> PolicyEngine:
        """The engine in force (swapped whole on reload; hold on to it for one request)."""
        return self._engine

    def decide(self, principal: Principal, action: str, ref: IntegrationRef | None = None) -> Decision:
        """``PolicyEngine.decide`` with the rules in force."""
        return self._engine.decide(principal, action, ref)

    def reload_if_changed(self) -> ReloadResult:
        """Check the directory once; swap in a changed valid set, keep the old one if it is invalid."""
        with self._lock:
            try:
                files = read_policy_dir(self.settings.dir)
            except PolicyInvalid as exc:
                return self._refuse(f"dir:{exc.message}", exc.message)
            current = fingerprint(files)
            if current == self._seen:
                return ReloadResult("unchanged", "policy files unchanged", current)
            try:
                policy_set = parse_policy_set(self.settings.dir, files)
            except PolicyInvalid as exc:
                return self._refuse(current, exc.message)
            self._policy_set = policy_set
            self._engine = PolicyEngine.from_policy_set(policy_set)
            self._seen = current
            result = ReloadResult("reloaded", self._summary(policy_set), current)
        self._report(result)
        return result

    def _refuse(self, seen: str, message: str) -> ReloadResult:
        if seen == self._seen:
            return ReloadResult("unchanged", "policy files unchanged (still invalid)", seen)
        self._seen = seen
        result = ReloadResult("rejected", f"kept the last good policies: {message}", seen)
        self._report(result)
        return result

    @staticmethod
    def _summary(policy_set: PolicySet) -> str:
        rules = sum(1 for _ in policy_set.rules())
        return f"{rules} rules from {len(policy_set.documents)} files in {policy_set.directory}"

    def _report(self, result: ReloadResult) -> None:
        if self._metrics is not None:
            self._metrics.policy_reloads.labels(outcome=result.outcome).inc()
        if result.outcome == "rejected":
            log.error("policy reload rejected", outcome=result.outcome, detail=result.detail)
        else:
            log.info("policies loaded", outcome=result.outcome, detail=result.detail, fingerprint=result.fingerprint)
        if self._on_reload is not None:
            try:
                self._on_reload(result.outcome, result.detail)
            except Exception:
                log.exception("on_reload callback failed", outcome=result.outcome)

    def start(self) -> None:
        """Check every ``reload_interval_seconds`` in a daemon thread (no-op when the interval is 0)."""
        if self.settings.reload_interval_seconds <= 0 or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="policy-reload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the reload thread and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.settings.reload_interval_seconds):
            try:
                self.reload_if_changed()
            except Exception:
                log.exception("policy reload check failed")


__all__ = ["OnReload", "PolicyStore", "ReloadOutcome", "ReloadResult"]
