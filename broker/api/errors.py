"""The one place where broker error codes become HTTP statuses (RFC 9457 problems)."""

from __future__ import annotations

import math
from typing import Any

from starlette.responses import JSONResponse

from broker.errors import (
    AccessDenied,
    AuditUnavailable,
    AuthenticationFailed,
    BrokerError,
    ConfigError,
    Conflict,
    InvalidInput,
    NotFound,
    OemError,
    PolicyDenied,
    PolicyInvalid,
    Unavailable,
)

PROBLEM_TYPE_BASE = "urn:mspc-broker:problem:"

# Most specific first: the first class an error is an instance of decides.
_STATUS: tuple[tuple[type[BrokerError], int], ...] = (
    (AuditUnavailable, 503),
    (Unavailable, 503),
    (AuthenticationFailed, 401),
    (PolicyDenied, 403),
    (InvalidInput, 400),
    (NotFound, 404),
    (Conflict, 409),
    (AccessDenied, 502),
    (OemError, 502),
    (PolicyInvalid, 500),
    (ConfigError, 500),
)

_TITLES = {
    400: "Bad request",
    401: "Authentication required",
    403: "Forbidden by policy",
    404: "Not found",
    409: "Conflict",
    500: "Broker misconfigured",
    502: "Upstream refused the broker",
    503: "Temporarily unavailable",
}


def status_for(exc: BrokerError) -> int:
    """HTTP status of a broker error."""
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def problem(status: int, code: str, detail: str, **extra: Any) -> JSONResponse:
    """An ``application/problem+json`` response with a stable ``code``."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + code.lower(),
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "code": code,
        "detail": detail,
    }
    body.update(extra)
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="mspc-broker"'
    return JSONResponse(body, status_code=status, media_type="application/problem+json", headers=headers)


def problem_for(exc: BrokerError) -> JSONResponse:
    """The problem response for a broker error (``Retry-After`` on 503)."""
    status = status_for(exc)
    response = problem(status, exc.code, exc.message)
    if status == 503:
        retry = exc.retry_after_seconds if exc.retry_after_seconds is not None else 1.0
        response.headers["Retry-After"] = str(max(1, math.ceil(retry)))
    return response
