"""Audit records: the action vocabulary, the event value object, keys, and sealing.

Pure functions and value objects (no I/O). A record is one JSON object,
serialised canonically (sorted keys, no spaces, UTF-8) on one line:

- ``hash`` is SHA-256 over the canonical serialisation of the record
  without ``hash``; ``prev`` is the ``hash`` of the record before it (the
  first record of a chain has ``prev`` = 64 zeros), and ``seq`` counts from 0.
- secrets never appear: each entry of ``AuditEvent.secrets`` becomes a
  ``details["<name>_hmac"]`` field, HMAC-SHA256 under a key derived from the
  audit key.
- ``audit.checkpoint`` records also carry ``key_id`` and ``mac``:
  HMAC-SHA256 (under another derived key) over the record without ``hash``
  and ``mac``. Since ``prev`` commits to every earlier record, somebody who
  edits the file and recomputes every hash still cannot produce valid
  checkpoint MACs without the key.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import re
import secrets as _secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum, StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeAlias

from pydantic import SecretBytes, SecretStr

from broker.errors import ConfigError
from broker.jsonenc import encoder
from broker.models import IntegrationRef, IssuedToken, Principal, validate_identifier
from broker.settings import AuditSettings

SCHEMA_VERSION = 1
GENESIS_HASH = "0" * 64
MIN_KEY_BYTES = 32
TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"

Scalar: TypeAlias = str | int | float | bool | None
DetailValue: TypeAlias = Scalar | list[Scalar] | tuple[Scalar, ...]
SecretValue: TypeAlias = SecretStr | SecretBytes | str | bytes


class AuditAction(StrEnum):
    """Every kind of security-relevant event (the ``action`` field)."""

    TOKEN_ISSUED = "token.issued"  # noqa: S105 - an action name, not a password
    TOKEN_DENIED = "token.denied"  # noqa: S105
    AUTH_FAILED = "auth.failed"
    ADMIN_ACTION = "admin.action"
    PROVISION_STEP = "provision.step"
    ROTATION_STEP = "rotation.step"
    ROLLBACK_STEP = "rollback.step"
    REVOKE_STEP = "revoke.step"
    VENDOR_KEY_VERSION_CHANGED = "vendor_key.version_changed"
    ORPHAN_DETECTED = "orphan.detected"
    POLICY_RELOADED = "policy.reloaded"
    BROKER_STARTED = "broker.started"
    BROKER_STOPPED = "broker.stopped"
    AUDIT_CHECKPOINT = "audit.checkpoint"
    AUDIT_RECOVERED = "audit.recovered"


# Written by the audit log itself, never through ``AuditLog.record``.
INTERNAL_ACTIONS = frozenset({AuditAction.AUDIT_CHECKPOINT, AuditAction.AUDIT_RECOVERED})
STEP_ACTIONS = frozenset(
    {AuditAction.PROVISION_STEP, AuditAction.ROTATION_STEP, AuditAction.ROLLBACK_STEP, AuditAction.REVOKE_STEP}
)


# details every record of these actions must carry (the schema says the same).
REQUIRED_DETAILS: Mapping[AuditAction, frozenset[str]] = MappingProxyType(
    {
        AuditAction.TOKEN_ISSUED: frozenset(
            {"vendor_key_version", "partner_key_version", "lease_id", "ttl_seconds", "stale"}
        ),
        AuditAction.TOKEN_DENIED: frozenset({"error_code"}),
        AuditAction.ADMIN_ACTION: frozenset({"operation"}),
        AuditAction.VENDOR_KEY_VERSION_CHANGED: frozenset({"new_version"}),
        **{action: frozenset({"step"}) for action in STEP_ACTIONS},
    }
)


class AuditOutcome(StrEnum):
    """How it ended: ``denied`` = refused by policy; ``failure`` = attempted and
    failed for an expected reason (bad credential, upstream refusal);
    ``error`` = an internal or unexpected error."""

    SUCCESS = "success"
    DENIED = "denied"
    FAILURE = "failure"
    ERROR = "error"


_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
# A details key that names a secret (rather than describing one) is refused:
# secrets go through ``secrets=`` and become ``<name>_hmac``.
_SECRET_NAME = re.compile(r"(secret|token|password|passwd|authorization|api_?key|partner_?key|vendor_?key|credential)")
_DESCRIBES = re.compile(r"(_version|_versions|_hash|_hmac|_id|_ids|_path|_seconds|_type|_count|_stage|_at)$")


# json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False), its encoder
# built once. Records are trees of JSON values: no circular-reference bookkeeping.
_ENCODE = encoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, check_circular=False)
_ENCODE_STRING = json.encoder.encode_basestring


def canonical(obj: Mapping[str, Any]) -> bytes:
    """The canonical serialisation hashed and written: sorted keys, no spaces, UTF-8."""
    return _ENCODE(obj).encode()


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) over the canonical form of ``record`` without its ``hash`` field."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def format_ts(moment: datetime) -> str:
    """Fixed-width UTC timestamp, so string order is time order."""
    return moment.astimezone(UTC).strftime(TS_FORMAT)


_TOKEN_HMACS = 1024  # token HMACs remembered per key (forgotten all at once when full)
_PRINCIPAL_VIEWS = 1024  # serialised principals remembered (likewise)


def _secret_bytes(value: SecretValue) -> bytes:
    if isinstance(value, SecretStr):
        return value.get_secret_value().encode()
    if isinstance(value, SecretBytes):
        return value.get_secret_value()
    if isinstance(value, str):
        return value.encode()
    return bytes(value)


class AuditKey:
    """The audit key and the keys derived from it (its value never leaves this object).

    ``hmac_hex`` fingerprints secrets for records and lookups; checkpoint MACs
    use a separately derived key; ``key_id`` names the key without revealing it.
    """

    __slots__ = ("_checkpoint_key", "_secret_key", "_token_hmacs", "ephemeral", "key_id")

    def __init__(self, material: bytes, *, ephemeral: bool = False) -> None:
        if len(material) < MIN_KEY_BYTES:
            raise ConfigError(f"the audit HMAC key must be at least {MIN_KEY_BYTES} bytes")
        self._secret_key = hmac.new(material, b"mspc-broker audit v1 secret-hmac", hashlib.sha256).digest()
        self._checkpoint_key = hmac.new(material, b"mspc-broker audit v1 checkpoint-mac", hashlib.sha256).digest()
        self.key_id = hmac.new(material, b"mspc-broker audit v1 key-id", hashlib.sha256).hexdigest()[:16]
        self.ephemeral = ephemeral
        self._token_hmacs: dict[str, str] = {}

    @classmethod
    def from_settings(cls, settings: AuditSettings) -> AuditKey:
        """The configured key; without one, ``ConfigError`` unless ``allow_ephemeral_key`` (dev only)."""
        key = cls.from_settings_optional(settings)
        if key is not None:
            return key
        if settings.allow_ephemeral_key:
            return cls(_secrets.token_bytes(MIN_KEY_BYTES), ephemeral=True)
        raise ConfigError(
            "no audit HMAC key: set BROKER_AUDIT__HMAC_KEY_FILE (or BROKER_AUDIT__HMAC_KEY); "
            "for local development only, BROKER_AUDIT__ALLOW_EPHEMERAL_KEY=true"
        )

    @classmethod
    def from_settings_optional(cls, settings: AuditSettings) -> AuditKey | None:
        """The configured key, or None when none is configured (tools that can work without it)."""
        if settings.hmac_key is None:
            return None
        return cls(settings.hmac_key.get_secret_value().encode())

    @classmethod
    def from_file(cls, path: Path) -> AuditKey:
        """The key in a file (as ``hmac_key_file``: UTF-8, trailing newline stripped)."""
        try:
            text = path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"cannot read the audit key file {path}: {exc.strerror}") from None
        return cls(text.encode())

    def hmac_hex(self, value: SecretValue) -> str:
        """HMAC-SHA256 (hex) of a secret value, as stored in ``<name>_hmac`` fields."""
        return hmac.digest(self._secret_key, _secret_bytes(value), "sha256").hex()

    def token_hmac_hex(self, token: SecretStr) -> str:
        """``hmac_hex`` of an MSPC_TOKEN, remembered for the last ``_TOKEN_HMACS`` distinct tokens.

        An integration's token is the same string until one of its keys
        rotates, so the HMAC of every token issued is computed once per key
        pair. The remembered tokens are what the key cache already holds in
        memory, in another form.
        """
        text = token.get_secret_value()
        digest = self._token_hmacs.get(text)
        if digest is None:
            if len(self._token_hmacs) >= _TOKEN_HMACS:
                self._token_hmacs.clear()
            digest = self._token_hmacs[text] = self.hmac_hex(token)
        return digest

    def checkpoint_mac(self, record: Mapping[str, Any]) -> str:
        """MAC of a checkpoint record: over its canonical form without ``hash`` and ``mac``."""
        body = {k: v for k, v in record.items() if k not in ("hash", "mac")}
        return hmac.new(self._checkpoint_key, canonical(body), hashlib.sha256).hexdigest()

    def mac_ok(self, record: Mapping[str, Any]) -> bool:
        """Whether a checkpoint record's ``mac`` is valid under this key."""
        mac = record.get("mac")
        return isinstance(mac, str) and hmac.compare_digest(mac, self.checkpoint_mac(record))

    def __repr__(self) -> str:
        return f"AuditKey(key_id={self.key_id!r}, ephemeral={self.ephemeral})"


_SCALARS = frozenset({str, int, float, bool, type(None)})  # exact types: a subclass (an Enum) takes _detail


def _detail(name: str, value: Any) -> DetailValue:
    if isinstance(value, (SecretStr, SecretBytes)):
        raise ValueError(f"details[{name!r}] is a secret: pass it in secrets= so it is stored as an HMAC")
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, datetime):
        return format_ts(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple, frozenset, set)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        out: list[Scalar] = []
        for item in items:
            scalar = item.value if isinstance(item, Enum) else item
            if not (scalar is None or isinstance(scalar, (str, int, float, bool))):
                raise TypeError(f"details[{name!r}] may hold only scalars")
            out.append(scalar)
        return out
    raise TypeError(f"details[{name!r}] must be a scalar or a list of scalars, not {type(value).__name__}")


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not _name_ok(name):
        raise ValueError(f"{kind} name {name!r} must match {_NAME.pattern}")


@functools.lru_cache(maxsize=1024)
def _name_ok(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


@functools.lru_cache(maxsize=1024)
def _names_secret(name: str) -> bool:
    """Whether a details key names a secret rather than describing one (names are few: cached)."""
    return _SECRET_NAME.search(name) is not None and _DESCRIBES.search(name) is None


@functools.lru_cache(maxsize=1024)
def _check_names(details: tuple[str, ...], secrets: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless these details and secrets names may go in a record.

    Events of one kind carry the same names again and again, so a set of
    names is checked once (a refusal is not cached: it raises every time).
    """
    for name in details:
        _check_name("details", name)
        if _names_secret(name):
            raise ValueError(f"details[{name!r}] names a secret: pass it in secrets= to store its HMAC")
    for name in secrets:
        _check_name("secrets", name)
        if f"{name}_hmac" in details:
            raise ValueError(f"details already has {name}_hmac")


def _principal_json(principal: Principal) -> tuple[bytes, bytes]:
    """The ``principal`` and ``subject`` members of a record, serialised; remembered per principal object.

    Principals come from the identity cache, one object per verified
    service-account token, so the same object signs many requests. The
    entry holds the object itself, so its id cannot be reused while cached.
    """
    entry = _PRINCIPAL_JSON.get(id(principal))
    if entry is None or entry[0] is not principal:
        if len(_PRINCIPAL_JSON) >= _PRINCIPAL_VIEWS:
            _PRINCIPAL_JSON.clear()
        entry = _PRINCIPAL_JSON[id(principal)] = (
            principal,
            canonical(_principal_view(principal)),
            _json(principal.subject),
        )
    return entry[1], entry[2]


_PRINCIPAL_JSON: dict[int, tuple[Principal, bytes, bytes]] = {}


def _principal_view(principal: Principal) -> dict[str, str | None]:
    """A record's ``principal`` member."""
    return {
        "namespace": principal.namespace,
        "service_account": principal.service_account,
        "pod_name": principal.pod_name,
        "pod_uid": principal.pod_uid,
        "issuer": principal.issuer,
    }


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One event to record, before the log gives it a place in the chain.

    ``details`` holds non-secret context (scalars or lists of scalars; a key
    naming a secret is refused). ``secrets`` maps a name to a secret value;
    each becomes ``details["<name>_hmac"]``.
    """

    action: AuditAction
    outcome: AuditOutcome
    principal: Principal | None = None
    ref: IntegrationRef | None = None
    rule_id: str | None = None
    reason: str | None = None
    request_id: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    secrets: Mapping[str, SecretValue] = field(default_factory=dict)
    vendor_id: str | None = None

    def __post_init__(self) -> None:
        if self.vendor_id is not None:
            if self.ref is not None and self.ref.vendor_id != self.vendor_id:
                raise ValueError("give ref or vendor_id, not two different vendors")
            validate_identifier("vendor_id", self.vendor_id)
        elif self.ref is not None:
            object.__setattr__(self, "vendor_id", self.ref.vendor_id)
        if type(self.action) is not AuditAction:
            object.__setattr__(self, "action", AuditAction(self.action))
        if type(self.outcome) is not AuditOutcome:
            object.__setattr__(self, "outcome", AuditOutcome(self.outcome))
        _check_names(tuple(self.details), tuple(self.secrets))
        details: dict[str, DetailValue] = {
            name: value if type(value) in _SCALARS else _detail(name, value) for name, value in self.details.items()
        }
        object.__setattr__(self, "details", MappingProxyType(details))
        object.__setattr__(self, "secrets", MappingProxyType(dict(self.secrets)))
        self._check_action_shape()

    def _check_action_shape(self) -> None:
        required = REQUIRED_DETAILS.get(self.action)
        if required is not None and not required.issubset(self.details):
            missing = required - set(self.details)
            raise ValueError(f"{self.action} records need details {sorted(missing)}")
        if self.action == AuditAction.TOKEN_ISSUED:
            if "token" not in self.secrets or self.principal is None or self.ref is None:
                raise ValueError("token.issued records need a principal, a ref and secrets={'token': ...}")
            if self.outcome != AuditOutcome.SUCCESS:
                raise ValueError("token.issued records have outcome success (refusals are token.denied)")
        elif self.action == AuditAction.TOKEN_DENIED:
            if self.principal is None or self.outcome == AuditOutcome.SUCCESS:
                raise ValueError("token.denied records need a principal and a non-success outcome")
        elif self.action in STEP_ACTIONS and self.ref is None:
            raise ValueError(f"{self.action} records need a ref")
        elif self.action == AuditAction.VENDOR_KEY_VERSION_CHANGED and self.vendor_id is None:
            raise ValueError("vendor_key.version_changed records need a vendor_id")

    def body(self, key: AuditKey) -> dict[str, Any]:
        """The record without its chain fields (``seq``, ``ts``, ``prev``, ``hash``)."""
        details: dict[str, Any] = dict(self.details)
        for name, value in self.secrets.items():
            details[f"{name}_hmac"] = key.hmac_hex(value)
        p = self.principal
        return {
            "v": SCHEMA_VERSION,
            "action": self.action.value,
            "outcome": self.outcome.value,
            "subject": p.subject if p else None,
            "principal": _principal_view(p) if p else None,
            "organization_id": self.ref.organization_id if self.ref else None,
            "vendor_id": self.vendor_id,
            "rule_id": self.rule_id,
            "reason": self.reason,
            "request_id": self.request_id,
            "details": details,
        }

    @classmethod
    def token_issued(
        cls,
        principal: Principal,
        ref: IntegrationRef,
        *,
        rule_id: str | None,
        token: SecretStr,
        vendor_key_version: str,
        partner_key_version: str,
        lease_id: str,
        ttl_seconds: int,
        stale: bool,
        request_id: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> AuditEvent:
        """An MSPC_TOKEN was handed out: who, for which pair, under which rule, and its lineage."""
        return cls(
            AuditAction.TOKEN_ISSUED,
            AuditOutcome.SUCCESS,
            principal=principal,
            ref=ref,
            rule_id=rule_id,
            request_id=request_id,
            details={
                **(details or {}),
                "vendor_key_version": vendor_key_version,
                "partner_key_version": partner_key_version,
                "lease_id": lease_id,
                "ttl_seconds": ttl_seconds,
                "stale": stale,
            },
            secrets={"token": token},
        )

    @classmethod
    def token_denied(
        cls,
        principal: Principal,
        ref: IntegrationRef | None,
        *,
        error_code: str,
        reason: str,
        rule_id: str | None = None,
        outcome: AuditOutcome = AuditOutcome.DENIED,
        request_id: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> AuditEvent:
        """A token request by an authenticated caller was refused (policy, backend, audit...)."""
        return cls(
            AuditAction.TOKEN_DENIED,
            outcome,
            principal=principal,
            ref=ref,
            rule_id=rule_id,
            reason=reason,
            request_id=request_id,
            details={**(details or {}), "error_code": error_code},
        )


def seal(body: Mapping[str, Any], *, seq: int, ts: str, prev: str) -> tuple[bytes, str]:
    """Give a record body its chain fields; return (the line to write, its hash).

    Equal to ``canonical(record) + b"\\n"`` with ``record["hash"] = record_hash(record)``
    (a test holds them equal), but serialises once: the members sorting
    before ``"hash"`` and those after it are serialised apart, hashed joined,
    and joined again around the ``"hash"`` member.
    """
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    for name, value in body.items():
        if name < "hash":
            before[name] = value
        elif name > "hash":
            after[name] = value
    after["seq"] = seq  # the chain's values win over any in body ("prev", "seq", "ts" all sort after "hash")
    after["ts"] = ts
    after["prev"] = prev
    head = canonical(before)[:-1]  # '{"action":...' without its "}" (just "{" if nothing sorts before "hash")
    tail = canonical(after)[1:]  # '"organization_id":...}' without its "{" (never empty: "prev", "seq", "ts")
    if len(head) > 1:
        head += b","
    return _sealed(head, tail)


def _sealed(head: bytes, tail: bytes) -> tuple[bytes, str]:
    """(the line, its hash) of a record cut where ``"hash"`` goes: the hash is over ``head + tail``."""
    digest = hashlib.sha256(head + tail).hexdigest()
    return b'%s"hash":"%s",%s\n' % (head, digest.encode(), tail), digest


@dataclass(frozen=True, slots=True)
class PreparedRecord:
    """A record serialised ahead of time, all but its chain fields: ``seal_prepared`` fills them in.

    ``head`` is the canonical object up to, not including, the ``"hash"``
    member (ending in ","), and the tail is cut where ``"prev"``, ``"seq"``
    and ``"ts"`` go. Only ``prepare_token_issued`` makes one.
    """

    head: bytes
    to_prev: bytes
    to_seq: bytes
    to_ts: bytes
    rest: bytes


def _json(value: Any) -> bytes:
    """One JSON value, canonical (as it appears inside ``canonical``'s output)."""
    if type(value) is str:
        return _ENCODE_STRING(value).encode()
    if value is None:
        return b"null"
    return _ENCODE(value).encode()


def prepare_token_issued(
    key: AuditKey, principal: Principal, ref: IntegrationRef, issued: IssuedToken, *, request_id: str | None
) -> PreparedRecord:
    """The ``token.issued`` record of ``issued``, serialised ahead, for the token hot path.

    ``seal_prepared`` of it is byte for byte ``seal`` of the body of
    ``AuditEvent.token_issued`` with the same values and
    ``details={"expires_at": <ISO 8601>}`` (a property test holds them
    equal). It skips the event object, the generic checks (its field names
    are fixed here) and half of the serialisation, which the writer would
    otherwise do for every token.
    """
    details = {
        "expires_at": issued.expires_at.isoformat(),
        "lease_id": issued.lease_id,
        "partner_key_version": issued.partner_key_version,
        "stale": issued.stale,
        "token_hmac": key.token_hmac_hex(issued.token),
        "ttl_seconds": issued.ttl_seconds,
        "vendor_key_version": issued.vendor_key_version,
    }
    view, subject = _principal_json(principal)
    return PreparedRecord(
        head=b'{"action":"token.issued","details":%s,' % canonical(details),
        to_prev=b'"organization_id":%s,"outcome":"success","prev":"' % _json(ref.organization_id),
        to_seq=b'","principal":%s,"reason":null,"request_id":%s,"rule_id":%s,"seq":'
        % (view, _json(request_id), _json(issued.rule_id)),
        to_ts=b',"subject":%s,"ts":"' % subject,
        rest=b'","v":%d,"vendor_id":%s}' % (SCHEMA_VERSION, _json(ref.vendor_id)),
    )


def seal_prepared(record: PreparedRecord, *, seq: int, ts: str, prev: str) -> tuple[bytes, str]:
    """``seal`` for a ``PreparedRecord``: (the line to write, its hash)."""
    r = record
    tail = b"%s%s%s%d%s%s%s" % (r.to_prev, prev.encode(), r.to_seq, seq, r.to_ts, ts.encode(), r.rest)
    return _sealed(r.head, tail)


def checkpoint_body(key: AuditKey, *, seq: int, ts: str, prev: str) -> dict[str, Any]:
    """A signed checkpoint: the running record count and the chain head, MAC-ed."""
    record: dict[str, Any] = AuditEvent(AuditAction.AUDIT_CHECKPOINT, AuditOutcome.SUCCESS).body(key)
    record["details"] = {"count": seq, "head": prev}
    record["key_id"] = key.key_id
    record.update(seq=seq, ts=ts, prev=prev)
    record["mac"] = key.checkpoint_mac(record)
    return record
