"""Logging: JSON lines off a TTY, and the redaction backstop."""

from __future__ import annotations

import io
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog
from pydantic import SecretStr

from broker.log import (
    REDACTED,
    _json_line,
    configure_logging,
    get_logger,
    info_line,
    reset_logging,
    utc_timestamp,
)


class TestLogging:
    def test_json_lines_off_tty(self) -> None:
        """Off a TTY every log call is one JSON object per line."""
        buffer = io.StringIO()
        configure_logging(level="info", fmt="auto", stream=buffer)
        structlog.get_logger().info("hello", answer=42)
        record = json.loads(buffer.getvalue().strip())
        assert record["event"] == "hello"
        assert record["answer"] == 42
        assert record["level"] == "info"

    def test_redacts_secret_keys_and_secretstr(self, canary: str) -> None:
        """Secret-looking keys and SecretStr values are replaced, nested ones too."""
        buffer = io.StringIO()
        configure_logging(level="debug", fmt="json", stream=buffer)
        log = structlog.get_logger()
        log.info("x", token=canary, client_secret=canary, wrapped=SecretStr(canary), nested={"api_key": canary})
        log.info("y", headers={"Authorization": f"Bearer {canary}"}, partner_key_version="3")
        out = buffer.getvalue()
        assert canary not in out
        assert REDACTED in out
        assert '"partner_key_version": "3"' in out

    def test_level_filter(self) -> None:
        """Debug lines are dropped at info level."""
        buffer = io.StringIO()
        configure_logging(level="info", fmt="json", stream=buffer)
        structlog.get_logger().debug("quiet")
        assert buffer.getvalue() == ""


class TestFastPipeline:
    """The per-request log line's cheaper pieces give what structlog's stock ones gave."""

    def test_component_loggers_follow_reconfiguration(self) -> None:
        """A component logger bound under one configuration writes to the next one's stream after a reconfigure."""
        log = get_logger("thing")
        first, second = io.StringIO(), io.StringIO()
        configure_logging(level="info", fmt="json", stream=first)
        log.info("one")
        configure_logging(level="warning", fmt="json", stream=second)
        log.info("dropped at warning")
        log.warning("two")
        assert [json.loads(line)["event"] for line in first.getvalue().splitlines()] == ["one"]
        lines = [json.loads(line) for line in second.getvalue().splitlines()]
        assert [(r["event"], r["component"], r["level"]) for r in lines] == [("two", "thing", "warning")]
        reset_logging()
        log.warning("three")  # structlog's defaults again: not into the old buffer
        assert "three" not in second.getvalue()

    def test_timestamp_is_utc_iso_with_microseconds(self) -> None:
        """``timestamp`` is now, in UTC, always with six fractional digits and a Z."""
        before = datetime.now(UTC)
        stamp = utc_timestamp()
        after = datetime.now(UTC)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
        assert before - timedelta(microseconds=1) <= datetime.fromisoformat(stamp) <= after

    def test_line_is_json_dumps_of_the_event(self) -> None:
        """The renderer's text is json.dumps's with structlog's fallback for unknown values."""

        class Custom:
            def __structlog__(self) -> str:
                return "custom-view"

        event = {"event": "x", "n": 1.5, "text": "é\u2028", "obj": object.__new__(Custom), "other": b"raw"}
        expected = json.dumps(event, default=lambda v: v.__structlog__() if hasattr(v, "__structlog__") else repr(v))
        assert _json_line(event) == expected

    @pytest.mark.parametrize("fmt", ["json", "console"])
    def test_info_line_writes_what_the_logger_writes(self, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """``info_line`` (the per-request line) gives the same line as ``get_logger(...).info``, in either format."""
        monkeypatch.setattr("broker.log.utc_timestamp", lambda: "2026-11-28T01:02:03.000004Z")
        buffer = io.StringIO()
        configure_logging(level="info", fmt=fmt, stream=buffer)
        structlog.contextvars.bind_contextvars(request_id="r-1")
        fields: dict[str, Any] = {
            "method": "POST",
            "status": 201,
            "principal": "ns/sa",
            "pod": None,
            "latency_ms": 1.25,
            "authorization": "Bearer secret",  # the redaction backstop still applies
        }
        get_logger("api").info("request", **fields)
        info_line("api", "request", **fields)
        first, second = buffer.getvalue().splitlines()
        assert first == second
        assert "secret" not in first
        if fmt == "json":
            assert list(json.loads(first)) == [
                *("component", "method", "status", "principal", "pod", "latency_ms", "authorization"),
                *("event", "request_id", "level", "timestamp"),
            ]

    def test_info_line_respects_the_level(self) -> None:
        buffer = io.StringIO()
        configure_logging(level="warning", fmt="json", stream=buffer)
        info_line("api", "request", status=201)
        assert buffer.getvalue() == ""
