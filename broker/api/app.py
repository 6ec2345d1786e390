"""HTTP routes: tokens, admin, health, metrics. ``create_app(runtime)`` builds the app.

Routes only parse, call ``BrokerService`` and shape the answer. Errors become
RFC 9457 problems in ``broker.api.errors``; anything unexpected becomes a
500 problem without a traceback or a secret. One canonical log line per
request carries request id, principal, deciding rule, outcome and latency.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, Literal, Protocol

import structlog
from fastapi import FastAPI, Header, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.api.errors import problem, problem_for
from broker.engine.core import IntegrationStatus, Outcome
from broker.engine.desired import DesiredIntegration
from broker.errors import BrokerError, InvalidIdentifier, InvalidInput
from broker.jsonenc import encoder
from broker.log import get_logger, info_line
from broker.metrics import Metrics
from broker.models import IDENTIFIER_REGEX, IntegrationRef, IssuedToken, Principal
from broker.service import BrokerService, new_id

log = get_logger("api")

Auth = Annotated[str | None, Header(description="Bearer <Kubernetes projected service-account token>")]
OrgPath = Annotated[str, Path(pattern=IDENTIFIER_REGEX, description="MSPC organizationId.")]
VendorPath = Annotated[str, Path(pattern=IDENTIFIER_REGEX, description="MSPC vendorId.")]


class RuntimeLike(Protocol):
    """What the app needs from the process runtime (``broker.runtime.Runtime``)."""

    service: BrokerService
    metrics: Metrics

    def readiness(self) -> tuple[bool, dict[str, Any]]: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


# -- request / response models ----------------------------------------------------


MAX_MIN_TTL_SECONDS = 86400  # the largest min_ttl_seconds a token request may ask for


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    organization_id: str = Field(pattern=IDENTIFIER_REGEX, description="MSPC organizationId.")
    vendor_id: str = Field(pattern=IDENTIFIER_REGEX, description="MSPC vendorId.")
    min_ttl_seconds: int = Field(
        0, ge=0, le=MAX_MIN_TTL_SECONDS, description="Refuse rather than issue a token living less."
    )


class TokenResponse(BaseModel):
    token: str = Field(description="The MSPC_TOKEN: send as 'Authorization: Bearer <token>' to the Vendor API.")
    token_type: str = Field("Bearer", description="Always 'Bearer'.")
    expires_at: datetime = Field(description="When the broker stops vouching for this token (UTC).")
    ttl_seconds: int = Field(description="Lifetime granted, in seconds.")
    lease_id: str = Field(description="Id of this issuance in the audit trail.")
    partner_key_version: str = Field(description="Store version of the partner key used.")
    vendor_key_version: str = Field(description="Store version of the vendor key used.")
    stale: bool = Field(description="True if a key was served from cache during a backend outage.")


class IntegrationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    organization_id: str = Field(pattern=IDENTIFIER_REGEX, description="MSPC organizationId.")
    vendor_id: str = Field(pattern=IDENTIFIER_REGEX, description="MSPC vendorId.")
    max_key_age_seconds: int | None = Field(None, gt=0, description="Rotate after this age, in seconds.")
    grace_seconds: int | None = Field(None, ge=0, description="Old key stays valid this long, in seconds.")


class RetiringView(BaseModel):
    version: str
    retire_at: float


class OrphanView(BaseModel):
    integration_id: str
    detected_at: float
    revoked: bool


class IntegrationView(BaseModel):
    organization_id: str
    vendor_id: str
    state: str
    current_version: str | None
    pending_version: str | None
    previous_version: str | None
    key_created_at: datetime | None
    key_age_seconds: float | None
    next_rotation_at: float | None
    versions: int
    retiring: list[RetiringView]
    orphans: list[OrphanView]
    last_error: str | None

    @classmethod
    def of(cls, s: IntegrationStatus) -> IntegrationView:
        return cls(
            organization_id=s.ref.organization_id,
            vendor_id=s.ref.vendor_id,
            state=s.state,
            current_version=s.current_version,
            pending_version=s.pending_version,
            previous_version=s.previous_version,
            key_created_at=s.key_created_at,
            key_age_seconds=s.key_age_seconds,
            next_rotation_at=s.next_rotation_at,
            versions=s.versions,
            retiring=[RetiringView(version=r.version, retire_at=r.retire_at) for r in s.retiring],
            orphans=[
                OrphanView(integration_id=o.integration_id, detected_at=o.detected_at, revoked=o.revoked)
                for o in s.orphans
            ],
            last_error=s.last_error,
        )


class OutcomeView(BaseModel):
    organization_id: str
    vendor_id: str
    action: str
    ok: bool
    version: str | None
    code: str | None
    message: str
    orphans: int

    @classmethod
    def of(cls, o: Outcome) -> OutcomeView:
        return cls(
            organization_id=o.ref.organization_id,
            vendor_id=o.ref.vendor_id,
            action=o.action,
            ok=o.ok,
            version=o.version,
            code=o.code,
            message=o.message,
            orphans=o.orphans,
        )


class IntegrationKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    organization_id: str = Field(pattern=IDENTIFIER_REGEX, description="MSPC organizationId.")
    vendor_id: str = Field(pattern=IDENTIFIER_REGEX, description="MSPC vendorId.")


Action = Literal[
    "token:issue", "integration:read", "integration:provision", "integration:rotate", "integration:revoke", "audit:read"
]


class AuthzCheckRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Action = Field("token:issue", description="The action to check.")
    integration: IntegrationKey | None = Field(None, description="The integration; unset for unscoped actions.")
    subject: str | None = Field(
        None,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        max_length=317,
        description="namespace/service-account to check instead of the caller (needs integration:read).",
    )


class AuthzCheckResponse(BaseModel):
    subject: str
    action: str
    allowed: bool
    rule_id: str | None
    reason: str
    ttl_cap_seconds: int | None


# -- the canonical log line -----------------------------------------------------------

_QUIET_ROUTES = frozenset({"/livez", "/readyz", "/metrics"})
_OBSERVED = "broker.observed"  # scope key: a CanonicalLogMiddleware already counts and logs this request


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text: str = value.decode("latin-1")
            if text and len(text) <= 64 and text.isascii():
                return text
            break
    return new_id()


class CanonicalLogMiddleware:
    """Pure ASGI middleware: request id, metrics and one canonical log line per request.

    The request id comes from ``X-Request-Id`` (when short and ASCII) or is
    made up, is bound in structlog's contextvars for the request and echoed in
    the response. An exception that escapes the app becomes a 500 problem
    without a traceback. Pure ASGI (no ``BaseHTTPMiddleware``): the route runs
    in the request's own task, with no extra task group or memory stream.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self._metrics = metrics
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The hot path's own middleware already counts and logs a token request it hands to FastAPI.
        observe = not scope.get(_OBSERVED)
        scope[_OBSERVED] = True
        if observe:
            request_id = _request_id(scope)
            header = (b"x-request-id", request_id.encode("ascii"))
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(request_id=request_id)
            state = scope.setdefault("state", {})
            state["principal"] = None
            state["rule_id"] = None
        start = time.perf_counter()
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if observe:
                    # Counted and logged before the first byte leaves, as the response is decided.
                    self._observe(scope, message["status"], time.perf_counter() - start)
                    headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                    headers.append(header)
                    message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:  # a bug: never a traceback or a secret to the client
            log.exception("unhandled error", path=scope["path"])
            if started:
                raise  # the response has started: nothing else can be sent
            await _internal_error()(scope, receive, send_wrapper)
        else:
            if not started and observe:
                if scope["state"].get("disconnected"):
                    log.info("client disconnected before the request was read", path=scope["path"])
                else:
                    log.error("unhandled error", path=scope["path"], error="the route sent no response")
                    await _internal_error()(scope, receive, send_wrapper)
        if observe:
            structlog.contextvars.clear_contextvars()

    def _observe(self, scope: Scope, status: int, elapsed: float) -> None:
        route = scope.get("route")
        route_name = getattr(route, "path", "unmatched")
        method = scope["method"]
        key = (route_name, method, status)
        children = self._children.get(key)
        if children is None:  # labels() takes a lock and builds a key: once per route, method and status
            children = self._children[key] = (
                self._metrics.requests.labels(route=route_name, method=method, status=str(status)),
                self._metrics.request_seconds.labels(route=route_name),
            )
        children[0].inc()
        children[1].observe(elapsed)
        if route_name not in _QUIET_ROUTES:
            state = scope["state"]
            principal: Principal | None = state.get("principal")
            info_line(
                "api",
                "request",
                method=method,
                route=route_name,
                status=status,
                principal=principal.subject if principal else None,
                pod=principal.pod_name if principal else None,
                rule_id=state.get("rule_id"),
                latency_ms=round(elapsed * 1000, 3),
            )


def _internal_error() -> Response:
    return problem(500, "INTERNAL", "internal error; see the broker log with this request id")


# -- the token hot path --------------------------------------------------------------

_TOKEN_FIELDS = frozenset({"organization_id", "vendor_id", "min_ttl_seconds"})
_IDENTIFIER = re.compile(IDENTIFIER_REGEX)
_HOT_BODY_BYTES = 16 * 1024  # a token request is ~100 bytes; bigger bodies take the FastAPI route
_DECODE = json.JSONDecoder().decode
_ENCODE_RESPONSE = encoder(separators=(",", ":"), ensure_ascii=False, check_circular=False)  # built once


def _token_request(content_type: bytes | None, raw: bytes) -> tuple[str, str, int] | None:
    """(organization_id, vendor_id, min_ttl_seconds) if the body is JSON that ``TokenRequest`` accepts as is.

    Deliberately stricter than pydantic's lax mode (exact types, no coercion):
    whatever this refuses, the FastAPI route judges, so every accepted body is
    one ``TokenRequest`` accepts with the same values and every refusal is
    FastAPI's own.
    """
    if content_type is None or not raw:
        return None
    if content_type != b"application/json" and not content_type.startswith(b"application/json;"):
        return None
    try:
        body = _DECODE(raw.decode())  # UTF-8 (anything else, a BOM included, is left to FastAPI)
    except ValueError:
        return None
    if type(body) is not dict or not body.keys() <= _TOKEN_FIELDS:
        return None
    org, vendor, min_ttl = body.get("organization_id"), body.get("vendor_id"), body.get("min_ttl_seconds", 0)
    if type(org) is not str or type(vendor) is not str or type(min_ttl) is not int:
        return None
    if not (_IDENTIFIER.fullmatch(org) and _IDENTIFIER.fullmatch(vendor) and 0 <= min_ttl <= MAX_MIN_TTL_SECONDS):
        return None
    return org, vendor, min_ttl


def _iso_z(moment: datetime) -> str:
    """A UTC datetime as pydantic serialises it: ISO 8601, microseconds only when non-zero, ``Z``."""
    text = moment.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def token_response_json(issued: IssuedToken) -> bytes:
    """The ``TokenResponse`` JSON of an issued token: the bytes FastAPI's route produces (a test holds them equal)."""
    return _ENCODE_RESPONSE(
        {
            "token": issued.token.get_secret_value(),
            "token_type": "Bearer",
            "expires_at": _iso_z(issued.expires_at),
            "ttl_seconds": issued.ttl_seconds,
            "lease_id": issued.lease_id,
            "partner_key_version": issued.partner_key_version,
            "vendor_key_version": issued.vendor_key_version,
            "stale": issued.stale,
        }
    ).encode()


class _TokenHotPath:
    """``POST /v1/tokens`` for a JSON body that validates, served without FastAPI's machinery.

    The token route is the hot path. This plain ASGI handler reads the body
    once, checks it (``_token_request``), authenticates, issues and answers
    201 with the ``TokenResponse`` bytes; a ``BrokerError`` becomes the same
    problem response FastAPI's exception handler gives. Any other body is
    handed, replayed, to the FastAPI app, whose ``/v1/tokens`` route stays the
    one documented in OpenAPI and produces every refusal of the input.
    """

    def __init__(self, service: BrokerService, api: ASGIApp, route: APIRoute) -> None:
        self._service = service
        self._api = api
        self._route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self._route
        authorization: bytes | None = None
        content_type: bytes | None = None
        for name, value in scope["headers"]:  # the first of each, as Starlette's Headers.get
            if name == b"authorization" and authorization is None:
                authorization = value
            elif name == b"content-type" and content_type is None:
                content_type = value
        chunks: list[bytes] = []
        size = 0
        more = True
        while more and size <= _HOT_BODY_BYTES:
            message = await receive()
            if message["type"] == "http.disconnect":
                scope["state"]["disconnected"] = True
                return
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        parsed = None if more else _token_request(content_type, raw)
        if parsed is None:
            await self._api(scope, _replay(raw, more, receive), send)
            return
        organization_id, vendor_id, min_ttl_seconds = parsed
        state = scope["state"]
        try:
            principal = await self._service.authenticate(
                authorization.decode("latin-1") if authorization is not None else None
            )
            state["principal"] = principal
            issued = await self._service.issue_token(
                principal, IntegrationRef(organization_id, vendor_id), min_ttl_seconds
            )
        except BrokerError as exc:
            await problem_for(exc)(scope, receive, send)
            return
        state["rule_id"] = issued.rule_id
        content = token_response_json(issued)
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [(b"content-length", b"%d" % len(content)), (b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": content})


def _replay(raw: bytes, more: bool, receive: Receive) -> Receive:
    """A ``receive`` that first gives back the body already read, then continues with the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": raw, "more_body": more}

    return replay


class BrokerApp:
    """The ASGI app served: the token hot path in front of the FastAPI app (``api``).

    ``POST /v1/tokens`` goes to ``_TokenHotPath`` under its own
    ``CanonicalLogMiddleware`` (the request is counted and logged there, once,
    even when the hot path hands it on to FastAPI); everything else, and the
    lifespan, goes straight to FastAPI.
    """

    def __init__(self, api: FastAPI, hot: ASGIApp, *, metrics: Metrics) -> None:
        self.api = api
        self._hot = CanonicalLogMiddleware(hot, metrics=metrics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/tokens" and scope["method"] == "POST":
            await self._hot(scope, receive, send)
        else:
            await self.api(scope, receive, send)


# -- the app ------------------------------------------------------------------------


def create_app(runtime: RuntimeLike, *, manage_lifecycle: bool = True) -> BrokerApp:
    """Build the ASGI app around a runtime (started and stopped in the lifespan)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            runtime.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                runtime.stop()

    app = FastAPI(
        title="mspc-broker",
        version="1",
        description="Short-lived MSPC_TOKENs for Kubernetes workloads.",
        lifespan=lifespan,
    )
    service = runtime.service
    metrics = runtime.metrics

    app.add_middleware(CanonicalLogMiddleware, metrics=metrics)

    @app.exception_handler(BrokerError)
    async def broker_error(_: Request, exc: BrokerError) -> JSONResponse:
        return problem_for(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = tuple(first.get("loc", ()))
        where = ".".join(str(p) for p in loc if p != "body")
        code = InvalidInput.code
        if loc and loc[-1] in ("organization_id", "vendor_id") and first.get("type") == "string_pattern_mismatch":
            code = InvalidIdentifier.code
        return problem(400, code, f"{where}: {first.get('msg')}" if where else str(first.get("msg")))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "HTTP_ERROR")
        return problem(exc.status_code, code, str(exc.detail))

    async def caller(request: Request, authorization: str | None) -> Principal:
        principal = await service.authenticate(authorization)
        request.state.principal = principal
        return principal

    problem_responses: dict[int | str, dict[str, Any]] = {
        s: {"description": t, "content": {"application/problem+json": {}}}
        for s, t in (
            (400, "Bad request"),
            (401, "Unauthenticated"),
            (403, "Denied by policy"),
            (404, "Unknown integration"),
            (409, "Conflict"),
            (503, "Backend unavailable"),
        )
    }

    @app.post("/v1/tokens", status_code=201, response_model=TokenResponse, responses=problem_responses)
    async def issue_token(body: TokenRequest, request: Request, authorization: Auth = None) -> TokenResponse:
        """Issue a short-lived MSPC_TOKEN for one integration."""
        principal = await caller(request, authorization)
        issued = await service.issue_token(
            principal, IntegrationRef(body.organization_id, body.vendor_id), body.min_ttl_seconds
        )
        request.state.rule_id = issued.rule_id
        return TokenResponse(
            token=issued.token.get_secret_value(),
            expires_at=issued.expires_at,
            ttl_seconds=issued.ttl_seconds,
            lease_id=issued.lease_id,
            partner_key_version=issued.partner_key_version,
            vendor_key_version=issued.vendor_key_version,
            stale=issued.stale,
        )

    @app.get("/v1/integrations", response_model=list[IntegrationView], responses=problem_responses)
    async def list_integrations(request: Request, authorization: Auth = None) -> list[IntegrationView]:
        """Status of every desired integration the caller may read (never secrets)."""
        principal = await caller(request, authorization)
        return [IntegrationView.of(s) for s in await service.list_integrations(principal)]

    @app.get(
        "/v1/integrations/{organization_id}/{vendor_id}", response_model=IntegrationView, responses=problem_responses
    )
    async def get_integration(
        organization_id: OrgPath, vendor_id: VendorPath, request: Request, authorization: Auth = None
    ) -> IntegrationView:
        """Versions, stages, ages and state of one integration."""
        principal = await caller(request, authorization)
        return IntegrationView.of(await service.get_integration(principal, IntegrationRef(organization_id, vendor_id)))

    @app.post("/v1/integrations", status_code=201, response_model=OutcomeView, responses=problem_responses)
    async def add_integration(body: IntegrationRequest, request: Request, authorization: Auth = None) -> OutcomeView:
        """Add a desired integration and provision it."""
        principal = await caller(request, authorization)
        item = DesiredIntegration(
            IntegrationRef(body.organization_id, body.vendor_id), body.max_key_age_seconds, body.grace_seconds
        )
        return OutcomeView.of(await service.add_integration(principal, item))

    for verb in ("rotate", "rollback", "revoke"):

        def make(verb: str) -> Callable[..., Awaitable[OutcomeView]]:
            async def action(
                organization_id: OrgPath, vendor_id: VendorPath, request: Request, authorization: Auth = None
            ) -> OutcomeView:
                principal = await caller(request, authorization)
                ref = IntegrationRef(organization_id, vendor_id)
                outcome = await getattr(service, verb)(principal, ref)
                return OutcomeView.of(outcome)

            action.__doc__ = {
                "rotate": "Rotate the partner key now (old key valid for the grace period).",
                "rollback": "Promote the previous partner key back to current (if not yet revoked).",
                "revoke": "Break glass: rotate with zero grace and revoke the old key at once.",
            }[verb]
            action.__name__ = f"{verb}_integration"
            return action

        app.post(
            f"/v1/integrations/{{organization_id}}/{{vendor_id}}/{verb}",
            response_model=OutcomeView,
            responses=problem_responses,
        )(make(verb))

    @app.post("/v1/authz/check", response_model=AuthzCheckResponse, responses=problem_responses)
    async def authz_check(body: AuthzCheckRequest, request: Request, authorization: Auth = None) -> AuthzCheckResponse:
        """Dry run: would this principal be allowed, and which rule decides."""
        principal = await caller(request, authorization)
        ref = IntegrationRef(body.integration.organization_id, body.integration.vendor_id) if body.integration else None
        subject = principal
        if body.subject is not None and body.subject != principal.subject:
            await service.authorize(principal, "integration:read", ref)
            namespace, _, account = body.subject.partition("/")
            subject = Principal(namespace=namespace, service_account=account)
        decision = service.check(subject, body.action, ref)
        return AuthzCheckResponse(
            subject=subject.subject,
            action=body.action,
            allowed=decision.allowed,
            rule_id=decision.rule_id,
            reason=decision.reason,
            ttl_cap_seconds=decision.ttl_cap_seconds,
        )

    @app.get("/livez", include_in_schema=False)
    async def livez() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        ok, checks = runtime.readiness()
        return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # The token route is the hot path: served in front of FastAPI (see ``_TokenHotPath``) for the
    # common case, with the same checks and the same bytes; FastAPI's route handles everything else.
    token_route = next(r for r in app.router.routes if isinstance(r, APIRoute) and r.path == "/v1/tokens")
    return BrokerApp(app, _TokenHotPath(service, app, token_route), metrics=metrics)
