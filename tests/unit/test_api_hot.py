"""The token hot path's own parsing and serialisation agree with the FastAPI route's models."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from broker.api.app import TokenRequest, TokenResponse, _token_request, token_response_json
from broker.models import IssuedToken

JSON = b"application/json"


@pytest.mark.parametrize(
    "expires_at",
    [
        datetime(2026, 11, 27, 20, 0, 0, tzinfo=UTC),
        datetime(2026, 11, 27, 20, 0, 0, 123456, tzinfo=UTC),
        datetime(2026, 11, 27, 20, 0, 0, 500000, tzinfo=UTC),
        datetime.fromtimestamp(1795000000.25, tz=UTC),
    ],
)
@pytest.mark.parametrize("stale", [False, True])
def test_response_bytes_equal_the_response_model(expires_at: datetime, stale: bool) -> None:
    """``token_response_json`` gives exactly the bytes of ``TokenResponse.model_dump_json``."""
    issued = IssuedToken(
        token=SecretStr("dmVuZG9yOnBhcnRuZXI="),
        expires_at=expires_at,
        ttl_seconds=900,
        lease_id="0123456789abcdef0123456789abcdef",
        partner_key_version="7",
        vendor_key_version="3",
        stale=stale,
        rule_id="r",
    )
    model = TokenResponse(
        token=issued.token.get_secret_value(),
        expires_at=issued.expires_at,
        ttl_seconds=issued.ttl_seconds,
        lease_id=issued.lease_id,
        partner_key_version=issued.partner_key_version,
        vendor_key_version=issued.vendor_key_version,
        stale=issued.stale,
    )
    assert token_response_json(issued) == model.model_dump_json().encode()


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        (JSON, {"organization_id": "org-1", "vendor_id": "vendor-a"}, ("org-1", "vendor-a", 0)),
        (b"application/json; charset=utf-8", {"organization_id": "o", "vendor_id": "v"}, ("o", "v", 0)),
        (JSON, {"organization_id": "o", "vendor_id": "v", "min_ttl_seconds": 86400}, ("o", "v", 86400)),
        (b"text/plain", {"organization_id": "o", "vendor_id": "v"}, None),
        (None, {"organization_id": "o", "vendor_id": "v"}, None),
        (JSON, {"organization_id": "o", "vendor_id": "v", "min_ttl_seconds": "5"}, None),  # coercion: FastAPI's call
        (JSON, {"organization_id": "o", "vendor_id": "v", "min_ttl_seconds": True}, None),
        (JSON, {"organization_id": "o", "vendor_id": "v", "min_ttl_seconds": 86401}, None),
        (JSON, {"organization_id": "../etc", "vendor_id": "v"}, None),
        (JSON, {"organization_id": "o\n", "vendor_id": "v"}, None),
        (JSON, {"organization_id": "o", "vendor_id": "v", "extra": 1}, None),
        (JSON, {"vendor_id": "v"}, None),
        (JSON, ["o", "v"], None),
    ],
)
def test_the_hot_path_accepts_only_plain_valid_bodies(
    content_type: bytes | None, body: Any, expected: tuple[str, str, int] | None
) -> None:
    assert _token_request(content_type, json.dumps(body).encode()) == expected


def test_bodies_that_are_not_json_go_to_fastapi() -> None:
    assert _token_request(JSON, b"{nope") is None
    assert _token_request(JSON, b"") is None


_VALUES = st.none() | st.booleans() | st.integers(-10, 100000) | st.text(max_size=6) | st.just("org-1")
_BODIES = st.dictionaries(
    st.sampled_from(["organization_id", "vendor_id", "min_ttl_seconds", "other"]), _VALUES, max_size=4
)


@given(body=_BODIES)
def test_whatever_the_hot_path_accepts_the_model_accepts_with_the_same_values(body: dict[str, Any]) -> None:
    """The hot path is stricter than ``TokenRequest``, never looser: what it takes, FastAPI would take alike."""
    parsed = _token_request(JSON, json.dumps(body).encode())
    if parsed is None:
        return
    model = TokenRequest.model_validate(body)
    assert parsed == (model.organization_id, model.vendor_id, model.min_ttl_seconds)


@given(body=_BODIES)
def test_a_body_the_model_refuses_never_takes_the_hot_path(body: dict[str, Any]) -> None:
    try:
        TokenRequest.model_validate(body)
    except ValidationError:
        assert _token_request(JSON, json.dumps(body).encode()) is None


def test_times_round_trip_through_the_response() -> None:
    """The response's ``expires_at`` parses back to the instant issued (UTC)."""
    moment = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(microseconds=1)
    issued = IssuedToken(SecretStr("a"), moment, 1, "l", "1", "1", False, None)
    assert datetime.fromisoformat(json.loads(token_response_json(issued))["expires_at"]) == moment
