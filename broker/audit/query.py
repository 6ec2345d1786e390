"""Search audit files, streaming: one line in memory at a time, whatever the file size."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from broker.audit.records import format_ts
from broker.audit.verify import iter_lines

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_when(text: str, *, now: datetime | None = None) -> datetime:
    """An ISO-8601 date or date-time (naive = UTC), or an age such as ``90s``, ``10m``, ``1h``, ``7d`` ago."""
    relative = _RELATIVE.match(text.strip())
    if relative:
        amount = float(relative.group(1)) * _UNIT_SECONDS[relative.group(2)]
        return (now or datetime.now(UTC)) - timedelta(seconds=amount)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Filters, all optional and combined with AND; a set matches any of its members.

    ``hmac`` matches any ``*_hmac`` field in ``details`` (see ``broker audit hash``).
    ``since`` is inclusive, ``until`` exclusive.
    """

    since: datetime | None = None
    until: datetime | None = None
    subject: str | None = None
    organization_id: str | None = None
    vendor_id: str | None = None
    actions: frozenset[str] = frozenset()
    outcomes: frozenset[str] = frozenset()
    hmac: str | None = None

    def predicate(self) -> Callable[[Mapping[str, Any]], bool]:
        """A record predicate built once, so the scan loop does no option checks."""
        since = format_ts(self.since) if self.since else None
        until = format_ts(self.until) if self.until else None
        wanted = self.hmac.lower() if self.hmac else None
        checks: list[Callable[[Mapping[str, Any]], bool]] = []
        if since:
            checks.append(lambda r: isinstance(r.get("ts"), str) and r["ts"] >= since)
        if until:
            checks.append(lambda r: isinstance(r.get("ts"), str) and r["ts"] < until)
        for name, value in (
            ("subject", self.subject),
            ("organization_id", self.organization_id),
            ("vendor_id", self.vendor_id),
        ):
            if value:
                checks.append(_field_equals(name, value))
        if self.actions:
            checks.append(lambda r: r.get("action") in self.actions)
        if self.outcomes:
            checks.append(lambda r: r.get("outcome") in self.outcomes)
        if wanted:
            checks.append(lambda r: _has_hmac(r, wanted))
        return lambda record: all(check(record) for check in checks)


def _field_equals(name: str, value: str) -> Callable[[Mapping[str, Any]], bool]:
    return lambda record: record.get(name) == value


def _has_hmac(record: Mapping[str, Any], wanted: str) -> bool:
    details = record.get("details")
    if not isinstance(details, dict):
        return False
    return any(k.endswith("_hmac") and v == wanted for k, v in details.items())


def query_records(paths: Iterable[Path], query: AuditQuery) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """Yield (raw line, record) for every matching record, in chain order; unreadable lines are skipped."""
    match = query.predicate()
    needle = query.hmac.lower().encode() if query.hmac else None
    for _path, _number, raw in iter_lines(paths):
        if needle is not None and needle not in raw:
            continue
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict) and match(record):
            yield raw, record


def summarize_details(record: Mapping[str, Any], width: int = 80) -> str:
    """``k=v`` pairs of ``details`` for a table cell (HMACs shortened)."""
    details = record.get("details")
    if not isinstance(details, dict):
        return ""
    parts = []
    for k, v in details.items():
        shown = v[:12] + "…" if k.endswith("_hmac") and isinstance(v, str) else v
        parts.append(f"{k}={shown}")
    text = " ".join(parts)
    return text if len(text) <= width else text[: width - 1] + "…"


def render_table(matches: Iterable[tuple[bytes, Mapping[str, Any]]], console: Console, *, limit: int) -> int:
    """Print up to ``limit`` matches as a table (``--json`` streams without limit); return the count shown."""
    if not console.is_terminal:
        console.width = max(console.width, 200)  # piped: no terminal to fit, keep rows on one line
    table = Table(box=box.SIMPLE_HEAD)
    for name in ("seq", "ts", "action", "outcome"):
        table.add_column(name, no_wrap=True)
    for name in ("subject", "org/vendor", "rule"):
        table.add_column(name, overflow="fold")
    table.add_column("details", overflow="fold", ratio=1)
    shown = 0
    more = False
    for _raw, record in matches:
        if shown >= limit:
            more = True
            break
        pair = f"{record.get('organization_id')}/{record.get('vendor_id')}" if record.get("organization_id") else ""
        table.add_row(
            str(record.get("seq")),
            str(record.get("ts", ""))[:19].replace("T", " "),
            str(record.get("action")),
            str(record.get("outcome")),
            record.get("subject") or "",
            pair,
            record.get("rule_id") or "",
            summarize_details(record),
        )
        shown += 1
    console.print(table)
    console.print(
        f"{shown} record(s)" + (" shown; more match (raise --limit or use --json)" if more else ""), highlight=False
    )
    return shown
