"""``HttpOemClient``: the OEM client over httpx (sync, safe to share between threads).

Every call has explicit per-attempt timeouts and an overall deadline, and is
retried with exponential backoff and full jitter on 429, 408, 5xx, timeouts
and connection errors, waiting at least ``Retry-After`` when the OEM sends
one. Answers that retrying cannot fix raise at once (``broker.oem.errors``).

A create is not idempotent at the OEM. When an attempt fails after the
request may have been acted on (read timeout, connection dropped before the
answer, a 5xx other than 503) and a later attempt succeeds, the result says
``possible_duplicate=True``; when no attempt succeeds, ``OemOutcomeUnknown``
is raised instead of ``OemUnavailable``. Nothing is hidden.

httpx sends through ``_WireTransport`` (``broker.wire``: keep-alive HTTP/1.1
on the standard library, TLS verified with the configured CA bundle or
certifi's, as httpx would) unless a transport is passed in; the client keeps
no cookies.
"""

from __future__ import annotations

import http.cookiejar
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import certifi
import httpx
from pydantic import SecretStr

from broker import __version__, wire
from broker.errors import (
    BrokerError,
    ConfigError,
    OemError,
    OemOutcomeUnknown,
    OemUnavailable,
    snippet,
)
from broker.log import get_logger
from broker.metrics import Metrics
from broker.models import IntegrationRef, validate_identifier
from broker.oem.base import CreatedIntegration, OemIntegration
from broker.oem.errors import (
    AMBIGUOUS_TRANSPORT_ERRORS,
    UNPROCESSED_RETRYABLE_STATUSES,
    Upstream,
    is_retryable_status,
    oem_error,
    parse_retry_after,
    read_upstream,
    vendor_api_error,
)
from broker.settings import OemSettings

log = get_logger("oem")

GRANT_TYPE = "client_credentials"
BACKEND = "oem"
CREATE_PATH = "/api/oem-api/integration"
LIST_PATH = "/api/oem-api/integration/list"
REVOKE_PATH = "/api/oem-api/integration/{integration_id}"
PROBE_PATH = "/api/vendor-api/organization/accounts"
# The engine calls from up to engine.concurrency threads (le=256): keep that many connections alive
# (httpx's own pool keeps 20, so every burst past 20 opened and then dropped connections).
_KEEPALIVE_CONNECTIONS = 256


@dataclass(frozen=True, slots=True)
class _Outcome:
    """A final HTTP answer (2xx or non-retryable) and how it was reached."""

    response: httpx.Response
    attempts: int
    ambiguous: bool


class _RetriesExhausted(Exception):
    """No usable answer within ``max_attempts`` / the deadline."""

    def __init__(self, attempts: int, ambiguous: bool, last: str, retry_after_seconds: float | None) -> None:
        super().__init__(last)
        self.attempts = attempts
        self.ambiguous = ambiguous
        self.last = last
        self.retry_after_seconds = retry_after_seconds


def _verify(settings: OemSettings) -> ssl.SSLContext | bool:
    if settings.ca_bundle_path is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(settings.ca_bundle_path))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"BROKER_OEM__CA_BUNDLE_PATH: cannot load {settings.ca_bundle_path}: {exc}") from None


def _base_url(name: str, value: str) -> str:
    url = httpx.URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"{name} must be an http(s) URL with a host")
    return value.rstrip("/")


class HttpOemClient:
    """The OEM API and Vendor API over HTTP; one instance per process is enough."""

    def __init__(
        self,
        settings: OemSettings,
        *,
        metrics: Metrics | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if not settings.client_id or settings.client_secret is None:
            raise ConfigError(
                "the OEM client needs BROKER_OEM__CLIENT_ID and BROKER_OEM__CLIENT_SECRET "
                "(or BROKER_OEM__CLIENT_SECRET_FILE)"
            )
        self._settings = settings
        self._secret: SecretStr = settings.client_secret
        self._metrics = metrics
        self._sleep = sleep
        self._clock = clock
        self._jitter = jitter
        self._oem_url = _base_url("BROKER_OEM__BASE_URL", settings.base_url)
        self._vendor_url = _base_url(
            "BROKER_OEM__VENDOR_API_BASE_URL", settings.vendor_api_base_url or settings.base_url
        )
        verify = _verify(settings)
        self._http = httpx.Client(
            verify=verify,
            transport=transport or _WireTransport(verify),
            timeout=self._timeout(settings.deadline_seconds),
            follow_redirects=False,
            trust_env=False,
            cookies=_NoCookies(),
            headers={"User-Agent": f"mspc-broker/{__version__}", "Accept": "application/json"},
        )

    # -- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> HttpOemClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- verbs -------------------------------------------------------------------

    def create_external_integration(self, ref: IntegrationRef) -> CreatedIntegration:
        """POST /api/oem-api/integration with ``integrationType: external``; returns the partner key."""
        operation = "create_integration"
        body = self._envelope() | {
            "integrationType": "external",
            "organizationId": ref.organization_id,
            "vendorId": ref.vendor_id,
        }
        with self._measure(operation):
            try:
                outcome = self._call(operation, "POST", self._oem_url + CREATE_PATH, json=body)
            except _RetriesExhausted as exc:
                raise self._exhausted(operation, exc, ref=ref, create=True) from None
            response = outcome.response
            if not response.is_success:
                upstream = read_upstream(response)
                if outcome.ambiguous and upstream.status == 409:
                    raise OemOutcomeUnknown(
                        f"{operation} for {ref}: the OEM answered {upstream.describe()} after an earlier attempt "
                        f"got no answer ({outcome.attempts} attempts); that attempt probably created the "
                        "integration, whose partner key the broker never received: list and revoke it, then retry"
                    )
                refused = self._refused(operation, upstream, ref=ref)
                if outcome.ambiguous:
                    refused = type(refused)(
                        f"{refused.message}; note: an earlier attempt got no answer and may have created an "
                        "integration: list the organization's integrations and revoke any orphan",
                        retry_after_seconds=refused.retry_after_seconds,
                    )
                raise refused
            integration_id, partner_key = self._parse_created(response, ref, outcome)
        if outcome.ambiguous:
            log.warning(
                "oem.possible_duplicate",
                organization_id=ref.organization_id,
                vendor_id=ref.vendor_id,
                integration_id=integration_id,
                attempts=outcome.attempts,
            )
        return CreatedIntegration(
            integration_id=integration_id,
            ref=ref,
            partner_key=partner_key,
            possible_duplicate=outcome.ambiguous,
            attempts=outcome.attempts,
        )

    def list_integrations(self, organization_id: str | None = None) -> list[OemIntegration]:
        """POST /api/oem-api/integration/list (by ``organizationId``; None = all of this client's)."""
        operation = "list_integrations"
        body = self._envelope()
        if organization_id is not None:
            body["organizationId"] = validate_identifier("organization_id", organization_id)
        with self._measure(operation):
            try:
                outcome = self._call(operation, "POST", self._oem_url + LIST_PATH, json=body)
            except _RetriesExhausted as exc:
                raise self._exhausted(operation, exc) from None
            if not outcome.response.is_success:
                raise self._refused(operation, read_upstream(outcome.response))
            return self._parse_list(outcome.response, organization_id)

    def revoke_integration(self, integration_id: str) -> None:
        """DELETE /api/oem-api/integration/{id} with the credential envelope (an MSPC extension)."""
        operation = "revoke_integration"
        if not self._settings.revoke_supported:
            raise OemError(
                "revoking integrations is switched off (BROKER_OEM__REVOKE_SUPPORTED=false); revoke it in MSPC by hand"
            )
        validate_identifier("integration_id", integration_id)
        url = self._oem_url + REVOKE_PATH.format(integration_id=integration_id)
        with self._measure(operation):
            try:
                outcome = self._call(operation, "DELETE", url, json=self._envelope())
            except _RetriesExhausted as exc:
                raise self._exhausted(operation, exc) from None
            response = outcome.response
            if response.is_success:
                return
            upstream = read_upstream(response)
            if upstream.status == 404 and outcome.ambiguous:
                log.info("oem.revoke_already_done", integration_id=integration_id, attempts=outcome.attempts)
                return
            raise self._refused(operation, upstream, integration_id=integration_id)

    def probe_vendor_api(self, mspc_token: SecretStr) -> None:
        """GET /api/vendor-api/organization/accounts with ``Authorization: Bearer <MSPC_TOKEN>``."""
        operation = "probe_vendor_api"
        headers = {"Authorization": f"Bearer {mspc_token.get_secret_value()}"}
        with self._measure(operation):
            try:
                outcome = self._call(operation, "GET", self._vendor_url + PROBE_PATH, headers=headers)
            except _RetriesExhausted as exc:
                raise self._exhausted(operation, exc) from None
            if not outcome.response.is_success:
                raise vendor_api_error(read_upstream(outcome.response))

    # -- the retry loop ------------------------------------------------------------

    def _envelope(self) -> dict[str, Any]:
        return {
            "clientId": self._settings.client_id,
            "clientSecret": self._secret.get_secret_value(),
            "grantType": GRANT_TYPE,
            "scope": self._settings.scope,
        }

    def _timeout(self, remaining: float) -> httpx.Timeout:
        s = self._settings
        connect = min(s.connect_timeout_seconds, remaining)
        read = min(s.read_timeout_seconds, remaining)
        return httpx.Timeout(connect=connect, read=read, write=read, pool=connect)

    def _backoff(self, attempt: int) -> float:
        s = self._settings
        ceiling = min(s.backoff_max_seconds, s.backoff_base_seconds * (2 ** (attempt - 1)))
        return float(self._jitter() * ceiling)

    def _call(
        self,
        operation: str,
        method: str,
        url: str,
        *,
        json: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> _Outcome:
        """Send until a 2xx or non-retryable answer, ``max_attempts``, or the deadline."""
        deadline = self._clock() + self._settings.deadline_seconds
        ambiguous = False
        last = "no attempt was made"
        retry_after: float | None = None
        attempt = 0
        while True:
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            attempt += 1
            try:
                response = self._http.request(method, url, json=json, headers=headers, timeout=self._timeout(remaining))
            except httpx.TransportError as exc:
                if isinstance(exc, (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.ProxyError)):
                    raise OemError(f"{operation}: cannot send the request ({type(exc).__name__})") from None
                if _tls_verification_failed(exc):
                    raise OemError(
                        f"{operation}: the OEM's TLS certificate was not trusted; check BROKER_OEM__CA_BUNDLE_PATH "
                        "and the OEM host name"
                    ) from None
                ambiguous = ambiguous or isinstance(exc, AMBIGUOUS_TRANSPORT_ERRORS)
                last = type(exc).__name__
                retry_after = None
                wait = self._backoff(attempt)
            else:
                if response.is_success or not is_retryable_status(response.status_code):
                    return _Outcome(response, attempt, ambiguous)
                if response.status_code not in UNPROCESSED_RETRYABLE_STATUSES:
                    ambiguous = True
                last = read_upstream(response).describe()
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                wait = max(self._backoff(attempt), retry_after or 0.0)
                response.close()
            if attempt >= self._settings.max_attempts:
                break
            if self._clock() + wait >= deadline:
                break
            log.warning(
                "oem.retry",
                operation=operation,
                attempt=attempt,
                reason=last,
                wait_seconds=round(wait, 3),
                retry_after_seconds=retry_after,
            )
            self._sleep(wait)
        raise _RetriesExhausted(attempt, ambiguous, last, retry_after)

    # -- answers -----------------------------------------------------------------------

    def _refused(
        self,
        operation: str,
        upstream: Upstream,
        *,
        ref: IntegrationRef | None = None,
        integration_id: str | None = None,
    ) -> BrokerError:
        return oem_error(
            operation,
            upstream,
            client_id=self._settings.client_id,
            scope=self._settings.scope,
            ref=ref,
            integration_id=integration_id,
        )

    def _exhausted(
        self, operation: str, exc: _RetriesExhausted, *, ref: IntegrationRef | None = None, create: bool = False
    ) -> BrokerError:
        target = f" for {ref}" if ref else ""
        budget = f"{exc.attempts} attempt(s) within {self._settings.deadline_seconds:g}s"
        if create and exc.ambiguous:
            return OemOutcomeUnknown(
                f"{operation}{target}: no answer after {budget} (last: {exc.last}); an attempt may have "
                "created an integration whose partner key the broker never received: list the organization's "
                "integrations and revoke any orphan before creating again"
            )
        return OemUnavailable(
            f"{operation}{target}: the OEM did not answer usefully after {budget} (last: {exc.last}); "
            f"check BROKER_OEM__BASE_URL ({self._oem_url}) and the OEM's status",
            retry_after_seconds=exc.retry_after_seconds,
        )

    def _parse_created(self, response: httpx.Response, ref: IntegrationRef, outcome: _Outcome) -> tuple[str, SecretStr]:
        try:
            body = response.json()
            integration_id = body["integration"]["id"]
            partner_key = body["partnerApiKey"]
        except (ValueError, KeyError, TypeError):
            body = None
            integration_id = partner_key = None
        if (
            not isinstance(integration_id, str)
            or not integration_id
            or not isinstance(partner_key, str)
            or not partner_key
        ):
            keys = sorted(body) if isinstance(body, dict) else type(body).__name__
            raise OemOutcomeUnknown(
                f"create_integration for {ref}: the OEM answered {response.status_code} without a usable "
                f"integration id and partnerApiKey (top-level keys: {snippet(str(keys), 120)}); an integration "
                "was probably created: list and revoke it"
            )
        return integration_id, SecretStr(partner_key)

    def _parse_list(self, response: httpx.Response, organization_id: str | None) -> list[OemIntegration]:
        try:
            items = response.json()["integrations"]
            if not isinstance(items, list):
                raise TypeError("integrations is not a list")
            return [
                OemIntegration(
                    integration_id=str(item["id"]),
                    vendor_id=str(item["vendorId"]),
                    organization_id=_opt_str(item.get("organizationId")) or organization_id,
                    kind=_opt_str(item.get("integrationKind")),
                    status=_opt_str(item.get("integrationStatus")),
                    created_at=_opt_str(item.get("createdAt")),
                )
                for item in items
            ]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise OemError(
                f"list_integrations: unexpected response shape ({type(exc).__name__}): {snippet(response.text)}"
            ) from None

    # -- metrics -------------------------------------------------------------------------

    def _measure(self, operation: str) -> _Measure:
        return _Measure(self._metrics, operation, self._clock)


class _WireTransport(httpx.BaseTransport):
    """httpx's transport contract on ``broker.wire`` (far less CPU per call than httpcore).

    Its errors become the httpx errors the retry loop classifies: nothing
    sent (``ConnectError`` / ``ConnectTimeout``) versus possibly acted on
    (``WriteError`` / ``WriteTimeout``, ``ReadError`` / ``ReadTimeout``,
    ``RemoteProtocolError``), each with the cause chained for the TLS check.
    """

    def __init__(self, verify: ssl.SSLContext | bool) -> None:
        tls = verify if isinstance(verify, ssl.SSLContext) else ssl.create_default_context(cafile=certifi.where())
        self._pool = wire.Pool(tls, max_idle_per_origin=_KEEPALIVE_CONNECTIONS)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout") or {}
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        try:
            answer = self._pool.send(
                request.method,
                str(request.url),
                headers,
                request.read() or None,
                connect_timeout=timeout.get("connect"),
                read_timeout=timeout.get("read"),
                write_timeout=timeout.get("write"),
            )
        except wire.ConnectFailed as exc:
            kind: type[httpx.TransportError] = httpx.ConnectTimeout if exc.timed_out else httpx.ConnectError
            raise kind(exc.cause_name, request=request) from exc
        except wire.SendFailed as exc:
            raise (httpx.WriteTimeout if exc.timed_out else httpx.WriteError)(exc.cause_name, request=request) from exc
        except wire.AnswerFailed as exc:
            kind = httpx.ReadTimeout if exc.timed_out else httpx.ReadError
            if exc.protocol:
                kind = httpx.RemoteProtocolError
            raise kind(exc.cause_name, request=request) from exc
        return httpx.Response(
            answer.status,
            headers=list(answer.headers.items()),
            content=answer.content,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": answer.reason.encode("latin-1")},
            request=request,
        )

    def close(self) -> None:
        self._pool.close()


class _NoCookies(http.cookiejar.CookieJar):
    """A cookie jar that keeps nothing: the OEM API is stateless, so no call carries another's cookies
    (and no answer pays for cookie parsing)."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None

    def add_cookie_header(self, request: Any) -> None:
        return None


def _tls_verification_failed(exc: BaseException) -> bool:
    """True if a transport error was caused by certificate verification (retrying will not help)."""
    cause: BaseException | None = exc
    for _ in range(5):
        if cause is None:
            return False
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class _Measure:
    """Count a call, its latency, and its error code (if any) in ``Metrics``."""

    def __init__(self, metrics: Metrics | None, operation: str, clock: Callable[[], float]) -> None:
        self._metrics = metrics
        self._operation = operation
        self._clock = clock
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = self._clock()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        elapsed = self._clock() - self._start
        code = exc.code if isinstance(exc, BrokerError) else (type(exc).__name__ if exc else None)
        if code is not None:
            log.warning("oem.call_failed", operation=self._operation, code=code, elapsed_seconds=round(elapsed, 3))
        if self._metrics is None:
            return
        m = self._metrics
        m.backend_calls.labels(BACKEND, self._operation).inc()
        m.backend_seconds.labels(BACKEND, self._operation).observe(max(elapsed, 0.0))
        if code is not None:
            m.backend_errors.labels(BACKEND, self._operation, code).inc()
