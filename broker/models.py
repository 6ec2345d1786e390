"""Frozen value objects shared by every layer (no I/O, no vendor SDKs)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType

from pydantic import SecretStr

from broker.errors import InvalidIdentifier

# Organization and vendor ids become parts of secret paths, so they are held
# to a conservative alphabet: no '/', no '.', no whitespace, bounded length.
IDENTIFIER_REGEX = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"
IDENTIFIER_PATTERN = re.compile(IDENTIFIER_REGEX)


def validate_identifier(kind: str, value: str) -> str:
    """Return ``value`` if it is a safe identifier, else raise ``InvalidIdentifier``."""
    if not isinstance(value, str) or not IDENTIFIER_PATTERN.fullmatch(value):
        raise InvalidIdentifier(
            f"{kind} must be 1-128 ASCII letters, digits, '_' or '-', starting with a letter or digit"
        )
    return value


class Stage(StrEnum):
    """Stage pointers of a versioned partner-key secret."""

    CURRENT = "current"
    PENDING = "pending"
    PREVIOUS = "previous"


@dataclass(frozen=True, slots=True)
class IntegrationRef:
    """One (organizationId, vendorId) pair; both ids validated on construction."""

    organization_id: str
    vendor_id: str

    def __post_init__(self) -> None:
        validate_identifier("organization_id", self.organization_id)
        validate_identifier("vendor_id", self.vendor_id)

    def __str__(self) -> str:
        return f"{self.organization_id}/{self.vendor_id}"


def _frozen(data: Mapping[str, SecretStr]) -> Mapping[str, SecretStr]:
    return MappingProxyType(dict(data))


@dataclass(frozen=True, slots=True)
class SecretValue:
    """One version of a secret: a flat map of field name -> secret string."""

    path: str
    version: str
    data: Mapping[str, SecretStr]
    created_at: datetime | None = None
    stages: frozenset[Stage] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", _frozen(self.data))

    def field(self, name: str) -> SecretStr:
        """Return one field, or raise ``KeyError`` naming the field (never the value)."""
        try:
            return self.data[name]
        except KeyError:
            raise KeyError(f"field {name!r} not in secret {self.path!r} version {self.version}") from None


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """Metadata of one version; never the value."""

    version: str
    created_at: datetime | None
    stages: frozenset[Stage] = frozenset()
    deleted: bool = False
    destroyed: bool = False


@dataclass(frozen=True, slots=True)
class SecretInfo:
    """Metadata of a secret: its versions (oldest first) and stage pointers."""

    path: str
    versions: tuple[VersionInfo, ...]
    stages: Mapping[Stage, str] = field(default_factory=dict)
    latest_version: str | None = None
    owner: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", MappingProxyType(dict(self.stages)))


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Outcome of a write: the version that now holds the value, and whether it is new."""

    version: str
    created: bool


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller (a Kubernetes service account)."""

    namespace: str
    service_account: str
    pod_name: str | None = None
    pod_uid: str | None = None
    issuer: str | None = None
    expires_at: datetime | None = None

    @property
    def subject(self) -> str:
        """``namespace/service-account``, the form policies match."""
        return f"{self.namespace}/{self.service_account}"


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """An MSPC_TOKEN and its lineage."""

    token: SecretStr
    expires_at: datetime
    ttl_seconds: int
    lease_id: str
    partner_key_version: str
    vendor_key_version: str
    stale: bool
    rule_id: str | None


@dataclass(frozen=True, slots=True)
class Decision:
    """A policy decision and why it was taken."""

    allowed: bool
    rule_id: str | None
    reason: str
    ttl_cap_seconds: int | None = None
