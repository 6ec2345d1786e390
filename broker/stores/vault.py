"""``SecretStore`` on Vault / OpenBao KV v2, through hvac.

Connection
----------
The hvac client is built from ``VaultSettings`` only: url, CA bundle,
namespace and timeout are passed explicitly, and the adapter is constructed
with ``cert=None`` and the configured token (or none), so hvac's
``VAULT_ADDR`` / ``VAULT_TOKEN`` / ``VAULT_CACERT`` / ``~/.vault-token``
fallbacks never apply. hvac's HTTP goes through ``_Http``, the part of a
``requests.Session`` hvac uses, as a small HTTP/1.1 client on the standard
library (socket, ssl): it reads nothing from the environment (no proxies, no
``REQUESTS_CA_BUNDLE``, no ``.netrc``), verifies TLS and the host name
against the configured CA bundle or certifi's (as requests does), keeps up
to 64 idle connections per origin for the engine's threads, drops one the
server closed meanwhile, never retries (as the requests session did not),
follows at most 3 redirects, and refuses to send control characters in the
request line or headers. A call costs a fraction of the client CPU of
requests or urllib3, which matters because the engine's threads share one
interpreter lock.

Authentication: ``token`` (renewed with ``renew_self`` when renewable),
``approle`` and ``kubernetes`` (``POST auth/<mount>/login`` with role + the
projected service-account JWT, read from disk at every login; the mount may
be a ``kubernetes`` or a ``jwt`` auth method, both take that body). Logins
happen lazily on first use. A daemon thread renews the token (or logs in
again when it is not renewable or has reached its max TTL)
``token_renew_before_seconds`` before expiry, capped at half the TTL; every
call also checks the deadline first, so a stalled renewer cannot leave a call
with a dead token. All of it is serialised by one lock.

Versions and CAS
----------------
Versions are KV v2 version numbers as strings (``"1"``, ``"2"``...).
``write`` is ``POST {mount}/data/{path}`` with ``options.cas`` set to
``expected_latest`` (``0`` when the secret must not exist), so Vault itself
rejects a lost race; the loser gets ``Conflict``. A secret the broker creates
first gets ``custom_metadata.owner``, ``max_versions`` and
``cas_required=true`` (``POST {mount}/metadata/{path}``), so no writer,
human or broker, can overwrite it without CAS.

Idempotency (decision)
----------------------
A write is fully determined by its *slot*: ``expected_latest + 1``. No field
is added to the data (what ``bao kv get`` shows is exactly what the caller
wrote). When the CAS write fails, the store reads the slot: if that version
holds the same value, it is the first attempt's version (or an identical
concurrent write), and the retry returns it with ``created=False``;
otherwise it is somebody else's version and the answer is ``Conflict``.
A value equal to the latest version is answered with that version and
``created=False`` before anything is written. The ``idempotency_key`` thus
needs no storage: the same key always comes with the same ``expected_latest``
and value, which name the same slot. (It is logged as a short hash for
tracing.) The AWS store uses the same slot rule, so both stores answer the
contract alike.

Stages (decision)
-----------------
KV v2 has no labels. The pointers of ``<path>`` live in a sibling KV v2
secret ``<stage_record_prefix>/<path>`` (default ``_broker/stages/<path>``),
whose fields ``current`` / ``pending`` / ``previous`` hold version numbers
(an absent field is an unset stage). ``move_stage`` reads that record,
compares the pointer with ``expected``, and writes the new record with
``cas=<record version>``: concurrent movers race on Vault's CAS, and exactly
one wins. Moving ``current`` writes ``previous`` = the old current in the
same record version. Paths under the prefix are refused as secret paths.

Hints (decision)
----------------
Reads never trust memory, but writes may skip a read whose answer the
process already has, because Vault's own CAS checks the guess (``_Hints``):
a write naming a version this process wrote or read, whose value differs,
goes straight to the CAS write (no metadata read, no equality read); a create
right after a read found the path empty skips the metadata read; a stage move
uses the stage record as last read or written here as its ``cas``. If Vault
refuses the CAS, the full rules above run on fresh reads, so the answer is the
one a store without memory would give. A fresh provision thus costs 12
requests instead of 31.

Deleted and destroyed versions are reported as ``SecretNotFound`` naming the
state (``read_secret_version`` is called with ``raise_on_deleted_version``
explicitly ``False`` so the metadata of a soft-deleted version is seen).
Every hvac / requests error is translated by ``_translated``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import certifi
import hvac
import hvac.adapters
import hvac.exceptions
from pydantic import SecretStr

from broker import wire
from broker.errors import (
    BrokerError,
    ConfigError,
    Conflict,
    InvalidInput,
    SecretNotFound,
    StoreAccessDenied,
    StoreUnavailable,
    snippet,
)
from broker.log import get_logger
from broker.metrics import Metrics, observed
from broker.models import SecretInfo, SecretValue, Stage, VersionInfo, WriteResult
from broker.settings import StoreSettings, VaultSettings

BACKEND = "vault"
RETRY_AFTER_SECONDS = 1.0
_CAS_MISMATCH = "check-and-set"
_POOL_CONNECTIONS = 64
_MAX_REDIRECTS = 3
# How long a "nothing here" / "this version exists" answer may stand in for a metadata read, in seconds.
_RECENT_SECONDS = 5.0
_MAX_HINTS = 100_000
_log = get_logger("stores.vault")


def _errors_text(exc: hvac.exceptions.VaultError) -> str:
    errors = exc.errors
    if isinstance(errors, list):
        return "; ".join(str(e) for e in errors)
    return str(exc.args[0]) if exc.args and exc.args[0] else type(exc).__name__


@contextmanager
def _translated(operation: str, where: str, *, login: bool = False, sensitive: bool = False) -> Iterator[None]:
    """Re-raise hvac / requests errors as broker errors (``from exc``); messages carry no values.

    During a login (``login=True``) a 400 means refused credentials (Vault answers a bad
    secret_id or JWT with 400), so it becomes ``StoreAccessDenied``. For a request that
    carried secret data (``sensitive=True``) a 400's text is withheld, cause included.
    """
    try:
        yield
    except BrokerError:
        raise
    except hvac.exceptions.InvalidPath as exc:
        raise SecretNotFound(f"vault: nothing at {where}") from exc
    except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized) as exc:
        raise StoreAccessDenied(
            f"vault refused {operation} of {where} (check the broker's token, role and policy): "
            f"{snippet(_errors_text(exc))}"
        ) from exc
    except hvac.exceptions.InvalidRequest as exc:
        text = _errors_text(exc)
        if login:
            raise StoreAccessDenied(f"vault refused the login at {where}: {snippet(text)}") from exc
        if _CAS_MISMATCH in text:
            raise Conflict(f"vault: {where} changed concurrently (check-and-set failed); re-read and retry") from exc
        if sensitive:
            raise InvalidInput(
                f"vault rejected {operation} of {where} (its text is withheld: it may quote data)"
            ) from None
        raise InvalidInput(f"vault rejected {operation} of {where}: {snippet(text)}") from exc
    except hvac.exceptions.VaultError as exc:
        raise StoreUnavailable(
            f"vault failed {operation} of {where} ({type(exc).__name__}): {snippet(_errors_text(exc))}",
            retry_after_seconds=RETRY_AFTER_SECONDS,
        ) from exc
    except OSError as exc:  # broker.wire errors, socket, TLS, timeout; requests' RequestException too
        name = exc.cause_name if isinstance(exc, wire.WireError) else type(exc).__name__
        raise StoreUnavailable(
            f"vault unreachable for {operation} of {where}: {name}",
            retry_after_seconds=RETRY_AFTER_SECONDS,
        ) from exc
    except Exception as exc:
        raise StoreUnavailable(
            f"vault gave an unexpected answer to {operation} of {where}: {type(exc).__name__}",
            retry_after_seconds=RETRY_AFTER_SECONDS,
        ) from exc


_TIME = re.compile(r"^(?P<base>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?P<frac>\.\d+)?(?P<tz>Z|[+-]\d\d:\d\d)$")


def _parse_time(text: object) -> datetime | None:
    """Parse Vault's RFC 3339 timestamps (nanoseconds allowed); empty -> None."""
    if not isinstance(text, str) or not text:
        return None
    match = _TIME.match(text)
    if match is None:
        return None
    frac = (match["frac"] or "")[:7]
    tz = "+00:00" if match["tz"] == "Z" else match["tz"]
    return datetime.fromisoformat(match["base"] + frac + tz)


def _is_deleted(meta: Mapping[str, Any]) -> bool:
    deleted_at = _parse_time(meta.get("deletion_time"))
    return deleted_at is not None and deleted_at <= datetime.now(UTC)


def _to_secret_map(raw: Mapping[str, Any]) -> dict[str, SecretStr]:
    return {str(k): SecretStr(v if isinstance(v, str) else json.dumps(v)) for k, v in raw.items()}


def _plain(data: Mapping[str, SecretStr]) -> dict[str, str]:
    return {k: v.get_secret_value() for k, v in data.items()}


def _key_hash(idempotency_key: str) -> str:
    return hashlib.sha256(idempotency_key.encode()).hexdigest()[:12]


def _version_number(version: str) -> int:
    if not version.isdigit() or int(version) < 1:
        raise SecretNotFound(f"vault: {version!r} is not a KV v2 version number")
    return int(version)


class _TokenKeeper:
    """Holds the broker's Vault token: lazy login, renewal or re-login before expiry, thread-safe."""

    def __init__(
        self,
        settings: VaultSettings,
        adapter: hvac.adapters.JSONAdapter,
        login_adapter: hvac.adapters.JSONAdapter,
        token_api: Any,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._adapter = adapter
        self._login_adapter = login_adapter
        self._token_api = token_api
        self._clock = clock
        self._lock = threading.RLock()
        self._ready = False
        self._expires_at: float | None = None
        self._ttl_seconds = 0.0
        self._renewable = False
        self._accessor: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._can_login = settings.auth_method != "token"

    @property
    def accessor(self) -> str | None:
        """Accessor of the token in use (not a secret; names the token in Vault's audit log)."""
        return self._accessor

    def _margin_seconds(self) -> float:
        return min(self._settings.token_renew_before_seconds, self._ttl_seconds / 2)

    def _due(self) -> bool:
        return self._expires_at is not None and self._clock() >= self._expires_at - self._margin_seconds()

    def ensure(self) -> None:
        """Make sure a live token is installed; log in, renew or re-login as needed."""
        if self._ready and not self._due():
            return
        with self._lock:
            if not self._ready:
                self._login()
                self._start_renewer()
            elif self._due():
                self._refresh()

    def _set_lease(self, ttl_seconds: float, renewable: bool) -> None:
        self._renewable = renewable
        if ttl_seconds <= 0:
            self._expires_at = None
            self._ttl_seconds = 0.0
        else:
            self._expires_at = self._clock() + ttl_seconds
            self._ttl_seconds = max(self._ttl_seconds, ttl_seconds)

    def _login(self) -> None:
        s = self._settings
        if s.auth_method == "token":
            if s.token is None:
                raise ConfigError("vault.auth_method=token needs vault.token or vault.token_file")
            self._adapter.token = s.token.get_secret_value()
            with _translated("token lookup", "auth/token/lookup-self"):
                info = self._token_api.lookup_self()["data"]
            self._ttl_seconds = 0.0
            self._set_lease(float(info.get("ttl") or 0), bool(info.get("renewable")))
            self._accessor = info.get("accessor")
            self._ready = True
            _log.info("vault_token_loaded", auth_method="token", ttl_seconds=info.get("ttl"))
            return
        if s.auth_method == "approle":
            if not s.role_id or s.secret_id is None:
                raise ConfigError("vault.auth_method=approle needs vault.role_id and vault.secret_id(_file)")
            mount = s.approle_mount
            body = {"role_id": s.role_id, "secret_id": s.secret_id.get_secret_value()}
        else:
            if not s.kubernetes_role:
                raise ConfigError("vault.auth_method=kubernetes needs vault.kubernetes_role")
            mount = s.kubernetes_mount
            try:
                jwt = s.kubernetes_jwt_path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise StoreAccessDenied(
                    f"vault: cannot read the service-account token at {s.kubernetes_jwt_path}: {exc.strerror}"
                ) from None
            body = {"role": s.kubernetes_role, "jwt": jwt}
        where = f"auth/{mount}/login"
        with _translated("login", where, login=True):
            auth = self._login_adapter.post(f"/v1/{where}", json=body)["auth"]
        self._adapter.token = auth["client_token"]
        self._accessor = auth.get("accessor")
        self._ttl_seconds = 0.0
        self._set_lease(float(auth.get("lease_duration") or 0), bool(auth.get("renewable")))
        self._ready = True
        _log.info("vault_login", auth_method=s.auth_method, mount=mount, ttl_seconds=auth.get("lease_duration"))

    def _refresh(self) -> None:
        if self._renewable:
            try:
                with _translated("token renewal", "auth/token/renew-self"):
                    auth = self._token_api.renew_self()["auth"]
            except BrokerError as exc:
                if not self._can_login:
                    raise
                _log.warning("vault_renew_failed", code=exc.code)
                self._login()
                return
            lease = float(auth.get("lease_duration") or 0)
            capped = 0 < lease <= self._margin_seconds()  # the token reached its max TTL
            if capped and self._can_login:
                self._login()
                return
            self._set_lease(lease, bool(auth.get("renewable")) and not capped)
            _log.debug("vault_token_renewed", ttl_seconds=lease)
        elif self._can_login:
            self._login()
        else:
            # A non-renewable token cannot be helped; calls will fail with STORE_ACCESS_DENIED.
            _log.warning("vault_token_expiring_not_renewable")
            self._expires_at = None

    def _start_renewer(self) -> None:
        if self._thread is not None or self._stop.is_set():
            return
        self._thread = threading.Thread(target=self._run, name="vault-token-renewer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        backoff = 0.0
        while True:
            if backoff:
                wait = backoff
            elif self._expires_at is None:
                wait = 30.0
            else:
                wait = max(0.05, self._expires_at - self._margin_seconds() - self._clock())
            if self._stop.wait(wait):
                return
            try:
                self.ensure()
                backoff = 0.0
            except BrokerError as exc:
                backoff = min(max(backoff * 2, 0.5), 10.0)
                _log.warning("vault_token_refresh_failed", code=exc.code, retry_in_seconds=backoff)

    def close(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)


class _Response:
    """The part of a ``requests.Response`` hvac reads."""

    __slots__ = ("content", "headers", "reason", "status_code", "url")

    def __init__(self, answer: wire.Answer, url: str) -> None:
        self.status_code = answer.status
        self.reason = answer.reason
        self.headers = answer.headers
        self.content = answer.content
        self.url = url

    @property
    def ok(self) -> bool:
        return self.status_code < 400

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


class _Http:
    """The part of a ``requests.Session`` hvac uses, on a ``broker.wire.Pool`` (module docstring)."""

    cert = None
    proxies: dict[str, str] = {}  # noqa: RUF012 - read by hvac, never changed

    def __init__(self, verify: bool | str) -> None:
        self.verify = verify
        tls = ssl.create_default_context(cafile=verify if isinstance(verify, str) else certifi.where())
        self._pool = wire.Pool(tls, max_idle_per_origin=_POOL_CONNECTIONS)

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        allow_redirects: bool = True,
        timeout: float | None = None,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        data: Any = None,
        **_settled: Any,  # cert / verify / proxies: fixed in __init__
    ) -> _Response:
        sent = dict(headers or {})
        body: bytes | None = None
        if json is not None:
            body = _json_bytes(json)
            sent["Content-Type"] = "application/json"
        elif data is not None:
            body = data if isinstance(data, bytes) else str(data).encode()
        if params:
            url = f"{url}{'&' if '?' in url else '?'}{urllib.parse.urlencode(params, doseq=True)}"
        method = method.upper()
        for hop in range(_MAX_REDIRECTS + 1):
            response = self._send(method, url, sent, body, timeout)
            location = response.headers.get("location")
            if not allow_redirects or response.status_code not in _REDIRECTS or not location or hop == _MAX_REDIRECTS:
                return response
            url = urllib.parse.urljoin(url, location)
            if response.status_code in (301, 302, 303) and method != "HEAD":
                method, body = "GET", None
                sent.pop("Content-Type", None)
        raise AssertionError("unreachable")

    def _send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, timeout: float | None
    ) -> _Response:
        answer = self._pool.send(
            method, url, headers.items(), body, connect_timeout=timeout, read_timeout=timeout, write_timeout=timeout
        )
        return _Response(answer, url)

    def close(self) -> None:
        self._pool.close()


_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


class _Hints:
    """What this process last learned about paths; it only ever shapes compare-and-swap writes.

    * ``versions``: per path, one version this process wrote or read, a keyed
      digest of its value (versions are immutable, so this stays true) and
      when it was seen (a version seen moments ago need not be looked up
      before a stage points at it).
    * ``records``: per path, the stage record (its KV version and pointers) as
      last read or written here; possibly stale, so it is only the ``cas`` of
      the next stage write, which Vault refuses if the record moved.
    * ``absent``: paths a metadata or latest-data read found empty moments ago;
      taken once, by the next create.

    Thread-safe through single dict operations; each map is cleared when it
    reaches ``_MAX_HINTS`` entries.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._key = os.urandom(32)
        self._clock = clock
        self.versions: dict[str, tuple[int, bytes, float]] = {}
        self.records: dict[str, tuple[int, dict[Stage, str]]] = {}
        self._absent: dict[str, float] = {}

    def digest(self, data: Mapping[str, str]) -> bytes:
        body = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.blake2b(body, key=self._key, digest_size=16).digest()

    def saw_version(self, path: str, version: int, data: Mapping[str, str]) -> None:
        _bounded(self.versions)[path] = (version, self.digest(data), self._clock())
        self._absent.pop(path, None)

    def holds(self, path: str, version: int, data: Mapping[str, str]) -> bool | None:
        """Whether ``version`` of ``path`` holds ``data``; None if not known."""
        known = self.versions.get(path)
        if known is None or known[0] != version:
            return None
        return known[1] == self.digest(data)

    def exists_recently(self, path: str, version: int) -> bool:
        known = self.versions.get(path)
        return known is not None and known[0] == version and self._clock() - known[2] < _RECENT_SECONDS

    def saw_record(self, path: str, version: int, stages: Mapping[Stage, str]) -> None:
        _bounded(self.records)[path] = (version, dict(stages))

    def saw_absent(self, path: str) -> None:
        _bounded(self._absent)[path] = self._clock()
        self.versions.pop(path, None)

    def take_absent(self, path: str) -> bool:
        seen = self._absent.pop(path, None)
        return seen is not None and self._clock() - seen < _RECENT_SECONDS


def _bounded(hints: dict[str, Any]) -> dict[str, Any]:
    if len(hints) >= _MAX_HINTS:
        hints.clear()
    return hints


class VaultStore:
    """Versioned secrets in a Vault / OpenBao KV v2 mount (see the module docstring)."""

    backend = BACKEND

    def __init__(
        self, settings: VaultSettings, store_settings: StoreSettings, *, metrics: Metrics | None = None
    ) -> None:
        if settings.auth_method == "approle" and (not settings.role_id or settings.secret_id is None):
            raise ConfigError("vault.auth_method=approle needs vault.role_id and vault.secret_id(_file)")
        if settings.auth_method == "kubernetes" and not settings.kubernetes_role:
            raise ConfigError("vault.auth_method=kubernetes needs vault.kubernetes_role")
        if settings.auth_method == "token" and settings.token is None:
            raise ConfigError("vault.auth_method=token needs vault.token or vault.token_file")
        self._settings = settings
        self._store_settings = store_settings
        self._metrics = metrics
        self._mount = settings.kv_mount.strip("/")
        self._stage_prefix = settings.stage_record_prefix.strip("/")
        verify: bool | str = str(settings.ca_bundle_path) if settings.ca_bundle_path else True
        session = _Http(verify)
        self._session = session

        def adapter() -> hvac.adapters.JSONAdapter:
            return hvac.adapters.JSONAdapter(
                base_uri=settings.url,
                token=None,
                cert=None,
                verify=verify,
                timeout=settings.timeout_seconds,
                proxies=None,
                session=session,
                namespace=settings.namespace,
            )

        # hvac.Client gets an adapter built only from settings (token None, cert None), so none of
        # its fallbacks (VAULT_TOKEN, ~/.vault-token, VAULT_CLIENT_CERT, VAULT_CACERT) can apply.
        main_adapter = adapter()
        self._client = hvac.Client(
            url=settings.url,
            token="",
            verify=verify,
            timeout=settings.timeout_seconds,
            namespace=settings.namespace,
            session=session,
            adapter=lambda **_ignored: main_adapter,
        )
        self._kv = self._client.secrets.kv.v2
        self._hints = _Hints()
        self._tokens = _TokenKeeper(settings, self._client.adapter, adapter(), self._client.auth.token)

    # -- helpers ------------------------------------------------------------------------------

    @property
    def token_accessor(self) -> str | None:
        """Accessor of the broker's current Vault token (for audits and tests; not a secret)."""
        return self._tokens.accessor

    def _check_path(self, path: str) -> str:
        clean = path.strip("/")
        parts = clean.split("/")
        if not clean or any(p in ("", ".", "..") for p in parts):
            raise InvalidInput(f"vault: invalid secret path {path!r}")
        if clean == self._stage_prefix or clean.startswith(self._stage_prefix + "/"):
            raise InvalidInput(f"vault: paths under {self._stage_prefix!r} are reserved for stage records")
        return clean

    def _stage_path(self, path: str) -> str:
        return f"{self._stage_prefix}/{path}"

    def _where(self, path: str, version: int | None = None) -> str:
        suffix = f" version {version}" if version is not None else ""
        return f"{self._mount}/{path}{suffix}"

    def _metadata(self, path: str) -> dict[str, Any] | None:
        """GET {mount}/metadata/{path}; None when the secret does not exist."""
        try:
            with _translated("metadata read", self._where(path)):
                data: dict[str, Any] = self._kv.read_secret_metadata(path=path, mount_point=self._mount)["data"]
                return data
        except SecretNotFound:
            return None

    def _read_version(self, path: str, version: int | None) -> tuple[int, dict[str, Any], dict[str, Any]]:
        """GET {mount}/data/{path}?version=N -> (version, data, metadata); deleted/destroyed -> SecretNotFound."""
        where = self._where(path, version)
        try:
            with _translated("read", where):
                body = self._kv.read_secret_version(
                    path=path, version=version, mount_point=self._mount, raise_on_deleted_version=False
                )
        except SecretNotFound as exc:
            cause = exc.__cause__
            meta = _deleted_metadata(cause)
            if meta is None and version is None:
                self._hints.saw_absent(path)
            if meta is not None and meta.get("destroyed"):
                raise SecretNotFound(f"vault: {where} is destroyed (its data is gone for good)") from cause
            if meta is not None and _is_deleted(meta):
                raise SecretNotFound(f"vault: {where} is deleted (undelete it to read it)") from cause
            raise
        payload = body.get("data") or {}
        meta = payload.get("metadata") or {}
        number = int(meta.get("version") or version or 0)
        if meta.get("destroyed"):
            raise SecretNotFound(f"vault: {self._where(path, number)} is destroyed (its data is gone for good)")
        if payload.get("data") is None or _is_deleted(meta):
            raise SecretNotFound(f"vault: {self._where(path, number)} is deleted (undelete it to read it)")
        return number, payload["data"], meta

    def _stage_record(self, path: str) -> tuple[int, dict[Stage, str]]:
        """The stage record of ``path``: (its KV version, 0 if none; stage -> version)."""
        record_path = self._stage_path(path)
        try:
            with _translated("stage read", self._where(record_path)):
                body = self._kv.read_secret_version(
                    path=record_path, mount_point=self._mount, raise_on_deleted_version=False
                )
        except SecretNotFound:
            self._hints.saw_record(path, 0, {})
            return 0, {}
        payload = body.get("data") or {}
        meta = payload.get("metadata") or {}
        raw = payload.get("data") or {}
        stages = {stage: str(raw[stage.value]) for stage in Stage if raw.get(stage.value)}
        record_version = int(meta.get("version") or 0)
        self._hints.saw_record(path, record_version, stages)
        return record_version, stages

    def _ensure_metadata(self, path: str) -> None:
        """POST {mount}/metadata/{path}: owner, max_versions and cas_required on a secret the broker creates."""
        with _translated("metadata write", self._where(path)):
            self._kv.update_metadata(
                path=path,
                max_versions=self._store_settings.max_versions,
                cas_required=True,
                mount_point=self._mount,
                custom_metadata={"owner": self._store_settings.owner, "managed-by": "mspc-broker"},
            )

    # -- SecretStore ----------------------------------------------------------------------------

    def read(self, path: str, *, version: str | None = None, stage: Stage | None = None) -> SecretValue:
        """GET {mount}/data/{path} by version, by stage (via the stage record), else current or latest."""
        with observed(self._metrics, BACKEND, "read"):
            path = self._check_path(path)
            self._tokens.ensure()
            number: int | None = _version_number(version) if version is not None else None
            _, stages = self._stage_record(path)
            if number is None and stage is not None:
                if stage not in stages:
                    raise SecretNotFound(f"vault: stage {stage.value} of {self._where(path)} is not set")
                number = int(stages[stage])
            elif number is None and Stage.CURRENT in stages:
                number = int(stages[Stage.CURRENT])
            got, data, meta = self._read_version(path, number)
            self._hints.saw_version(path, got, _plain(_to_secret_map(data)))
            _log.debug("store_read", backend=BACKEND, path=path, version=got)
            return SecretValue(
                path=path,
                version=str(got),
                data=_to_secret_map(data),
                created_at=_parse_time(meta.get("created_time")),
                stages=frozenset(s for s, v in stages.items() if v == str(got)),
            )

    def describe(self, path: str) -> SecretInfo:
        """GET {mount}/metadata/{path} and the stage record; no values."""
        with observed(self._metrics, BACKEND, "describe"):
            path = self._check_path(path)
            self._tokens.ensure()
            meta = self._metadata(path)
            if meta is None:
                self._hints.saw_absent(path)
                raise SecretNotFound(f"vault: no secret at {self._where(path)}")
            _, stages = self._stage_record(path)
            versions = []
            for key in sorted((meta.get("versions") or {}), key=int):
                info = meta["versions"][key]
                versions.append(
                    VersionInfo(
                        version=str(key),
                        created_at=_parse_time(info.get("created_time")),
                        stages=frozenset(s for s, v in stages.items() if v == str(key)),
                        deleted=_is_deleted(info),
                        destroyed=bool(info.get("destroyed")),
                    )
                )
            latest = int(meta.get("current_version") or 0)
            owner = (meta.get("custom_metadata") or {}).get("owner")
            return SecretInfo(
                path=path,
                versions=tuple(versions),
                stages=stages,
                latest_version=str(latest) if latest else None,
                owner=owner,
            )

    def write(
        self,
        path: str,
        data: Mapping[str, SecretStr],
        *,
        expected_latest: str | None,
        idempotency_key: str,
    ) -> WriteResult:
        """POST {mount}/data/{path} with cas=expected_latest (0 = must not exist); see the module docstring."""
        with observed(self._metrics, BACKEND, "write"):
            path = self._check_path(path)
            if not data or not all(isinstance(k, str) and k for k in data):
                raise InvalidInput("vault: a secret needs at least one non-empty field name")
            wanted = _plain(data)
            try:
                expected = _version_number(expected_latest) if expected_latest is not None else 0
            except SecretNotFound:
                raise Conflict(f"vault: {expected_latest!r} is not a version of {self._where(path)}") from None
            log = _log.bind(
                backend=BACKEND, path=path, expected_latest=expected, idempotency_hash=_key_hash(idempotency_key)
            )
            self._tokens.ensure()
            if self._hinted_new(path, expected, wanted):
                # Known: version `expected` holds another value, or nothing is here (a create). Either way
                # the CAS write is the whole decision; if it loses, the full rules below decide.
                with contextlib.suppress(Conflict):
                    if expected == 0:
                        self._ensure_metadata(path)
                    return self._append(path, expected, wanted, log)
            meta = self._metadata(path)
            latest = int(meta.get("current_version") or 0) if meta else 0
            if latest == expected:
                if latest and self._value_equals(path, latest, wanted):
                    log.info("store_write_unchanged", version=latest)
                    return WriteResult(version=str(latest), created=False)
                if meta is None:
                    self._ensure_metadata(path)
                with contextlib.suppress(Conflict):  # somebody took the slot meanwhile: decide below like a retry
                    return self._append(path, expected, wanted, log)
            slot = expected + 1
            if self._value_equals(path, slot, wanted):
                self._hints.saw_version(path, slot, wanted)
                log.info("store_write_replayed", version=slot)
                return WriteResult(version=str(slot), created=False)
            log.info("store_write_conflict", latest_version=latest)
            raise Conflict(
                f"vault: {self._where(path)} is not at version {expected_latest or 'none'} any more; re-read and retry"
            )

    def _hinted_new(self, path: str, expected: int, wanted: Mapping[str, str]) -> bool:
        """True if the hints show this write cannot be a no-op: version ``expected`` holds another value,
        or (``expected`` 0) the path was found empty just now."""
        if expected == 0:
            return self._hints.take_absent(path)
        return self._hints.holds(path, expected, wanted) is False

    def _append(self, path: str, expected: int, wanted: dict[str, str], log: Any) -> WriteResult:
        """POST {mount}/data/{path} with cas=expected; ``Conflict`` if the slot is taken."""
        with _translated("write", self._where(path), sensitive=True):
            body = self._kv.create_or_update_secret(path=path, secret=wanted, cas=expected, mount_point=self._mount)
        version = int(body["data"]["version"])
        self._hints.saw_version(path, version, wanted)
        if expected == 0:
            self._hints.records.setdefault(path, (0, {}))  # a guess (a record may outlive its secret); CAS checks it
        log.info("store_write", version=version)
        return WriteResult(version=str(version), created=True)

    def _value_equals(self, path: str, version: int, wanted: Mapping[str, str]) -> bool:
        try:
            _, data, _ = self._read_version(path, version)
        except SecretNotFound:
            return False
        plain = _plain(_to_secret_map(data))
        self._hints.saw_version(path, version, plain)
        return plain == wanted

    def move_stage(self, path: str, stage: Stage, version: str | None, *, expected: str | None) -> None:
        """POST {mount}/data/<stage_record_prefix>/{path} with cas = the record version read.

        The record as this process last read or wrote it is tried first (no
        read); if Vault refuses that ``cas``, or that copy does not show
        ``expected``, the record is read and the move decided on it.
        """
        with observed(self._metrics, BACKEND, "move_stage"):
            path = self._check_path(path)
            stage = Stage(stage)
            number = _version_number(version) if version is not None else None
            self._tokens.ensure()
            hinted = self._hints.records.get(path)
            if hinted is not None and hinted[1].get(stage) == expected and version != expected:
                with contextlib.suppress(Conflict, SecretNotFound):  # decided afresh below
                    self._write_stages(path, stage, number, expected, *hinted)
                    return
            record_version, stages = self._stage_record(path)
            now = stages.get(stage)
            if now != expected:
                raise Conflict(
                    f"vault: stage {stage.value} of {self._where(path)} is at {now or 'unset'}, "
                    f"not {expected or 'unset'}"
                )
            if version == expected:
                return
            self._write_stages(path, stage, number, expected, record_version, stages)

    def _write_stages(
        self,
        path: str,
        stage: Stage,
        number: int | None,
        expected: str | None,
        record_version: int,
        stages: Mapping[Stage, str],
    ) -> None:
        """Write the stage record with ``stage`` moved (CAS on ``record_version``); ``Conflict`` if it moved."""
        if number is not None and not self._hints.exists_recently(path, number):
            meta = self._metadata(path)
            info = ((meta or {}).get("versions") or {}).get(str(number))
            if info is None:
                raise SecretNotFound(f"vault: {self._where(path, number)} does not exist")
            if info.get("destroyed") or _is_deleted(info):
                raise SecretNotFound(f"vault: {self._where(path, number)} is deleted or destroyed")
        new = dict(stages)
        new.pop(stage, None)
        if number is not None:
            new[stage] = str(number)
        if stage is Stage.CURRENT:
            new.pop(Stage.PREVIOUS, None)
            if expected is not None:
                new[Stage.PREVIOUS] = expected
        self._put_record(path, record_version, new)
        _log.info(
            "store_stage_moved",
            backend=BACKEND,
            path=path,
            stage=stage.value,
            to_version=str(number) if number is not None else None,
            from_version=expected,
        )

    def _put_record(self, path: str, record_version: int, stages: dict[Stage, str]) -> None:
        """POST the stage record of ``path`` with cas=record_version; ``Conflict`` if it moved meanwhile."""
        record_path = self._stage_path(path)
        if record_version == 0:
            self._ensure_metadata(record_path)  # the record path is the broker's own: same values every time
        try:
            with _translated("stage write", self._where(record_path)):
                body = self._kv.create_or_update_secret(
                    path=record_path,
                    secret={s.value: v for s, v in stages.items()},
                    cas=record_version,
                    mount_point=self._mount,
                )
        except Conflict:
            self._hints.records.pop(path, None)
            raise
        self._hints.saw_record(path, int(body["data"]["version"]), stages)

    def read_latest(self, path: str) -> SecretValue:
        """GET {mount}/data/{path}: the newest version, no stage lookup (``stages`` empty)."""
        with observed(self._metrics, BACKEND, "read"):
            path = self._check_path(path)
            self._tokens.ensure()
            got, data, meta = self._read_version(path, None)
            self._hints.saw_version(path, got, _plain(_to_secret_map(data)))
            return SecretValue(
                path=path,
                version=str(got),
                data=_to_secret_map(data),
                created_at=_parse_time(meta.get("created_time")),
            )

    def promote(self, path: str, version: str, *, expected_current: str | None) -> None:
        """One stage-record write (CAS): current -> ``version``, previous -> old current, pending unset."""
        with observed(self._metrics, BACKEND, "promote"):
            path = self._check_path(path)
            number = str(_version_number(version))
            self._tokens.ensure()

            def promoted(stages: Mapping[Stage, str]) -> dict[Stage, str] | None:
                if stages.get(Stage.PENDING) != number or stages.get(Stage.CURRENT) != expected_current:
                    return None
                new: dict[Stage, str] = {s: v for s, v in stages.items() if s not in (Stage.PENDING, Stage.PREVIOUS)}
                new[Stage.CURRENT] = number
                if expected_current is not None:
                    new[Stage.PREVIOUS] = expected_current
                return new

            hinted = self._hints.records.get(path)
            new = promoted(hinted[1]) if hinted is not None else None
            if hinted is not None and new is not None:
                with contextlib.suppress(Conflict):  # decided afresh below
                    self._put_record(path, hinted[0], new)
                    _log.info(
                        "store_promoted", backend=BACKEND, path=path, to_version=number, from_version=expected_current
                    )
                    return
            record_version, stages = self._stage_record(path)
            new = promoted(stages)
            if new is None:
                raise Conflict(
                    f"vault: {self._where(path)} has current {stages.get(Stage.CURRENT) or 'unset'} and pending "
                    f"{stages.get(Stage.PENDING) or 'unset'}, not {expected_current or 'unset'} and {number}"
                )
            self._put_record(path, record_version, new)
            _log.info("store_promoted", backend=BACKEND, path=path, to_version=number, from_version=expected_current)

    def health(self) -> None:
        """GET auth/token/lookup-self with the broker's token (after login / renewal)."""
        with observed(self._metrics, BACKEND, "health"):
            self._tokens.ensure()
            with _translated("health", "auth/token/lookup-self"):
                self._client.auth.token.lookup_self()

    def close(self) -> None:
        """Stop the renewer thread and close the HTTP session."""
        self._tokens.close()
        self._session.close()


def _deleted_metadata(exc: BaseException | None) -> dict[str, Any] | None:
    """The version metadata Vault returns with a 404 for a deleted / destroyed version, if any."""
    body = getattr(exc, "json", None)
    if not isinstance(body, dict):
        return None
    meta = (body.get("data") or {}).get("metadata")
    return meta if isinstance(meta, dict) else None
