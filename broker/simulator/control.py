"""Test controls of the simulator: fault injection, rate limits, request log.

None of this exists at the real OEM; it is what makes the broker's failure
handling testable. Faults are decided with a seeded RNG so a run can be
reproduced.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

REQUEST_LOG_MAX_ENTRIES = 10_000

# Endpoint names, as used in the request log, counts and fault specs.
ENDPOINTS = frozenset(
    {
        "organization.create",
        "organization.delete",
        "user.create",
        "user.delete",
        "vendor.list",
        "integration.create",
        "integration.list",
        "integration.revoke",
        "vendor_api.accounts.create",
        "vendor_api.accounts.list",
        "vendor_api.services.create",
        "vendor_api.status",
    }
)


class FaultSpec(BaseModel):
    """One injected fault, as given on the CLI or to ``POST /_sim/faults``.

    ``endpoint`` limits it to one endpoint name (e.g. ``integration.create``);
    ``requests`` limits it to the next N matching requests (unset = forever).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_ms: float = Field(0.0, ge=0, description="Delay added before the request is handled, in ms.")
    error_rate: float = Field(0.0, ge=0, le=1, description="Probability of answering error_status unprocessed.")
    error_status: int = Field(503, ge=500, le=599, description="Status of injected server errors.")
    hang_seconds: float = Field(0.0, ge=0, description="Hang this long before handling (client timeouts), in s.")
    lose_response: bool = Field(False, description="Handle the request, then drop the connection unanswered.")
    endpoint: str | None = Field(None, description="Only requests to this endpoint name.")
    requests: int | None = Field(None, ge=1, description="Only the next N matching requests.")

    @field_validator("endpoint")
    @classmethod
    def _known_endpoint(cls, value: str | None) -> str | None:
        if value is not None and value not in ENDPOINTS:
            raise ValueError(f"unknown endpoint; use one of {', '.join(sorted(ENDPOINTS))}")
        return value


@dataclass
class _ActiveFault:
    id: int
    spec: FaultSpec
    remaining: int | None

    def view(self) -> dict[str, Any]:
        return {"id": self.id, **self.spec.model_dump(), "remaining": self.remaining}


@dataclass(frozen=True)
class FaultPlan:
    """What to do to one request, after every matching fault was consulted."""

    latency_seconds: float = 0.0
    hang_seconds: float = 0.0
    error_status: int | None = None
    lose_response: bool = False
    fault_ids: tuple[int, ...] = ()


class Faults:
    """The active faults; ``plan()`` consumes one request from each that matches."""

    def __init__(self, specs: list[FaultSpec] | None = None, rng_seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._rng_seed = rng_seed
        self._rng = random.Random(rng_seed)  # noqa: S311 - reproducible fault decisions, not crypto
        self._next_id = 1
        self._faults: list[_ActiveFault] = []
        for spec in specs or []:
            self.add(spec)

    def add(self, spec: FaultSpec) -> int:
        """Activate a fault; return its id."""
        with self._lock:
            fault = _ActiveFault(self._next_id, spec, spec.requests)
            self._next_id += 1
            self._faults.append(fault)
            return fault.id

    def replace(self, specs: list[FaultSpec], rng_seed: int | None = None) -> None:
        """Replace every fault (and optionally reseed the RNG)."""
        with self._lock:
            self._faults = []
            if rng_seed is not None:
                self._rng_seed = rng_seed
            self._rng = random.Random(self._rng_seed)  # noqa: S311
        for spec in specs:
            self.add(spec)

    def view(self) -> list[dict[str, Any]]:
        """The active faults, for ``GET /_sim/faults``."""
        with self._lock:
            return [f.view() for f in self._faults]

    def plan(self, endpoint: str) -> FaultPlan:
        """Decide the faults for one request to ``endpoint``."""
        latency = hang = 0.0
        status: int | None = None
        lose = False
        ids: list[int] = []
        with self._lock:
            for fault in self._faults:
                spec = fault.spec
                if spec.endpoint is not None and spec.endpoint != endpoint:
                    continue
                if fault.remaining is not None:
                    fault.remaining -= 1
                ids.append(fault.id)
                latency += spec.latency_ms / 1000.0
                hang = max(hang, spec.hang_seconds)
                if spec.error_rate > 0 and status is None and self._rng.random() < spec.error_rate:
                    status = spec.error_status
                lose = lose or spec.lose_response
            self._faults = [f for f in self._faults if f.remaining is None or f.remaining > 0]
        return FaultPlan(latency, hang, status, lose, tuple(ids))


class RateLimitSpec(BaseModel):
    """A per-client token bucket: ``capacity`` requests, refilled continuously."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    capacity: int = Field(ge=1, description="Bucket size: requests allowed in a burst.")
    refill_per_second: float = Field(gt=0, description="Tokens added per second.")


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets keyed by client; ``take()`` returns None or Retry-After seconds."""

    def __init__(self, spec: RateLimitSpec | None = None, clock: Any = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.spec = spec
        self._buckets: dict[str, _Bucket] = {}

    def configure(self, spec: RateLimitSpec | None) -> None:
        """Set (or with None, switch off) the limit; buckets start full."""
        with self._lock:
            self.spec = spec
            self._buckets = {}

    def take(self, key: str) -> int | None:
        """Consume one token for ``key``; when empty, the whole seconds until one is back (>= 1)."""
        with self._lock:
            spec = self.spec
            if spec is None:
                return None
            now = self._clock()
            bucket = self._buckets.setdefault(key, _Bucket(float(spec.capacity), now))
            bucket.tokens = min(float(spec.capacity), bucket.tokens + (now - bucket.updated) * spec.refill_per_second)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return None
            return max(1, math.ceil((1.0 - bucket.tokens) / spec.refill_per_second))


@dataclass
class RequestRecord:
    """One request as the simulator saw it (monotonic time of arrival)."""

    seq: int
    monotonic: float
    method: str
    path: str
    endpoint: str
    client_id: str | None = None
    status: int | None = None
    outcome: str = "pending"
    fault_ids: tuple[int, ...] = ()

    def view(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "monotonic": self.monotonic,
            "method": self.method,
            "path": self.path,
            "endpoint": self.endpoint,
            "clientId": self.client_id,
            "status": self.status,
            "outcome": self.outcome,
            "faultIds": list(self.fault_ids),
        }


@dataclass
class RequestLog:
    """Bounded log of API requests (``/_sim/*`` excluded) and counts per endpoint."""

    entries: deque[RequestRecord] = field(default_factory=lambda: deque(maxlen=REQUEST_LOG_MAX_ENTRIES))
    counts: dict[str, int] = field(default_factory=dict)
    _seq: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, method: str, path: str, endpoint: str) -> RequestRecord:
        """Append a record for a request that just arrived."""
        with self._lock:
            self._seq += 1
            entry = RequestRecord(self._seq, time.monotonic(), method, path, endpoint)
            self.entries.append(entry)
            self.counts[endpoint] = self.counts.get(endpoint, 0) + 1
            return entry

    def clear(self) -> None:
        """Forget every request."""
        with self._lock:
            self.entries.clear()
            self.counts = {}

    def view(self) -> dict[str, Any]:
        """Counts and entries, for ``GET /_sim/requests``."""
        with self._lock:
            return {"counts": dict(self.counts), "requests": [e.view() for e in self.entries]}


DuplicateMode = Literal["new", "conflict"]
