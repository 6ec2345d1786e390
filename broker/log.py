"""structlog configuration: JSON lines off a TTY, console on one.

``redact`` is the backstop that keeps secrets out of log lines: values of
secret-looking keys and any ``SecretStr`` are replaced. The plan is still
that secrets never reach a log call in the first place.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog
from pydantic import SecretBytes, SecretStr

REDACTED = "[REDACTED]"
_SECRET_KEY = re.compile(
    r"(secret|token|password|passwd|authorization|api_?key|partner_?key|vendor_?key|credential|hmac)",
    re.IGNORECASE,
)
# Keys that merely *describe* a secret (versions, hashes, ids) stay visible.
_SAFE_SUFFIX = re.compile(r"(_version|_versions|_hash|_id|_path|_file|_ttl_seconds|_type|_count)$", re.IGNORECASE)


_PLAIN = (str, int, float, bool, type(None))


@functools.lru_cache(maxsize=4096)
def _secret_key(key: str) -> bool:
    """Whether a key names a secret (and not merely describes one); log keys are few, so this is cached."""
    return bool(_SECRET_KEY.search(key)) and not _SAFE_SUFFIX.search(key)


def _scrub(key: str, value: Any) -> Any:
    if isinstance(value, (SecretStr, SecretBytes)):
        return REDACTED
    if isinstance(value, Mapping):
        return {k: _scrub(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(key, v) for v in value]
    if _secret_key(key) and value not in (None, "", True, False):
        return REDACTED
    return value


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: replace secret values anywhere in the event."""
    for key, value in event_dict.items():
        if key == "event":
            continue
        if type(value) in _PLAIN and not _secret_key(key):  # the common case, decided without a copy
            continue
        event_dict[key] = _scrub(key, value)
    return event_dict


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog (and stdlib logging) once, at process start."""
    out = stream if stream is not None else sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=out, force=True)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """Return a logger bound with the component name."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(component=name)
    return logger
