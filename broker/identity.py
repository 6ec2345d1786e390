"""Workload identity: a Kubernetes service-account bearer token -> ``Principal``.

``Authenticator.authenticate(bearer)`` runs, in this order, and stops at the
first failure:

1. size: more than ``max_token_bytes`` is refused before any parsing;
2. cache: a token verified before (looked up by its SHA-256) is answered from
   memory until ``min(exp, verified_at + verified_cache_max_seconds)``;
3. header: only asymmetric algorithms (RS/PS 256-512, ES256/384, EdDSA) are
   accepted, and only the ones the chosen key's type allows (an RSA key never
   verifies an ES or HS token; ``none`` and HMAC are refused outright);
4. signature, with keys from (``mode``) the issuer's JWKS, found through OIDC
   discovery or ``jwks_url`` (cached ``jwks_cache_seconds``, refetched on an
   unknown ``kid`` at most once per ``jwks_refresh_min_interval_seconds``,
   last good keys kept ``jwks_max_stale_seconds`` while the issuer is down),
   or static PEM files; or, in ``tokenreview`` mode, the API server's
   TokenReview answer replaces steps 3-5;
5. claims: ``iss``, ``aud`` (the broker's own audience), ``exp`` / ``nbf`` /
   ``iat`` with ``clock_skew_seconds``, and the service account from the
   nested ``kubernetes.io`` claim or the legacy
   ``kubernetes.io/serviceaccount/*`` claims, cross-checked with ``sub``.

Every failure raises ``AuthenticationFailed`` with a reason that never quotes
the token, and counts ``broker_auth_failures_total{reason}``. When the
issuer cannot be asked (JWKS, discovery or TokenReview unreachable or
answering garbage) the error is ``IdentityUnavailable``, a subclass, so the
API can answer 503 instead of 401.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from broker.errors import AuthenticationFailed, ConfigError, IdentityUnavailable, snippet
from broker.log import get_logger
from broker.metrics import Metrics
from broker.models import Principal
from broker.settings import IdentitySettings

ALLOWED_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"})
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS = {"secp256r1": frozenset({"ES256"}), "secp384r1": frozenset({"ES384"})}
MIN_RSA_KEY_BITS = 2048
MAX_DOCUMENT_BYTES = 1024 * 1024
TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
_BEARER_PREFIX = re.compile(r"^\s*bearer\s+", re.IGNORECASE)
_SAFE_ALG = re.compile(r"^[A-Za-z0-9+_-]{1,16}$")
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SERVICE_ACCOUNT = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_SA_PREFIX = "system:serviceaccount:"
_LEGACY = "kubernetes.io/serviceaccount/"

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

log = get_logger("identity")


class _Rejected(Exception):
    """Internal: one failure with its metric label; turned into the public error in one place."""

    def __init__(self, reason: str, message: str, *, unavailable: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.unavailable = unavailable


def algorithms_for_key(key: object) -> frozenset[str]:
    """The JWS algorithms a public key may verify (empty for keys the broker will not use)."""
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGORITHMS if key.key_size >= MIN_RSA_KEY_BITS else frozenset()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _EC_ALGORITHMS.get(key.curve.name, frozenset())
    if isinstance(key, ed25519.Ed25519PublicKey):
        return frozenset({"EdDSA"})
    return frozenset()


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key, its ``kid`` (if any) and the algorithms it may verify."""

    kid: str | None
    key: PublicKey
    algorithms: frozenset[str]


def parse_jwks(document: object) -> dict[str, VerificationKey]:
    """Usable signature keys of a JWKS document by ``kid``; raises ``ValueError`` if it is not a JWKS.

    Keys without ``kid``, for encryption, symmetric (``oct``), weak (RSA < 2048
    bits) or of unknown type are skipped.
    """
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    keys: dict[str, VerificationKey] = {}
    for entry in document["keys"]:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("kid"), str) or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(dict(entry)).key
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        allowed = algorithms_for_key(key)
        if isinstance(entry.get("alg"), str):
            allowed = allowed & {entry["alg"]}
        if allowed:
            keys[entry["kid"]] = VerificationKey(entry["kid"], key, allowed)
    return keys


def _load_static_keys(paths: list[Path]) -> tuple[VerificationKey, ...]:
    if not paths:
        raise ConfigError("identity.static_key_paths: mode=static needs at least one PEM public key")
    keys = []
    for path in paths:
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"identity.static_key_paths: cannot read {path}: {exc.strerror}") from None
        except ValueError:
            raise ConfigError(f"identity.static_key_paths: {path} is not a PEM public key") from None
        allowed = algorithms_for_key(key)
        if not allowed:
            raise ConfigError(
                f"identity.static_key_paths: {path} is not an accepted key (RSA >= 2048, P-256/384, Ed25519)"
            )
        keys.append(VerificationKey(None, key, allowed))  # type: ignore[arg-type]
    return tuple(keys)


class JwksKeys:
    """Signing keys fetched from the issuer: discovery -> ``jwks_uri`` (or ``jwks_url``), cached.

    Thread-safe; at most one fetch is in flight, and fetches happen at most
    once per ``jwks_refresh_min_interval_seconds`` however many unknown key
    ids arrive. ``fetches`` counts JWKS fetch attempts.
    """

    def __init__(
        self, settings: IdentitySettings, client: httpx.Client, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._settings = settings
        self._client = client
        self._monotonic = monotonic
        self._jwks_url: str | None = settings.jwks_url
        self._keys: dict[str, VerificationKey] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._last_error: str | None = None
        self._lock = threading.Lock()
        self._token_origins = {_origin(settings.issuer)} | (
            {_origin(settings.jwks_url)} if settings.jwks_url else set()
        )
        self.fetches = 0

    def candidates(self, kid: str | None, algorithm: str) -> tuple[VerificationKey, ...]:
        """Keys that may verify a token with this header; raises ``_Rejected``."""
        found = self._lookup(kid)
        if found and self._fresh(self._monotonic()):
            return self._usable(found, algorithm)
        with self._lock:
            now = self._monotonic()
            found = self._lookup(kid)
            if not (found and self._fresh(now)) and self._may_fetch(now):
                self._refresh(now)
                found = self._lookup(kid)
            if found:
                if self._fetched_at is not None and now - self._fetched_at <= (
                    self._settings.jwks_cache_seconds + self._settings.jwks_max_stale_seconds
                ):
                    return self._usable(found, algorithm)
                raise _Rejected(
                    "issuer_unavailable",
                    f"issuer unavailable and the last good keys are too old ({self._last_error or 'no refresh'})",
                    unavailable=True,
                )
            if self._last_error is not None:
                raise _Rejected("issuer_unavailable", f"issuer unavailable: {self._last_error}", unavailable=True)
        if kid is None:
            raise _Rejected("unknown_kid", "token has no key id (kid) and the issuer has several keys")
        raise _Rejected("unknown_kid", "unknown signing key id")

    def _lookup(self, kid: str | None) -> tuple[VerificationKey, ...]:
        keys = self._keys
        if kid is not None:
            key = keys.get(kid)
            return (key,) if key is not None else ()
        return tuple(keys.values()) if len(keys) == 1 else ()

    @staticmethod
    def _usable(found: tuple[VerificationKey, ...], algorithm: str) -> tuple[VerificationKey, ...]:
        usable = tuple(k for k in found if algorithm in k.algorithms)
        if not usable:
            raise _Rejected("algorithm", f"algorithm {algorithm} not allowed for this signing key")
        return usable

    def _fresh(self, now: float) -> bool:
        return self._fetched_at is not None and now - self._fetched_at < self._settings.jwks_cache_seconds

    def _may_fetch(self, now: float) -> bool:
        return (
            self._attempted_at is None or now - self._attempted_at >= self._settings.jwks_refresh_min_interval_seconds
        )

    def _refresh(self, now: float) -> None:
        self._attempted_at = now
        self.fetches += 1
        try:
            url = self._jwks_url or self._discover()
            try:
                keys = parse_jwks(self._get_json(url, "JWKS"))
            except ValueError as exc:
                raise _Rejected(
                    "issuer_unavailable", f"issuer returned an invalid JWKS: {exc}", unavailable=True
                ) from None
            if not keys:
                raise _Rejected("issuer_unavailable", "issuer JWKS has no usable signing keys", unavailable=True)
        except _Rejected as exc:
            self._last_error = exc.message
            if self._settings.jwks_url is None:
                self._jwks_url = None
            log.warning("jwks refresh failed", error=exc.message, issuer=self._settings.issuer)
            return
        added = sorted(set(keys) - set(self._keys))
        self._keys = keys
        self._fetched_at = now
        self._last_error = None
        log.info("jwks refreshed", issuer=self._settings.issuer, key_count=len(keys), new_kids=added)

    def _discover(self) -> str:
        url = self._settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
        document = self._get_json(url, "OIDC discovery")
        if not isinstance(document, Mapping):
            raise _Rejected("issuer_unavailable", "OIDC discovery document is not a JSON object", unavailable=True)
        if document.get("issuer") != self._settings.issuer:
            raise _Rejected(
                "issuer_unavailable",
                f"OIDC discovery document names another issuer than {self._settings.issuer}",
                unavailable=True,
            )
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise _Rejected("issuer_unavailable", "OIDC discovery document has no usable jwks_uri", unavailable=True)
        self._jwks_url = jwks_uri
        return jwks_uri

    def _headers(self, url: str) -> dict[str, str]:
        """Accept JSON; add the broker's bearer token, but only for the configured issuer / JWKS hosts."""
        headers = {"Accept": "application/json"}
        path = self._settings.jwks_token_path
        if path is not None and _origin(url) in self._token_origins:
            try:
                headers["Authorization"] = "Bearer " + path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise _Rejected(
                    "issuer_unavailable", f"cannot read jwks_token_path {path}: {exc.strerror}", unavailable=True
                ) from None
        return headers

    def _get_json(self, url: str, what: str) -> object:
        """GET ``url`` and parse at most ``MAX_DOCUMENT_BYTES`` of JSON."""
        try:
            with self._client.stream("GET", url, headers=self._headers(url)) as response:
                if response.status_code != 200:
                    raise _Rejected(
                        "issuer_unavailable", f"{what} GET {url} answered HTTP {response.status_code}", unavailable=True
                    )
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise _Rejected("issuer_unavailable", f"{what} at {url} is too large", unavailable=True)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise _Rejected(
                "issuer_unavailable", f"issuer unreachable: {what} GET {url}: {type(exc).__name__}", unavailable=True
            ) from None
        try:
            return json.loads(body)
        except ValueError:
            raise _Rejected("issuer_unavailable", f"{what} at {url} is not JSON", unavailable=True) from None


def _origin(url: str) -> tuple[str, str, int | None]:
    parsed = httpx.URL(url)
    return parsed.scheme, parsed.host, parsed.port


class _VerifiedCache:
    """Verified tokens by SHA-256: LRU, bounded, each entry valid until its own deadline."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[bytes, tuple[Principal, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: bytes, now: float) -> Principal | None:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if now >= entry[1]:
                del self._entries[digest]
                return None
            self._entries.move_to_end(digest)
            return entry[0]

    def put(self, digest: bytes, principal: Principal, valid_until: float) -> None:
        if self._size == 0:
            return
        with self._lock:
            self._entries[digest] = (principal, valid_until)
            self._entries.move_to_end(digest)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _Rejected("claims", f"claim {name} is not a number")
    return float(value)


def _parse_subject(sub: object) -> tuple[str, str]:
    if not isinstance(sub, str) or not sub.startswith(_SA_PREFIX) or sub.count(":") != 3:
        raise _Rejected("claims", "subject is not a service account (system:serviceaccount:<namespace>:<name>)")
    namespace, name = sub[len(_SA_PREFIX) :].split(":")
    if not _NAMESPACE.fullmatch(namespace) or not _SERVICE_ACCOUNT.fullmatch(name):
        raise _Rejected("claims", "subject names an invalid namespace or service account")
    return namespace, name


def principal_from_claims(claims: Mapping[str, Any], *, expires_at: float | None = None) -> Principal:
    """The service account (and pod) a verified claim set names; raises ``AuthenticationFailed``.

    Reads the nested ``kubernetes.io`` claim and the legacy
    ``kubernetes.io/serviceaccount/*`` claims; at least one must be present
    and every one present must agree with ``sub``.
    """
    try:
        return _principal_from_claims(claims, expires_at)
    except _Rejected as exc:
        raise AuthenticationFailed(exc.message) from None


def _principal_from_claims(claims: Mapping[str, Any], expires_at: float | None) -> Principal:
    if "sub" not in claims:
        raise _Rejected("claims", "missing claim: sub")
    namespace, name = _parse_subject(claims["sub"])
    pod_name = pod_uid = None
    views: list[tuple[object, object]] = []
    nested = claims.get("kubernetes.io")
    if nested is not None:
        if not isinstance(nested, Mapping):
            raise _Rejected("claims", "claim kubernetes.io is not an object")
        sa = nested.get("serviceaccount")
        views.append((nested.get("namespace"), sa.get("name") if isinstance(sa, Mapping) else None))
        pod = nested.get("pod")
        if isinstance(pod, Mapping):
            pod_name = pod.get("name") if isinstance(pod.get("name"), str) else None
            pod_uid = pod.get("uid") if isinstance(pod.get("uid"), str) else None
    if _LEGACY + "namespace" in claims or _LEGACY + "service-account.name" in claims:
        views.append((claims.get(_LEGACY + "namespace"), claims.get(_LEGACY + "service-account.name")))
    if not views:
        raise _Rejected("claims", "missing claim: kubernetes.io namespace and service account")
    for claimed_namespace, claimed_name in views:
        if claimed_namespace is None or claimed_name is None:
            raise _Rejected("claims", "missing claim: kubernetes.io namespace or service account name")
        if (claimed_namespace, claimed_name) != (namespace, name):
            raise _Rejected("claims", "kubernetes.io claims do not match the subject")
    iss = claims.get("iss")
    return Principal(
        namespace=namespace,
        service_account=name,
        pod_name=pod_name,
        pod_uid=pod_uid,
        issuer=iss if isinstance(iss, str) else None,
        expires_at=datetime.fromtimestamp(expires_at, UTC) if expires_at is not None else None,
    )


def _strip_bearer(bearer: object) -> str:
    return _BEARER_PREFIX.sub("", bearer, count=1).strip() if isinstance(bearer, str) else ""


def _ssl_context(ca_bundle_path: Path | None) -> ssl.SSLContext:
    if ca_bundle_path is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(ca_bundle_path))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"identity: cannot load CA bundle {ca_bundle_path}: {exc}") from None


class Authenticator:
    """Bearer token -> ``Principal`` for one ``IdentitySettings`` (see the module docstring).

    ``clock`` gives wall-clock epoch seconds (token times), ``monotonic`` paces
    JWKS refreshes; both are injectable for tests. ``verifications`` counts
    signature checks (cache hits do none). Build once, share across threads,
    ``close()`` at shutdown.
    """

    def __init__(
        self,
        settings: IdentitySettings,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.settings = settings
        self._metrics = metrics
        self._clock = clock
        self._cache = _VerifiedCache(settings.verified_cache_size)
        self._jws = jwt.PyJWS()
        self._owns_client = http_client is None
        ca = settings.tokenreview_ca_bundle_path if settings.mode == "tokenreview" else settings.jwks_ca_bundle_path
        self._client = http_client or httpx.Client(
            timeout=settings.http_timeout_seconds, verify=_ssl_context(ca), trust_env=False, follow_redirects=False
        )
        self.jwks: JwksKeys | None = None
        self._static: tuple[VerificationKey, ...] = ()
        self.verifications = 0
        self._verify: Callable[[str, float], tuple[Principal, float]]
        if settings.mode == "tokenreview":
            self._verify = self._review
        else:
            if settings.mode == "static":
                self._static = _load_static_keys(settings.static_key_paths)
            else:
                self.jwks = JwksKeys(settings, self._client, monotonic)
            self._verify = self._verify_jwt

    def close(self) -> None:
        """Close the HTTP client if this authenticator built it."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> Authenticator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def authenticate(self, bearer: str) -> Principal:
        """Verify a bearer token (with or without the ``Bearer `` prefix) and return its principal."""
        token = _strip_bearer(bearer)
        raw = token.encode("utf-8", "surrogatepass")
        now = self._clock()
        try:
            if not raw:
                raise _Rejected("malformed", "no bearer token")
            if len(raw) > self.settings.max_token_bytes:
                raise _Rejected("too_large", f"token larger than {self.settings.max_token_bytes} bytes")
            if not raw.isascii():
                raise _Rejected("malformed", "malformed token: not ASCII")
            digest = hashlib.sha256(raw).digest()
            cached = self._cache.get(digest, now)
            if cached is not None:
                return cached
            principal, expires_at = self._verify(token, now)
        except _Rejected as exc:
            if self._metrics is not None:
                self._metrics.auth_failures.labels(reason=exc.reason).inc()
            log.debug("authentication failed", reason=exc.reason, detail=exc.message)
            if exc.unavailable:
                raise IdentityUnavailable(exc.message, retry_after_seconds=self._retry_after()) from None
            raise AuthenticationFailed(exc.message) from None
        valid_until = min(expires_at, now + self.settings.verified_cache_max_seconds)
        if valid_until > now:
            self._cache.put(digest, principal, valid_until)
        return principal

    async def authenticate_async(self, bearer: str) -> Principal:
        """``authenticate`` for async callers: cache hits inline, verification in a worker thread."""
        raw = _strip_bearer(bearer).encode("utf-8", "surrogatepass")
        if 0 < len(raw) <= self.settings.max_token_bytes:
            cached = self._cache.get(hashlib.sha256(raw).digest(), self._clock())
            if cached is not None:
                return cached
        return await asyncio.to_thread(self.authenticate, bearer)

    def _retry_after(self) -> float:
        return max(1.0, self.settings.jwks_refresh_min_interval_seconds)

    def _verify_jwt(self, token: str, now: float) -> tuple[Principal, float]:
        try:
            header = self._jws.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _Rejected("malformed", f"malformed token: {snippet(str(exc), 80)}") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
            shown = alg if isinstance(alg, str) and _SAFE_ALG.fullmatch(alg) else "(invalid)"
            raise _Rejected("algorithm", f"algorithm {shown} not allowed")
        if "crit" in header:
            raise _Rejected("malformed", "token header has unsupported critical extensions")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _Rejected("malformed", "token header kid is not a string")
        if self.jwks is not None:
            candidates = self.jwks.candidates(kid, alg)
        else:
            candidates = tuple(k for k in self._static if alg in k.algorithms)
            if not candidates:
                raise _Rejected("algorithm", f"algorithm {alg} not allowed for the configured keys")
        payload = self._check_signature(token, alg, candidates)
        try:
            claims = json.loads(payload)
        except ValueError:
            raise _Rejected("malformed", "token payload is not JSON") from None
        if not isinstance(claims, dict):
            raise _Rejected("malformed", "token payload is not a JSON object")
        expires_at = self._check_claims(claims, now)
        return _principal_from_claims(claims, expires_at), expires_at

    def _check_signature(self, token: str, alg: str, candidates: tuple[VerificationKey, ...]) -> bytes:
        for candidate in candidates:
            self.verifications += 1
            try:
                payload: bytes = self._jws.decode_complete(token, candidate.key, algorithms=[alg])["payload"]
                return payload
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError:
                raise _Rejected("malformed", "malformed token") from None
        raise _Rejected("signature", "signature verification failed")

    def _check_claims(self, claims: Mapping[str, Any], now: float) -> float:
        settings = self.settings
        skew = settings.clock_skew_seconds
        if claims.get("iss") != settings.issuer:
            raise _Rejected("issuer", f"issuer mismatch: token is not from {settings.issuer}")
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if settings.audience not in audiences:
            raise _Rejected("audience", f"audience mismatch: token is not for {settings.audience}")
        exp = _number(claims, "exp")
        if exp is None:
            raise _Rejected("claims", "missing claim: exp")
        if now > exp + skew:
            raise _Rejected("expired", "token expired")
        nbf = _number(claims, "nbf")
        if nbf is not None and now + skew < nbf:
            raise _Rejected("not_yet_valid", "token not yet valid (nbf in the future)")
        iat = _number(claims, "iat")
        if iat is not None and now + skew < iat:
            raise _Rejected("not_yet_valid", "token issued in the future (iat)")
        return exp

    def _review(self, token: str, now: float) -> tuple[Principal, float]:
        """POST /apis/authentication.k8s.io/v1/tokenreviews with the broker's own token."""
        settings = self.settings
        try:
            reviewer = settings.tokenreview_token_path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise _Rejected(
                "issuer_unavailable",
                f"cannot read the broker's own token {settings.tokenreview_token_path}: {exc.strerror}",
                unavailable=True,
            ) from None
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [settings.audience]},
        }
        url = settings.tokenreview_url.rstrip("/") + TOKENREVIEW_PATH
        try:
            response = self._client.post(url, json=body, headers={"Authorization": f"Bearer {reviewer}"})
        except httpx.HTTPError as exc:
            raise _Rejected(
                "issuer_unavailable", f"TokenReview unreachable: POST {url}: {type(exc).__name__}", unavailable=True
            ) from None
        if response.status_code in (401, 403):
            raise _Rejected(
                "issuer_unavailable",
                f"TokenReview refused the broker's own credentials (HTTP {response.status_code})",
                unavailable=True,
            )
        if response.status_code not in (200, 201):
            raise _Rejected("issuer_unavailable", f"TokenReview answered HTTP {response.status_code}", unavailable=True)
        try:
            status = response.json()["status"]
            authenticated = status.get("authenticated") is True
        except (ValueError, KeyError, TypeError, AttributeError):
            raise _Rejected("issuer_unavailable", "TokenReview answer is not a TokenReview", unavailable=True) from None
        if not authenticated:
            raise _Rejected(
                "rejected", f"token rejected by TokenReview: {snippet(str(status.get('error') or ''), 160)}"
            )
        audiences = status.get("audiences")
        if isinstance(audiences, list) and settings.audience not in audiences:
            raise _Rejected("audience", f"audience mismatch: token is not for {settings.audience}")
        user = status.get("user")
        user = user if isinstance(user, Mapping) else {}
        namespace, name = _parse_subject(user.get("username"))
        extra = user.get("extra")
        extra = extra if isinstance(extra, Mapping) else {}

        def first(key: str) -> str | None:
            values = extra.get(key)
            return values[0] if isinstance(values, list) and values and isinstance(values[0], str) else None

        expires_at = self._unverified_exp(token) or now + settings.verified_cache_max_seconds
        principal = Principal(
            namespace=namespace,
            service_account=name,
            pod_name=first("authentication.kubernetes.io/pod-name"),
            pod_uid=first("authentication.kubernetes.io/pod-uid"),
            issuer=settings.tokenreview_url,
            expires_at=datetime.fromtimestamp(expires_at, UTC),
        )
        return principal, expires_at

    @staticmethod
    def _unverified_exp(token: str) -> float | None:
        """``exp`` read without verification, only to bound how long a TokenReview answer is cached."""
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return None
        try:
            return _number(claims, "exp")
        except _Rejected:
            return None


__all__ = [
    "ALLOWED_ALGORITHMS",
    "Authenticator",
    "JwksKeys",
    "VerificationKey",
    "algorithms_for_key",
    "parse_jwks",
    "principal_from_claims",
]
