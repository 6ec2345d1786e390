"""Verify an audit chain across files, streaming (one line in memory at a time).

Files may be given in any order (or as directories); they are put in chain
order by the ``seq`` of their first record. Verification stops at the first
problem and names its file, line and what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.audit.records import GENESIS_HASH, AuditAction, AuditKey, canonical, record_hash

_HEX64 = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class Problem:
    """The first thing found wrong with a chain."""

    path: str
    line: int
    seq: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}"
        return f"{where} (seq {self.seq}): {self.message}" if self.seq is not None else f"{where}: {self.message}"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """Outcome of ``verify_chain``: counts, and the first problem if any."""

    records: int
    files: tuple[str, ...]
    checkpoints: int
    macs_checked: bool
    after_last_checkpoint: int
    problem: Problem | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return self.problem is None

    def summary(self) -> str:
        """One line for people: ``OK <n> records ...`` or ``FAIL <where>: <what>``."""
        if self.problem is not None:
            return f"FAIL {self.problem}"
        parts = [f"OK {self.records} records in {len(self.files)} file(s), {self.checkpoints} checkpoint(s)"]
        if not self.macs_checked:
            parts.append("checkpoint MACs NOT checked (no audit key)")
        elif self.checkpoints:
            parts.append("checkpoint MACs valid")
        if self.after_last_checkpoint:
            parts.append(f"{self.after_last_checkpoint} record(s) after the last checkpoint are not MAC-protected")
        return "; ".join(parts + list(self.notes))


def expand_paths(paths: Iterable[Path]) -> list[Path]:
    """Files named by ``paths``; a directory stands for its ``*.jsonl*`` files."""
    out: dict[Path, None] = {}
    for path in paths:
        if path.is_dir():
            for child in sorted(path.iterdir()):
                if ".jsonl" in child.name and not child.name.endswith(".lock") and child.is_file():
                    out[child] = None
        else:
            out[path] = None
    return list(out)


def _first_seq(path: Path) -> int:
    try:
        with path.open("rb") as fh:
            first = fh.readline()
        seq = json.loads(first).get("seq")
    except (OSError, ValueError, AttributeError):
        return -1
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else -1


def chain_order(paths: Iterable[Path]) -> list[Path]:
    """Files in chain order (by the ``seq`` of their first record); empty files dropped.

    Files whose first line is unreadable come first, so that problem is reported.
    """
    files = [p for p in expand_paths(paths) if not p.exists() or p.stat().st_size > 0]
    return sorted(files, key=lambda p: (_first_seq(p), str(p)))


def iter_lines(paths: Iterable[Path]) -> Iterator[tuple[Path, int, bytes]]:
    """(file, line number, raw line) over files in chain order, streaming."""
    for path in chain_order(paths):
        with path.open("rb") as fh:
            for number, raw in enumerate(fh, start=1):
                yield path, number, raw


def _is_hex64(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX64


class _Verifier:
    def __init__(self, key: AuditKey | None, partial: bool) -> None:
        self.key = key
        self.partial = partial
        self.expected_seq: int | None = None
        self.head = GENESIS_HASH
        self.head_where = ""
        self.records = 0
        self.checkpoints = 0
        self.after_checkpoint = 0

    def check(self, path: Path, number: int, raw: bytes) -> str | None:
        if not raw.endswith(b"\n"):
            return "incomplete last line (the file was truncated or a write was cut off)"
        try:
            record = json.loads(raw)
        except ValueError:
            return "not a JSON record"
        if not isinstance(record, dict):
            return "not a JSON object"
        seq = record.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            return "no valid seq"
        if not (_is_hex64(record.get("hash")) and _is_hex64(record.get("prev"))):
            return "no valid hash / prev"
        if canonical(record) + b"\n" != raw:
            return "not in canonical form (the line was edited)"
        if record_hash(record) != record["hash"]:
            return "content does not match its hash (the record was edited)"
        if self.expected_seq is None:
            if not self.partial and (seq != 0 or record["prev"] != GENESIS_HASH):
                return (
                    f"the chain starts at seq {seq}, not at the genesis record "
                    "(earlier records or files are missing; --partial accepts that)"
                )
        elif seq > self.expected_seq:
            return (
                f"expected seq {self.expected_seq}, found {seq}: {seq - self.expected_seq} record(s) "
                "missing here (deleted, or lines reordered)"
            )
        elif seq < self.expected_seq:
            return (
                f"expected seq {self.expected_seq}, found {seq} again or out of order "
                f"(a record was inserted or lines reordered; the record before is at {self.head_where})"
            )
        elif record["prev"] != self.head:
            return (
                f"prev does not match the hash of the record before it at {self.head_where} "
                "(that record was edited and rehashed, or a forged record was inserted)"
            )
        if record.get("action") == AuditAction.AUDIT_CHECKPOINT:
            problem = self._check_checkpoint(record)
            if problem:
                return problem
            self.checkpoints += 1
            self.after_checkpoint = 0
        else:
            self.after_checkpoint += 1
        self.expected_seq = seq + 1
        self.head = record["hash"]
        self.head_where = f"{path}:{number}"
        self.records += 1
        return None

    def _check_checkpoint(self, record: dict[str, Any]) -> str | None:
        details = record.get("details") or {}
        if details.get("count") != record["seq"] or details.get("head") != record["prev"]:
            return "checkpoint count / head do not match its place in the chain"
        if self.key is None:
            return None
        if record.get("key_id") != self.key.key_id:
            return f"checkpoint signed with another key (key_id {record.get('key_id')}, ours {self.key.key_id})"
        if not self.key.mac_ok(record):
            return "checkpoint MAC is invalid (the chain was re-forged without the audit key)"
        return None


def verify_chain(paths: Iterable[Path], *, key: AuditKey | None = None, partial: bool = False) -> VerifyReport:
    """Check every record, every link and (with ``key``) every checkpoint MAC; stop at the first problem.

    ``partial`` accepts a chain that does not start at the genesis record
    (older files removed by retention).
    """
    files = chain_order(paths)
    verifier = _Verifier(key, partial)
    problem: Problem | None = None
    for path in files:
        if not path.exists():
            problem = Problem(str(path), 0, None, "file not found")
            break
        with path.open("rb") as fh:
            for number, raw in enumerate(fh, start=1):
                message = verifier.check(path, number, raw)
                if message is not None:
                    problem = Problem(str(path), number, _seq_of(raw), message)
                    break
        if problem is not None:
            break
    if not files:
        problem = Problem("-", 0, None, "no audit files found")
    return VerifyReport(
        records=verifier.records,
        files=tuple(str(p) for p in files),
        checkpoints=verifier.checkpoints,
        macs_checked=key is not None,
        after_last_checkpoint=verifier.after_checkpoint,
        problem=problem,
    )


def _seq_of(raw: bytes) -> int | None:
    try:
        seq = json.loads(raw).get("seq")
    except (ValueError, AttributeError):
        return None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None
