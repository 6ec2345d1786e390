"""Identity building blocks: claim extraction, JWKS parsing, algorithm choice, static keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.errors import AuthenticationFailed, ConfigError
from broker.identity import Authenticator, algorithms_for_key, parse_jwks, principal_from_claims
from broker.settings import IdentitySettings
from broker.testing.jwt import DevIssuer

NESTED = {
    "sub": "system:serviceaccount:billing:invoicer",
    "iss": "https://issuer.example",
    "kubernetes.io": {
        "namespace": "billing",
        "serviceaccount": {"name": "invoicer", "uid": "sa-uid"},
        "pod": {"name": "invoicer-abc", "uid": "pod-uid"},
    },
}
LEGACY = {
    "sub": "system:serviceaccount:billing:invoicer",
    "kubernetes.io/serviceaccount/namespace": "billing",
    "kubernetes.io/serviceaccount/service-account.name": "invoicer",
    "kubernetes.io/serviceaccount/service-account.uid": "sa-uid",
}


class TestPrincipalFromClaims:
    def test_nested_claim(self) -> None:
        """The nested kubernetes.io claim gives namespace, service account, pod name and uid."""
        principal = principal_from_claims(NESTED, expires_at=1_900_000_000)
        assert (principal.namespace, principal.service_account) == ("billing", "invoicer")
        assert (principal.pod_name, principal.pod_uid) == ("invoicer-abc", "pod-uid")
        assert principal.issuer == "https://issuer.example"
        assert principal.expires_at is not None and principal.expires_at.timestamp() == 1_900_000_000

    def test_legacy_claims(self) -> None:
        """The legacy flat claims are read when the nested claim is absent."""
        assert principal_from_claims(LEGACY).subject == "billing/invoicer"

    def test_both_forms_must_agree(self) -> None:
        """When both claim forms are present they must name the same service account."""
        mixed = {**NESTED, **LEGACY, "kubernetes.io/serviceaccount/namespace": "platform"}
        with pytest.raises(AuthenticationFailed, match="do not match"):
            principal_from_claims(mixed)

    @pytest.mark.parametrize(
        ("claims", "message"),
        [
            ({k: v for k, v in NESTED.items() if k != "sub"}, "missing claim: sub"),
            ({"sub": NESTED["sub"]}, "missing claim: kubernetes.io"),
            ({**NESTED, "sub": "system:serviceaccount:billing"}, "not a service account"),
            ({**NESTED, "sub": "system:serviceaccount:Bad_NS:invoicer"}, "invalid namespace"),
            ({**NESTED, "kubernetes.io": "billing"}, "not an object"),
            ({**NESTED, "kubernetes.io": {"namespace": "billing"}}, "missing claim"),
        ],
    )
    def test_refusals(self, claims: dict[str, Any], message: str) -> None:
        """Claim sets without a consistent service-account identity are refused with a clear reason."""
        with pytest.raises(AuthenticationFailed, match=message):
            principal_from_claims(claims)


class TestKeyChoice:
    def test_algorithms_follow_key_type(self) -> None:
        """RSA keys verify RS/PS only, P-256 ES256 only, P-384 ES384 only; weak RSA nothing."""
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
        weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
        assert algorithms_for_key(rsa_key) == {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
        assert algorithms_for_key(ec.generate_private_key(ec.SECP256R1()).public_key()) == {"ES256"}
        assert algorithms_for_key(ec.generate_private_key(ec.SECP384R1()).public_key()) == {"ES384"}
        assert algorithms_for_key(weak) == frozenset()
        assert algorithms_for_key(b"hmac-secret") == frozenset()

    def test_parse_jwks_skips_unusable_keys(self) -> None:
        """Symmetric, encryption, kid-less and malformed entries of a JWKS are ignored; alg narrows a key."""
        issuer = DevIssuer(algorithm="ES256")
        good = issuer.jwks()["keys"][0]
        document = {
            "keys": [
                good,
                {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
                {**good, "kid": "enc", "use": "enc"},
                {k: v for k, v in good.items() if k != "kid"},
                {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            ]
        }
        keys = parse_jwks(document)
        assert list(keys) == [good["kid"]]
        assert keys[good["kid"]].algorithms == {"ES256"}

    @pytest.mark.parametrize("document", [None, [], {"keys": "x"}, {"nokeys": []}])
    def test_parse_jwks_rejects_non_jwks(self, document: object) -> None:
        """Something that is not a JWKS document is an error, not an empty key set."""
        with pytest.raises(ValueError, match="not a JWKS"):
            parse_jwks(document)


class TestStaticKeys:
    def test_static_pem_keys(self, tmp_path: Path) -> None:
        """In static mode tokens are verified with PEM public keys from files, no HTTP involved."""
        issuer = DevIssuer(algorithm="ES256", issuer="https://kubernetes.default.svc.cluster.local")
        pem = tmp_path / "sa.pub"
        pem.write_bytes(issuer.current_key.public_pem())
        settings = IdentitySettings(mode="static", issuer=issuer.issuer, static_key_paths=[pem])
        with Authenticator(settings) as auth:
            assert auth.authenticate(issuer.mint("billing", "invoicer")).subject == "billing/invoicer"
            other = DevIssuer(algorithm="ES256", issuer=issuer.issuer)
            with pytest.raises(AuthenticationFailed, match="signature verification failed"):
                auth.authenticate(other.mint("billing", "invoicer"))
            with pytest.raises(AuthenticationFailed, match="algorithm RS256 not allowed"):
                auth.authenticate(DevIssuer(issuer=issuer.issuer).mint("billing", "invoicer"))

    def test_bad_static_configuration(self, tmp_path: Path) -> None:
        """Missing, unreadable, non-PEM and weak key files are configuration errors at construction."""
        weak = tmp_path / "weak.pub"
        weak.write_bytes(
            rsa.generate_private_key(public_exponent=65537, key_size=1024)
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        garbage = tmp_path / "garbage.pub"
        garbage.write_text("not a key")
        for paths, message in [
            ([], "needs at least one"),
            ([tmp_path / "missing.pub"], "cannot read"),
            ([garbage], "not a PEM public key"),
            ([weak], "not an accepted key"),
        ]:
            with pytest.raises(ConfigError, match=message):
                Authenticator(IdentitySettings(mode="static", static_key_paths=paths))
