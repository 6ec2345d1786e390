"""The MSPC simulator honours the OEM / Vendor API contract (specs/mspc-api.md + DESIGN.md) over real HTTP."""

from __future__ import annotations

import base64
import json
import ssl
import time
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from broker.errors import ConfigError
from broker.mspc_token import compose
from broker.simulator import RateLimitSpec, load_seed, parse_seed
from broker.testing.simulator import (
    SimulatorThread,
    fingerprint,
    self_signed_certificate,
    start_simulator_process,
    start_simulator_thread,
)

ENVELOPE = {"clientId": "dev-client", "clientSecret": "dev-client-secret", "grantType": "client_credentials"}
MANAGE = {**ENVELOPE, "scope": "vendor_manage"}
PARTNER = {**ENVELOPE, "scope": "oem:partner_token"}
EXTERNAL = {**PARTNER, "integrationType": "external", "organizationId": "org-contoso", "vendorId": "vendor-acme"}
CONTOSO_TOKEN = "contoso-oem-token-dev"
ACME_KEY = SecretStr("acme-vendor-key-dev")
GLOBEX_KEY = SecretStr("globex-vendor-key-dev")
CREATED_MESSAGE = "Successfully created an integration for an organization"


@pytest.fixture
def http(sim: SimulatorThread) -> httpx.Client:
    """A plain HTTP client aimed at the simulator."""
    return sim.http()


def send(http: httpx.Client, method: str, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
    """Send ``body`` as JSON (dict / list) or raw bytes."""
    if isinstance(body, bytes):
        return http.request(method, path, content=body, **kwargs)
    return http.request(method, path, json=body, **kwargs)


def create_external(http: httpx.Client, org: str = "org-contoso", vendor: str = "vendor-acme") -> dict[str, Any]:
    response = send(http, "POST", "/api/oem-api/integration", {**EXTERNAL, "organizationId": org, "vendorId": vendor})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def bearer(token: SecretStr) -> dict[str, str]:
    return {"Authorization": f"Bearer {token.get_secret_value()}"}


def without(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


# (id, method, path, body, expected status, expected code)
ERROR_CASES: list[tuple[str, str, str, Any, int, str]] = [
    ("malformed-json", "POST", "/api/oem-api/integration", b'{"clientId": ', 400, "BAD_REQUEST"),
    ("empty-body", "POST", "/api/oem-api/integration", b"", 400, "BAD_REQUEST"),
    ("json-array", "POST", "/api/oem-api/vendor", [MANAGE], 400, "BAD_REQUEST"),
    (
        "missing-client-secret",
        "POST",
        "/api/oem-api/integration",
        without(EXTERNAL, "clientSecret"),
        400,
        "BAD_REQUEST",
    ),
    ("missing-scope", "POST", "/api/oem-api/vendor", without(MANAGE, "scope"), 400, "BAD_REQUEST"),
    ("client-id-not-string", "POST", "/api/oem-api/vendor", {**MANAGE, "clientId": 7}, 400, "BAD_REQUEST"),
    (
        "wrong-grant-type",
        "POST",
        "/api/oem-api/vendor",
        {**MANAGE, "grantType": "password"},
        400,
        "UNSUPPORTED_GRANT_TYPE",
    ),
    ("bad-secret", "POST", "/api/oem-api/integration", {**EXTERNAL, "clientSecret": "nope"}, 401, "INVALID_CLIENT"),
    ("unknown-client", "POST", "/api/oem-api/vendor", {**MANAGE, "clientId": "who"}, 401, "INVALID_CLIENT"),
    (
        "scope-not-for-endpoint",
        "POST",
        "/api/oem-api/integration",
        {**EXTERNAL, "scope": "vendor_manage"},
        403,
        "INVALID_SCOPE",
    ),
    (
        "scope-not-granted",
        "POST",
        "/api/oem-api/integration",
        {**EXTERNAL, "clientId": "manage-only-client", "clientSecret": "manage-only-secret"},
        403,
        "INVALID_SCOPE",
    ),
    (
        "unknown-organization",
        "POST",
        "/api/oem-api/integration",
        {**EXTERNAL, "organizationId": "org-x"},
        404,
        "ORGANIZATION_NOT_FOUND",
    ),
    (
        "unknown-vendor",
        "POST",
        "/api/oem-api/integration",
        {**EXTERNAL, "vendorId": "vendor-x"},
        404,
        "VENDOR_NOT_FOUND",
    ),
    (
        "vendor-not-allowed",
        "POST",
        "/api/oem-api/integration",
        {**EXTERNAL, "organizationId": "org-fabrikam", "vendorId": "vendor-globex"},
        403,
        "VENDOR_NOT_AUTHORIZED",
    ),
    (
        "vendor-id-not-string",
        "POST",
        "/api/oem-api/integration",
        {**EXTERNAL, "vendorId": ["vendor-acme"]},
        400,
        "BAD_REQUEST",
    ),
    (
        "integration-type-not-external",
        "POST",
        "/api/oem-api/integration",
        {**EXTERNAL, "integrationType": "internal"},
        400,
        "BAD_REQUEST",
    ),
    (
        "credential-variant-bad-org-token",
        "POST",
        "/api/oem-api/integration",
        {**MANAGE, "organizationOemToken": "nope", "data": {"vendorId": "vendor-acme", "integrationCredentials": {}}},
        403,
        "INVALID_ORGANIZATION_TOKEN",
    ),
    (
        "credential-variant-credentials-not-object",
        "POST",
        "/api/oem-api/integration",
        {
            **MANAGE,
            "organizationOemToken": CONTOSO_TOKEN,
            "data": {"vendorId": "vendor-acme", "integrationCredentials": "k"},
        },
        400,
        "BAD_REQUEST",
    ),
    ("organization-missing-data", "POST", "/api/oem-api/organization", MANAGE, 400, "BAD_REQUEST"),
    (
        "organization-exists",
        "POST",
        "/api/oem-api/organization",
        {**MANAGE, "data": {"name": "C", "email": "a@contoso.example", "vendorOrganizationId": "contoso"}},
        409,
        "ORGANIZATION_EXISTS",
    ),
    (
        "organization-delete-unknown",
        "DELETE",
        "/api/oem-api/organization/nobody",
        MANAGE,
        404,
        "ORGANIZATION_NOT_FOUND",
    ),
    (
        "organization-delete-bad-secret",
        "DELETE",
        "/api/oem-api/organization/contoso",
        {**MANAGE, "clientSecret": "x"},
        401,
        "INVALID_CLIENT",
    ),
    (
        "user-unknown-organization",
        "POST",
        "/api/oem-api/user",
        {**MANAGE, "data": {"email": "u@x.example", "vendorOrganizationId": "nobody"}},
        404,
        "ORGANIZATION_NOT_FOUND",
    ),
    (
        "user-delete-bad-org-token",
        "DELETE",
        "/api/oem-api/user",
        {**MANAGE, "organizationOemToken": "x", "data": {"email": "a"}},
        403,
        "INVALID_ORGANIZATION_TOKEN",
    ),
    (
        "user-delete-unnamed",
        "DELETE",
        "/api/oem-api/user",
        {**MANAGE, "organizationOemToken": CONTOSO_TOKEN},
        400,
        "BAD_REQUEST",
    ),
    (
        "user-delete-unknown",
        "DELETE",
        "/api/oem-api/user",
        {**MANAGE, "organizationOemToken": CONTOSO_TOKEN, "data": {"vendorUserId": "ghost"}},
        404,
        "USER_NOT_FOUND",
    ),
    (
        "list-bad-org-token",
        "POST",
        "/api/oem-api/integration/list",
        {**PARTNER, "organizationOemToken": "x"},
        403,
        "INVALID_ORGANIZATION_TOKEN",
    ),
    (
        "list-unknown-organization",
        "POST",
        "/api/oem-api/integration/list",
        {**PARTNER, "organizationId": "org-x"},
        404,
        "ORGANIZATION_NOT_FOUND",
    ),
    (
        "revoke-unknown",
        "DELETE",
        "/api/oem-api/integration/0123456789abcdef01234567",
        PARTNER,
        404,
        "INTEGRATION_NOT_FOUND",
    ),
    ("revoke-without-body", "DELETE", "/api/oem-api/integration/0123456789abcdef01234567", b"", 400, "BAD_REQUEST"),
    ("unknown-path", "POST", "/api/oem-api/nothing-here", MANAGE, 404, "NOT_FOUND"),
    ("wrong-method", "GET", "/api/oem-api/vendor", None, 405, "METHOD_NOT_ALLOWED"),
]


class TestErrorTable:
    @pytest.mark.parametrize(
        ("method", "path", "body", "status", "code"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
    )
    def test_error_answer(self, http: httpx.Client, method: str, path: str, body: Any, status: int, code: str) -> None:
        """Each malformed, unauthenticated or impossible request gets its documented status and JSON error body."""
        response = send(http, method, path, body)
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        assert response.json() == {"status": status, "code": code, "message": ANY}
        assert response.json()["message"]

    def test_invalid_credentials_message_matches_docs(self, http: httpx.Client) -> None:
        """Bad client credentials answer the docs' 401 body, plus the code."""
        response = send(http, "POST", "/api/oem-api/vendor", {**MANAGE, "clientSecret": "wrong"})
        assert response.json() == {
            "status": 401,
            "code": "INVALID_CLIENT",
            "message": "Unauthorized: Invalid credentials",
        }

    def test_errors_never_echo_the_secret(self, http: httpx.Client, canary: str) -> None:
        """A rejected client secret is not repeated in the error body."""
        response = send(http, "POST", "/api/oem-api/vendor", {**MANAGE, "clientSecret": canary, "scope": 5})
        assert response.status_code == 400
        assert canary not in response.text


API_ROUTES = [
    ("POST", "/api/oem-api/organization"),
    ("DELETE", "/api/oem-api/organization/contoso-x"),
    ("POST", "/api/oem-api/user"),
    ("DELETE", "/api/oem-api/user"),
    ("POST", "/api/oem-api/vendor"),
    ("POST", "/api/oem-api/integration"),
    ("POST", "/api/oem-api/integration/list"),
    ("DELETE", "/api/oem-api/integration/abc"),
    ("POST", "/api/vendor-api/organization/accounts"),
    ("POST", "/api/vendor-api/organization/services"),
    ("PATCH", "/api/vendor-api/status/mapping"),
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(
    ["data", "organizationOemToken", "integrationType", "organizationId", "vendorId", "vendorAccountId", "id", "name"]
)


class TestNeverA500:
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        route=st.sampled_from(API_ROUTES),
        base=st.sampled_from([MANAGE, PARTNER, {}]),
        extra=st.dictionaries(field_names, json_values, max_size=4),
        raw=st.none() | st.binary(max_size=40),
    )
    def test_arbitrary_bodies_get_json_answers(
        self,
        http: httpx.Client,
        route: tuple[str, str],
        base: dict[str, Any],
        extra: dict[str, Any],
        raw: bytes | None,
    ) -> None:
        """Whatever body arrives, every endpoint answers a JSON status/code/message below 500 or a success."""
        body: Any = raw if raw is not None else {**base, **extra}
        response = send(http, route[0], route[1], body, headers=bearer(compose(ACME_KEY, SecretStr("pk-unknown"))))
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert set(response.json()) == {"status", "code", "message"}


class TestOemSuccessBodies:
    def test_vendor_list(self, http: httpx.Client, sim: SimulatorThread) -> None:
        """POST /vendor lists every seeded vendor in the documented shape."""
        response = send(http, "POST", "/api/oem-api/vendor", MANAGE)
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == 200
        assert body["message"] == "Successfully fetched MSPC vendors"
        assert body["vendors"][0] == {
            "id": "vendor-acme",
            "name": "Acme Backup",
            "integrationStatus": "active",
            "integrationType": "external",
            "integrationCredentialTemplate": {"api key": "", "api username": ""},
        }
        assert [v["id"] for v in body["vendors"]] == [v.id for v in sim.seed.vendors]

    def test_external_create(self, http: httpx.Client) -> None:
        """An external create answers 201 with the integration, a partnerApiKey and the docs' message."""
        response = send(http, "POST", "/api/oem-api/integration", EXTERNAL)
        assert response.status_code == 201
        assert response.json() == {
            "integration": {"id": ANY, "vendorId": "vendor-acme", "integrationKind": "external"},
            "partnerApiKey": ANY,
            "status": 201,
            "message": CREATED_MESSAGE,
        }
        assert len(response.json()["integration"]["id"]) == 24

    def test_credential_create(self, http: httpx.Client, sim: SimulatorThread) -> None:
        """A credential-based create answers 201 without a partner key and never stores credential values."""
        body = {
            **MANAGE,
            "organizationOemToken": CONTOSO_TOKEN,
            "data": {"vendorId": "vendor-initech", "integrationCredentials": {"api user": "u", "api key": "secret-k"}},
        }
        response = send(http, "POST", "/api/oem-api/integration", body)
        assert response.status_code == 201
        assert response.json() == {
            "integration": {"id": ANY, "vendorId": "vendor-initech"},
            "status": 201,
            "message": CREATED_MESSAGE,
        }
        assert [i["integrationKind"] for i in sim.integrations()] == ["custom_hosted"]
        assert "secret-k" not in json.dumps(sim.integrations())

    def test_list_by_token_and_by_id(self, http: httpx.Client) -> None:
        """integration/list finds an organization's live integrations by OEM token or by organizationId."""
        created = create_external(http)
        by_token = send(
            http, "POST", "/api/oem-api/integration/list", {**MANAGE, "organizationOemToken": CONTOSO_TOKEN}
        )
        by_id = send(http, "POST", "/api/oem-api/integration/list", {**PARTNER, "organizationId": "org-contoso"})
        for response in (by_token, by_id):
            assert response.status_code == 200
            body = response.json()
            assert body["status"] == 200
            assert body["message"] == "Successfully fetched list of user's integrations"
            assert body["integrations"] == [
                {
                    "id": created["integration"]["id"],
                    "vendorId": "vendor-acme",
                    "integrationCredentialTemplate": [{"api key": "", "api username": ""}],
                    "integrationStatus": "active",
                    "integrationKind": "external",
                    "organizationId": "org-contoso",
                    "createdAt": ANY,
                }
            ]

    def test_organization_and_user_lifecycle(self, http: httpx.Client, sim: SimulatorThread) -> None:
        """Create organization, add and remove a user, delete the organization: the documented bodies each time."""
        org = send(
            http,
            "POST",
            "/api/oem-api/organization",
            {
                **MANAGE,
                "data": {
                    "name": "Northwind",
                    "email": "owner@northwind.example",
                    "firstName": "O",
                    "lastName": "W",
                    "vendorUserId": "u1",
                    "vendorOrganizationId": "northwind",
                },
            },
        )
        assert org.status_code == 201
        assert org.json() == {
            "status": 201,
            "message": "Successfully created organization",
            "organizationOemToken": ANY,
        }
        token = org.json()["organizationOemToken"]
        user = send(
            http,
            "POST",
            "/api/oem-api/user",
            {
                **MANAGE,
                "data": {"email": "m@northwind.example", "vendorUserId": "u2", "vendorOrganizationId": "northwind"},
            },
        )
        assert user.status_code == 201
        assert user.json() == {
            "status": 201,
            "message": "Successfully created a user for the organization",
            "organizationOemToken": token,
        }
        again = send(
            http,
            "POST",
            "/api/oem-api/user",
            {**MANAGE, "data": {"email": "m@northwind.example", "vendorOrganizationId": "northwind"}},
        )
        assert again.json()["code"] == "USER_EXISTS"
        roles = {
            u["vendorUserId"]: u["role"]
            for o in sim.organizations()
            if o["vendorOrganizationId"] == "northwind"
            for u in o["users"]
        }
        assert roles == {"u1": "owner", "u2": "member"}
        removed = send(
            http,
            "DELETE",
            "/api/oem-api/user",
            {**MANAGE, "organizationOemToken": token, "data": {"vendorUserId": "u2"}},
        )
        assert removed.status_code == 201
        assert removed.json() == {"status": 201, "message": "Success: User Deleted"}
        deleted = send(http, "DELETE", "/api/oem-api/organization/northwind", MANAGE)
        assert deleted.status_code == 201
        assert deleted.json() == {"status": 201, "message": "Success"}
        gone = send(http, "POST", "/api/oem-api/integration/list", {**MANAGE, "organizationOemToken": token})
        assert gone.json()["code"] == "INVALID_ORGANIZATION_TOKEN"

    def test_user_placed_by_email_domain(self, http: httpx.Client, sim: SimulatorThread) -> None:
        """A user without vendorOrganizationId joins the organization (created without one) of its email domain."""
        send(
            http,
            "POST",
            "/api/oem-api/organization",
            {**MANAGE, "data": {"name": "Tailspin", "email": "a@tailspin.example"}},
        )
        response = send(http, "POST", "/api/oem-api/user", {**MANAGE, "data": {"email": "b@tailspin.example"}})
        assert response.status_code == 201
        users = [u["email"] for o in sim.organizations() if o["name"] == "Tailspin" for u in o["users"]]
        assert users == ["a@tailspin.example", "b@tailspin.example"]


class TestVendorApi:
    def test_token_from_created_integration_is_accepted(self, http: httpx.Client) -> None:
        """MSPC_TOKEN = base64(vendorKey:partnerKey) works for accounts, services and status."""
        created = create_external(http)
        token = compose(ACME_KEY, SecretStr(created["partnerApiKey"]))
        account = {"vendorAccountId": "test_account_123", "name": "Test", "externalId": "ext_123"}
        posted = http.post("/api/vendor-api/organization/accounts", json=account, headers=bearer(token))
        assert posted.status_code == 201
        assert posted.json()["account"] == account
        assert (
            http.post("/api/vendor-api/organization/accounts", json=account, headers=bearer(token)).status_code == 200
        )
        service = {"id": "svc-1", "name": "Backup", "description": "per seat"}
        assert (
            http.post("/api/vendor-api/organization/services", json=service, headers=bearer(token)).status_code == 201
        )
        status = http.patch("/api/vendor-api/status/mapping", json=service, headers=bearer(token))
        assert status.json() == {
            "status": 200,
            "message": "Successfully updated integration status",
            "integrationStatus": "mapping",
        }
        listed = http.get("/api/vendor-api/organization/accounts", headers=bearer(token))
        assert listed.status_code == 200
        assert listed.json()["accounts"] == [account]

    @pytest.mark.parametrize(
        ("header", "code"),
        [
            (None, "INVALID_MSPC_TOKEN"),
            ("Basic abc", "INVALID_MSPC_TOKEN"),
            ("Bearer not*base64", "INVALID_MSPC_TOKEN"),
            ("Bearer " + base64.b64encode(b"no-colon-here").decode(), "INVALID_MSPC_TOKEN"),
            ("Bearer " + base64.b64encode(b"vendor:key").decode().rstrip("="), "INVALID_MSPC_TOKEN"),
            ("Bearer " + base64.urlsafe_b64encode(b"\xfb\xff:>>?").decode(), "INVALID_MSPC_TOKEN"),
            ("Bearer " + base64.b64encode(b"who:partner").decode(), "UNKNOWN_VENDOR_KEY"),
            ("Bearer " + base64.b64encode(b"acme-vendor-key-dev:nobody").decode(), "UNKNOWN_PARTNER_KEY"),
        ],
        ids=[
            "missing",
            "not-bearer",
            "not-base64",
            "no-colon",
            "unpadded",
            "url-safe",
            "unknown-vendor",
            "unknown-partner",
        ],
    )
    def test_bad_tokens_are_401(self, http: httpx.Client, header: str | None, code: str) -> None:
        """Missing, malformed or unknown MSPC_TOKENs get 401 with a specific code."""
        headers = {"Authorization": header} if header else {}
        response = http.get("/api/vendor-api/organization/accounts", headers=headers)
        assert response.status_code == 401
        assert response.json() == {"status": 401, "code": code, "message": ANY}

    def test_partner_key_with_other_vendor_key_is_403(self, http: httpx.Client) -> None:
        """A valid partner key presented with another vendor's key is VENDOR_NOT_AUTHORIZED."""
        created = create_external(http)
        token = compose(GLOBEX_KEY, SecretStr(created["partnerApiKey"]))
        response = http.get("/api/vendor-api/organization/accounts", headers=bearer(token))
        assert response.status_code == 403
        assert response.json()["code"] == "VENDOR_NOT_AUTHORIZED"

    def test_revoked_key_is_401_and_revoke_is_once(self, http: httpx.Client, sim: SimulatorThread) -> None:
        """DELETE integration/{id} (with the envelope) revokes the key; a second DELETE is 404."""
        created = create_external(http)
        integration_id = created["integration"]["id"]
        token = compose(ACME_KEY, SecretStr(created["partnerApiKey"]))
        revoked = http.request("DELETE", f"/api/oem-api/integration/{integration_id}", json=PARTNER)
        assert revoked.status_code == 201
        assert revoked.json() == {"status": 201, "message": "Success: Integration revoked"}
        probe = http.get("/api/vendor-api/organization/accounts", headers=bearer(token))
        assert probe.json() == {"status": 401, "code": "PARTNER_KEY_REVOKED", "message": ANY}
        assert http.request("DELETE", f"/api/oem-api/integration/{integration_id}", json=PARTNER).status_code == 404
        assert sim.live_integrations() == []
        listed = send(http, "POST", "/api/oem-api/integration/list", {**PARTNER, "organizationId": "org-contoso"})
        assert listed.json()["integrations"] == []

    def test_unknown_status_and_body_validation(self, http: httpx.Client) -> None:
        """An unknown status segment, and an account without vendorAccountId, are 400."""
        created = create_external(http)
        token = compose(ACME_KEY, SecretStr(created["partnerApiKey"]))
        assert http.patch("/api/vendor-api/status/flying", headers=bearer(token)).json()["code"] == "INVALID_STATUS"
        bad = http.post("/api/vendor-api/organization/accounts", json={"name": "x"}, headers=bearer(token))
        assert bad.status_code == 400
        assert bad.json()["code"] == "BAD_REQUEST"


class TestDuplicates:
    def test_default_mode_creates_a_second_integration(self, http: httpx.Client, sim: SimulatorThread) -> None:
        """A second create for the same pair makes a new integration and key; both keys work."""
        first = create_external(http)
        second = create_external(http)
        assert first["integration"]["id"] != second["integration"]["id"]
        assert first["partnerApiKey"] != second["partnerApiKey"]
        for created in (first, second):
            token = compose(ACME_KEY, SecretStr(created["partnerApiKey"]))
            assert http.get("/api/vendor-api/organization/accounts", headers=bearer(token)).status_code == 200
        assert len(sim.live_integrations()) == 2

    def test_conflict_mode_answers_409(self, http: httpx.Client, sim: SimulatorThread) -> None:
        """In conflict mode a second create is 409 INTEGRATION_EXISTS naming the existing id; after revoke it works."""
        sim.configure(duplicate_mode="conflict")
        first = create_external(http)
        response = send(http, "POST", "/api/oem-api/integration", EXTERNAL)
        assert response.status_code == 409
        assert response.json()["code"] == "INTEGRATION_EXISTS"
        assert first["integration"]["id"] in response.json()["message"]
        http.request("DELETE", f"/api/oem-api/integration/{first['integration']['id']}", json=PARTNER)
        assert send(http, "POST", "/api/oem-api/integration", EXTERNAL).status_code == 201


class TestRateLimit:
    def test_bucket_answers_429_with_retry_after(self, http: httpx.Client, sim: SimulatorThread) -> None:
        """Past the bucket's capacity a client gets 429, an integer Retry-After >= 1, and a JSON body."""
        sim.configure(rate_limit=RateLimitSpec(capacity=2, refill_per_second=0.5))
        statuses = [send(http, "POST", "/api/oem-api/vendor", MANAGE).status_code for _ in range(2)]
        limited = send(http, "POST", "/api/oem-api/vendor", MANAGE)
        assert statuses == [200, 200]
        assert limited.status_code == 429
        assert int(limited.headers["Retry-After"]) >= 1
        assert limited.json() == {"status": 429, "code": "RATE_LIMITED", "message": ANY}
        assert "Retry after" in limited.json()["message"]

    def test_buckets_are_per_client(self, http: httpx.Client, sim: SimulatorThread) -> None:
        """One client's exhausted bucket does not limit another client."""
        sim.configure(rate_limit=RateLimitSpec(capacity=1, refill_per_second=0.1))
        send(http, "POST", "/api/oem-api/vendor", MANAGE)
        assert send(http, "POST", "/api/oem-api/vendor", MANAGE).status_code == 429
        other = {**MANAGE, "clientId": "manage-only-client", "clientSecret": "manage-only-secret"}
        assert send(http, "POST", "/api/oem-api/vendor", other).status_code == 200

    def test_reset_switches_the_limit_off(self, http: httpx.Client, sim: SimulatorThread) -> None:
        """Reset returns to the start-up configuration (no limit)."""
        sim.configure(rate_limit=RateLimitSpec(capacity=1, refill_per_second=0.1))
        sim.reset()
        assert [send(http, "POST", "/api/oem-api/vendor", MANAGE).status_code for _ in range(3)] == [200, 200, 200]


class TestFaults:
    def test_error_rate_for_next_requests_only(self, http: httpx.Client, sim: SimulatorThread) -> None:
        """An error fault limited to 2 requests of one endpoint answers 503 twice, then normally; others untouched."""
        sim.add_fault(error_rate=1.0, requests=2, endpoint="integration.create")
        assert send(http, "POST", "/api/oem-api/vendor", MANAGE).status_code == 200
        codes = [send(http, "POST", "/api/oem-api/integration", EXTERNAL).status_code for _ in range(3)]
        assert codes == [503, 503, 201]
        assert sim.faults() == []
        assert len(sim.live_integrations()) == 1

    def test_seeded_rng_reproduces_the_sequence(self, http: httpx.Client, sim: SimulatorThread) -> None:
        """The same fault seed gives the same pattern of injected errors."""
        patterns = []
        for _ in range(2):
            sim.set_faults([{"error_rate": 0.5, "error_status": 502, "endpoint": "vendor.list"}], seed=42)
            patterns.append([send(http, "POST", "/api/oem-api/vendor", MANAGE).status_code for _ in range(12)])
        assert patterns[0] == patterns[1]
        assert set(patterns[0]) == {200, 502}

    def test_latency_is_added(self, http: httpx.Client, sim: SimulatorThread) -> None:
        """A latency fault delays the answer by at least that many milliseconds."""
        sim.add_fault(latency_ms=150, requests=1)
        start = time.monotonic()
        assert send(http, "POST", "/api/oem-api/vendor", MANAGE).status_code == 200
        assert time.monotonic() - start >= 0.15

    def test_hang_outlasts_the_client_timeout(self, sim: SimulatorThread) -> None:
        """A hang fault makes a client with a shorter read timeout time out."""
        sim.add_fault(hang_seconds=3, requests=1, endpoint="vendor.list")
        with (
            httpx.Client(base_url=sim.url, timeout=httpx.Timeout(5.0, read=0.2)) as client,
            pytest.raises(httpx.ReadTimeout),
        ):
            client.post("/api/oem-api/vendor", json=MANAGE)
        assert sim.requests("vendor.list")[0]["outcome"] == "hung"

    def test_lost_response_creates_then_drops(self, http: httpx.Client, sim: SimulatorThread) -> None:
        """A lost-response fault creates the integration, then closes the connection with no answer."""
        sim.add_fault(lose_response=True, requests=1, endpoint="integration.create")
        with pytest.raises(httpx.RemoteProtocolError):
            send(http, "POST", "/api/oem-api/integration", EXTERNAL)
        assert len(sim.live_integrations()) == 1
        assert sim.requests("integration.create")[0]["outcome"] == "dropped"
        assert send(http, "POST", "/api/oem-api/integration", EXTERNAL).status_code == 201

    @pytest.mark.parametrize("spec", [{"error_rate": 2}, {"endpoint": "integration.crate"}, {"surprise": 1}])
    def test_bad_fault_spec_is_400(self, http: httpx.Client, spec: dict[str, Any]) -> None:
        """The admin endpoint refuses out-of-range values, unknown endpoint names and unknown fields."""
        response = http.post("/_sim/faults", json=spec)
        assert response.status_code == 400


class TestInspection:
    def test_integrations_show_fingerprints_never_keys(self, http: httpx.Client, sim: SimulatorThread) -> None:
        """/_sim/integrations shows a SHA-256 fingerprint and liveness per integration, never the key."""
        created = create_external(http)
        raw = http.get("/_sim/integrations").text
        assert created["partnerApiKey"] not in raw
        [item] = sim.integrations()
        assert item["partnerKeyFingerprint"] == fingerprint(created["partnerApiKey"])
        assert item["live"] is True
        assert item["organizationId"] == "org-contoso"
        assert item["vendorId"] == "vendor-acme"

    def test_request_log_and_counts(self, http: httpx.Client, sim: SimulatorThread) -> None:
        """Every API request is logged in order with a monotonic timestamp, status and client; counts per endpoint."""
        send(http, "POST", "/api/oem-api/vendor", MANAGE)
        send(http, "POST", "/api/oem-api/integration", {**EXTERNAL, "clientSecret": "bad"})
        entries = sim.requests()
        assert [(e["endpoint"], e["status"], e["clientId"]) for e in entries] == [
            ("vendor.list", 200, "dev-client"),
            ("integration.create", 401, "dev-client"),
        ]
        assert entries[0]["monotonic"] <= entries[1]["monotonic"]
        assert sim.request_counts() == {"vendor.list": 1, "integration.create": 1}

    def test_reset_forgets_everything(self, http: httpx.Client, sim: SimulatorThread) -> None:
        """Reset drops integrations, created organizations and the request log."""
        create_external(http)
        sim.reset()
        assert sim.integrations() == []
        assert sim.requests() == []
        assert {o["id"] for o in sim.organizations()} == {"org-contoso", "org-fabrikam"}


class TestAdminToken:
    def test_controls_need_the_token(self, canary: str) -> None:
        """With an admin token, /_sim/* (except health) refuses callers without it."""
        sim = start_simulator_thread(admin_token=canary)
        try:
            assert httpx.get(f"{sim.url}/_sim/integrations").status_code == 401
            assert httpx.get(f"{sim.url}/_sim/health").status_code == 200
            assert sim.integrations() == []
        finally:
            sim.stop()


class TestSeed:
    def test_default_seed_loads(self) -> None:
        """The packaged development seed is valid and has partner-token and manage-only clients."""
        seed = load_seed()
        scopes = {c.id: set(c.scopes) for c in seed.clients}
        assert scopes["dev-client"] == {"vendor_manage", "oem:partner_token"}
        assert scopes["manage-only-client"] == {"vendor_manage"}

    def test_vendor_key_with_colon_is_refused(self, canary: str) -> None:
        """A vendor key containing ':' could not be parsed out of an MSPC_TOKEN, so the seed is refused."""
        doc = {
            "clients": [{"id": "c", "secret": "s"}],
            "vendors": [{"id": "v", "name": "V", "vendor_key": canary + ":x"}],
        }
        with pytest.raises(ConfigError) as info:
            parse_seed(doc)
        assert canary not in str(info.value)

    def test_unknown_allowed_vendor_is_refused(self) -> None:
        """An organization may only allow seeded vendors."""
        doc = {
            "clients": [{"id": "c", "secret": "s"}],
            "vendors": [{"id": "v", "name": "V", "vendor_key": "k"}],
            "organizations": [{"id": "o", "name": "O", "oem_token": "t", "allowed_vendor_ids": ["w"]}],
        }
        with pytest.raises(ConfigError, match="unknown vendor"):
            parse_seed(doc)


class TestProcess:
    def test_cli_announces_and_state_survives_restart(self, tmp_path: Path) -> None:
        """`broker simulator --state` prints its URL, and a restart keeps integrations and revocations."""
        state = tmp_path / "state.json"
        proc = start_simulator_process(state_path=state, workdir=tmp_path)
        try:
            assert f"MSPC simulator listening on {proc.url}" in proc.log_tail()
            with httpx.Client(base_url=proc.url, timeout=5.0) as http:
                kept = create_external(http)
                revoked = create_external(http)
                http.request("DELETE", f"/api/oem-api/integration/{revoked['integration']['id']}", json=PARTNER)
        finally:
            proc.stop()
        assert kept["partnerApiKey"] not in state.read_text()
        proc = start_simulator_process(state_path=state, workdir=tmp_path, port=None)
        try:
            live = {i["id"]: i["live"] for i in proc.integrations()}
            assert live == {kept["integration"]["id"]: True, revoked["integration"]["id"]: False}
            with httpx.Client(base_url=proc.url, timeout=5.0) as http:
                ok = http.get(
                    "/api/vendor-api/organization/accounts",
                    headers=bearer(compose(ACME_KEY, SecretStr(kept["partnerApiKey"]))),
                )
                gone = http.get(
                    "/api/vendor-api/organization/accounts",
                    headers=bearer(compose(ACME_KEY, SecretStr(revoked["partnerApiKey"]))),
                )
            assert ok.status_code == 200
            assert gone.json()["code"] == "PARTNER_KEY_REVOKED"
        finally:
            proc.stop()

    def test_cli_fault_options_tls_and_admin_token(self, tmp_path: Path, canary: str) -> None:
        """CLI fault options, HTTPS and the admin-token variable take effect in the subprocess."""
        cert, key = self_signed_certificate(tmp_path / "tls")
        proc = start_simulator_process(
            workdir=tmp_path,
            tls_cert_file=cert,
            tls_key_file=key,
            admin_token=canary,
            extra_args=[
                "--error-rate",
                "1",
                "--error-status",
                "502",
                "--fault-endpoint",
                "vendor.list",
                "--fault-requests",
                "1",
            ],
        )
        try:
            assert proc.url.startswith("https://")
            assert f"MSPC simulator listening on {proc.url}" in proc.log_tail()
            with httpx.Client(
                base_url=proc.url, verify=ssl.create_default_context(cafile=str(cert)), timeout=5.0
            ) as http:
                codes = [send(http, "POST", "/api/oem-api/vendor", MANAGE).status_code for _ in range(2)]
                assert http.get("/_sim/integrations").status_code == 401
            assert codes == [502, 200]
            assert proc.request_counts() == {"vendor.list": 2}
        finally:
            proc.stop()
        assert canary not in proc.log_tail(100_000)
