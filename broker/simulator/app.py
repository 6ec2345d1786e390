"""The simulator's ASGI app: MSPC OEM API + Vendor API, with test controls.

Built from ``specs/mspc-api.md`` and the MSPC decisions in ``DESIGN.md``:
credential envelope in the JSON body, scope ``oem:partner_token`` for
partner keys (``vendor_manage`` for organization, user and vendor calls),
error bodies ``{"status": N, "code": "...", "message": "..."}``. Success
bodies are the documented examples.

Every API request passes one pipeline (``Simulator._api``): it is logged
with a monotonic timestamp, rate-limited per client, given its injected
faults, handled, and (for a lost-response fault) answered with a dropped
connection *after* its state change. Test controls live under ``/_sim/``
(guarded by ``Authorization: Bearer <admin token>`` when one is set):

    GET    /_sim/health          liveness (never guarded)
    GET    /_sim/integrations    every integration: ids, org, vendor, kind,
                                 status, live, createdAt, partnerKeyFingerprint
    GET    /_sim/organizations   organizations with their users (no tokens)
    GET    /_sim/requests        {"counts": {endpoint: n}, "requests": [...]}
    DELETE /_sim/requests        clear the request log
    GET    /_sim/faults          active faults with remaining counts
    POST   /_sim/faults          add one FaultSpec, answers {"id": n}
    PUT    /_sim/faults          {"faults": [FaultSpec...], "seed": int?}
    DELETE /_sim/faults          remove every fault
    GET    /_sim/config          {"duplicateMode", "rateLimit"}
    POST   /_sim/config          change either (rateLimit null = off)
    POST   /_sim/reset           seed state + start-up config; hung requests end

Endpoint names (request log, counts, ``FaultSpec.endpoint``) are listed in
``broker.simulator.control.ENDPOINTS``. A hang fault sleeps, then handles
the request normally (so a timed-out create may still create), unless the
simulator is reset or stopped meanwhile.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from broker.errors import InvalidMspcToken
from broker.log import get_logger
from broker.mspc_token import parse as parse_mspc_token
from broker.simulator.control import (
    ENDPOINTS,
    DuplicateMode,
    Faults,
    FaultSpec,
    RateLimiter,
    RateLimitSpec,
    RequestLog,
    RequestRecord,
)
from broker.simulator.seed import PARTNER_TOKEN_SCOPE, VENDOR_MANAGE_SCOPE, Seed, SeedClient, SeedVendor, load_seed
from broker.simulator.state import Integration, Organization, User, World, fingerprint, same_secret

log = get_logger("simulator")

GRANT_TYPE = "client_credentials"
INTEGRATION_STATUSES = frozenset({"mapping", "active", "inactive", "pending"})
MESSAGE_ECHO_CHARS = 64
HANG_POLL_SECONDS = 0.02
_DROP_KEY = "broker.simulator.drop"

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class SimulatorConfig:
    """Start-up behaviour; ``POST /_sim/reset`` returns to it."""

    duplicate_mode: DuplicateMode = "new"
    faults: tuple[FaultSpec, ...] = ()
    fault_seed: int = 0
    rate_limit: RateLimitSpec | None = None
    admin_token: str | None = None


class SimError(Exception):
    """An error answer: ``{"status", "code", "message"}`` with that HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers

    def response(self) -> JSONResponse:
        """The JSON error response."""
        return error_response(self.status, self.code, self.message, self.headers)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error body in the simulator's documented shape."""
    return JSONResponse({"status": status, "code": code, "message": message}, status_code=status, headers=headers)


def _echo(value: str) -> str:
    """A caller-supplied (non-secret) value cut short for an error message."""
    return repr(value[:MESSAGE_ECHO_CHARS])


# -- request bodies ------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=False)


class Envelope(_Body):
    """The credential envelope every OEM call carries in its JSON body."""

    client_id: StrictStr = Field(alias="clientId")
    client_secret: StrictStr = Field(alias="clientSecret")
    grant_type: StrictStr = Field(alias="grantType")
    scope: StrictStr = Field(alias="scope")


class OrganizationData(_Body):
    name: StrictStr = Field(min_length=1)
    email: StrictStr = Field(min_length=3)
    first_name: StrictStr | None = Field(None, alias="firstName")
    last_name: StrictStr | None = Field(None, alias="lastName")
    vendor_user_id: StrictStr | None = Field(None, alias="vendorUserId")
    vendor_organization_id: StrictStr | None = Field(None, alias="vendorOrganizationId")


class CreateOrganization(_Body):
    data: OrganizationData


class UserData(_Body):
    email: StrictStr = Field(min_length=3)
    first_name: StrictStr | None = Field(None, alias="firstName")
    last_name: StrictStr | None = Field(None, alias="lastName")
    vendor_user_id: StrictStr | None = Field(None, alias="vendorUserId")
    vendor_organization_id: StrictStr | None = Field(None, alias="vendorOrganizationId")


class CreateUser(_Body):
    data: UserData


class DeleteUserData(_Body):
    vendor_user_id: StrictStr | None = Field(None, alias="vendorUserId")
    email: StrictStr | None = None


class DeleteUser(_Body):
    organization_oem_token: StrictStr = Field(alias="organizationOemToken")
    data: DeleteUserData | None = None


class CredentialIntegrationData(_Body):
    vendor_id: StrictStr = Field(alias="vendorId", min_length=1)
    integration_credentials: dict[str, StrictStr] = Field(alias="integrationCredentials")


class CreateCredentialIntegration(_Body):
    organization_oem_token: StrictStr = Field(alias="organizationOemToken")
    data: CredentialIntegrationData


class CreateExternalIntegration(_Body):
    integration_type: StrictStr = Field(alias="integrationType")
    organization_id: StrictStr = Field(alias="organizationId", min_length=1)
    vendor_id: StrictStr = Field(alias="vendorId", min_length=1)


class ListIntegrations(_Body):
    organization_oem_token: StrictStr | None = Field(None, alias="organizationOemToken")
    organization_id: StrictStr | None = Field(None, alias="organizationId")


class VendorAccount(_Body):
    vendor_account_id: StrictStr = Field(alias="vendorAccountId", min_length=1)
    name: StrictStr
    external_id: StrictStr | None = Field(None, alias="externalId")


class VendorService(_Body):
    id: StrictStr = Field(min_length=1)
    name: StrictStr
    description: StrictStr | None = None


class ConfigUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    duplicate_mode: DuplicateMode | None = Field(None, alias="duplicateMode")
    rate_limit: RateLimitSpec | None = Field(None, alias="rateLimit")


class FaultReplace(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    faults: list[FaultSpec]
    seed: int | None = None


def validate(model: type[M], data: Any) -> M:
    """Validate a decoded body; a mismatch is a 400 naming the fields, never their values."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [
            (".".join(str(p) for p in err["loc"]) or "body") + ": " + err["msg"]
            for err in exc.errors(include_input=False, include_url=False)
        ]
        raise SimError(400, "BAD_REQUEST", "Bad Request: " + "; ".join(problems[:5])) from None


# -- the pipeline ----------------------------------------------------------------


@dataclass
class Call:
    """One API request on its way through the pipeline."""

    endpoint: str
    raw_body: bytes
    record: RequestRecord
    generation: int
    client: SeedClient | None = None
    integration: Integration | None = None
    vendor: SeedVendor | None = None
    _json: Any = field(default=None, repr=False)
    _parsed: bool = False

    def json(self) -> Any:
        """The decoded body; a 400 if it is absent or not JSON."""
        if not self._parsed:
            if not self.raw_body.strip():
                raise SimError(400, "BAD_REQUEST", "Bad Request: a JSON body is required")
            try:
                self._json = json.loads(self.raw_body)
            except (ValueError, UnicodeDecodeError):
                raise SimError(400, "BAD_REQUEST", "Bad Request: the body is not valid JSON") from None
            self._parsed = True
        return self._json

    def json_object(self) -> dict[str, Any]:
        """The decoded body, which must be a JSON object."""
        body = self.json()
        if not isinstance(body, dict):
            raise SimError(400, "BAD_REQUEST", "Bad Request: the body must be a JSON object")
        return body


Handler = Callable[["Simulator", Request, Call], Awaitable[Response]]


@dataclass
class _Drop:
    drop: bool = False


class Simulator:
    """The simulator: world state, test controls, and the ASGI app (``self`` is the app)."""

    def __init__(
        self, seed: Seed | None = None, config: SimulatorConfig | None = None, state_path: Path | None = None
    ) -> None:
        self.seed = seed if seed is not None else load_seed()
        self.config = config or SimulatorConfig()
        self.world = World(self.seed, state_path)
        self.duplicate_mode: DuplicateMode = self.config.duplicate_mode
        self.faults = Faults(list(self.config.faults), self.config.fault_seed)
        self.rate_limiter = RateLimiter(self.config.rate_limit)
        self.requests = RequestLog()
        self.generation = 0
        self.app = Starlette(
            routes=self._routes(),
            exception_handlers={HTTPException: _http_error, Exception: _internal_error},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry: the Starlette app, plus dropping the connection for lost-response faults."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        flag = _Drop()
        scope[_DROP_KEY] = flag

        async def guarded_send(message: Message) -> None:
            if not flag.drop:
                await send(message)

        await self.app(scope, receive, guarded_send)
        if flag.drop:
            await _drop_connection(send)

    # -- routes ------------------------------------------------------------

    def _routes(self) -> list[Route]:
        api: list[tuple[str, str, str, Handler]] = [
            ("/api/oem-api/organization", "POST", "organization.create", Simulator._organization_create),
            (
                "/api/oem-api/organization/{vendor_organization_id}",
                "DELETE",
                "organization.delete",
                Simulator._organization_delete,
            ),
            ("/api/oem-api/user", "POST", "user.create", Simulator._user_create),
            ("/api/oem-api/user", "DELETE", "user.delete", Simulator._user_delete),
            ("/api/oem-api/vendor", "POST", "vendor.list", Simulator._vendor_list),
            ("/api/oem-api/integration", "POST", "integration.create", Simulator._integration_create),
            ("/api/oem-api/integration/list", "POST", "integration.list", Simulator._integration_list),
            ("/api/oem-api/integration/{integration_id}", "DELETE", "integration.revoke", Simulator._revoke),
            ("/api/vendor-api/organization/accounts", "POST", "vendor_api.accounts.create", Simulator._accounts_create),
            ("/api/vendor-api/organization/accounts", "GET", "vendor_api.accounts.list", Simulator._accounts_list),
            ("/api/vendor-api/organization/services", "POST", "vendor_api.services.create", Simulator._services_create),
            ("/api/vendor-api/status/{status}", "PATCH", "vendor_api.status", Simulator._status_update),
        ]
        routes: list[Route] = []
        by_path: dict[str, dict[str, Callable[[Request], Awaitable[Response]]]] = {}
        assert {entry[2] for entry in api} == ENDPOINTS, "endpoint names out of sync with control.ENDPOINTS"
        for path, method, endpoint, handler in api:
            by_path.setdefault(path, {})[method] = self._api(endpoint, handler)
        for path, methods in by_path.items():
            routes.append(Route(path, _dispatch(methods), methods=list(methods)))
        admin: list[tuple[str, list[str], Callable[[Request], Awaitable[Response]]]] = [
            ("/_sim/health", ["GET"], self._admin_health),
            ("/_sim/integrations", ["GET"], self._admin_integrations),
            ("/_sim/organizations", ["GET"], self._admin_organizations),
            ("/_sim/requests", ["GET", "DELETE"], self._admin_requests),
            ("/_sim/faults", ["GET", "POST", "PUT", "DELETE"], self._admin_faults),
            ("/_sim/config", ["GET", "POST"], self._admin_config),
            ("/_sim/reset", ["POST"], self._admin_reset),
        ]
        for path, methods_list, admin_handler in admin:
            routes.append(Route(path, self._guard(admin_handler), methods=methods_list))
        return routes

    def _api(self, endpoint: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            record = self.requests.record(request.method, request.url.path, endpoint)
            call = Call(endpoint, await request.body(), record, self.generation)
            try:
                response = await self._pipeline(request, call, handler)
            except SimError as exc:
                response = exc.response()
            record.status = response.status_code
            if record.outcome == "pending":
                record.outcome = "answered"
            return response

        return run

    async def _pipeline(self, request: Request, call: Call, handler: Handler) -> Response:
        key = self._rate_key(request, call)
        retry_after = self.rate_limiter.take(key)
        if retry_after is not None:
            call.record.outcome = "rate_limited"
            raise SimError(
                429,
                "RATE_LIMITED",
                f"Rate limit exceeded. Retry after {retry_after} seconds.",
                headers={"Retry-After": str(retry_after)},
            )
        plan = self.faults.plan(call.endpoint)
        call.record.fault_ids = plan.fault_ids
        if plan.latency_seconds > 0:
            await asyncio.sleep(plan.latency_seconds)
        if plan.hang_seconds > 0:
            call.record.outcome = "hung"
            await self._hang(plan.hang_seconds, call.generation)
        if call.generation != self.generation:
            call.record.outcome = "discarded"
            raise SimError(503, "SIMULATOR_RESET", "the simulator was reset or stopped while this request waited")
        if plan.error_status is not None:
            call.record.outcome = "injected_error"
            raise SimError(plan.error_status, "INJECTED_FAULT", "injected server error (simulator fault)")
        response = await handler(self, request, call)
        if plan.lose_response:
            call.record.outcome = "dropped"
            request.scope[_DROP_KEY].drop = True
        return response

    async def _hang(self, seconds: float, generation: int) -> None:
        """Sleep ``seconds``, cut short by ``reset()`` / ``release_waiting()``."""
        end = asyncio.get_running_loop().time() + seconds
        loop = asyncio.get_running_loop()
        while generation == self.generation and (left := end - loop.time()) > 0:
            await asyncio.sleep(min(left, HANG_POLL_SECONDS))

    def release_waiting(self) -> None:
        """End every hanging request now (they answer 503); used before shutdown."""
        self.generation += 1

    def _rate_key(self, request: Request, call: Call) -> str:
        if call.endpoint.startswith("vendor_api."):
            auth = request.headers.get("authorization", "")
            return "vendor-api:" + fingerprint(auth)
        try:
            body = call.json()
        except SimError:
            body = None
        client_id = body.get("clientId") if isinstance(body, dict) else None
        if isinstance(client_id, str):
            call.record.client_id = client_id[:MESSAGE_ECHO_CHARS]
            return "client:" + client_id
        host = request.client.host if request.client else "unknown"
        return "anonymous:" + host

    # -- authentication ------------------------------------------------------------

    def _authenticate(self, call: Call, scopes: Iterable[str]) -> SeedClient:
        """Check the body's credential envelope for an endpoint accepting ``scopes``."""
        envelope = validate(Envelope, call.json_object())
        if envelope.grant_type != GRANT_TYPE:
            raise SimError(400, "UNSUPPORTED_GRANT_TYPE", f"Bad Request: grantType must be {GRANT_TYPE!r}")
        client = self.seed.client(envelope.client_id)
        if client is None or not same_secret(client.secret, envelope.client_secret):
            raise SimError(401, "INVALID_CLIENT", "Unauthorized: Invalid credentials")
        accepted = tuple(scopes)
        if envelope.scope not in client.scopes:
            raise SimError(403, "INVALID_SCOPE", f"scope {_echo(envelope.scope)} is not granted to this client")
        if envelope.scope not in accepted:
            raise SimError(
                403,
                "INVALID_SCOPE",
                f"scope {_echo(envelope.scope)} is not valid for this endpoint (use {' or '.join(accepted)})",
            )
        call.client = client
        return client

    def _organization_by_token(self, token: str) -> Organization:
        org = self.world.organization_by_token(token)
        if org is None:
            raise SimError(403, "INVALID_ORGANIZATION_TOKEN", "Forbidden: invalid organization token")
        return org

    def _vendor(self, vendor_id: str) -> SeedVendor:
        vendor = self.seed.vendor(vendor_id)
        if vendor is None:
            raise SimError(404, "VENDOR_NOT_FOUND", f"Not Found: vendor {_echo(vendor_id)} does not exist")
        return vendor

    def _authenticate_vendor_api(self, request: Request, call: Call) -> Integration:
        """Resolve the bearer MSPC_TOKEN to a live integration of the token's vendor."""
        header = request.headers.get("authorization")
        if not header:
            raise SimError(401, "INVALID_MSPC_TOKEN", "missing Authorization: Bearer <MSPC_TOKEN>")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value:
            raise SimError(401, "INVALID_MSPC_TOKEN", "the Authorization header must be 'Bearer <MSPC_TOKEN>'")
        try:
            credentials = parse_mspc_token(value)
        except InvalidMspcToken as exc:
            raise SimError(401, "INVALID_MSPC_TOKEN", f"malformed MSPC_TOKEN: {exc.message}") from None
        vendor_key = credentials.vendor_key.get_secret_value()
        vendor = next((v for v in self.seed.vendors if same_secret(v.vendor_key, vendor_key)), None)
        if vendor is None:
            raise SimError(401, "UNKNOWN_VENDOR_KEY", "the vendor key in the MSPC_TOKEN is not known")
        integration = self.world.integration_by_partner_key(credentials.partner_key.get_secret_value())
        if integration is None:
            raise SimError(401, "UNKNOWN_PARTNER_KEY", "the partner key in the MSPC_TOKEN is not known")
        if integration.vendor_id != vendor.id:
            raise SimError(403, "VENDOR_NOT_AUTHORIZED", "the partner key does not belong to this vendor")
        if not integration.live:
            raise SimError(401, "PARTNER_KEY_REVOKED", "the partner key in the MSPC_TOKEN was revoked")
        call.integration = integration
        call.vendor = vendor
        return integration

    # -- OEM API ----------------------------------------------------------------

    async def _organization_create(self, request: Request, call: Call) -> Response:
        """POST /api/oem-api/organization"""
        self._authenticate(call, [VENDOR_MANAGE_SCOPE])
        data = validate(CreateOrganization, call.json_object()).data
        if data.vendor_organization_id is not None and self.world.organization_by_vendor_id(
            data.vendor_organization_id
        ):
            raise SimError(409, "ORGANIZATION_EXISTS", "Conflict: an organization with these details already exists")
        org, token = self.world.create_organization(
            name=data.name, email=data.email, vendor_organization_id=data.vendor_organization_id
        )
        self.world.add_user(
            User(org.id, data.email, data.vendor_user_id, data.first_name, data.last_name, role="owner")
        )
        return JSONResponse(
            {"status": 201, "message": "Successfully created organization", "organizationOemToken": token},
            status_code=201,
        )

    async def _organization_delete(self, request: Request, call: Call) -> Response:
        """DELETE /api/oem-api/organization/{vendorOrganizationId}"""
        self._authenticate(call, [VENDOR_MANAGE_SCOPE])
        vendor_organization_id = request.path_params["vendor_organization_id"]
        org = self.world.organization_by_vendor_id(vendor_organization_id)
        if org is None:
            raise SimError(404, "ORGANIZATION_NOT_FOUND", "Not Found: organization not found")
        self.world.delete_organization(org)
        return JSONResponse({"status": 201, "message": "Success"}, status_code=201)

    async def _user_create(self, request: Request, call: Call) -> Response:
        """POST /api/oem-api/user"""
        self._authenticate(call, [VENDOR_MANAGE_SCOPE])
        data = validate(CreateUser, call.json_object()).data
        if data.vendor_organization_id:
            org = self.world.organization_by_vendor_id(data.vendor_organization_id)
        else:
            domain = data.email.rpartition("@")[2].lower()
            with self.world.lock:
                org = next(
                    (
                        o
                        for o in self.world.organizations.values()
                        if o.vendor_organization_id is None and (o.email or "").rpartition("@")[2].lower() == domain
                    ),
                    None,
                )
        if org is None:
            raise SimError(404, "ORGANIZATION_NOT_FOUND", "Not Found: no organization matches this user")
        with self.world.lock:
            exists = any(
                u.organization_id == org.id
                and (u.email == data.email or (data.vendor_user_id and u.vendor_user_id == data.vendor_user_id))
                for u in self.world.users
            )
        if exists:
            raise SimError(409, "USER_EXISTS", "Conflict: this user already exists in the organization")
        self.world.add_user(User(org.id, data.email, data.vendor_user_id, data.first_name, data.last_name))
        return JSONResponse(
            {
                "status": 201,
                "message": "Successfully created a user for the organization",
                "organizationOemToken": org.oem_token,
            },
            status_code=201,
        )

    async def _user_delete(self, request: Request, call: Call) -> Response:
        """DELETE /api/oem-api/user (the user is named by data.vendorUserId or data.email)"""
        self._authenticate(call, [VENDOR_MANAGE_SCOPE])
        body = validate(DeleteUser, call.json_object())
        org = self._organization_by_token(body.organization_oem_token)
        wanted = body.data
        if wanted is None or (wanted.vendor_user_id is None and wanted.email is None):
            raise SimError(400, "BAD_REQUEST", "Bad Request: name the user in data.vendorUserId or data.email")
        with self.world.lock:
            user = next(
                (
                    u
                    for u in self.world.users
                    if u.organization_id == org.id
                    and (
                        (wanted.vendor_user_id is not None and u.vendor_user_id == wanted.vendor_user_id)
                        or (wanted.email is not None and u.email == wanted.email)
                    )
                ),
                None,
            )
        if user is None:
            raise SimError(404, "USER_NOT_FOUND", "Not Found: User not found")
        self.world.remove_user(user)
        return JSONResponse({"status": 201, "message": "Success: User Deleted"}, status_code=201)

    async def _vendor_list(self, request: Request, call: Call) -> Response:
        """POST /api/oem-api/vendor"""
        self._authenticate(call, [VENDOR_MANAGE_SCOPE])
        vendors = [
            {
                "id": v.id,
                "name": v.name,
                "integrationStatus": v.integration_status,
                "integrationType": v.integration_type,
                "integrationCredentialTemplate": dict(v.credential_template),
            }
            for v in self.seed.vendors
        ]
        return JSONResponse({"status": 200, "message": "Successfully fetched MSPC vendors", "vendors": vendors})

    def _check_pair(self, org: Organization, vendor: SeedVendor) -> None:
        if not org.allows(vendor.id):
            raise SimError(
                403,
                "VENDOR_NOT_AUTHORIZED",
                f"organization {_echo(org.id)} does not allow vendor {_echo(vendor.id)}",
            )
        if self.duplicate_mode == "conflict":
            existing = self.world.live_integrations(org.id, vendor.id)
            if existing:
                raise SimError(
                    409,
                    "INTEGRATION_EXISTS",
                    f"Conflict: organization {_echo(org.id)} already has integration {existing[0].id} "
                    f"for vendor {_echo(vendor.id)}",
                )

    async def _integration_create(self, request: Request, call: Call) -> Response:
        """POST /api/oem-api/integration (credential-based or ``integrationType: external``)"""
        body = call.json_object()
        if "integrationType" in body:
            return self._external_create(call)
        self._authenticate(call, [VENDOR_MANAGE_SCOPE])
        parsed = validate(CreateCredentialIntegration, body)
        org = self._organization_by_token(parsed.organization_oem_token)
        vendor = self._vendor(parsed.data.vendor_id)
        self._check_pair(org, vendor)
        integration, _ = self.world.create_integration(
            organization_id=org.id,
            vendor_id=vendor.id,
            kind="custom_hosted",
            client_id=call.client.id if call.client else "",
            credential_fields=sorted(parsed.data.integration_credentials),
        )
        return JSONResponse(
            {
                "integration": {"id": integration.id, "vendorId": vendor.id},
                "status": 201,
                "message": "Successfully created an integration for an organization",
            },
            status_code=201,
        )

    def _external_create(self, call: Call) -> Response:
        client = self._authenticate(call, [PARTNER_TOKEN_SCOPE])
        parsed = validate(CreateExternalIntegration, call.json_object())
        if parsed.integration_type != "external":
            raise SimError(400, "BAD_REQUEST", "Bad Request: integrationType must be 'external'")
        org = self.world.organizations.get(parsed.organization_id)
        if org is None:
            raise SimError(
                404, "ORGANIZATION_NOT_FOUND", f"Not Found: organization {_echo(parsed.organization_id)} does not exist"
            )
        vendor = self._vendor(parsed.vendor_id)
        self._check_pair(org, vendor)
        integration, partner_key = self.world.create_integration(
            organization_id=org.id, vendor_id=vendor.id, kind="external", client_id=client.id, credential_fields=[]
        )
        return JSONResponse(
            {
                "integration": {"id": integration.id, "vendorId": vendor.id, "integrationKind": "external"},
                "partnerApiKey": partner_key,
                "status": 201,
                "message": "Successfully created an integration for an organization",
            },
            status_code=201,
        )

    async def _integration_list(self, request: Request, call: Call) -> Response:
        """POST /api/oem-api/integration/list (by organizationOemToken, organizationId, or all of the client's)"""
        client = self._authenticate(call, [VENDOR_MANAGE_SCOPE, PARTNER_TOKEN_SCOPE])
        body = validate(ListIntegrations, call.json_object())
        if body.organization_oem_token is not None:
            org_id: str | None = self._organization_by_token(body.organization_oem_token).id
        elif body.organization_id is not None:
            if body.organization_id not in self.world.organizations:
                raise SimError(404, "ORGANIZATION_NOT_FOUND", f"Not Found: organization {body.organization_id!r:.64}")
            org_id = body.organization_id
        else:
            org_id = None
        with self.world.lock:
            chosen = [
                i
                for i in self.world.integrations.values()
                if i.live and (i.organization_id == org_id if org_id is not None else i.client_id == client.id)
            ]
        items = []
        for integration in chosen:
            vendor = self.seed.vendor(integration.vendor_id)
            items.append(
                {
                    "id": integration.id,
                    "vendorId": integration.vendor_id,
                    "integrationCredentialTemplate": [dict(vendor.credential_template) if vendor else {}],
                    "integrationStatus": integration.status,
                    "integrationKind": integration.kind,
                    "organizationId": integration.organization_id,
                    "createdAt": integration.created_at,
                }
            )
        return JSONResponse(
            {"integrations": items, "status": 200, "message": "Successfully fetched list of user's integrations"}
        )

    async def _revoke(self, request: Request, call: Call) -> Response:
        """DELETE /api/oem-api/integration/{id} (extension: revokes the integration and its partner key)"""
        client = self._authenticate(call, [PARTNER_TOKEN_SCOPE, VENDOR_MANAGE_SCOPE])
        integration_id = request.path_params["integration_id"]
        integration = self.world.integrations.get(integration_id)
        if integration is None or not integration.live or integration.client_id != client.id:
            raise SimError(404, "INTEGRATION_NOT_FOUND", f"Not Found: integration {_echo(integration_id)} not found")
        self.world.revoke_integration(integration)
        return JSONResponse({"status": 201, "message": "Success: Integration revoked"}, status_code=201)

    # -- Vendor API ----------------------------------------------------------------

    def _upsert(self, table: dict[str, Any], key: str, view: dict[str, Any], noun: str) -> Response:
        """Insert or replace ``table[key]``: 201 when new, 200 when it replaced an entry."""
        with self.world.lock:
            created = key not in table
            table[key] = view
            self.world.touch()
        status = 201 if created else 200
        verb = "created" if created else "updated"
        return JSONResponse(
            {"status": status, "message": f"Successfully {verb} vendor {noun}", noun: view}, status_code=status
        )

    async def _accounts_create(self, request: Request, call: Call) -> Response:
        """POST /api/vendor-api/organization/accounts (upsert by vendorAccountId)"""
        integration = self._authenticate_vendor_api(request, call)
        account = validate(VendorAccount, call.json_object())
        return self._upsert(
            integration.accounts, account.vendor_account_id, account.model_dump(by_alias=True), "account"
        )

    async def _accounts_list(self, request: Request, call: Call) -> Response:
        """GET /api/vendor-api/organization/accounts (read-only probe)"""
        integration = self._authenticate_vendor_api(request, call)
        with self.world.lock:
            accounts = list(integration.accounts.values())
        return JSONResponse({"status": 200, "message": "Successfully fetched vendor accounts", "accounts": accounts})

    async def _services_create(self, request: Request, call: Call) -> Response:
        """POST /api/vendor-api/organization/services (upsert by id)"""
        integration = self._authenticate_vendor_api(request, call)
        service = validate(VendorService, call.json_object())
        return self._upsert(integration.services, service.id, service.model_dump(by_alias=True), "service")

    async def _status_update(self, request: Request, call: Call) -> Response:
        """PATCH /api/vendor-api/status/{status} (a body, if any, must be JSON and is ignored)"""
        integration = self._authenticate_vendor_api(request, call)
        status = request.path_params["status"]
        if status not in INTEGRATION_STATUSES:
            raise SimError(
                400, "INVALID_STATUS", f"Bad Request: status must be one of {', '.join(sorted(INTEGRATION_STATUSES))}"
            )
        if call.raw_body.strip():
            call.json()
        with self.world.lock:
            integration.status = status
            self.world.touch()
        return JSONResponse(
            {"status": 200, "message": "Successfully updated integration status", "integrationStatus": status}
        )

    # -- test controls (/_sim) ------------------------------------------------------

    def _guard(self, handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            token = self.config.admin_token
            if token is not None and request.url.path != "/_sim/health":
                given = request.headers.get("authorization", "")
                if not same_secret(given, f"Bearer {token}"):
                    return error_response(401, "ADMIN_UNAUTHORIZED", "the /_sim endpoints need the admin token")
            try:
                return await handler(request)
            except SimError as exc:
                return exc.response()

        return run

    async def _admin_body(self, request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw) if raw.strip() else {}
        except (ValueError, UnicodeDecodeError):
            raise SimError(400, "BAD_REQUEST", "Bad Request: the body is not valid JSON") from None

    async def _admin_health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "integrations": len(self.world.integrations)})

    async def _admin_integrations(self, request: Request) -> Response:
        with self.world.lock:
            items = [i.inspect() for i in self.world.integrations.values()]
        return JSONResponse({"integrations": items})

    async def _admin_organizations(self, request: Request) -> Response:
        with self.world.lock:
            items = [
                {
                    "id": o.id,
                    "name": o.name,
                    "vendorOrganizationId": o.vendor_organization_id,
                    "allowedVendorIds": o.allowed_vendor_ids,
                    "seeded": o.seeded,
                    "createdAt": o.created_at,
                    "users": [
                        {"email": u.email, "vendorUserId": u.vendor_user_id, "role": u.role}
                        for u in self.world.users
                        if u.organization_id == o.id
                    ],
                }
                for o in self.world.organizations.values()
            ]
        return JSONResponse({"organizations": items})

    async def _admin_requests(self, request: Request) -> Response:
        if request.method == "DELETE":
            self.requests.clear()
        return JSONResponse(self.requests.view())

    async def _admin_faults(self, request: Request) -> Response:
        if request.method == "POST":
            fault_id = self.faults.add(_validate_admin(FaultSpec, await self._admin_body(request)))
            return JSONResponse({"id": fault_id, "faults": self.faults.view()}, status_code=201)
        if request.method == "PUT":
            replace = _validate_admin(FaultReplace, await self._admin_body(request))
            self.faults.replace(replace.faults, replace.seed)
        elif request.method == "DELETE":
            self.faults.replace([])
        return JSONResponse({"faults": self.faults.view()})

    async def _admin_config(self, request: Request) -> Response:
        if request.method == "POST":
            body = await self._admin_body(request)
            update = _validate_admin(ConfigUpdate, body)
            if "duplicateMode" in body and update.duplicate_mode is not None:
                self.duplicate_mode = update.duplicate_mode
            if "rateLimit" in body:
                self.rate_limiter.configure(update.rate_limit)
        spec = self.rate_limiter.spec
        return JSONResponse({"duplicateMode": self.duplicate_mode, "rateLimit": spec.model_dump() if spec else None})

    async def _admin_reset(self, request: Request) -> Response:
        self.reset()
        return JSONResponse({"status": "reset"})

    def reset(self) -> None:
        """Back to the seed and the start-up configuration; waiting requests are discarded."""
        self.generation += 1
        self.world.reset()
        self.requests.clear()
        self.faults.replace(list(self.config.faults), self.config.fault_seed)
        self.rate_limiter.configure(self.config.rate_limit)
        self.duplicate_mode = self.config.duplicate_mode


def _validate_admin(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [
            (".".join(str(p) for p in err["loc"]) or "body") + ": " + err["msg"]
            for err in exc.errors(include_input=False, include_url=False)
        ]
        raise SimError(400, "BAD_REQUEST", "; ".join(problems)) from None


def _dispatch(
    methods: dict[str, Callable[[Request], Awaitable[Response]]],
) -> Callable[[Request], Awaitable[Response]]:
    async def run(request: Request) -> Response:
        return await methods[request.method](request)

    return run


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    codes = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}
    messages = {404: "Not Found: no such endpoint", 405: "Method Not Allowed"}
    return error_response(status, codes.get(status, "HTTP_ERROR"), messages.get(status, "HTTP error"))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("simulator.internal_error", path=request.url.path, error_type=type(exc).__name__)
    return error_response(500, "INTERNAL_ERROR", "internal simulator error")


async def _drop_connection(send: Send) -> None:
    """Close the client connection without a byte of response (lost-response fault).

    uvicorn's ``send`` is a bound method of the request cycle, which holds
    the asyncio transport; closing it gives the client a connection closed
    before any answer. Elsewhere, fall back to failing the ASGI call.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        raise RuntimeError("lost-response fault: dropping the connection")
    transport.close()
    for _ in range(3):
        await asyncio.sleep(0)


def create_app(
    seed: Seed | None = None, config: SimulatorConfig | None = None, state_path: Path | None = None
) -> Simulator:
    """Build the simulator ASGI app (the packaged dev seed when ``seed`` is None)."""
    return Simulator(seed, config, state_path)
