"""Audit records: vocabulary, events, keys, canonical hashing, and the published JSON Schema."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from broker.audit import (
    GENESIS_HASH,
    REQUIRED_DETAILS,
    AuditAction,
    AuditEvent,
    AuditKey,
    AuditLog,
    AuditOutcome,
    canonical,
    load_schema,
    record_hash,
)
from broker.audit.records import format_ts, prepare_token_issued, seal, seal_prepared
from broker.errors import ConfigError
from broker.models import IntegrationRef, IssuedToken, Principal
from broker.settings import AuditSettings

PRINCIPAL = Principal("payments", "invoicer", pod_name="invoicer-7d9f", pod_uid="uid-1", issuer="https://k8s")
REF = IntegrationRef("org-1", "vendor-a")
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def every_event(token: str) -> list[AuditEvent]:
    """One event per caller-emitted action, shaped as the service and engine will emit them."""
    return [
        AuditEvent.token_issued(
            PRINCIPAL,
            REF,
            rule_id="payments-read",
            token=SecretStr(token),
            vendor_key_version="3",
            partner_key_version="7",
            lease_id="lease-1",
            ttl_seconds=900,
            stale=False,
            request_id="req-1",
        ),
        AuditEvent.token_denied(PRINCIPAL, REF, error_code="POLICY_DENIED", reason="no rule matches"),
        AuditEvent(AuditAction.AUTH_FAILED, AuditOutcome.FAILURE, reason="expired", details={"error_code": "X"}),
        AuditEvent(
            AuditAction.ADMIN_ACTION,
            AuditOutcome.SUCCESS,
            principal=PRINCIPAL,
            ref=REF,
            details={"operation": "rotate"},
        ),
        AuditEvent(
            AuditAction.PROVISION_STEP,
            AuditOutcome.SUCCESS,
            ref=REF,
            details={"step": "oem_create", "integration_id": "int-9"},
            secrets={"partner_key": SecretStr(token)},
        ),
        AuditEvent(AuditAction.ROTATION_STEP, AuditOutcome.SUCCESS, ref=REF, details={"step": "promoted"}),
        AuditEvent(AuditAction.ROLLBACK_STEP, AuditOutcome.SUCCESS, ref=REF, details={"step": "restored"}),
        AuditEvent(
            AuditAction.REVOKE_STEP, AuditOutcome.FAILURE, ref=REF, details={"step": "oem_delete", "error_code": "E"}
        ),
        AuditEvent(
            AuditAction.VENDOR_KEY_VERSION_CHANGED,
            AuditOutcome.SUCCESS,
            vendor_id="vendor-a",
            details={"old_version": "3", "new_version": "4"},
        ),
        AuditEvent(AuditAction.ORPHAN_DETECTED, AuditOutcome.SUCCESS, ref=REF, details={"integration_ids": ["a", "b"]}),
        AuditEvent(AuditAction.POLICY_RELOADED, AuditOutcome.FAILURE, reason="bad yaml", details={"file_count": 2}),
        AuditEvent(AuditAction.BROKER_STARTED, AuditOutcome.SUCCESS, details={"version": "0.1.0"}),
        AuditEvent(AuditAction.BROKER_STOPPED, AuditOutcome.SUCCESS),
    ]


class TestAuditEvent:
    def test_secrets_become_hmac_fields(self, canary: str) -> None:
        """Each entry of secrets= is stored only as details['<name>_hmac'], the HMAC under the audit key."""
        key = AuditKey(b"k" * 32)
        body = every_event(canary)[0].body(key)
        assert body["details"]["token_hmac"] == key.hmac_hex(canary)
        assert canary not in json.dumps(body)

    def test_secret_in_details_is_refused(self) -> None:
        """A SecretStr passed in details raises instead of being written."""
        with pytest.raises(ValueError, match="secrets="):
            AuditEvent(AuditAction.BROKER_STARTED, AuditOutcome.SUCCESS, details={"x": SecretStr("s")})

    @pytest.mark.parametrize("name", ["token", "partner_key", "client_secret", "vendor_api_key", "password"])
    def test_secret_looking_detail_key_is_refused(self, name: str) -> None:
        """A details key naming a secret (not describing one) raises, so a clear value cannot slip in."""
        with pytest.raises(ValueError, match="names a secret"):
            AuditEvent(AuditAction.BROKER_STARTED, AuditOutcome.SUCCESS, details={name: "clear"})

    @pytest.mark.parametrize("name", ["partner_key_version", "token_hmac", "lease_id", "ttl_seconds"])
    def test_describing_detail_keys_are_allowed(self, name: str) -> None:
        """Keys that describe a secret (versions, ids, HMACs, durations) are fine."""
        AuditEvent(AuditAction.BROKER_STARTED, AuditOutcome.SUCCESS, details={name: "1"})

    def test_nested_detail_values_are_refused(self) -> None:
        """Details hold scalars or lists of scalars, so every record stays flat and searchable."""
        with pytest.raises(TypeError):
            AuditEvent(AuditAction.BROKER_STARTED, AuditOutcome.SUCCESS, details={"x": {"y": 1}})

    def test_unknown_action_is_refused(self) -> None:
        """Only the documented vocabulary can be recorded."""
        with pytest.raises(ValueError):
            AuditEvent("token.stolen", AuditOutcome.SUCCESS)  # type: ignore[arg-type]

    @pytest.mark.parametrize("action", sorted(REQUIRED_DETAILS))
    def test_required_details_are_enforced(self, action: AuditAction) -> None:
        """Actions with required details refuse a record without them."""
        with pytest.raises(ValueError):
            AuditEvent(action, AuditOutcome.FAILURE, principal=PRINCIPAL, ref=REF)

    def test_token_issued_needs_the_token(self) -> None:
        """token.issued without the token's HMAC (its lineage anchor) is refused."""
        details = {"vendor_key_version": "1", "partner_key_version": "1", "lease_id": "l", "ttl_seconds": 1}
        with pytest.raises(ValueError):
            AuditEvent(
                AuditAction.TOKEN_ISSUED,
                AuditOutcome.SUCCESS,
                principal=PRINCIPAL,
                ref=REF,
                details=details | {"stale": False},
            )


class TestAuditKey:
    def test_missing_key_refuses_to_start(self) -> None:
        """Without hmac_key the audit log will not start (ConfigError naming the setting)."""
        with pytest.raises(ConfigError, match="HMAC_KEY_FILE"):
            AuditKey.from_settings(AuditSettings())

    def test_short_key_is_refused(self) -> None:
        """A key under 32 bytes is a configuration error."""
        with pytest.raises(ConfigError, match="32 bytes"):
            AuditKey.from_settings(AuditSettings(hmac_key=SecretStr("short")))

    def test_ephemeral_key_only_when_allowed(self) -> None:
        """allow_ephemeral_key gives a random key, marked ephemeral, different per process start."""
        settings = AuditSettings(allow_ephemeral_key=True)
        a, b = AuditKey.from_settings(settings), AuditKey.from_settings(settings)
        assert a.ephemeral and a.key_id != b.key_id

    def test_key_from_file(self, tmp_path: Path, canary: str) -> None:
        """hmac_key_file and AuditKey.from_file read the same key (trailing newline stripped)."""
        path = tmp_path / "key"
        path.write_text(canary * 2 + "\n")
        from_settings = AuditKey.from_settings(AuditSettings(hmac_key_file=path))
        assert from_settings.key_id == AuditKey.from_file(path).key_id
        assert from_settings.hmac_hex("x") == AuditKey.from_file(path).hmac_hex("x")

    def test_repr_hides_the_key(self, canary: str) -> None:
        """The key's repr shows only its id."""
        key = AuditKey((canary * 2).encode())
        assert canary not in repr(key) and key.key_id in repr(key)


class TestCanonicalHash:
    def test_hash_ignores_key_order(self) -> None:
        """The record hash is over the canonical form, so key order does not matter."""
        assert record_hash({"a": 1, "b": "é"}) == record_hash({"b": "é", "a": 1})
        assert canonical({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()

    def test_hash_excludes_itself(self) -> None:
        """A record's stored hash does not take part in computing it."""
        assert record_hash({"a": 1, "hash": "x"}) == record_hash({"a": 1})


class TestSchema:
    def test_every_action_validates_and_no_secret_leaks(self, tmp_path: Path, canary: str) -> None:
        """Every emitted record, for every action (checkpoint and recovered included), validates against
        the packaged schema, and neither the token nor the key appears in the file."""
        path = tmp_path / "audit.jsonl"
        path.write_bytes(b'{"torn')  # a torn tail: the first write reports it in audit.recovered
        key_text = canary + "-KEY-" + canary
        settings = AuditSettings(
            file_path=path, hmac_key=SecretStr(key_text), checkpoint_every_records=4, write_timeout_ms=10_000
        )
        with AuditLog(settings) as log:
            for event in every_event(canary):
                log.emit(event)
        schema = load_schema()
        jsonschema.Draft202012Validator.check_schema(schema)
        validator = jsonschema.Draft202012Validator(schema)
        raw = path.read_bytes()
        records = [json.loads(line) for line in raw.splitlines()]
        for record in records:
            errors = sorted(validator.iter_errors(record), key=str)
            assert errors == [], (record["action"], [e.message for e in errors])
        assert {r["action"] for r in records} == {a.value for a in AuditAction}
        assert canary.encode() not in raw
        assert key_text.encode() not in raw

    def test_schema_vocabulary_matches_code(self) -> None:
        """The schema's action and outcome enums are exactly the code's vocabulary."""
        props = load_schema()["properties"]
        assert set(props["action"]["enum"]) == {a.value for a in AuditAction}
        assert set(props["outcome"]["enum"]) == {o.value for o in AuditOutcome}

    def test_schema_rejects_a_clear_secret_field(self, canary: str) -> None:
        """A *_hmac field that is not a 64-hex HMAC does not validate."""
        line, _ = seal(every_event(canary)[0].body(AuditKey(b"k" * 32)), seq=0, ts=format_ts(NOW), prev=GENESIS_HASH)
        record = json.loads(line)
        validator = jsonschema.Draft202012Validator(load_schema())
        assert validator.is_valid(record)
        record["details"]["token_hmac"] = canary
        assert not validator.is_valid(record)


_JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
_JSON_VALUES = st.recursive(
    _JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@given(
    value=st.dictionaries(
        st.text(max_size=12),
        st.recursive(
            _JSON_SCALARS | st.floats(allow_nan=False, allow_infinity=False) | st.integers(),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
            max_leaves=8,
        ),
        max_size=8,
    )
)
def test_canonical_is_json_dumps_sorted_compact_utf8(value: dict[str, Any]) -> None:
    """The prebuilt encoder writes exactly what the verifier's reference (json.dumps) writes."""
    reference = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    assert canonical(value) == reference.encode()


def test_canonical_refuses_what_json_refuses() -> None:
    with pytest.raises(ValueError, match="Out of range float"):
        canonical({"x": float("nan")})
    with pytest.raises(TypeError, match="not JSON serializable"):
        canonical({"x": object()})
    assert canonical({"x": 1.5e-07, "y": 1e16, "z": '\u2028\x00"é'}) == (
        b'{"x":1.5e-07,"y":1e+16,"z":"\xe2\x80\xa8\\u0000\\"\xc3\xa9"}'
    )


@given(body=st.dictionaries(st.text(max_size=12), _JSON_VALUES, max_size=8), seq=st.integers(0, 2**40))
def test_seal_serialises_once_but_equals_the_reference(body: dict[str, Any], seq: int) -> None:
    """``seal`` (one serialisation, split around "hash") gives the reference line: canonical form, record_hash."""
    line, digest = seal(body, seq=seq, ts="2026-01-02T03:04:05.000000Z", prev=GENESIS_HASH)
    record = {k: v for k, v in body.items() if k != "hash"}
    record.update(seq=seq, ts="2026-01-02T03:04:05.000000Z", prev=GENESIS_HASH)
    record["hash"] = record_hash(record)
    assert digest == record["hash"]
    assert line == canonical(record) + b"\n"


_IDENTIFIERS = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,20}\Z")
_TEXT = st.text(max_size=16)  # any text, quotes, backslashes, control characters and non-ASCII included


@given(
    principal=st.builds(
        Principal,
        namespace=_TEXT,
        service_account=_TEXT,
        pod_name=st.none() | _TEXT,
        pod_uid=st.none() | _TEXT,
        issuer=st.none() | _TEXT,
    ),
    ref=st.builds(IntegrationRef, _IDENTIFIERS, _IDENTIFIERS),
    issued=st.builds(
        IssuedToken,
        token=_TEXT.map(SecretStr),
        expires_at=st.datetimes(timezones=st.just(UTC) | st.none()),
        ttl_seconds=st.integers(0, 2**31),
        lease_id=_TEXT,
        partner_key_version=_TEXT,
        vendor_key_version=_TEXT,
        stale=st.booleans(),
        rule_id=st.none() | _TEXT,
    ),
    request_id=st.none() | _TEXT,
    seq=st.integers(0, 2**40),
    prev=st.text("0123456789abcdef", min_size=64, max_size=64),
)
def test_prepared_token_issued_seals_like_the_event(
    principal: Principal,
    ref: IntegrationRef,
    issued: IssuedToken,
    request_id: str | None,
    seq: int,
    prev: str,
) -> None:
    """The hot path's prepared token.issued record is the generic record, byte for byte, hash included."""
    key = AuditKey(b"k" * 32)
    ts = format_ts(NOW)
    event = AuditEvent.token_issued(
        principal,
        ref,
        rule_id=issued.rule_id,
        token=issued.token,
        vendor_key_version=issued.vendor_key_version,
        partner_key_version=issued.partner_key_version,
        lease_id=issued.lease_id,
        ttl_seconds=issued.ttl_seconds,
        stale=issued.stale,
        request_id=request_id,
        details={"expires_at": issued.expires_at.isoformat()},
    )
    expected = seal(event.body(key), seq=seq, ts=ts, prev=prev)
    prepared = prepare_token_issued(key, principal, ref, issued, request_id=request_id)
    assert seal_prepared(prepared, seq=seq, ts=ts, prev=prev) == expected
    again = prepare_token_issued(key, principal, ref, issued, request_id=request_id)  # from the remembered parts
    assert seal_prepared(again, seq=seq, ts=ts, prev=prev) == expected


def test_remembered_parts_stay_right_past_their_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Token HMACs and serialised principals are remembered within bounds; cleared and refilled, they stay right."""
    monkeypatch.setattr("broker.audit.records._TOKEN_HMACS", 3)
    monkeypatch.setattr("broker.audit.records._PRINCIPAL_VIEWS", 3)
    key = AuditKey(b"k" * 32)
    ref = IntegrationRef("org-1", "acme")
    principals = [Principal("ns", f"sa-{i}", pod_name=f"pod-{i}") for i in range(5)]
    for round_ in range(3):
        for i, principal in enumerate(principals):
            token = SecretStr(f"token-{i % 4}")
            issued = IssuedToken(token, NOW, 60, f"lease-{round_}-{i}", "2", "1", False, "r")
            assert key.token_hmac_hex(token) == key.hmac_hex(token)
            prepared = prepare_token_issued(key, principal, ref, issued, request_id=None)
            line, _ = seal_prepared(prepared, seq=i, ts=format_ts(NOW), prev="0" * 64)
            record = json.loads(line)
            assert record["principal"]["service_account"] == f"sa-{i}"
            assert record["subject"] == f"ns/sa-{i}"
            assert record["details"]["token_hmac"] == key.hmac_hex(token)
