"""HttpOemClient against the real MSPC simulator over HTTP: errors, retries, ambiguity, end to end."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from broker.errors import (
    IntegrationNotFound,
    NotFound,
    OemConflict,
    OemError,
    OemInvalidClient,
    OemInvalidScope,
    OemOutcomeUnknown,
    OemRejectedToken,
    OemUnavailable,
    OemVendorNotAuthorized,
)
from broker.models import IntegrationRef
from broker.mspc_token import compose
from broker.oem import HttpOemClient
from broker.settings import OemSettings
from broker.simulator import RateLimitSpec, load_seed, parse_seed
from broker.testing.simulator import SimulatorThread, fingerprint, self_signed_certificate, start_simulator_thread

CONTOSO_ACME = IntegrationRef("org-contoso", "vendor-acme")
ACME_KEY = SecretStr("acme-vendor-key-dev")
GLOBEX_KEY = SecretStr("globex-vendor-key-dev")
POLL_TIMEOUT_SECONDS = 5.0


ClientFactory = Callable[..., HttpOemClient]


@pytest.fixture
def make_client(sim: SimulatorThread) -> Iterator[ClientFactory]:
    """Build clients aimed at the simulator with small, fast retry settings (overridable)."""
    clients: list[HttpOemClient] = []

    def factory(**overrides: Any) -> HttpOemClient:
        values: dict[str, Any] = {
            "base_url": sim.url,
            "client_id": "dev-client",
            "client_secret": SecretStr("dev-client-secret"),
            "connect_timeout_seconds": 1.0,
            "read_timeout_seconds": 0.3,
            "deadline_seconds": 3.0,
            "max_attempts": 4,
            "backoff_base_seconds": 0.01,
            "backoff_max_seconds": 0.05,
        }
        values.update(overrides)
        client = HttpOemClient(OemSettings(**values))
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close()


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` until true (synchronisation with the server, bounded)."""
    deadline = time.monotonic() + POLL_TIMEOUT_SECONDS
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class TestCreate:
    def test_created_key_matches_simulator_fingerprint(self, sim: SimulatorThread, make_client: ClientFactory) -> None:
        """The partner key returned is the one the simulator holds for the new integration."""
        created = make_client().create_external_integration(CONTOSO_ACME)
        [item] = sim.live_integrations()
        assert item["id"] == created.integration_id
        assert item["partnerKeyFingerprint"] == fingerprint(created.partner_key.get_secret_value())
        assert created.possible_duplicate is False
        assert created.attempts == 1

    def test_concurrent_use_from_threads(self, sim: SimulatorThread, make_client: ClientFactory) -> None:
        """One client used from 8 threads creates 8 distinct integrations."""
        client = make_client()
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda _: client.create_external_integration(CONTOSO_ACME), range(8)))
        assert len({r.integration_id for r in results}) == 8
        assert len(sim.live_integrations()) == 8


class TestNonRetryableErrors:
    @pytest.mark.parametrize(
        ("overrides", "ref", "error_class", "hint"),
        [
            ({"client_secret": SecretStr("wrong")}, CONTOSO_ACME, OemInvalidClient, "BROKER_OEM__CLIENT_SECRET"),
            ({"scope": "vendor_manage"}, CONTOSO_ACME, OemInvalidScope, "BROKER_OEM__SCOPE"),
            (
                {"client_id": "manage-only-client", "client_secret": SecretStr("manage-only-secret")},
                CONTOSO_ACME,
                OemInvalidScope,
                "scopes MSPC granted",
            ),
            (
                {},
                IntegrationRef("org-fabrikam", "vendor-globex"),
                OemVendorNotAuthorized,
                "organization org-fabrikam does not allow vendor vendor-globex",
            ),
            ({}, IntegrationRef("org-nowhere", "vendor-acme"), NotFound, "ORGANIZATION_NOT_FOUND"),
            ({}, IntegrationRef("org-contoso", "vendor-nowhere"), NotFound, "VENDOR_NOT_FOUND"),
        ],
        ids=[
            "invalid-client",
            "wrong-scope",
            "scope-not-granted",
            "vendor-not-authorized",
            "unknown-org",
            "unknown-vendor",
        ],
    )
    def test_raises_once_with_hint(
        self,
        sim: SimulatorThread,
        make_client: ClientFactory,
        overrides: dict[str, Any],
        ref: IntegrationRef,
        error_class: type[Exception],
        hint: str,
    ) -> None:
        """Each refusal raises its error class after exactly one request, with a message saying what to check."""
        with pytest.raises(error_class) as info:
            make_client(**overrides).create_external_integration(ref)
        assert hint in str(info.value)
        assert sim.request_counts() == {"integration.create": 1}
        assert sim.integrations() == []

    def test_conflict_mode_second_create(self, sim: SimulatorThread, make_client: ClientFactory) -> None:
        """In conflict mode a second create raises OemConflict and creates nothing."""
        sim.configure(duplicate_mode="conflict")
        client = make_client()
        client.create_external_integration(CONTOSO_ACME)
        with pytest.raises(OemConflict, match="INTEGRATION_EXISTS"):
            client.create_external_integration(CONTOSO_ACME)
        assert len(sim.live_integrations()) == 1

    def test_revoke_unknown(self, sim: SimulatorThread, make_client: ClientFactory) -> None:
        """Revoking an id the OEM does not know is IntegrationNotFound."""
        with pytest.raises(IntegrationNotFound):
            make_client().revoke_integration("0123456789abcdef01234567")


class TestRetries:
    def test_429_retry_after_is_honoured(self, sim: SimulatorThread, make_client: ClientFactory) -> None:
        """After a 429 the next attempt reaches the server no sooner than Retry-After (server timestamps)."""
        sim.configure(rate_limit=RateLimitSpec(capacity=1, refill_per_second=1.0))
        client = make_client(deadline_seconds=5.0)
        client.list_integrations()
        client.list_integrations()
        entries = sim.requests("integration.list")
        assert [e["status"] for e in entries] == [200, 429, 200]
        assert entries[2]["monotonic"] - entries[1]["monotonic"] >= 1.0

    def test_5xx_storm_then_success(self, sim: SimulatorThread, make_client: ClientFactory) -> None:
        """Three 503s in a row are ridden out; the create succeeds and is not a possible duplicate."""
        sim.add_fault(error_rate=1.0, requests=3, endpoint="integration.create")
        created = make_client().create_external_integration(CONTOSO_ACME)
        assert created.attempts == 4
        assert created.possible_duplicate is False
        assert len(sim.live_integrations()) == 1

    def test_endless_503_ends_in_unavailable_within_deadline(
        self, sim: SimulatorThread, make_client: ClientFactory
    ) -> None:
        """A list against an OEM that only answers 503 fails with OemUnavailable, bounded by attempts and deadline."""
        sim.add_fault(error_rate=1.0, endpoint="integration.list")
        start = time.monotonic()
        with pytest.raises(OemUnavailable, match="4 attempt"):
            make_client(deadline_seconds=2.0).list_integrations()
        assert time.monotonic() - start < 2.5
        assert sim.request_counts()["integration.list"] == 4

    def test_endless_502_on_create_is_outcome_unknown(self, sim: SimulatorThread, make_client: ClientFactory) -> None:
        """A create that only ever got 502s may have been acted on behind a proxy: OemOutcomeUnknown."""
        sim.add_fault(error_rate=1.0, error_status=502, endpoint="integration.create")
        with pytest.raises(OemOutcomeUnknown):
            make_client().create_external_integration(CONTOSO_ACME)

    def test_hang_is_bounded_by_the_deadline(self, sim: SimulatorThread, make_client: ClientFactory) -> None:
        """When every answer hangs past the read timeout, the call ends by its deadline with OemUnavailable."""
        sim.add_fault(hang_seconds=5.0, endpoint="integration.list")
        start = time.monotonic()
        with pytest.raises(OemUnavailable, match="ReadTimeout"):
            make_client(read_timeout_seconds=0.2, deadline_seconds=1.0).list_integrations()
        assert time.monotonic() - start < 1.5

    def test_timeout_on_create_reports_possible_duplicate(
        self, sim: SimulatorThread, make_client: ClientFactory
    ) -> None:
        """A create retried after a read timeout is flagged; the slow first request later creates a second one."""
        sim.add_fault(hang_seconds=0.6, requests=1, endpoint="integration.create")
        created = make_client(read_timeout_seconds=0.2).create_external_integration(CONTOSO_ACME)
        assert created.possible_duplicate is True
        wait_until(lambda: len(sim.live_integrations()) == 2, "the hung create to finish")


class TestLostResponse:
    def test_retry_after_lost_response_is_possible_duplicate(
        self, sim: SimulatorThread, make_client: ClientFactory
    ) -> None:
        """The first create is acted on but unanswered; the retry succeeds flagged, and the OEM holds 2 integrations."""
        sim.add_fault(lose_response=True, requests=1, endpoint="integration.create")
        created = make_client().create_external_integration(CONTOSO_ACME)
        assert created.possible_duplicate is True
        assert created.attempts == 2
        live = sim.live_integrations()
        assert len(live) == 2
        returned = [
            i for i in live if i["partnerKeyFingerprint"] == fingerprint(created.partner_key.get_secret_value())
        ]
        assert [i["id"] for i in returned] == [created.integration_id]

    def test_every_response_lost_is_outcome_unknown(self, sim: SimulatorThread, make_client: ClientFactory) -> None:
        """When every answer is lost the client raises OemOutcomeUnknown, never OemUnavailable."""
        sim.add_fault(lose_response=True, endpoint="integration.create")
        with pytest.raises(OemOutcomeUnknown):
            make_client(max_attempts=2).create_external_integration(CONTOSO_ACME)
        assert len(sim.live_integrations()) == 2

    def test_lost_response_in_conflict_mode_is_outcome_unknown(
        self, sim: SimulatorThread, make_client: ClientFactory
    ) -> None:
        """In conflict mode the retry after a lost answer gets 409: the client reports an unknown outcome."""
        sim.configure(duplicate_mode="conflict")
        sim.add_fault(lose_response=True, requests=1, endpoint="integration.create")
        with pytest.raises(OemOutcomeUnknown, match="probably created"):
            make_client().create_external_integration(CONTOSO_ACME)
        assert len(sim.live_integrations()) == 1

    def test_revoke_with_lost_response_is_done(self, sim: SimulatorThread, make_client: ClientFactory) -> None:
        """A revoke whose answer was lost is retried, gets 404, and counts as revoked."""
        client = make_client()
        created = client.create_external_integration(CONTOSO_ACME)
        sim.add_fault(lose_response=True, requests=1, endpoint="integration.revoke")
        client.revoke_integration(created.integration_id)
        assert sim.live_integrations() == []


class TestListAndRevoke:
    def test_list_by_organization_and_all(self, sim: SimulatorThread, make_client: ClientFactory) -> None:
        """list_integrations filters by organization, or lists all of this client's integrations."""
        client = make_client()
        a = client.create_external_integration(CONTOSO_ACME)
        b = client.create_external_integration(IntegrationRef("org-fabrikam", "vendor-acme"))
        contoso = client.list_integrations("org-contoso")
        assert [(i.integration_id, i.vendor_id, i.organization_id, i.kind) for i in contoso] == [
            (a.integration_id, "vendor-acme", "org-contoso", "external")
        ]
        assert {i.integration_id for i in client.list_integrations()} == {a.integration_id, b.integration_id}
        client.revoke_integration(a.integration_id)
        assert client.list_integrations("org-contoso") == []


class TestVendorApiEndToEnd:
    def test_token_lifecycle(self, sim: SimulatorThread, make_client: ClientFactory) -> None:
        """A composed token passes the probe; another vendor's key is 403; garbage is 401; after revoke it is 401."""
        client = make_client()
        created = client.create_external_integration(CONTOSO_ACME)
        token = compose(ACME_KEY, created.partner_key)
        client.probe_vendor_api(token)
        with pytest.raises(OemVendorNotAuthorized, match="VENDOR_NOT_AUTHORIZED"):
            client.probe_vendor_api(compose(GLOBEX_KEY, created.partner_key))
        with pytest.raises(OemRejectedToken, match="INVALID_MSPC_TOKEN"):
            client.probe_vendor_api(SecretStr("garbage!"))
        client.revoke_integration(created.integration_id)
        with pytest.raises(OemRejectedToken, match="PARTNER_KEY_REVOKED"):
            client.probe_vendor_api(token)


class TestTls:
    def test_https_with_ca_bundle_and_untrusted(self, tmp_path: Path) -> None:
        """Over HTTPS the client works with the CA bundle; without it, it fails at once naming the setting."""
        cert, key = self_signed_certificate(tmp_path)
        sim = start_simulator_thread(tls_cert_file=cert, tls_key_file=key)
        try:
            common: dict[str, Any] = {
                "base_url": sim.url,
                "client_id": "dev-client",
                "client_secret": SecretStr("dev-client-secret"),
                "backoff_base_seconds": 0.01,
            }
            with HttpOemClient(OemSettings(**common, ca_bundle_path=cert)) as trusted:
                assert trusted.create_external_integration(CONTOSO_ACME).possible_duplicate is False
            start = time.monotonic()
            with HttpOemClient(OemSettings(**common)) as untrusted, pytest.raises(OemError) as info:
                untrusted.list_integrations()
            assert "BROKER_OEM__CA_BUNDLE_PATH" in info.value.message
            assert time.monotonic() - start < 1.0
            assert sim.request_counts() == {"integration.create": 1}
        finally:
            sim.stop()


class TestSecrecy:
    def test_canary_secret_and_partner_key_never_leak(self, captured_logs: io.StringIO, canary: str) -> None:
        """With a canary client secret, no log line or error message ever contains it or a partner key."""
        base = load_seed()
        seed = parse_seed(
            {
                **base.model_dump(),
                "clients": [{"id": "canary-client", "secret": canary, "scopes": ["oem:partner_token"]}],
            }
        )
        sim = start_simulator_thread(seed=seed)
        try:
            settings = OemSettings(
                base_url=sim.url,
                client_id="canary-client",
                client_secret=SecretStr(canary),
                read_timeout_seconds=0.3,
                backoff_base_seconds=0.01,
                backoff_max_seconds=0.02,
                max_attempts=2,
            )
            messages: list[str] = []
            with HttpOemClient(settings) as client:
                sim.add_fault(lose_response=True, requests=1, endpoint="integration.create")
                created = client.create_external_integration(CONTOSO_ACME)
                token = compose(ACME_KEY, created.partner_key)
                client.revoke_integration(created.integration_id)
                for call in (
                    lambda: client.probe_vendor_api(token),
                    lambda: client.create_external_integration(IntegrationRef("org-fabrikam", "vendor-globex")),
                    lambda: client.revoke_integration(created.integration_id),
                ):
                    with pytest.raises(Exception) as info:
                        call()
                    messages.append(str(info.value))
                sim.add_fault(lose_response=True, endpoint="integration.create")
                with pytest.raises(OemOutcomeUnknown) as unknown:
                    client.create_external_integration(CONTOSO_ACME)
                messages.append(str(unknown.value))
        finally:
            sim.stop()
        logs = captured_logs.getvalue()
        assert "oem.possible_duplicate" in logs
        for secret in (canary, created.partner_key.get_secret_value(), token.get_secret_value()):
            assert secret not in logs
            assert all(secret not in m for m in messages)


class TestStatelessCalls:
    def test_cookies_from_an_answer_are_never_sent_back(self) -> None:
        """A Set-Cookie from the OEM is ignored: no call carries state from another (narrow: MockTransport)."""
        seen: list[str | None] = []

        def answer(request: httpx.Request) -> httpx.Response:
            seen.append(request.headers.get("cookie"))
            return httpx.Response(200, headers={"Set-Cookie": "session=abc; Path=/"}, json={"integrations": []})

        settings = OemSettings(base_url="http://oem.invalid", client_id="c", client_secret=SecretStr("s"))
        with HttpOemClient(settings, transport=httpx.MockTransport(answer)) as client:
            client.list_integrations("org-contoso")
            client.list_integrations("org-contoso")
        assert seen == [None, None]
