"""A development OIDC issuer that signs Kubernetes-shaped service-account tokens.

``DevIssuer`` behaves like a cluster's service-account issuer: it holds RSA /
EC / Ed25519 signing keys, mints projected service-account tokens with the
same claims the kube-apiserver writes, and serves
``/.well-known/openid-configuration`` and ``/openid/v1/jwks`` over real HTTP
on a loopback port. Keys can be rotated (``add_key``, ``retire_key``) and the
JWKS endpoint can be made to fail (``jwks_fault``) to test clients.

``TokenReviewServer`` answers ``POST /apis/authentication.k8s.io/v1/tokenreviews``
for tokens of a ``DevIssuer``, as the API server would.

Both are test helpers shipped so users can test their own workloads::

    with DevIssuer() as issuer:
        token = issuer.mint("billing", "invoicer", audience="mspc-broker")
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

KeyAlgorithm = Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]
JwksFault = Literal["none", "garbage", "error", "empty"]
_MAX_BODY_BYTES = 64 * 1024

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def kubernetes_key_id(public_key: Any) -> str:
    """The ``kid`` the kube-apiserver derives: base64url(sha256(DER SubjectPublicKeyInfo))."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


def generate_key(algorithm: str) -> PrivateKey:
    """A new private key for ``algorithm`` (RSA 2048, P-256, P-384 or Ed25519)."""
    if algorithm.startswith(("RS", "PS")):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unsupported algorithm {algorithm!r}")


def _public_jwk(public_key: Any, kid: str, algorithm: str) -> dict[str, Any]:
    if isinstance(public_key, rsa.RSAPublicKey):
        jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(public_key, as_dict=True)
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(public_key, as_dict=True)
    else:
        jwk = jwt.algorithms.OKPAlgorithm.to_jwk(public_key, as_dict=True)
    jwk.update({"kid": kid, "use": "sig", "alg": algorithm})
    return jwk


@dataclass(frozen=True)
class SigningKey:
    """One issuer key: its id, algorithm and key pair."""

    kid: str
    algorithm: str
    private_key: PrivateKey

    @property
    def public_key(self) -> Any:
        return self.private_key.public_key()

    def public_pem(self) -> bytes:
        """The public key as PEM (SubjectPublicKeyInfo), as a static-key file holds it."""
        pem: bytes = self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem


@dataclass(frozen=True)
class LoopbackTls:
    """A throw-away CA and a server certificate for 127.0.0.1 / localhost (PEM bytes)."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def generate(cls, valid_seconds: int = 24 * 3600) -> LoopbackTls:
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mspc-broker test CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(seconds=valid_seconds))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(seconds=valid_seconds))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return cls(
            ca_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )

    def write_ca(self, path: Path) -> Path:
        """Write the CA certificate (what clients trust) to ``path``; returns it."""
        path.write_bytes(self.ca_pem)
        return path

    def server_context(self) -> ssl.SSLContext:
        """A server-side TLS context holding the certificate and key."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.TemporaryDirectory(prefix="loopback-tls-") as tmp:
            chain, key = Path(tmp) / "chain.pem", Path(tmp) / "key.pem"
            chain.write_bytes(self.cert_pem + self.ca_pem)
            key.write_bytes(self.key_pem)
            context.load_cert_chain(chain, key)
        return context


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _LoopbackHttp:
    """A threaded ``http.server`` on 127.0.0.1 whose handler is one method."""

    def __init__(
        self,
        handle: Callable[[str, str, bytes, Mapping[str, str]], tuple[int, bytes]],
        tls: LoopbackTls | None = None,
    ) -> None:
        self._handle = handle
        self.tls = tls
        self._server: _QuietServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self, port: int = 0) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = min(int(self.headers.get("Content-Length") or 0), _MAX_BODY_BYTES)
                body = self.rfile.read(length) if length else b""
                status, payload = outer._handle(self.command, self.path, body, dict(self.headers.items()))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = _serve  # noqa: N815 - http.server's naming
            do_POST = _serve  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = _QuietServer(("127.0.0.1", port), Handler)
        if self.tls is not None:
            self._server.socket = self.tls.server_context().wrap_socket(self._server.socket, server_side=True)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="loopback-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"


class DevIssuer:
    """A cluster-like service-account token issuer on ``http://127.0.0.1:<port>``.

    ``issuer`` defaults to the server's own base URL, so OIDC discovery works
    exactly as against a cluster whose issuer is discoverable; pass another
    value to mimic ``https://kubernetes.default.svc.cluster.local`` (clients
    then use ``jwks_url`` directly). Counters ``jwks_requests`` and
    ``discovery_requests`` count what clients fetched (``unauthorized_requests``
    what was refused for a missing token). ``tls=True`` serves
    HTTPS with a throw-away CA (``tls.ca_pem``); ``required_token`` makes
    discovery and JWKS answer 401 without that bearer token, as a cluster
    does by default (only service accounts may read them).
    """

    def __init__(
        self,
        *,
        algorithm: KeyAlgorithm = "RS256",
        issuer: str | None = None,
        private_key: PrivateKey | None = None,
        tls: bool = False,
        required_token: str | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, SigningKey] = {}
        self._published: list[str] = []
        self._current: str = ""
        self._issuer_override = issuer
        self.tls = LoopbackTls.generate() if tls else None
        self.required_token = required_token
        self._http = _LoopbackHttp(self._handle, self.tls)
        self.jwks_requests = 0
        self.discovery_requests = 0
        self.unauthorized_requests = 0
        self.jwks_fault: JwksFault = "none"
        self.add_key(algorithm, private_key=private_key)

    def start(self, port: int = 0) -> DevIssuer:
        """Serve discovery and JWKS on 127.0.0.1 (``port`` 0 picks a free port); returns self."""
        self._http.start(port)
        return self

    def stop(self) -> None:
        """Stop serving; clients then see connection errors (an unreachable issuer)."""
        self._http.stop()

    def __enter__(self) -> DevIssuer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._http.port

    @property
    def url(self) -> str:
        """Base URL of the HTTP(S) server."""
        return self._http.url

    @property
    def issuer(self) -> str:
        """The ``iss`` of minted tokens."""
        return self._issuer_override or self.url

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/openid/v1/jwks"

    @property
    def discovery_url(self) -> str:
        return f"{self.url}/.well-known/openid-configuration"

    @property
    def current_key(self) -> SigningKey:
        """The key ``mint`` signs with unless told otherwise."""
        return self._keys[self._current]

    def key(self, kid: str) -> SigningKey:
        return self._keys[kid]

    def add_key(
        self,
        algorithm: KeyAlgorithm = "RS256",
        *,
        kid: str | None = None,
        publish: bool = True,
        make_current: bool = True,
        private_key: PrivateKey | None = None,
    ) -> SigningKey:
        """Add a key (generated unless given; ``kid`` defaults to the Kubernetes-style id), publish it, sign with it."""
        private_key = private_key or generate_key(algorithm)
        key = SigningKey(kid or kubernetes_key_id(private_key.public_key()), algorithm, private_key)
        with self._lock:
            self._keys[key.kid] = key
            if publish:
                self._published.append(key.kid)
            if make_current:
                self._current = key.kid
        return key

    def retire_key(self, kid: str) -> None:
        """Remove a key from the JWKS (it can still sign, as a compromised key would)."""
        with self._lock:
            self._published = [k for k in self._published if k != kid]

    def jwks(self) -> dict[str, Any]:
        """The JWKS document as served."""
        with self._lock:
            keys = [self._keys[kid] for kid in self._published]
        return {"keys": [_public_jwk(k.public_key, k.kid, k.algorithm) for k in keys]}

    def discovery(self) -> dict[str, Any]:
        """The OpenID discovery document as served (the fields the kube-apiserver serves)."""
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_url,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": sorted({k.algorithm for k in self._keys.values()}),
        }

    def claims(
        self,
        namespace: str,
        service_account: str,
        *,
        audience: str | list[str] = "mspc-broker",
        ttl_seconds: int = 3600,
        pod_name: str | None = None,
        pod_uid: str | None = None,
        service_account_uid: str | None = None,
        issued_at: float | None = None,
        legacy: bool = False,
    ) -> dict[str, Any]:
        """The claim set of a projected token (``legacy=True``: the old secret-based token claims)."""
        now = int(time.time() if issued_at is None else issued_at)
        sa_uid = service_account_uid or str(uuid.uuid4())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
            "aud": [audience] if isinstance(audience, str) else list(audience),
            "iat": now,
            "nbf": now,
            "exp": now + ttl_seconds,
            "jti": str(uuid.uuid4()),
        }
        if legacy:
            claims.update(
                {
                    "kubernetes.io/serviceaccount/namespace": namespace,
                    "kubernetes.io/serviceaccount/secret.name": f"{service_account}-token-x7k2p",
                    "kubernetes.io/serviceaccount/service-account.name": service_account,
                    "kubernetes.io/serviceaccount/service-account.uid": sa_uid,
                }
            )
            return claims
        k8s: dict[str, Any] = {"namespace": namespace, "serviceaccount": {"name": service_account, "uid": sa_uid}}
        if pod_name is not None:
            k8s["pod"] = {"name": pod_name, "uid": pod_uid or str(uuid.uuid4())}
        claims["kubernetes.io"] = k8s
        return claims

    def mint(
        self,
        namespace: str,
        service_account: str,
        *,
        audience: str | list[str] = "mspc-broker",
        ttl_seconds: int = 3600,
        pod_name: str | None = None,
        pod_uid: str | None = None,
        issued_at: float | None = None,
        legacy: bool = False,
        claims: Mapping[str, Any] | None = None,
        drop_claims: tuple[str, ...] = (),
        headers: Mapping[str, Any] | None = None,
        kid: str | None = None,
    ) -> str:
        """Sign a service-account token; ``claims`` override, ``drop_claims`` remove, ``headers`` add."""
        payload = self.claims(
            namespace,
            service_account,
            audience=audience,
            ttl_seconds=ttl_seconds,
            pod_name=pod_name,
            pod_uid=pod_uid,
            issued_at=issued_at,
            legacy=legacy,
        )
        payload.update(claims or {})
        for name in drop_claims:
            payload.pop(name, None)
        return self.sign(payload, headers=headers, kid=kid)

    def sign(
        self, payload: Mapping[str, Any], *, headers: Mapping[str, Any] | None = None, kid: str | None = None
    ) -> str:
        """Sign any payload with a key of this issuer (the current one by default)."""
        key = self._keys[kid or self._current]
        return jwt.encode(
            dict(payload), key.private_key, algorithm=key.algorithm, headers={"kid": key.kid, **(headers or {})}
        )

    def _handle(self, method: str, path: str, _body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        path = path.split("?", 1)[0]
        if self.required_token is not None and _bearer(headers) != self.required_token:
            with self._lock:
                self.unauthorized_requests += 1
            return 401, b'{"kind": "Status", "status": "Failure", "message": "Unauthorized", "code": 401}'
        if method == "GET" and path == "/.well-known/openid-configuration":
            with self._lock:
                self.discovery_requests += 1
            return 200, json.dumps(self.discovery()).encode()
        if method == "GET" and path == "/openid/v1/jwks":
            with self._lock:
                self.jwks_requests += 1
                fault = self.jwks_fault
            if fault == "garbage":
                return 200, b"<html>this is not a key set</html>"
            if fault == "error":
                return 500, b'{"message": "internal error"}'
            if fault == "empty":
                return 200, b'{"keys": []}'
            return 200, json.dumps(self.jwks()).encode()
        return 404, b'{"message": "not found"}'


def _bearer(headers: Mapping[str, str]) -> str | None:
    value = {k.lower(): v for k, v in headers.items()}.get("authorization", "")
    return value[7:] if value.startswith("Bearer ") else None


class TokenReviewServer:
    """A fake ``POST /apis/authentication.k8s.io/v1/tokenreviews`` backed by a ``DevIssuer``.

    Requests must carry ``Authorization: Bearer <reviewer_token>`` (else 401).
    A token is authenticated when the issuer signed it with a published key,
    it has not expired and one of its audiences is among ``spec.audiences``;
    the answer carries the username and pod extras the API server returns.
    ``requests`` counts reviews.
    """

    PATH = "/apis/authentication.k8s.io/v1/tokenreviews"

    def __init__(self, issuer: DevIssuer, *, reviewer_token: str, tls: bool = False) -> None:
        self.issuer = issuer
        self.reviewer_token = reviewer_token
        self.requests = 0
        self._lock = threading.Lock()
        self.tls = LoopbackTls.generate() if tls else None
        self._http = _LoopbackHttp(self._handle, self.tls)

    def start(self, port: int = 0) -> TokenReviewServer:
        self._http.start(port)
        return self

    def stop(self) -> None:
        self._http.stop()

    def __enter__(self) -> TokenReviewServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self._http.url

    def _review(self, token: str, audiences: list[str]) -> dict[str, Any]:
        keys = {k["kid"]: k for k in self.issuer.jwks()["keys"]}
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            jwk = jwt.PyJWK(keys[kid])
            claims = jwt.decode(
                token, jwk, algorithms=[jwk.algorithm_name], audience=audiences, issuer=self.issuer.issuer
            )
        except (jwt.PyJWTError, KeyError) as exc:
            return {"authenticated": False, "error": f"invalid bearer token, {type(exc).__name__}"}
        token_aud = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        k8s = claims.get("kubernetes.io", {})
        extra: dict[str, list[str]] = {}
        if "pod" in k8s:
            extra["authentication.kubernetes.io/pod-name"] = [k8s["pod"]["name"]]
            extra["authentication.kubernetes.io/pod-uid"] = [k8s["pod"]["uid"]]
        namespace = claims["sub"].split(":")[2]
        return {
            "authenticated": True,
            "user": {
                "username": claims["sub"],
                "uid": k8s.get("serviceaccount", {}).get("uid", ""),
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
                "extra": extra,
            },
            "audiences": [a for a in audiences if a in token_aud],
        }

    def _handle(self, method: str, path: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        if method != "POST" or path.split("?", 1)[0] != self.PATH:
            return 404, b'{"message": "not found"}'
        with self._lock:
            self.requests += 1
        if _bearer(headers) != self.reviewer_token:
            return 401, b'{"kind": "Status", "status": "Failure", "message": "Unauthorized", "code": 401}'
        try:
            review = json.loads(body)
            token = review["spec"]["token"]
            audiences = list(review["spec"].get("audiences") or [])
        except (ValueError, KeyError, TypeError):
            return 400, b'{"kind": "Status", "status": "Failure", "message": "bad request", "code": 400}'
        review["status"] = self._review(token, audiences)
        review["spec"]["token"] = ""
        return 201, json.dumps(review).encode()


__all__ = [
    "DevIssuer",
    "JwksFault",
    "KeyAlgorithm",
    "LoopbackTls",
    "PrivateKey",
    "SigningKey",
    "TokenReviewServer",
    "generate_key",
    "kubernetes_key_id",
]
