"""Hash-chained, HMAC-ed audit trail: record, verify, query.

Emitting (service, engine, policy reload)::

    audit = AuditLog(settings.audit, metrics=metrics)   # ConfigError without a key
    audit.start()
    receipt = audit.record(AuditAction.ROTATION_STEP, AuditOutcome.SUCCESS,
                           ref=ref, details={"step": "promoted", "partner_key_version": "7"})
    await audit.aemit(AuditEvent.token_issued(principal, ref, rule_id=..., token=token, ...))
    audit.close()

``record`` / ``arecord`` return once the record is durable, or raise
``AuditUnavailable`` within ``write_timeout_ms``: the caller then refuses the
audited act (HTTP 503 ``AUDIT_UNAVAILABLE``).

Tamper evidence: every record carries ``seq``, ``ts``, ``prev`` (hash of the
record before) and ``hash``; every ``checkpoint_every_records`` records (and
at close) an ``audit.checkpoint`` record carries the running count and chain
head, MAC-ed with a key derived from the audit key. Anybody can check the
hashes and links (``broker audit verify``); only a holder of the key can
check - or forge - checkpoint MACs. What the chain cannot show: records
removed from the very end of the newest file after its last checkpoint.
Ship the file off the host (stdout sink, log shipper) to cover that.

Keys: ``hmac_key`` / ``hmac_key_file`` (at least 32 bytes) is required.
``allow_ephemeral_key`` (dev only) makes a random key per process, so
``broker audit hash`` cannot find its records later and checkpoints of
earlier runs cannot be verified.

The record schema is ``schema.json`` in this package (``load_schema()``).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from broker.audit.query import AuditQuery, parse_when, query_records, render_table, summarize_details
from broker.audit.records import (
    GENESIS_HASH,
    REQUIRED_DETAILS,
    AuditAction,
    AuditEvent,
    AuditKey,
    AuditOutcome,
    canonical,
    record_hash,
)
from broker.audit.verify import Problem, VerifyReport, chain_order, verify_chain
from broker.audit.writer import AuditLog, AuditReceipt, rotated_siblings

__all__ = [
    "GENESIS_HASH",
    "REQUIRED_DETAILS",
    "AuditAction",
    "AuditEvent",
    "AuditKey",
    "AuditLog",
    "AuditOutcome",
    "AuditQuery",
    "AuditReceipt",
    "Problem",
    "VerifyReport",
    "canonical",
    "chain_order",
    "default_chains",
    "default_paths",
    "load_schema",
    "parse_when",
    "query_records",
    "record_hash",
    "render_table",
    "summarize_details",
    "verify_chain",
    "worker_audit_path",
]


def load_schema() -> dict[str, Any]:
    """The JSON Schema every audit record validates against."""
    text = resources.files("broker.audit").joinpath("schema.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def default_paths(file_path: Path) -> list[Path]:
    """The configured audit file and its rotated siblings (those that exist)."""
    return [*rotated_siblings(file_path), *([file_path] if file_path.exists() else [])]


_WORKER_DIR = "worker-"


def worker_audit_path(file_path: Path, index: int) -> Path:
    """The chain of server worker ``index``: the configured file for worker 0, ``worker-I/<name>`` beside it else."""
    return file_path if index == 0 else file_path.parent / f"{_WORKER_DIR}{index}" / file_path.name


def default_chains(file_path: Path) -> list[list[Path]]:
    """Every server chain of the configured audit file: its own, then each worker's (``server.workers`` > 1)."""
    indexes = sorted(
        int(d.name.removeprefix(_WORKER_DIR))
        for d in file_path.parent.glob(_WORKER_DIR + "*")
        if d.is_dir() and d.name.removeprefix(_WORKER_DIR).isdigit()
    )
    chains = [default_paths(worker_audit_path(file_path, i)) for i in [0, *indexes]]
    return [chain for chain in chains if chain]
