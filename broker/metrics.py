"""Prometheus metrics, one ``Metrics`` object per process (no import-time globals).

Labels never carry secret values: only backend, operation, route, outcome,
code and similar bounded vocabularies.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from broker.errors import BrokerError

# Set (by the worker supervisor, ``broker.api.workers``) in the environment of worker processes,
# before prometheus_client is imported: each process then keeps its values in files there, and
# ``render`` adds up every worker's.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def mark_worker_dead(directory: Path, pid: int) -> None:
    """Drop a stopped worker's live gauges (its counters keep counting in the totals)."""
    multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


class Metrics:
    """All broker metrics on a private registry (tests build their own).

    Gauges say how workers combine (``multiprocess_mode``, used only with
    ``server.workers`` > 1): the largest value among live workers.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._multiprocess_dir = os.environ.get(MULTIPROC_ENV)
        r = self.registry
        self.requests = Counter(
            "broker_http_requests_total",
            "HTTP requests by route and outcome.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "broker_http_request_seconds",
            "HTTP request latency by route.",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.tokens_issued = Counter("broker_tokens_issued_total", "MSPC_TOKENs issued.", ["stale"], registry=r)
        self.tokens_denied = Counter(
            "broker_tokens_denied_total", "Token requests refused, by code.", ["code"], registry=r
        )
        self.cache_events = Counter(
            "broker_cache_events_total", "Key cache hits, misses, coalesced waits, stale serves.", ["event"], registry=r
        )
        self.backend_calls = Counter(
            "broker_backend_calls_total", "Calls to outside systems.", ["backend", "operation"], registry=r
        )
        self.backend_errors = Counter(
            "broker_backend_errors_total",
            "Failed calls to outside systems, by code.",
            ["backend", "operation", "code"],
            registry=r,
        )
        self.backend_seconds = Histogram(
            "broker_backend_call_seconds", "Latency of calls to outside systems.", ["backend", "operation"], registry=r
        )
        self.staleness_seconds = Gauge(
            "broker_cache_staleness_seconds",
            "Age of the oldest value served stale, 0 when fresh.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.key_age_seconds = Gauge(
            "broker_partner_key_age_seconds",
            "Age of each current partner key.",
            ["organization_id", "vendor_id"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.rotations = Counter("broker_rotations_total", "Rotation outcomes.", ["outcome"], registry=r)
        self.provisions = Counter("broker_provisions_total", "Provisioning outcomes.", ["outcome"], registry=r)
        self.orphans = Counter("broker_orphans_total", "Orphaned OEM integrations detected.", ["action"], registry=r)
        self.leader = Gauge(
            "broker_leader", "1 while this replica holds the leader lease.", registry=r, multiprocess_mode="livemax"
        )
        self.audit_failures = Counter(
            "broker_audit_failures_total", "Audit writes that failed or timed out.", ["reason"], registry=r
        )
        self.audit_records = Counter("broker_audit_records_total", "Audit records written.", ["sink"], registry=r)
        self.policy_reloads = Counter(
            "broker_policy_reloads_total", "Policy reloads by outcome.", ["outcome"], registry=r
        )
        self.auth_failures = Counter(
            "broker_auth_failures_total", "Failed authentications by reason.", ["reason"], registry=r
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (of every worker, when there are several)."""
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined, path=self._multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(combined)


@contextmanager
def observed(metrics: Metrics | None, backend: str, operation: str) -> Iterator[None]:
    """Count one call to an outside system, its error code (``BrokerError``) and its latency."""
    started = time.perf_counter()
    if metrics is not None:
        metrics.backend_calls.labels(backend, operation).inc()
    try:
        yield
    except BrokerError as exc:
        if metrics is not None:
            metrics.backend_errors.labels(backend, operation, exc.code).inc()
        raise
    finally:
        if metrics is not None:
            metrics.backend_seconds.labels(backend, operation).observe(time.perf_counter() - started)
