"""Logging: JSON lines off a TTY, and the redaction backstop."""

from __future__ import annotations

import io
import json

import structlog
from pydantic import SecretStr

from broker.log import REDACTED, configure_logging


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
