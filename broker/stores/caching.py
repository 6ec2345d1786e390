"""A caching ``SecretStore`` wrapper for the token hot path.

* **Single flight**: concurrent misses for one key wait on one backend read.
* **Refresh ahead**: a hit past ``(1 - refresh_ahead_ratio) * ttl`` (with
  jitter) is served at once while one background read refreshes it.
* **Serve stale, bounded and visibly**: when the backend fails, the last good
  value is served (``stale=True``) for up to ``max_stale_seconds`` past its
  freshness; after that the read fails with ``StoreUnavailable`` carrying
  ``retry_after_seconds``.
* **Invalidation**: the broker's own writes and stage moves through this
  wrapper drop the path at once; ``invalidate(path)`` does it for others
  (vendor-key version changes).

Reads by explicit version are cached too (versions are immutable).
``describe`` is never cached: it is how callers notice change.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from broker.errors import BrokerError, StoreUnavailable, Unavailable
from broker.metrics import Metrics
from broker.models import SecretInfo, SecretValue, Stage, WriteResult
from broker.stores.base import SecretStore

CacheKey = tuple[str, str | None, str | None]


@dataclass(frozen=True, slots=True)
class CachedRead:
    """A value and whether it is being served past its freshness."""

    value: SecretValue
    stale: bool
    age_seconds: float


@dataclass(slots=True)
class _Entry:
    value: SecretValue
    fetched_at: float
    refresh_at: float
    expires_at: float


class CachingStore:
    """``SecretStore`` wrapper: single-flight, refresh-ahead, bounded stale serving."""

    def __init__(
        self,
        inner: SecretStore,
        *,
        ttl_seconds: float,
        max_stale_seconds: float,
        refresh_ahead_ratio: float = 0.2,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        max_entries: int = 100_000,
    ) -> None:
        self.inner = inner
        self.backend = inner.backend
        self._ttl = ttl_seconds
        self._max_stale = max_stale_seconds
        self._ahead = refresh_ahead_ratio
        self._metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: dict[CacheKey, _Entry] = {}
        self._inflight: dict[CacheKey, Future[SecretValue]] = {}
        self._generation: dict[str, int] = {}
        self._refresher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cache-refresh")
        self._event_counters: dict[str, Any] = {}

    # -- metrics ---------------------------------------------------------------

    def _event(self, name: str) -> None:
        if self._metrics is not None:
            counter = self._event_counters.get(name)
            if counter is None:  # labels() takes a lock and builds a key: once per event name
                counter = self._event_counters[name] = self._metrics.cache_events.labels(event=name)
            counter.inc()

    # -- cached reads ------------------------------------------------------------

    def peek(self, path: str, *, version: str | None = None, stage: Stage | None = None) -> CachedRead | None:
        """A fresh cached value without any I/O (None on a miss or when it needs a refresh)."""
        key = (path, version, stage.value if stage else None)
        now = self._clock()
        entry = self._entries.get(key)
        if entry is None or now >= entry.refresh_at:
            return None
        self._event("hit")
        return CachedRead(entry.value, False, now - entry.fetched_at)

    def read_cached(self, path: str, *, version: str | None = None, stage: Stage | None = None) -> CachedRead:
        """Read through the cache; see the module docstring for the rules."""
        key = (path, version, stage.value if stage else None)
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None and now < entry.expires_at:
            self._event("hit")
            if now >= entry.refresh_at:
                self._refresh_in_background(key)
            return CachedRead(entry.value, False, now - entry.fetched_at)
        try:
            value = self._load(key)
        except (Unavailable, StoreUnavailable) as exc:
            return self._serve_stale(key, exc)
        return CachedRead(value, False, 0.0)

    def _serve_stale(self, key: CacheKey, exc: BrokerError) -> CachedRead:
        now = self._clock()
        entry = self._entries.get(key)
        if entry is None or now > entry.expires_at + self._max_stale:
            if self._metrics is not None:
                self._metrics.staleness_seconds.set(0)
            retry = exc.retry_after_seconds or 1.0
            raise StoreUnavailable(
                f"{self.backend} unavailable and no cached value within the staleness budget "
                f"({self._max_stale:.0f}s): {exc.message}",
                retry_after_seconds=retry,
            ) from exc
        self._event("stale")
        age = now - entry.fetched_at
        if self._metrics is not None:
            self._metrics.staleness_seconds.set(now - entry.expires_at)
        return CachedRead(entry.value, True, age)

    def _load(self, key: CacheKey) -> SecretValue:
        """Single flight: the first caller reads, concurrent callers wait for its result."""
        with self._lock:
            future = self._inflight.get(key)
            leader = future is None
            if future is None:
                future = Future()
                self._inflight[key] = future
                generation = self._generation.get(key[0], 0)
        if not leader:
            self._event("coalesced")
            return future.result()
        self._event("miss")
        try:
            value = self._fetch(key)
        except BaseException as exc:
            with self._lock:
                self._inflight.pop(key, None)
            future.set_exception(exc)
            raise
        with self._lock:
            self._inflight.pop(key, None)
            if self._generation.get(key[0], 0) == generation:
                self._store_entry(key, value)
        future.set_result(value)
        return value

    def _fetch(self, key: CacheKey) -> SecretValue:
        path, version, stage = key
        return self.inner.read(path, version=version, stage=Stage(stage) if stage else None)

    def _store_entry(self, key: CacheKey, value: SecretValue) -> None:
        now = self._clock()
        ttl = self._ttl
        # Refresh somewhere in the last `ahead` fraction of the TTL, so many
        # keys loaded together do not all refresh in the same instant.
        ahead = ttl * self._ahead * (0.5 + 0.5 * self._rng.random())
        if len(self._entries) >= self._max_entries:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = _Entry(value, now, now + ttl - ahead, now + ttl)
        if self._metrics is not None:
            self._metrics.staleness_seconds.set(0)

    def _refresh_in_background(self, key: CacheKey) -> None:
        with self._lock:
            if key in self._inflight:
                return
        self._event("refresh")

        def run() -> None:
            # A failure is left to the next foreground read (stale or error).
            with contextlib.suppress(BrokerError):
                self._load(key)

        self._refresher.submit(run)

    def invalidate(self, path: str | None = None) -> None:
        """Drop cached values of ``path`` (all paths when None)."""
        with self._lock:
            if path is None:
                self._entries.clear()
                for p in list(self._generation):
                    self._generation[p] += 1
                return
            for key in [k for k in self._entries if k[0] == path]:
                del self._entries[key]
            self._generation[path] = self._generation.get(path, 0) + 1

    # -- SecretStore -------------------------------------------------------------

    def read(self, path: str, *, version: str | None = None, stage: Stage | None = None) -> SecretValue:
        return self.read_cached(path, version=version, stage=stage).value

    def describe(self, path: str) -> SecretInfo:
        return self.inner.describe(path)

    def write(
        self, path: str, data: Mapping[str, SecretStr], *, expected_latest: str | None, idempotency_key: str
    ) -> WriteResult:
        try:
            return self.inner.write(path, data, expected_latest=expected_latest, idempotency_key=idempotency_key)
        finally:
            self.invalidate(path)

    def move_stage(self, path: str, stage: Stage, version: str | None, *, expected: str | None) -> None:
        try:
            self.inner.move_stage(path, stage, version, expected=expected)
        finally:
            self.invalidate(path)

    def health(self) -> None:
        self.inner.health()

    def close(self) -> None:
        self._refresher.shutdown(wait=False, cancel_futures=True)
        self.inner.close()
