"""Translate OEM / Vendor API answers and transport failures into ``BrokerError``.

The table lives here, in one place: status + upstream code -> our error
class, with a message that says what to check. Upstream text is cut with
``broker.errors.snippet``; nothing the broker sent (client secret, MSPC
token) is ever quoted.
"""

from __future__ import annotations

import email.utils
import math
import time
from dataclasses import dataclass
from typing import Any

import httpx

from broker.errors import (
    BrokerError,
    IntegrationNotFound,
    NotFound,
    OemBadRequest,
    OemConflict,
    OemError,
    OemInvalidClient,
    OemInvalidScope,
    OemRejectedToken,
    OemVendorNotAuthorized,
    snippet,
)
from broker.models import IntegrationRef

UPSTREAM_MESSAGE_CHARS = 160

# A request that failed with one of these may or may not have reached the
# OEM and been acted on; for a create, that means a possible duplicate.
AMBIGUOUS_TRANSPORT_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)
# Statuses by which a server says it did not act on the request.
UNPROCESSED_RETRYABLE_STATUSES = frozenset({408, 429, 503})


@dataclass(frozen=True, slots=True)
class Upstream:
    """What an error answer said: status, machine code (if any), short message."""

    status: int
    code: str | None
    message: str

    def describe(self) -> str:
        """``401 INVALID_CLIENT: Unauthorized: Invalid credentials`` (already cut short)."""
        head = f"{self.status} {self.code}" if self.code else str(self.status)
        return f"{head}: {self.message}" if self.message else head


def read_upstream(response: httpx.Response) -> Upstream:
    """Extract status, code and a cut-down message from an error response."""
    code: str | None = None
    message = ""
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        raw_code = body.get("code")
        code = snippet(raw_code, 64) if isinstance(raw_code, str) and raw_code else None
        raw_message = body.get("message")
        message = snippet(raw_message, UPSTREAM_MESSAGE_CHARS) if isinstance(raw_message, str) else ""
    else:
        message = snippet(response.text, UPSTREAM_MESSAGE_CHARS)
    return Upstream(response.status_code, code, message)


def is_retryable_status(status: int) -> bool:
    """429, 408 and every 5xx are worth another attempt."""
    return status in (408, 429) or 500 <= status <= 599


def parse_retry_after(value: str | None, now_epoch_seconds: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date); None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        now = time.time() if now_epoch_seconds is None else now_epoch_seconds
        seconds = when.timestamp() - now
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


CREDENTIALS_HINT = (
    "check BROKER_OEM__CLIENT_ID / BROKER_OEM__CLIENT_SECRET (or BROKER_OEM__CLIENT_SECRET_FILE) "
    "against the credentials MSPC issued"
)


def oem_error(
    operation: str,
    upstream: Upstream,
    *,
    client_id: str,
    scope: str,
    ref: IntegrationRef | None = None,
    integration_id: str | None = None,
) -> BrokerError:
    """The ``BrokerError`` for a non-retryable OEM API answer to ``operation``."""
    what = upstream.describe()
    pair = f"organization {ref.organization_id} / vendor {ref.vendor_id}" if ref else "the request"
    status, code = upstream.status, upstream.code
    if status == 401:
        return OemInvalidClient(f"the OEM rejected client {client_id!r} ({what}); {CREDENTIALS_HINT}")
    if status == 403 and code == "INVALID_SCOPE":
        return OemInvalidScope(
            f"the OEM refused scope {scope!r} for client {client_id!r} ({what}); "
            "check BROKER_OEM__SCOPE and the scopes MSPC granted this client"
        )
    if status == 403 and code == "VENDOR_NOT_AUTHORIZED":
        org = ref.organization_id if ref else "?"
        vendor = ref.vendor_id if ref else "?"
        return OemVendorNotAuthorized(
            f"organization {org} does not allow vendor {vendor} at the OEM ({what}); "
            "the partner must enable this vendor for the organization in MSPC"
        )
    if status == 400:
        return OemBadRequest(f"{operation}: the OEM rejected the request as malformed ({what})")
    if status == 409:
        return OemConflict(
            f"{operation}: an integration for {pair} already exists at the OEM ({what}); "
            "adopt or revoke the existing integration (the OEM runs in conflict mode)"
        )
    if status == 404:
        if integration_id is not None:
            return IntegrationNotFound(f"{operation}: integration {integration_id} is not known at the OEM ({what})")
        return NotFound(f"{operation}: {pair} is not known at the OEM ({what}); check the organization and vendor ids")
    return OemError(f"{operation}: the OEM refused the request ({what})")


def vendor_api_error(upstream: Upstream) -> BrokerError:
    """The ``BrokerError`` for a non-retryable Vendor API answer to the probe."""
    what = upstream.describe()
    if upstream.status == 403 and upstream.code == "VENDOR_NOT_AUTHORIZED":
        return OemVendorNotAuthorized(
            f"the Vendor API refused the MSPC_TOKEN ({what}): its partner key belongs to another vendor"
        )
    if upstream.status in (401, 403):
        return OemRejectedToken(
            f"the Vendor API refused the MSPC_TOKEN ({what}); the partner key may be revoked or unknown, "
            "or the vendor key may be wrong"
        )
    if upstream.status == 400:
        return OemBadRequest(f"probe_vendor_api: the Vendor API rejected the request ({what})")
    return OemError(f"probe_vendor_api: the Vendor API refused the request ({what})")
