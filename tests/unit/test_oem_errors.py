"""OEM client error mapping and retry policy, with the network swapped for httpx.MockTransport."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from broker.errors import (
    BrokerError,
    ConfigError,
    IntegrationNotFound,
    NotFound,
    OemBadRequest,
    OemConflict,
    OemError,
    OemInvalidClient,
    OemInvalidScope,
    OemOutcomeUnknown,
    OemRejectedToken,
    OemUnavailable,
    OemVendorNotAuthorized,
)
from broker.metrics import Metrics
from broker.models import IntegrationRef
from broker.oem import HttpOemClient, OemClient, parse_retry_after
from broker.settings import OemSettings

REF = IntegrationRef("org-contoso", "vendor-acme")
CREATED = {
    "integration": {"id": "67ae3bcff05cb32e0cb6d9b7", "vendorId": "vendor-acme", "integrationKind": "external"},
    "partnerApiKey": "pk-secret-value",
    "status": 201,
    "message": "Successfully created an integration for an organization",
}

Responder = Callable[[httpx.Request], httpx.Response]


def error(status: int, code: str, message: str = "nope", headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"status": status, "code": code, "message": message}, headers=headers)


class FakeClock:
    """A monotonic clock that only moves when the client sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def make_client(
    responder: Responder | list[httpx.Response | Exception],
    *,
    clock: FakeClock | None = None,
    secret: str = "client-secret-value",
    metrics: Metrics | None = None,
    **overrides: Any,
) -> tuple[HttpOemClient, list[httpx.Request]]:
    """A client whose transport answers from ``responder`` (a function or a script of answers)."""
    seen: list[httpx.Request] = []
    script = list(responder) if isinstance(responder, list) else None

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if script is None:
            assert callable(responder)
            return responder(request)
        answer = script.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    settings = OemSettings(
        base_url="https://oem.example",
        client_id="dev-client",
        client_secret=SecretStr(secret),
        **{
            "max_attempts": 5,
            "deadline_seconds": 30.0,
            "backoff_base_seconds": 0.1,
            "backoff_max_seconds": 2.0,
            **overrides,
        },
    )
    clock = clock or FakeClock()
    client = HttpOemClient(
        settings,
        transport=httpx.MockTransport(handler),
        sleep=clock.sleep,
        clock=clock,
        jitter=lambda: 1.0,
        metrics=metrics,
    )
    return client, seen


class TestRequestShape:
    def test_create_sends_envelope_and_external_body(self) -> None:
        """create_external_integration POSTs the credential envelope with integrationType external."""
        client, seen = make_client([httpx.Response(201, json=CREATED)])
        created = client.create_external_integration(REF)
        assert seen[0].method == "POST"
        assert seen[0].url == "https://oem.example/api/oem-api/integration"
        assert json.loads(seen[0].content) == {
            "clientId": "dev-client",
            "clientSecret": "client-secret-value",
            "grantType": "client_credentials",
            "scope": "oem:partner_token",
            "integrationType": "external",
            "organizationId": "org-contoso",
            "vendorId": "vendor-acme",
        }
        assert created.integration_id == "67ae3bcff05cb32e0cb6d9b7"
        assert created.partner_key.get_secret_value() == "pk-secret-value"
        assert created.possible_duplicate is False
        assert "pk-secret-value" not in repr(created)

    def test_revoke_sends_delete_with_body(self) -> None:
        """revoke_integration sends DELETE integration/{id} with the envelope as JSON body."""
        client, seen = make_client([httpx.Response(201, json={"status": 201, "message": "Success"})])
        client.revoke_integration("67ae3bcff05cb32e0cb6d9b7")
        assert seen[0].method == "DELETE"
        assert seen[0].url.path == "/api/oem-api/integration/67ae3bcff05cb32e0cb6d9b7"
        assert json.loads(seen[0].content)["grantType"] == "client_credentials"

    def test_probe_sends_bearer_to_vendor_api(self) -> None:
        """probe_vendor_api GETs the accounts probe with Authorization: Bearer <token>."""
        client, seen = make_client(
            [httpx.Response(200, json={"accounts": []})], vendor_api_base_url="https://vendor.example/"
        )
        client.probe_vendor_api(SecretStr("dG9rZW4="))
        assert seen[0].method == "GET"
        assert str(seen[0].url) == "https://vendor.example/api/vendor-api/organization/accounts"
        assert seen[0].headers["authorization"] == "Bearer dG9rZW4="

    def test_list_parses_items(self) -> None:
        """list_integrations turns the documented list into OemIntegration values."""
        body = {"integrations": [{"id": "i1", "vendorId": "v1", "integrationStatus": "active"}], "status": 200}
        client, seen = make_client([httpx.Response(200, json=body)])
        [item] = client.list_integrations("org-contoso")
        assert (item.integration_id, item.vendor_id, item.organization_id, item.status) == (
            "i1",
            "v1",
            "org-contoso",
            "active",
        )
        assert json.loads(seen[0].content)["organizationId"] == "org-contoso"

    def test_is_an_oem_client(self) -> None:
        """HttpOemClient satisfies the OemClient protocol."""
        client, _ = make_client([])
        assert isinstance(client, OemClient)


class TestErrorMapping:
    @pytest.mark.parametrize(
        ("response", "error_class", "hint"),
        [
            (error(401, "INVALID_CLIENT"), OemInvalidClient, "BROKER_OEM__CLIENT_SECRET"),
            (error(403, "INVALID_SCOPE"), OemInvalidScope, "BROKER_OEM__SCOPE"),
            (
                error(403, "VENDOR_NOT_AUTHORIZED"),
                OemVendorNotAuthorized,
                "organization org-contoso does not allow vendor vendor-acme",
            ),
            (error(400, "BAD_REQUEST"), OemBadRequest, "malformed"),
            (error(409, "INTEGRATION_EXISTS"), OemConflict, "already exists"),
            (error(404, "ORGANIZATION_NOT_FOUND"), NotFound, "organization and vendor ids"),
            (error(403, "SOMETHING_ELSE"), OemError, "SOMETHING_ELSE"),
        ],
        ids=["401", "scope", "vendor", "400", "409", "404", "other-403"],
    )
    def test_non_retryable_answers_raise_at_once(
        self, response: httpx.Response, error_class: type[BrokerError], hint: str
    ) -> None:
        """Answers retrying cannot fix raise the matching error after one attempt, saying what to check."""
        client, seen = make_client([response])
        with pytest.raises(error_class) as info:
            client.create_external_integration(REF)
        assert len(seen) == 1
        assert hint in info.value.message
        assert response.json()["code"] in info.value.message

    def test_revoke_404_is_integration_not_found(self) -> None:
        """A revoke of an unknown id is IntegrationNotFound."""
        client, _ = make_client([error(404, "INTEGRATION_NOT_FOUND")])
        with pytest.raises(IntegrationNotFound):
            client.revoke_integration("abc")

    def test_revoke_switched_off(self) -> None:
        """With revoke_supported false nothing is sent and the error names the setting."""
        client, seen = make_client([], revoke_supported=False)
        with pytest.raises(OemError, match="BROKER_OEM__REVOKE_SUPPORTED"):
            client.revoke_integration("abc")
        assert seen == []

    @pytest.mark.parametrize(
        ("response", "error_class"),
        [
            (error(401, "PARTNER_KEY_REVOKED"), OemRejectedToken),
            (error(401, "INVALID_MSPC_TOKEN"), OemRejectedToken),
            (error(403, "VENDOR_NOT_AUTHORIZED"), OemVendorNotAuthorized),
        ],
    )
    def test_probe_refusals(self, response: httpx.Response, error_class: type[BrokerError]) -> None:
        """Vendor API refusals map to OemRejectedToken / OemVendorNotAuthorized carrying the upstream code."""
        client, _ = make_client([response])
        with pytest.raises(error_class) as info:
            client.probe_vendor_api(SecretStr("dG9rZW4="))
        assert response.json()["code"] in info.value.message
        assert "dG9rZW4=" not in str(info.value)

    def test_upstream_body_is_cut(self) -> None:
        """A huge upstream error body is truncated in the error message."""
        client, _ = make_client([httpx.Response(400, text="x" * 10_000)])
        with pytest.raises(OemBadRequest) as info:
            client.create_external_integration(REF)
        assert len(info.value.message) < 400

    def test_success_without_key_is_outcome_unknown(self) -> None:
        """A 201 without a usable partnerApiKey means an integration exists that the broker cannot use."""
        client, _ = make_client([httpx.Response(201, json={"integration": {"id": "i1"}, "status": 201})])
        with pytest.raises(OemOutcomeUnknown):
            client.create_external_integration(REF)

    def test_missing_credentials_is_config_error(self) -> None:
        """A client without client id / secret fails at construction, naming the variables."""
        with pytest.raises(ConfigError, match="BROKER_OEM__CLIENT_ID"):
            HttpOemClient(OemSettings(base_url="https://oem.example"))

    def test_missing_ca_bundle_is_config_error(self, tmp_path: Any) -> None:
        """An unreadable CA bundle fails at construction, naming the setting."""
        settings = OemSettings(client_id="c", client_secret=SecretStr("s"), ca_bundle_path=tmp_path / "none.pem")
        with pytest.raises(ConfigError, match="BROKER_OEM__CA_BUNDLE_PATH"):
            HttpOemClient(settings)

    def test_bad_base_url_is_config_error(self) -> None:
        """A base URL that is not http(s) is refused at construction."""
        with pytest.raises(ConfigError, match="BROKER_OEM__BASE_URL"):
            HttpOemClient(OemSettings(base_url="ftp://x", client_id="c", client_secret=SecretStr("s")))


class TestRetries:
    def test_5xx_then_success(self) -> None:
        """503s are retried with growing backoff and the 201 that follows is returned, not marked duplicate."""
        clock = FakeClock()
        client, seen = make_client(
            [error(503, "UNAVAILABLE"), error(503, "UNAVAILABLE"), httpx.Response(201, json=CREATED)], clock=clock
        )
        created = client.create_external_integration(REF)
        assert len(seen) == 3
        assert clock.sleeps == [0.1, 0.2]
        assert created.possible_duplicate is False
        assert created.attempts == 3

    def test_retry_after_is_a_floor(self) -> None:
        """A 429's Retry-After is waited even when the backoff would be shorter."""
        clock = FakeClock()
        client, _ = make_client(
            [error(429, "RATE_LIMITED", headers={"Retry-After": "3"}), httpx.Response(201, json=CREATED)], clock=clock
        )
        client.create_external_integration(REF)
        assert clock.sleeps == [3.0]

    def test_retry_after_beyond_deadline_gives_up_with_hint(self) -> None:
        """When Retry-After would pass the deadline the call fails now with OemUnavailable carrying it."""
        client, seen = make_client([error(429, "RATE_LIMITED", headers={"Retry-After": "120"})], deadline_seconds=10.0)
        with pytest.raises(OemUnavailable) as info:
            client.list_integrations()
        assert len(seen) == 1
        assert info.value.retry_after_seconds == 120.0

    def test_max_attempts_bound(self) -> None:
        """After max_attempts unprocessed failures the error is OemUnavailable, not outcome-unknown."""
        client, seen = make_client(lambda request: error(503, "UNAVAILABLE"), max_attempts=3)
        with pytest.raises(OemUnavailable):
            client.create_external_integration(REF)
        assert len(seen) == 3

    def test_deadline_bounds_attempts(self) -> None:
        """Backoff never sleeps past the overall deadline."""
        clock = FakeClock()
        client, seen = make_client(
            lambda request: httpx.Response(500), clock=clock, max_attempts=20, deadline_seconds=1.0
        )
        with pytest.raises(BrokerError):
            client.list_integrations()
        assert sum(clock.sleeps) < 1.0
        assert 1 < len(seen) < 20

    def test_full_jitter_uses_random(self) -> None:
        """The backoff is random * min(cap, base * 2**n) (full jitter)."""
        clock = FakeClock()
        settings = OemSettings(
            base_url="https://oem.example", client_id="c", client_secret=SecretStr("s"), backoff_base_seconds=1.0
        )
        answers = iter([httpx.Response(503), httpx.Response(503), httpx.Response(200, json={"integrations": []})])
        client = HttpOemClient(
            settings,
            transport=httpx.MockTransport(lambda r: next(answers)),
            sleep=clock.sleep,
            clock=clock,
            jitter=lambda: 0.25,
        )
        client.list_integrations()
        assert clock.sleeps == [0.25, 0.5]

    def test_connect_error_is_not_ambiguous(self) -> None:
        """A connection that never opened cannot have created anything: the final error is OemUnavailable."""
        client, _ = make_client(lambda request: (_ for _ in ()).throw(httpx.ConnectError("refused")), max_attempts=2)
        with pytest.raises(OemUnavailable):
            client.create_external_integration(REF)

    def test_read_timeout_then_success_is_possible_duplicate(self) -> None:
        """A create retried after a read timeout succeeds with possible_duplicate=True."""
        client, _ = make_client([httpx.ReadTimeout("slow"), httpx.Response(201, json=CREATED)])
        created = client.create_external_integration(REF)
        assert created.possible_duplicate is True
        assert created.attempts == 2

    def test_lost_response_until_exhausted_is_outcome_unknown(self) -> None:
        """A create whose attempts all lost their answer raises OemOutcomeUnknown, not OemUnavailable."""
        client, _ = make_client(
            lambda request: (_ for _ in ()).throw(httpx.RemoteProtocolError("closed")), max_attempts=2
        )
        with pytest.raises(OemOutcomeUnknown, match="revoke any orphan"):
            client.create_external_integration(REF)

    def test_ambiguous_then_409_is_outcome_unknown(self) -> None:
        """In conflict mode, a 409 after an unanswered attempt means that attempt created it: outcome unknown."""
        client, _ = make_client([httpx.RemoteProtocolError("closed"), error(409, "INTEGRATION_EXISTS")])
        with pytest.raises(OemOutcomeUnknown, match="probably created"):
            client.create_external_integration(REF)

    def test_refusal_after_lost_answer_mentions_possible_orphan(self) -> None:
        """A refusal that follows an unanswered create attempt keeps its class but says an orphan may exist."""
        client, _ = make_client([httpx.ReadTimeout("slow"), error(401, "INVALID_CLIENT")])
        with pytest.raises(OemInvalidClient, match="revoke any orphan"):
            client.create_external_integration(REF)

    def test_502_is_ambiguous_for_create(self) -> None:
        """A 502 may come from a proxy after the OEM acted, so a later success is a possible duplicate."""
        client, _ = make_client([httpx.Response(502), httpx.Response(201, json=CREATED)])
        assert client.create_external_integration(REF).possible_duplicate is True

    def test_revoke_404_after_lost_answer_counts_as_done(self) -> None:
        """A revoke retried after a lost answer that then gets 404 is treated as revoked."""
        client, seen = make_client([httpx.RemoteProtocolError("closed"), error(404, "INTEGRATION_NOT_FOUND")])
        client.revoke_integration("abc")
        assert len(seen) == 2


class TestSecrecyAndMetrics:
    def test_no_secret_in_errors_or_logs(self, captured_logs: Any, canary: str) -> None:
        """Neither the client secret nor a partner key appears in errors or log lines."""
        answers: list[httpx.Response | Exception] = [
            httpx.ReadTimeout("slow"),
            httpx.Response(201, json={**CREATED, "partnerApiKey": canary + "-pk"}),
            error(401, "INVALID_CLIENT"),
        ]
        client, _ = make_client(answers, secret=canary)
        created = client.create_external_integration(REF)
        with pytest.raises(OemInvalidClient) as info:
            client.list_integrations()
        text = captured_logs.getvalue()
        assert "oem.possible_duplicate" in text
        for leak in (canary, created.partner_key.get_secret_value()):
            assert leak not in text
            assert leak not in str(info.value)
            assert leak not in repr(created)

    def test_metrics_record_calls_and_errors(self) -> None:
        """Calls, latency and error codes are recorded with backend=oem."""
        metrics = Metrics()
        client, _ = make_client([httpx.Response(201, json=CREATED), error(401, "INVALID_CLIENT")], metrics=metrics)
        client.create_external_integration(REF)
        with pytest.raises(OemInvalidClient):
            client.list_integrations()
        registry = metrics.registry
        assert (
            registry.get_sample_value(
                "broker_backend_calls_total", {"backend": "oem", "operation": "create_integration"}
            )
            == 1
        )
        assert (
            registry.get_sample_value(
                "broker_backend_errors_total",
                {"backend": "oem", "operation": "list_integrations", "code": "INVALID_CLIENT"},
            )
            == 1
        )


class TestRetryAfterParsing:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [("3", 3.0), ("0", 0.0), ("-5", 0.0), ("1.5", 1.5), (None, None), ("soon", None), ("nan", None)],
    )
    def test_delta_seconds(self, value: str | None, expected: float | None) -> None:
        """Retry-After delta-seconds are parsed, clamped at zero; junk is ignored."""
        assert parse_retry_after(value) == expected

    def test_http_date(self) -> None:
        """Retry-After as an HTTP-date gives the seconds until then."""
        assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now_epoch_seconds=1445412480.0) == 10.0
