"""What the engine needs from its neighbours, as small structural Protocols.

The real implementations live in ``broker.oem`` and ``broker.audit``; the
engine only depends on these verbs, so tests can hand it the real clients
and nothing else needs to know about the engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from pydantic import SecretStr

from broker.models import IntegrationRef


class CreatedIntegrationLike(Protocol):
    """The OEM's answer to an external-integration create."""

    @property
    def integration_id(self) -> str: ...

    @property
    def partner_key(self) -> SecretStr: ...

    @property
    def possible_duplicate(self) -> bool: ...


class ListedIntegrationLike(Protocol):
    """One integration as listed by the OEM."""

    @property
    def integration_id(self) -> str: ...

    @property
    def vendor_id(self) -> str: ...


class OemPort(Protocol):
    """The OEM / Vendor API verbs the engine uses."""

    def create_external_integration(self, ref: IntegrationRef) -> CreatedIntegrationLike: ...

    def list_integrations(self, organization_id: str | None = None) -> Sequence[ListedIntegrationLike]: ...

    def revoke_integration(self, integration_id: str) -> None: ...

    def probe_vendor_api(self, mspc_token: SecretStr) -> None: ...


class AuditPort(Protocol):
    """Where the engine reports each step (the audit trail)."""

    def record(
        self,
        action: str,
        outcome: str,
        *,
        ref: IntegrationRef | None = None,
        reason: str | None = None,
        details: Mapping[str, Any] | None = None,
        secrets: Mapping[str, SecretStr] | None = None,
        vendor_id: str | None = None,
    ) -> Any: ...


class NullAudit:
    """An ``AuditPort`` that drops records (CLI one-shots without an audit key)."""

    def record(
        self,
        action: str,
        outcome: str,
        *,
        ref: IntegrationRef | None = None,
        reason: str | None = None,
        details: Mapping[str, Any] | None = None,
        secrets: Mapping[str, SecretStr] | None = None,
        vendor_id: str | None = None,
    ) -> None:
        return None
