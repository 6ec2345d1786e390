"""Identity against a real issuer: JWTs signed by test keys, JWKS served over loopback HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.errors import AuthenticationFailed, IdentityUnavailable
from broker.identity import Authenticator
from broker.metrics import Metrics
from broker.settings import IdentitySettings
from broker.testing.jwt import DevIssuer, PrivateKey, generate_key

AUDIENCE = "mspc-broker"


class FakeClock:
    """Wall and monotonic time in one, moved by hand."""

    def __init__(self, start: float = 1_900_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    return signing_input + "." + _b64(signature)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
def rsa_key() -> PrivateKey:
    """One RSA key for the module: generating 2048-bit keys is the slow part of these tests."""
    return generate_key("RS256")


@pytest.fixture
def issuer(rsa_key: PrivateKey) -> Iterator[DevIssuer]:
    with DevIssuer(private_key=rsa_key) as running:
        yield running


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def _authenticator(
    issuer: DevIssuer, clock: FakeClock, metrics: Metrics | None = None, **overrides: Any
) -> Authenticator:
    settings = IdentitySettings(issuer=issuer.issuer, audience=AUDIENCE, **overrides)
    return Authenticator(settings, metrics=metrics, clock=clock, monotonic=clock)


@pytest.fixture
def auth(issuer: DevIssuer, clock: FakeClock, metrics: Metrics) -> Iterator[Authenticator]:
    with _authenticator(issuer, clock, metrics) as authenticator:
        yield authenticator


def _failures(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("broker_auth_failures_total", {"reason": reason}) or 0.0


def _refused(auth: Authenticator, token: str, message: str) -> AuthenticationFailed:
    with pytest.raises(AuthenticationFailed) as info:
        auth.authenticate(token)
    assert message in info.value.message
    assert not token or token not in str(info.value)
    return info.value


class TestAuthenticatorAccepts:
    @pytest.mark.parametrize("algorithm", ["RS256", "ES256", "PS384", "ES384", "EdDSA"])
    def test_projected_token_of_each_algorithm(self, algorithm: Any, clock: FakeClock) -> None:
        """A projected service-account token signed with any accepted asymmetric algorithm yields its principal."""
        with DevIssuer(algorithm=algorithm) as issuer, _authenticator(issuer, clock) as auth:
            token = issuer.mint("billing", "invoicer", pod_name="invoicer-7d9f", pod_uid="uid-1", issued_at=clock())
            principal = auth.authenticate(token)
        assert principal.subject == "billing/invoicer"
        assert (principal.pod_name, principal.pod_uid) == ("invoicer-7d9f", "uid-1")
        assert principal.issuer == issuer.issuer
        assert principal.expires_at is not None and principal.expires_at.timestamp() == clock() + 3600

    def test_bearer_prefix_is_accepted(self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock) -> None:
        """The raw Authorization header value ('Bearer <token>') works as well as the bare token."""
        token = issuer.mint("billing", "invoicer", issued_at=clock())
        assert auth.authenticate(f"Bearer {token}").service_account == "invoicer"

    def test_legacy_claims(self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock) -> None:
        """Tokens with only the legacy kubernetes.io/serviceaccount/* claims are understood."""
        token = issuer.mint("security", "auditor", legacy=True, issued_at=clock())
        principal = auth.authenticate(token)
        assert principal.subject == "security/auditor"
        assert principal.pod_name is None

    def test_token_for_several_audiences(self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock) -> None:
        """A token whose aud list includes the broker's audience is accepted."""
        token = issuer.mint("billing", "invoicer", audience=["vault", AUDIENCE], issued_at=clock())
        assert auth.authenticate(token).namespace == "billing"

    def test_clock_skew_tolerated(self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock) -> None:
        """A token that expired less than clock_skew_seconds ago is still accepted."""
        token = issuer.mint("billing", "invoicer", issued_at=clock() - 100, ttl_seconds=90)
        assert auth.authenticate(token).namespace == "billing"

    def test_explicit_jwks_url_without_discovery(self, clock: FakeClock) -> None:
        """With jwks_url set, an issuer like https://kubernetes.default.svc works without discovery."""
        with DevIssuer(issuer="https://kubernetes.default.svc.cluster.local") as issuer:
            settings = IdentitySettings(issuer=issuer.issuer, jwks_url=issuer.jwks_url)
            with Authenticator(settings, clock=clock, monotonic=clock) as auth:
                auth.authenticate(issuer.mint("billing", "invoicer", issued_at=clock()))
        assert (issuer.discovery_requests, issuer.jwks_requests) == (0, 1)

    def test_async_variant(self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock) -> None:
        """authenticate_async gives the same principal as authenticate and uses the same cache."""
        token = issuer.mint("billing", "invoicer", issued_at=clock())

        async def twice() -> list[str]:
            return [(await auth.authenticate_async(token)).subject for _ in range(2)]

        assert asyncio.run(twice()) == ["billing/invoicer"] * 2
        assert auth.verifications == 1


class TestAttacks:
    def test_alg_none(self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock, metrics: Metrics) -> None:
        """An unsigned token (alg none) is refused whatever its claims say."""
        claims = issuer.claims("billing", "invoicer", issued_at=clock())
        token = _forge({"alg": "none", "typ": "JWT", "kid": issuer.current_key.kid}, claims)
        _refused(auth, token, "algorithm none not allowed")
        assert _failures(metrics, "algorithm") == 1

    def test_hs256_with_the_public_key_as_secret(
        self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock
    ) -> None:
        """The key-confusion attack (HS256 keyed with the issuer's public PEM) is refused."""
        claims = issuer.claims("billing", "invoicer", issued_at=clock())
        header = {"alg": "HS256", "typ": "JWT", "kid": issuer.current_key.kid}
        signing_input = _forge(header, claims).rsplit(".", 1)[0]
        mac = hmac.new(issuer.current_key.public_pem(), signing_input.encode(), hashlib.sha256).digest()
        _refused(auth, signing_input + "." + _b64(mac), "algorithm HS256 not allowed")

    def test_algorithm_not_matching_the_key_type(self, clock: FakeClock) -> None:
        """A header claiming RS256 for a kid that names an EC key is refused before any verification."""
        with DevIssuer(algorithm="ES256") as issuer, _authenticator(issuer, clock) as auth:
            claims = issuer.claims("billing", "invoicer", issued_at=clock())
            token = _forge({"alg": "RS256", "kid": issuer.current_key.kid}, claims, b"x" * 256)
            _refused(auth, token, "algorithm RS256 not allowed for this signing key")
            assert auth.verifications == 0

    def test_wrong_audience(self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock, metrics: Metrics) -> None:
        """A token minted for another audience (e.g. Vault) is refused."""
        token = issuer.mint("billing", "invoicer", audience="vault", issued_at=clock())
        _refused(auth, token, "audience mismatch: token is not for mspc-broker")
        assert _failures(metrics, "audience") == 1

    def test_wrong_issuer(self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock) -> None:
        """A validly signed token naming another issuer is refused."""
        token = issuer.mint("billing", "invoicer", claims={"iss": "https://evil.example"}, issued_at=clock())
        _refused(auth, token, "issuer mismatch")

    def test_expired(self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock, metrics: Metrics) -> None:
        """A token past exp plus the clock skew is refused."""
        token = issuer.mint("billing", "invoicer", issued_at=clock() - 7200, ttl_seconds=3600)
        _refused(auth, token, "token expired")
        assert _failures(metrics, "expired") == 1

    @pytest.mark.parametrize("exp", [float("inf"), float("nan"), "never", True, None])
    def test_exp_must_be_a_finite_number(
        self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock, exp: object
    ) -> None:
        """A signed token whose exp is missing, infinite, NaN or not a number is refused (it would never expire)."""
        token = issuer.mint("billing", "invoicer", issued_at=clock(), claims={"exp": exp})
        _refused(auth, token, "missing claim: exp" if exp is None else "claim exp is not a number")

    def test_not_yet_valid(self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock) -> None:
        """A token whose nbf lies beyond the clock skew is refused."""
        token = issuer.mint("billing", "invoicer", issued_at=clock(), claims={"nbf": clock() + 120})
        _refused(auth, token, "not yet valid")

    def test_unknown_kid(self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock, metrics: Metrics) -> None:
        """A token signed by a key the issuer never published is refused as an unknown key id."""
        auth.authenticate(issuer.mint("billing", "invoicer", issued_at=clock()))
        rogue = issuer.add_key(publish=False, make_current=False)
        _refused(auth, issuer.mint("billing", "invoicer", issued_at=clock(), kid=rogue.kid), "unknown signing key id")
        assert _failures(metrics, "unknown_kid") == 1

    def test_unknown_kid_flood_is_rate_limited(self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock) -> None:
        """Fifty tokens with unknown kids cause at most one extra JWKS fetch at the issuer."""
        auth.authenticate(issuer.mint("billing", "invoicer", issued_at=clock()))
        assert issuer.jwks_requests == 1
        clock.advance(auth.settings.jwks_refresh_min_interval_seconds)
        for i in range(50):
            token = issuer.mint("billing", "invoicer", issued_at=clock(), headers={"kid": f"rogue-{i}"})
            with pytest.raises(AuthenticationFailed, match="unknown signing key id"):
                auth.authenticate(token)
            clock.advance(0.01)
        assert issuer.jwks_requests <= 2

    def test_real_kid_with_attacker_key(self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock) -> None:
        """A token that names the issuer's kid but is signed by another key fails signature verification."""
        other = DevIssuer(algorithm="RS256", private_key=generate_key("RS256"))
        claims = issuer.claims("billing", "invoicer", issued_at=clock())
        token = other.sign(claims, headers={"kid": issuer.current_key.kid})
        _refused(auth, token, "signature verification failed")

    def test_tampered_payload(self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock) -> None:
        """Changing the namespace in a signed token breaks its signature."""
        header, _, signature = issuer.mint("billing", "invoicer", issued_at=clock()).split(".")
        claims = issuer.claims("platform", "broker-admin", issued_at=clock())
        tampered = f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"
        _refused(auth, tampered, "signature verification failed")

    def test_oversized_token_refused_before_parsing(self, issuer: DevIssuer, auth: Authenticator) -> None:
        """A token over max_token_bytes is refused without parsing it or contacting the issuer."""
        token = issuer.mint("billing", "invoicer", claims={"pad": "x" * 9000})
        _refused(auth, token, "token larger than 8192 bytes")
        _refused(auth, "%" * 10_000, "token larger than")
        assert issuer.jwks_requests == 0 and auth.verifications == 0

    def test_garbage_token(self, auth: Authenticator) -> None:
        """A value that is not a JWT is refused as malformed."""
        _refused(auth, "not-a-jwt", "malformed token")
        _refused(auth, "", "no bearer token")

    def test_missing_sub(self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock) -> None:
        """A token without sub is refused."""
        _refused(
            auth, issuer.mint("billing", "invoicer", issued_at=clock(), drop_claims=("sub",)), "missing claim: sub"
        )

    def test_missing_namespace(self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock) -> None:
        """A token without any kubernetes.io claim (a plain OIDC token) is refused."""
        token = issuer.mint("billing", "invoicer", issued_at=clock(), drop_claims=("kubernetes.io",))
        _refused(auth, token, "missing claim: kubernetes.io")
        nested = {"kubernetes.io": {"serviceaccount": {"name": "invoicer", "uid": "u"}}}
        _refused(auth, issuer.mint("billing", "invoicer", issued_at=clock(), claims=nested), "missing claim")

    def test_claims_disagree_with_subject(self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock) -> None:
        """A sub naming one service account and kubernetes.io claims naming another are refused."""
        token = issuer.mint(
            "billing", "invoicer", issued_at=clock(), claims={"sub": "system:serviceaccount:platform:broker-admin"}
        )
        _refused(auth, token, "do not match the subject")

    def test_subject_not_a_service_account(self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock) -> None:
        """A user subject (not system:serviceaccount:...) is refused."""
        _refused(auth, issuer.mint("billing", "invoicer", issued_at=clock(), claims={"sub": "alice"}), "not a service")

    def test_jku_header_is_ignored(self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock) -> None:
        """A jku header pointing at an attacker's key set is never fetched."""
        with DevIssuer(algorithm="ES256") as attacker:
            claims = issuer.claims("billing", "invoicer", issued_at=clock())
            token = attacker.sign(claims, headers={"jku": attacker.jwks_url})
            with pytest.raises(AuthenticationFailed):
                auth.authenticate(token)
            assert attacker.jwks_requests == 0

    def test_crit_header_refused(self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock) -> None:
        """A token with critical header extensions the broker does not implement is refused."""
        token = issuer.mint("billing", "invoicer", issued_at=clock(), headers={"crit": ["exp"]})
        _refused(auth, token, "critical")

    def test_token_never_logged(
        self, issuer: DevIssuer, clock: FakeClock, metrics: Metrics, captured_logs: io.StringIO
    ) -> None:
        """Neither the token nor its signature reaches a log line, even on failures."""
        with _authenticator(issuer, clock, metrics) as auth:
            good = issuer.mint("billing", "invoicer", issued_at=clock())
            bad = issuer.mint("billing", "invoicer", audience="vault", issued_at=clock())
            auth.authenticate(good)
            with pytest.raises(AuthenticationFailed):
                auth.authenticate(bad)
        logs = captured_logs.getvalue()
        assert "jwks refreshed" in logs
        for token in (good, bad):
            assert token not in logs and token.rsplit(".", 1)[1] not in logs


class TestIssuerAvailability:
    def test_issuer_down(self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock, metrics: Metrics) -> None:
        """With the issuer stopped and no keys cached, authentication fails as IdentityUnavailable."""
        token = issuer.mint("billing", "invoicer", issued_at=clock())
        issuer.stop()
        with pytest.raises(IdentityUnavailable) as info:
            auth.authenticate(token)
        assert "issuer unreachable" in info.value.message
        assert info.value.code == "IDENTITY_UNAVAILABLE" and isinstance(info.value, AuthenticationFailed)
        assert info.value.retry_after_seconds is not None
        assert _failures(metrics, "issuer_unavailable") == 1

    @pytest.mark.parametrize(
        ("fault", "message"),
        [("garbage", "is not JSON"), ("error", "answered HTTP 500"), ("empty", "no usable signing keys")],
    )
    def test_jwks_broken(
        self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock, fault: Any, message: str
    ) -> None:
        """A JWKS endpoint answering garbage, an error or no keys makes authentication unavailable, not 'invalid'."""
        issuer.jwks_fault = fault
        with pytest.raises(IdentityUnavailable) as info:
            auth.authenticate(issuer.mint("billing", "invoicer", issued_at=clock()))
        assert message in info.value.message

    def test_discovery_naming_another_issuer(self, clock: FakeClock) -> None:
        """A discovery document whose issuer differs from the configured one is not trusted."""
        with DevIssuer(issuer="https://elsewhere.example") as issuer:
            settings = IdentitySettings(issuer=issuer.url)
            with Authenticator(settings, clock=clock, monotonic=clock) as auth, pytest.raises(IdentityUnavailable):
                auth.authenticate(issuer.mint("billing", "invoicer", issued_at=clock(), claims={"iss": issuer.url}))
            assert issuer.jwks_requests == 0

    def test_last_good_keys_served_while_issuer_down(
        self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock
    ) -> None:
        """After the issuer goes down, known keys keep working for jwks_max_stale_seconds, then it is unavailable."""
        auth.authenticate(issuer.mint("billing", "invoicer", issued_at=clock()))
        issuer.stop()
        clock.advance(auth.settings.jwks_cache_seconds + 60)
        assert auth.authenticate(issuer.mint("billing", "invoicer", issued_at=clock())).namespace == "billing"
        clock.advance(auth.settings.jwks_max_stale_seconds)
        with pytest.raises(IdentityUnavailable):
            auth.authenticate(issuer.mint("billing", "invoicer", issued_at=clock()))

    def test_recovers_when_issuer_returns(self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock) -> None:
        """After an outage the next refresh (past the rate limit) fetches keys again."""
        issuer.jwks_fault = "error"
        token = issuer.mint("billing", "invoicer", issued_at=clock())
        with pytest.raises(IdentityUnavailable):
            auth.authenticate(token)
        issuer.jwks_fault = "none"
        clock.advance(auth.settings.jwks_refresh_min_interval_seconds)
        assert auth.authenticate(token).namespace == "billing"


class TestKeyRotation:
    def test_new_kid_accepted_after_one_refetch(self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock) -> None:
        """A token signed with a newly published key is accepted after exactly one JWKS refetch."""
        old = issuer.current_key
        auth.authenticate(issuer.mint("billing", "invoicer", issued_at=clock()))
        issuer.add_key("ES256")
        clock.advance(auth.settings.jwks_refresh_min_interval_seconds)
        assert auth.authenticate(issuer.mint("billing", "invoicer", issued_at=clock())).namespace == "billing"
        assert issuer.jwks_requests == 2
        assert auth.authenticate(issuer.mint("billing", "payments", issued_at=clock(), kid=old.kid))
        assert issuer.jwks_requests == 2

    def test_retired_key_refused_after_cache_expiry(
        self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock
    ) -> None:
        """Once a key leaves the JWKS and the key cache expires, its new tokens are refused."""
        old = issuer.current_key
        auth.authenticate(issuer.mint("billing", "invoicer", issued_at=clock()))
        issuer.add_key("ES256")
        issuer.retire_key(old.kid)
        clock.advance(auth.settings.jwks_cache_seconds)
        _refused(auth, issuer.mint("billing", "invoicer", issued_at=clock(), kid=old.kid), "unknown signing key id")


class TestVerifiedCache:
    def test_second_authentication_skips_verification(
        self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock
    ) -> None:
        """The same token again is answered from the cache without a signature check."""
        token = issuer.mint("billing", "invoicer", issued_at=clock())
        first = auth.authenticate(token)
        assert auth.authenticate(token) == first
        assert auth.verifications == 1

    def test_expired_cached_token_refused(self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock) -> None:
        """A cached token is refused once it has expired."""
        token = issuer.mint("billing", "invoicer", issued_at=clock(), ttl_seconds=120)
        auth.authenticate(token)
        clock.advance(120 + auth.settings.clock_skew_seconds + 1)
        _refused(auth, token, "token expired")

    def test_cache_entries_are_reverified_after_max_age(
        self, issuer: DevIssuer, auth: Authenticator, clock: FakeClock
    ) -> None:
        """A long-lived token is verified again after verified_cache_max_seconds."""
        token = issuer.mint("billing", "invoicer", issued_at=clock(), ttl_seconds=3600)
        auth.authenticate(token)
        clock.advance(auth.settings.verified_cache_max_seconds)
        auth.authenticate(token)
        assert auth.verifications == 2

    def test_cache_is_bounded(self, issuer: DevIssuer, clock: FakeClock) -> None:
        """Past verified_cache_size entries, the least recently used token is verified again."""
        with _authenticator(issuer, clock, verified_cache_size=2) as auth:
            tokens = [issuer.mint("billing", f"sa-{i}", issued_at=clock()) for i in range(3)]
            for token in tokens:
                auth.authenticate(token)
            auth.authenticate(tokens[2])
            assert auth.verifications == 3
            auth.authenticate(tokens[0])
            assert auth.verifications == 4


class TestTransport:
    def test_https_issuer_with_ca_bundle(self, rsa_key: PrivateKey, clock: FakeClock, tmp_path: Path) -> None:
        """Discovery and JWKS over HTTPS work when the issuer's CA is configured."""
        with DevIssuer(private_key=rsa_key, tls=True) as issuer:
            assert issuer.tls is not None and issuer.url.startswith("https://")
            ca = issuer.tls.write_ca(tmp_path / "ca.pem")
            with _authenticator(issuer, clock, jwks_ca_bundle_path=ca) as auth:
                assert auth.authenticate(issuer.mint("billing", "invoicer", issued_at=clock())).namespace == "billing"

    def test_https_issuer_not_trusted_without_its_ca(self, rsa_key: PrivateKey, clock: FakeClock) -> None:
        """An HTTPS issuer whose certificate does not verify is unavailable, never trusted."""
        with DevIssuer(private_key=rsa_key, tls=True) as issuer, _authenticator(issuer, clock) as auth:
            with pytest.raises(IdentityUnavailable, match="issuer unreachable"):
                auth.authenticate(issuer.mint("billing", "invoicer", issued_at=clock()))
            assert issuer.discovery_requests == 0

    def test_bearer_token_for_protected_discovery(self, rsa_key: PrivateKey, clock: FakeClock, tmp_path: Path) -> None:
        """An issuer that wants a service-account token (a cluster's default) gets the one in jwks_token_path."""
        token_file = tmp_path / "token"
        token_file.write_text("broker-own-sa-token\n")
        with DevIssuer(private_key=rsa_key, required_token="broker-own-sa-token") as issuer:
            with _authenticator(issuer, clock) as anonymous, pytest.raises(IdentityUnavailable, match="HTTP 401"):
                anonymous.authenticate(issuer.mint("billing", "invoicer", issued_at=clock()))
            with _authenticator(issuer, clock, jwks_token_path=token_file) as auth:
                assert auth.authenticate(issuer.mint("billing", "invoicer", issued_at=clock())).namespace == "billing"

    def test_bearer_token_not_sent_to_other_hosts(
        self, rsa_key: PrivateKey, clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A discovered jwks_uri on another host never receives the broker's own token."""
        token_file = tmp_path / "token"
        token_file.write_text("broker-own-sa-token")
        with DevIssuer(private_key=rsa_key) as issuer, DevIssuer(required_token="broker-own-sa-token") as elsewhere:
            document = {**issuer.discovery(), "jwks_uri": elsewhere.jwks_url}
            monkeypatch.setattr(issuer, "discovery", lambda: document)
            with (
                _authenticator(issuer, clock, jwks_token_path=token_file) as auth,
                pytest.raises(IdentityUnavailable, match="HTTP 401"),
            ):
                auth.authenticate(issuer.mint("billing", "invoicer", issued_at=clock()))
            assert elsewhere.unauthorized_requests == 1 and elsewhere.jwks_requests == 0

    def test_non_ascii_bearer(self, auth: Authenticator) -> None:
        """Any string, lone surrogates included, is refused as malformed rather than crashing."""
        _refused(auth, "\ud800.\u00e9.x", "malformed token")
