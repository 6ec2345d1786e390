"""Every error the broker raises on purpose.

Each class carries a stable ``code`` (a string API clients and runbooks can
rely on). Messages say what went wrong and what to check; they never contain
a secret value, and upstream bodies are cut to ``UPSTREAM_SNIPPET_CHARS``
before they are quoted. The HTTP status of each code is decided in exactly
one place, ``broker.api.errors``.

    BrokerError                      BROKER_ERROR
    ├── ConfigError                  CONFIG_INVALID
    ├── InvalidInput                 INVALID_INPUT
    │   ├── InvalidIdentifier        INVALID_IDENTIFIER
    │   └── InvalidMspcToken         INVALID_MSPC_TOKEN
    ├── AuthenticationFailed         UNAUTHENTICATED
    │   └── IdentityUnavailable      IDENTITY_UNAVAILABLE (retry_after_seconds)
    ├── PolicyDenied                 POLICY_DENIED
    ├── PolicyInvalid                POLICY_INVALID
    ├── NotFound                     NOT_FOUND
    │   ├── SecretNotFound           SECRET_NOT_FOUND
    │   └── IntegrationNotFound      INTEGRATION_NOT_FOUND
    ├── Conflict                     CONFLICT
    │   ├── TtlUnsatisfiable         TTL_UNSATISFIABLE
    │   └── RotationBudgetExceeded   ROTATION_BUDGET_EXCEEDED
    ├── AccessDenied                 ACCESS_DENIED
    │   └── StoreAccessDenied        STORE_ACCESS_DENIED
    ├── Unavailable                  UNAVAILABLE        (retry_after_seconds)
    │   ├── StoreUnavailable         STORE_UNAVAILABLE
    │   ├── OemUnavailable           OEM_UNAVAILABLE
    │   └── AuditUnavailable         AUDIT_UNAVAILABLE
    └── OemError                     OEM_ERROR
        ├── OemInvalidClient         INVALID_CLIENT
        ├── OemInvalidScope          INVALID_SCOPE
        ├── OemVendorNotAuthorized   VENDOR_NOT_AUTHORIZED
        ├── OemBadRequest            OEM_BAD_REQUEST
        ├── OemConflict              OEM_CONFLICT
        ├── OemRejectedToken         OEM_TOKEN_REJECTED
        └── OemOutcomeUnknown        OEM_OUTCOME_UNKNOWN
"""

from __future__ import annotations

UPSTREAM_SNIPPET_CHARS = 256


def snippet(text: str | bytes | None, limit: int = UPSTREAM_SNIPPET_CHARS) -> str:
    """Return at most ``limit`` characters of an upstream body, for error text."""
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


class BrokerError(Exception):
    """Base of every deliberate broker error; ``code`` is stable."""

    code = "BROKER_ERROR"

    def __init__(self, message: str, *, retry_after_seconds: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_seconds = retry_after_seconds

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ConfigError(BrokerError):
    """A setting is missing or invalid; raised at start-up."""

    code = "CONFIG_INVALID"


class InvalidInput(BrokerError):
    """A caller sent something malformed."""

    code = "INVALID_INPUT"


class InvalidIdentifier(InvalidInput):
    """An organization, vendor or path id failed validation."""

    code = "INVALID_IDENTIFIER"


class InvalidMspcToken(InvalidInput):
    """A value is not a well-formed MSPC_TOKEN."""

    code = "INVALID_MSPC_TOKEN"


class AuthenticationFailed(BrokerError):
    """The caller's credential could not be verified."""

    code = "UNAUTHENTICATED"


class IdentityUnavailable(AuthenticationFailed):
    """The token issuer (JWKS / discovery / TokenReview) cannot be reached; the token was not judged."""

    code = "IDENTITY_UNAVAILABLE"


class PolicyDenied(BrokerError):
    """The policy engine denied the action."""

    code = "POLICY_DENIED"


class PolicyInvalid(BrokerError):
    """A policy file is malformed."""

    code = "POLICY_INVALID"


class NotFound(BrokerError):
    """The thing asked for does not exist."""

    code = "NOT_FOUND"


class SecretNotFound(NotFound):
    """No secret (or no such version / stage) at a store path."""

    code = "SECRET_NOT_FOUND"


class IntegrationNotFound(NotFound):
    """No desired or provisioned integration for an (organization, vendor) pair."""

    code = "INTEGRATION_NOT_FOUND"


class Conflict(BrokerError):
    """An optimistic-concurrency check failed: somebody else won the race."""

    code = "CONFLICT"


class TtlUnsatisfiable(Conflict):
    """No token with the requested minimum lifetime can be issued now."""

    code = "TTL_UNSATISFIABLE"


class RotationBudgetExceeded(Conflict):
    """Too many rotations of one integration in 24 hours (store version quotas)."""

    code = "ROTATION_BUDGET_EXCEEDED"


class AccessDenied(BrokerError):
    """A backend refused the broker's own credentials or permissions."""

    code = "ACCESS_DENIED"


class StoreAccessDenied(AccessDenied):
    """The secret store refused the broker (bad credentials or policy)."""

    code = "STORE_ACCESS_DENIED"


class Unavailable(BrokerError):
    """A dependency cannot be reached now; retry after ``retry_after_seconds``."""

    code = "UNAVAILABLE"


class StoreUnavailable(Unavailable):
    """The secret store cannot be reached or answered with a server error."""

    code = "STORE_UNAVAILABLE"


class OemUnavailable(Unavailable):
    """The OEM / Vendor API cannot be reached, timed out, or kept failing."""

    code = "OEM_UNAVAILABLE"


class IntegrationPending(Unavailable):
    """A desired integration has no partner key yet: the leader is provisioning it; retry."""

    code = "INTEGRATION_PENDING"


class AuditUnavailable(Unavailable):
    """The audit sink could not be written in time; nothing was issued."""

    code = "AUDIT_UNAVAILABLE"


class OemError(BrokerError):
    """The OEM / Vendor API refused a request for a reason retrying will not fix."""

    code = "OEM_ERROR"


class OemInvalidClient(OemError):
    """The OEM rejected the client id / secret."""

    code = "INVALID_CLIENT"


class OemInvalidScope(OemError):
    """The OEM client is not allowed the requested scope."""

    code = "INVALID_SCOPE"


class OemVendorNotAuthorized(OemError):
    """The organization does not allow this vendor."""

    code = "VENDOR_NOT_AUTHORIZED"


class OemBadRequest(OemError):
    """The OEM rejected the request body as malformed."""

    code = "OEM_BAD_REQUEST"


class OemConflict(OemError):
    """The OEM answered 409: the integration already exists (conflict mode)."""

    code = "OEM_CONFLICT"


class OemRejectedToken(OemError):
    """The Vendor API refused an MSPC_TOKEN (bad, unknown or revoked key)."""

    code = "OEM_TOKEN_REJECTED"


class OemOutcomeUnknown(OemError):
    """A create may have succeeded at the OEM although no answer arrived.

    Raised when a retried non-idempotent call could have created an
    integration the broker never saw; the caller decides how to reconcile.
    """

    code = "OEM_OUTCOME_UNKNOWN"
