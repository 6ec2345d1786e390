"""The OEM client contract: one small Protocol with domain verbs, and its values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pydantic import SecretStr

from broker.models import IntegrationRef


@dataclass(frozen=True, slots=True)
class CreatedIntegration:
    """An external integration the OEM created, with its partner key (returned once).

    ``possible_duplicate`` is True when the create was retried after an
    attempt whose outcome is unknown (timeout or lost response after the
    request may have reached the OEM): that attempt may have created another
    integration for the same pair, which the caller must find and revoke.
    """

    integration_id: str
    ref: IntegrationRef
    partner_key: SecretStr
    possible_duplicate: bool = False
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class OemIntegration:
    """One integration as ``POST /api/oem-api/integration/list`` reports it (no key)."""

    integration_id: str
    vendor_id: str
    organization_id: str | None = None
    kind: str | None = None
    status: str | None = None
    created_at: str | None = None


@runtime_checkable
class OemClient(Protocol):
    """What the broker needs from the MSPC OEM API and Vendor API."""

    def create_external_integration(self, ref: IntegrationRef) -> CreatedIntegration:
        """Create an external integration for ``ref`` and return its partner key."""
        ...

    def list_integrations(self, organization_id: str | None = None) -> list[OemIntegration]:
        """Live integrations of one organization (None: every one this client created)."""
        ...

    def revoke_integration(self, integration_id: str) -> None:
        """Revoke an integration so its partner key stops working.

        Raises ``IntegrationNotFound`` if the OEM does not know the id; a 404
        on a retry after an unanswered attempt counts as done.
        """
        ...

    def probe_vendor_api(self, mspc_token: SecretStr) -> None:
        """Make one read-only Vendor API call with ``mspc_token``; raise if it is refused."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...
