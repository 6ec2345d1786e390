"""Workload SDK: fetch MSPC_TOKENs from the broker and sign Vendor API calls.

    client = BrokerClient("https://mspc-broker.platform:8080", organization_id="org-1", vendor_id="acme")
    vendor_api = httpx.Client(base_url="https://x.mspcentric.app", auth=client.auth())
    vendor_api.get("/api/vendor-api/organization/accounts")

* The caller's identity is its projected service-account token, re-read from
  ``sa_token_file`` on every fetch (the kubelet rotates it).
* Tokens are cached and refreshed once about two thirds of their TTL has
  passed (``refresh_ratio``).
* Fetches retry connection errors, 429 and 5xx with full-jitter backoff, up to
  ``deadline_seconds``; 400/401/403/404/409 fail at once with the broker's
  problem ``code``.
* ``MspcAuth`` (an ``httpx.Auth``) sets ``Authorization: Bearer <MSPC_TOKEN>``
  and, on a 401 from the Vendor API, fetches a fresh token and retries once.

This module is imported by workloads: it depends on httpx and pydantic only.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import threading
import time
from collections.abc import AsyncGenerator, Callable, Generator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

DEFAULT_SA_TOKEN_FILE = Path("/var/run/secrets/mspc-broker/token")
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class BrokerClientError(Exception):
    """A token could not be obtained; ``code`` is the broker's problem code (or a local one)."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class BrokerToken:
    """An issued MSPC_TOKEN and its lineage."""

    token: SecretStr
    expires_at: datetime
    ttl_seconds: int
    lease_id: str
    partner_key_version: str
    vendor_key_version: str
    stale: bool
    fetched_at: float

    def refresh_due(self, now: float, ratio: float) -> bool:
        return now >= self.fetched_at + self.ttl_seconds * ratio

    def metadata(self) -> dict[str, Any]:
        """Everything but the token, for the JSON file beside it."""
        return {
            "expires_at": self.expires_at.isoformat(),
            "ttl_seconds": self.ttl_seconds,
            "lease_id": self.lease_id,
            "partner_key_version": self.partner_key_version,
            "vendor_key_version": self.vendor_key_version,
            "stale": self.stale,
            "fetched_at": datetime.fromtimestamp(self.fetched_at, tz=UTC).isoformat(),
        }


def _parse(body: Any, fetched_at: float) -> BrokerToken:
    try:
        return BrokerToken(
            token=SecretStr(str(body["token"])),
            expires_at=datetime.fromisoformat(str(body["expires_at"]).replace("Z", "+00:00")),
            ttl_seconds=int(body["ttl_seconds"]),
            lease_id=str(body["lease_id"]),
            partner_key_version=str(body["partner_key_version"]),
            vendor_key_version=str(body["vendor_key_version"]),
            stale=bool(body.get("stale", False)),
            fetched_at=fetched_at,
        )
    except (KeyError, TypeError, ValueError):
        raise BrokerClientError("BAD_RESPONSE", "the broker's answer is not a token response") from None


def _problem(response: httpx.Response) -> BrokerClientError:
    try:
        body = response.json()
        code = str(body.get("code") or f"HTTP_{response.status_code}")
        detail = str(body.get("detail") or body.get("title") or "")
    except (ValueError, AttributeError):
        code, detail = f"HTTP_{response.status_code}", response.text[:200]
    return BrokerClientError(code, detail[:300], response.status_code)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class _Retry(Exception):
    """A failed attempt worth retrying (internal to the fetch loops)."""

    def __init__(self, error: BrokerClientError, retry_after: float | None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after = retry_after


class _Core:
    """Settings and the retry policy shared by the sync and async clients."""

    def __init__(
        self,
        broker_url: str,
        *,
        organization_id: str,
        vendor_id: str,
        sa_token_file: Path | None = DEFAULT_SA_TOKEN_FILE,
        sa_token: SecretStr | None = None,
        min_ttl_seconds: int = 0,
        refresh_ratio: float = 2 / 3,
        timeout_seconds: float = 5.0,
        deadline_seconds: float = 30.0,
        backoff_base_seconds: float = 0.2,
        backoff_max_seconds: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = broker_url.rstrip("/") + "/v1/tokens"
        self.body = {"organization_id": organization_id, "vendor_id": vendor_id, "min_ttl_seconds": min_ttl_seconds}
        self.sa_token_file = sa_token_file
        self.sa_token = sa_token
        self.refresh_ratio = refresh_ratio
        self.timeout = timeout_seconds
        self.deadline = deadline_seconds
        self.base = backoff_base_seconds
        self.cap = backoff_max_seconds
        self.clock = clock
        self.rng = random.Random()  # noqa: S311 - jitter, not crypto
        self.current: BrokerToken | None = None

    def headers(self) -> dict[str, str]:
        if self.sa_token is not None:
            identity = self.sa_token.get_secret_value()
        elif self.sa_token_file is not None:
            try:
                identity = self.sa_token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise BrokerClientError(
                    "SA_TOKEN_UNREADABLE", f"cannot read the service-account token {self.sa_token_file}: {exc.strerror}"
                ) from None
        else:
            raise BrokerClientError("SA_TOKEN_UNREADABLE", "no service-account token configured")
        return {"Authorization": f"Bearer {identity}", "Content-Type": "application/json"}

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = self.rng.uniform(0, min(self.cap, self.base * 2**attempt))
        return max(delay, retry_after or 0.0)

    def accept(self, response: httpx.Response) -> BrokerToken:
        """The token from a 201; raise at once on a final refusal, ``_Retry`` on a retryable answer."""
        if response.status_code == 201:
            return _parse(response.json(), self.clock())
        error = _problem(response)
        if response.status_code not in RETRYABLE_STATUS:
            raise error
        raise _Retry(error, _retry_after(response))

    def unreachable(self, exc: httpx.HTTPError) -> _Retry:
        return _Retry(BrokerClientError("BROKER_UNREACHABLE", f"{type(exc).__name__} talking to {self.url}"), None)

    def delay_or_give_up(self, started: float, attempt: int, retry: _Retry) -> float:
        """How long to wait before the next attempt, or raise once the deadline would pass."""
        delay = self.backoff(attempt, retry.retry_after)
        if time.monotonic() - started + delay > self.deadline:
            error = retry.error
            raise BrokerClientError(error.code, f"gave up after {attempt + 1} attempts: {error.message}", error.status)
        return delay

    def cached(self, force: bool) -> BrokerToken | None:
        token = self.current
        if force or token is None or token.refresh_due(self.clock(), self.refresh_ratio):
            return None
        return token


class BrokerClient:
    """Synchronous broker client with automatic refresh (thread-safe)."""

    def __init__(self, broker_url: str, *, http_client: httpx.Client | None = None, **options: Any) -> None:
        self._core = _Core(broker_url, **options)
        self._http = http_client or httpx.Client(timeout=self._core.timeout, trust_env=False)
        self._lock = threading.Lock()

    def token(self, *, force: bool = False) -> BrokerToken:
        """The current token, fetched or refreshed when due (or when ``force``)."""
        with self._lock:
            cached = self._core.cached(force)
            if cached is not None:
                return cached
            self._core.current = self._fetch()
            return self._core.current

    def _fetch(self) -> BrokerToken:
        core = self._core
        started = time.monotonic()
        for attempt in itertools.count():
            try:
                return core.accept(self._http.post(core.url, json=core.body, headers=core.headers()))
            except _Retry as retry:
                time.sleep(core.delay_or_give_up(started, attempt, retry))
            except httpx.HTTPError as exc:
                time.sleep(core.delay_or_give_up(started, attempt, core.unreachable(exc)))
        raise AssertionError("unreachable")

    def auth(self) -> MspcAuth:
        """An ``httpx.Auth`` that signs Vendor API requests with the current MSPC_TOKEN."""
        return MspcAuth(self)

    def close(self) -> None:
        self._http.close()


class AsyncBrokerClient:
    """Asynchronous broker client with automatic refresh (task-safe)."""

    def __init__(self, broker_url: str, *, http_client: httpx.AsyncClient | None = None, **options: Any) -> None:
        self._core = _Core(broker_url, **options)
        self._http = http_client or httpx.AsyncClient(timeout=self._core.timeout, trust_env=False)
        self._lock = asyncio.Lock()

    async def token(self, *, force: bool = False) -> BrokerToken:
        async with self._lock:
            cached = self._core.cached(force)
            if cached is not None:
                return cached
            self._core.current = await self._fetch()
            return self._core.current

    async def _fetch(self) -> BrokerToken:
        core = self._core
        started = time.monotonic()
        for attempt in itertools.count():
            try:
                return core.accept(await self._http.post(core.url, json=core.body, headers=core.headers()))
            except _Retry as retry:
                await asyncio.sleep(core.delay_or_give_up(started, attempt, retry))
            except httpx.HTTPError as exc:
                await asyncio.sleep(core.delay_or_give_up(started, attempt, core.unreachable(exc)))
        raise AssertionError("unreachable")

    def auth(self) -> MspcAuth:
        return MspcAuth(self)

    async def aclose(self) -> None:
        await self._http.aclose()


class MspcAuth(httpx.Auth):
    """Signs requests with ``Authorization: Bearer <MSPC_TOKEN>``; one refresh-and-retry on 401."""

    def __init__(self, client: BrokerClient | AsyncBrokerClient) -> None:
        self._client = client

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if not isinstance(self._client, BrokerClient):
            raise TypeError("use an AsyncBrokerClient's auth with httpx.AsyncClient")
        request.headers["Authorization"] = f"Bearer {self._client.token().token.get_secret_value()}"
        response = yield request
        if response.status_code == 401:
            request.headers["Authorization"] = f"Bearer {self._client.token(force=True).token.get_secret_value()}"
            yield request

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if not isinstance(self._client, AsyncBrokerClient):
            raise TypeError("use a BrokerClient's auth with httpx.Client")
        token = await self._client.token()
        request.headers["Authorization"] = f"Bearer {token.token.get_secret_value()}"
        response = yield request
        if response.status_code == 401:
            token = await self._client.token(force=True)
            request.headers["Authorization"] = f"Bearer {token.token.get_secret_value()}"
            yield request


def write_token_files(token: BrokerToken, out: Path) -> None:
    """Write the token to ``out`` and its metadata to ``out``.json, atomically, mode 0600."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, token.token.get_secret_value()), (Path(f"{out}.json"), json.dumps(token.metadata()))):
        tmp = path.with_name(f".{path.name}.tmp")
        fd = _open_private(tmp)
        try:
            with open(fd, "w", encoding="utf-8", closefd=True) as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(path)


def _open_private(path: Path) -> int:
    path.unlink(missing_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
