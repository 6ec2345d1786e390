"""``AuditLog``: the bounded, fail-closed writer of the audit chain.

One daemon thread owns every byte of I/O (files and stdout). Callers put a
request on a bounded queue and wait at most ``write_timeout_ms`` for it to be
written; otherwise they get ``AuditUnavailable`` and must not carry out the
audited act. The writer commits requests in batches (one write per batch)
and only then acknowledges them. "Written" depends on ``fsync``:

- ``always``: written and fsynced (one fsync per batch): nothing
  acknowledged is lost even to a power cut;
- ``interval`` (the default): written to the file, so in the kernel's page
  cache, where a crash or kill of the broker cannot lose it; the writer
  fsyncs within ``fsync_interval_ms`` after, on a thread of its own, so a
  slow disk holds up no write (like auditd's default ``INCREMENTAL_ASYNC``
  flush; Vault's file audit device never fsyncs). A power cut or kernel
  crash can lose that much;
- ``never``: the kernel writes back when it likes.

A failed background fsync counts as a failed write: the log reports it
(``audit.recovered``) and is unhealthy until the next good write. The records
async callers make in one event-loop iteration travel as one request (one
queue entry, one timer, one wake-up); the bound counts records, not requests.

Consistency rules:

- A request whose caller gave up before the writer took it is dropped and
  never enters the chain.
- A failed write leaves nothing behind: the file is cut back to the last
  acknowledged byte (immediately, or when it is reopened), so a torn line
  can only be one nobody was told succeeded. The chain head in memory is
  rolled back with it.
- After trouble, the first successful write is preceded by an
  ``audit.recovered`` record saying what happened: failed attempts, dropped
  requests, bytes cut, and ``unacknowledged_seqs`` (records that did reach
  the file but whose caller had already been told the audit was unavailable).
- On start the chain continues from the last line of the file (or of the
  newest rotated file); only the tail is read. A torn last fragment is cut
  (and reported in ``audit.recovered``); an unreadable last complete line
  makes every write fail until somebody looks (``broker audit verify``).
- Past ``max_file_bytes`` the file is renamed to ``<name>.<last seq, 12
  digits>`` and a new one started; the chain runs on across files.
- One writer per file: a ``.<name>.lock`` beside it is flock-ed for the
  log's lifetime; a second writer (another process or ``AuditLog``) fails
  closed with ``AuditUnavailable`` instead of forking the chain.
- Non-regular files (a FIFO, a character device) and stdout are written
  but never read: such a chain starts at the genesis record on each start.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import queue
import stat
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import structlog

from broker.audit.records import (
    GENESIS_HASH,
    AuditAction,
    AuditEvent,
    AuditKey,
    AuditOutcome,
    PreparedRecord,
    SecretValue,
    checkpoint_body,
    format_ts,
    prepare_token_issued,
    seal,
    seal_prepared,
)
from broker.errors import AuditUnavailable, ConfigError
from broker.log import get_logger, utc_timestamp
from broker.metrics import Metrics
from broker.models import IntegrationRef, IssuedToken, Principal
from broker.settings import AuditSettings

_TAIL_CHUNK_BYTES = 64 * 1024
_MAX_BATCH = 512
_BATCH_MAX_RECORDS = 64
_MAX_LISTED_SEQS = 100

_QUEUED, _WRITING, _ABANDONED, _ABANDONED_WRITING, _DONE = range(5)

_log = get_logger("audit")


@dataclass(frozen=True, slots=True)
class AuditReceipt:
    """Where a record landed in the chain."""

    seq: int
    hash: str
    ts: str


class _Request:
    """One queued write. A thread waits on ``event``; a coroutine is resolved on its ``loop``."""

    __slots__ = ("body", "error", "event", "kind", "lock", "loop", "receipt", "resolve", "state")

    def __init__(self, kind: str, body: dict[str, Any] | None = None, *, threaded: bool = True) -> None:
        self.kind = kind
        self.body = body
        self.lock = threading.Lock()
        self.state = _QUEUED
        self.event: threading.Event | None = threading.Event() if threaded else None
        self.receipt: AuditReceipt | None = None
        self.error: AuditUnavailable | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.resolve: Callable[[], None] | None = None

    def wait(self, timeout_seconds: float) -> bool:
        """For threaded callers: wait for the outcome; False if it did not come in time."""
        assert self.event is not None
        return self.event.wait(timeout_seconds)

    def abandon(self) -> bool:
        """Mark that the caller stopped waiting; False if the outcome is already known."""
        with self.lock:
            if self.state == _QUEUED:
                self.state = _ABANDONED
            elif self.state == _WRITING:
                self.state = _ABANDONED_WRITING
            else:
                return False
            return True

    def outcome(self) -> AuditReceipt:
        if self.error is not None:
            raise self.error
        assert self.receipt is not None
        return self.receipt


class _LoopBatch(_Request):
    """The records async callers made in one event-loop iteration: one queue entry, one wake-up.

    Each caller awaits its own future; the batch shares one timeout timer
    and one hand-over to the writer (see ``AuditLog.aemit``). ``cancelled``
    holds the members whose caller went away: left out if the writer has not
    taken the batch yet, else reported as unacknowledged.
    """

    __slots__ = ("bodies", "cancelled", "expired", "futures", "receipts", "skipped", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__("batch", threaded=False)
        self.loop = loop
        self.resolve = self.resolve_members
        self.bodies: list[dict[str, Any] | PreparedRecord] = []
        self.futures: list[asyncio.Future[None]] = []
        self.cancelled: set[int] = set()
        self.skipped: frozenset[int] = frozenset()  # cancelled before the writer took the batch
        self.receipts: list[AuditReceipt | None] = []
        self.expired: AuditUnavailable | None = None
        self.timer: asyncio.TimerHandle | None = None

    def resolve_members(self) -> None:
        """In the batch's event loop: the outcome is known, wake every member."""
        if self.timer is not None:
            self.timer.cancel()
        for future in self.futures:
            if not future.done():
                future.set_result(None)

    def outcome_of(self, index: int) -> AuditReceipt:
        if self.expired is not None:
            raise self.expired
        if self.error is not None:
            raise self.error
        receipt = self.receipts[index]
        assert receipt is not None
        return receipt


class _Notes:
    """What went wrong since the last good write; becomes one ``audit.recovered`` record."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.failures = 0
        self.dropped = 0
        self.truncated_bytes = 0
        self.unacknowledged: list[int] = []
        self.unacknowledged_count = 0
        self.file_replaced = False
        self.since: str | None = None
        self.last_reason: str | None = None

    @property
    def pending(self) -> bool:
        return bool(
            self.failures or self.dropped or self.truncated_bytes or self.unacknowledged_count or self.file_replaced
        )

    def failed(self, reason: str, ts: str) -> None:
        self.failures += 1
        self.last_reason = reason
        self.since = self.since or ts

    def unacknowledge(self, seq: int) -> None:
        self.unacknowledged_count += 1
        if len(self.unacknowledged) < _MAX_LISTED_SEQS:
            self.unacknowledged.append(seq)

    def details(self) -> dict[str, Any]:
        return {
            "failures": self.failures,
            "dropped_records": self.dropped,
            "truncated_bytes": self.truncated_bytes,
            "unacknowledged_seqs": list(self.unacknowledged),
            "unacknowledged_count": self.unacknowledged_count,
            "file_replaced": self.file_replaced,
            "since": self.since,
            "last_failure": self.last_reason,
        }


class _Syncer:
    """The ``fsync: interval`` fsyncs, on a thread of their own: a slow disk never holds up a write.

    It fsyncs a duplicate of the writer's descriptor (the writer may close or
    rotate its own meanwhile), one at a time. A failure is reported through
    ``on_error`` at once (unhealthy, counted) and left in ``error`` for the
    writer's next ``audit.recovered`` record.
    """

    def __init__(self, on_error: Callable[[str], None]) -> None:
        self._on_error = on_error
        self._fds: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.busy = False
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="audit-fsync", daemon=True)
        self._thread.start()

    def submit(self, fd: int) -> None:
        duplicate = os.dup(fd)
        self.busy = True
        self._fds.put(duplicate)

    def stop(self, timeout_seconds: float) -> None:
        self._fds.put(None)
        self._thread.join(timeout_seconds)

    def _run(self) -> None:
        _no_wakeup_preemption()
        while (fd := self._fds.get()) is not None:
            try:
                os.fsync(fd)
            except OSError as exc:
                self.error = _errname(exc)
                self._on_error(self.error)
            finally:
                os.close(fd)
                self.busy = False


class TailCorrupt(Exception):
    """The last complete line of an audit file is not a record this log can continue from."""


class SinkLocked(Exception):
    """Another writer (process or ``AuditLog``) holds the audit file: two writers would fork the chain."""


def _no_wakeup_preemption() -> None:
    """Put the calling thread (the writer) under Linux's SCHED_BATCH policy, where it can.

    Its share of CPU is unchanged; what changes is that its wake-ups no
    longer preempt the thread running on a core. Woken for every batch, it
    otherwise interrupted the event loops (of this worker and the others)
    only to wait for the interpreter lock their thread holds. Measured with
    two workers on two cores: half the context switches, ~10% more tokens/s,
    lower p99. The bound on a write (``write_timeout_ms``) is unaffected: the
    delay is at most a scheduler slice, milliseconds.
    """
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is not None:
        with contextlib.suppress(OSError):  # not Linux, or a sandbox that forbids it: keep the default
            os.sched_setscheduler(0, policy, os.sched_param(0))


def _bound_request_id() -> str | None:
    """The request id bound in structlog's context (by the API's log middleware), if any."""
    bound = structlog.contextvars.get_contextvars().get("request_id")
    return bound if isinstance(bound, str) else None


def _resolve_all(resolvers: list[Callable[[], None]]) -> None:
    for resolve in resolvers:
        resolve()


def _errname(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


def read_tail(fd: int, size: int) -> tuple[dict[str, Any] | None, int]:
    """Return (the last complete record, the offset just past it) by reading backwards.

    Bytes after that offset are a torn fragment. Raises ``TailCorrupt`` if the
    last complete line is not a JSON record with ``seq`` and ``hash``.
    """
    end = size
    buf = b""
    newline = -1
    while end > 0 and newline < 0:
        start = max(0, end - _TAIL_CHUNK_BYTES)
        buf = os.pread(fd, end - start, start) + buf
        end = start
        newline = buf.rfind(b"\n")
    if newline < 0:
        return None, 0
    complete_end = end + newline + 1
    begin = buf.rfind(b"\n", 0, newline)
    while begin < 0 and end > 0:
        start = max(0, end - _TAIL_CHUNK_BYTES)
        chunk = os.pread(fd, end - start, start)
        buf = chunk + buf
        newline += len(chunk)
        end = start
        begin = buf.rfind(b"\n", 0, newline)
    line = buf[begin + 1 : newline]
    try:
        record = json.loads(line)
    except ValueError:
        raise TailCorrupt("the last line of the audit file is not JSON") from None
    if not (
        isinstance(record, dict)
        and isinstance(record.get("seq"), int)
        and not isinstance(record.get("seq"), bool)
        and isinstance(record.get("hash"), str)
    ):
        raise TailCorrupt("the last line of the audit file is not an audit record")
    return record, complete_end


def rotated_siblings(path: Path) -> list[Path]:
    """Rotated files of ``path`` (``<name>.<digits>``), oldest first."""
    prefix = path.name + "."
    found = [p for p in path.parent.glob(prefix + "*") if p.name[len(prefix) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(prefix) :]))


class AuditLog:
    """Append-only, hash-chained audit trail with a bounded write path.

    ``record`` / ``emit`` return an ``AuditReceipt`` once the record is
    written to every sink (as ``fsync`` defines written), or raise ``AuditUnavailable`` within
    ``write_timeout_ms``. ``arecord`` / ``aemit`` are the same for async callers
    (no thread is held while waiting). Use as a context manager, or call
    ``start`` and ``close``.
    """

    def __init__(
        self,
        settings: AuditSettings,
        *,
        metrics: Metrics | None = None,
        key: AuditKey | None = None,
        stdout: BinaryIO | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if settings.file_path is None and not settings.stdout:
            raise ConfigError("the audit trail needs a sink: set BROKER_AUDIT__FILE_PATH and/or BROKER_AUDIT__STDOUT")
        self._settings = settings
        self._key = key if key is not None else AuditKey.from_settings(settings)
        self._metrics = metrics or Metrics()
        self._path = settings.file_path
        self._stdout: BinaryIO | None = (stdout or sys.stdout.buffer) if settings.stdout else None
        self._clock = clock  # None: the system clock, formatted by utc_timestamp without a datetime
        self._timeout_seconds = settings.write_timeout_ms / 1000
        self._queue: queue.SimpleQueue[_Request] = queue.SimpleQueue()  # bounded by _reserve, in records
        self._queued_lock = threading.Lock()
        self._queued_records = 0
        self._batches: dict[asyncio.AbstractEventLoop, _LoopBatch] = {}  # per loop, touched by its thread
        self._thread: threading.Thread | None = None
        self._lifecycle = threading.Lock()
        self._closed = False
        self._stopping = False
        # Writer-thread state below: touched only by the writer thread.
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._regular = False
        self._size = 0
        self._good: tuple[tuple[int, int], int] | None = None  # ((dev, inode), last acknowledged offset)
        self._next_seq: int | None = None
        self._prev = GENESIS_HASH
        self._file_last_seq = -1
        self._since_checkpoint = 0
        self._notes = _Notes()
        self._healthy = True
        self._unsynced_since: float | None = None  # monotonic time of the first write not yet fsynced
        self._syncer: _Syncer | None = None  # fsync: interval, started with the first sync

    # -- public API ---------------------------------------------------------------

    @property
    def key(self) -> AuditKey:
        """The audit key (for ``hmac_hex`` lookups and verification)."""
        return self._key

    @property
    def healthy(self) -> bool:
        """False after a failed write until the next good one (for readiness)."""
        return self._healthy

    def hmac_hex(self, value: SecretValue) -> str:
        """The ``<name>_hmac`` value a secret gets in records."""
        return self._key.hmac_hex(value)

    def start(self) -> AuditLog:
        """Start the writer thread (``record`` also starts it on first use)."""
        with self._lifecycle:
            if self._closed:
                raise AuditUnavailable("the audit log is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
                self._thread.start()
        return self

    def record(
        self,
        action: AuditAction | str,
        outcome: AuditOutcome | str,
        *,
        principal: Principal | None = None,
        ref: IntegrationRef | None = None,
        rule_id: str | None = None,
        reason: str | None = None,
        request_id: str | None = None,
        details: Mapping[str, Any] | None = None,
        secrets: Mapping[str, SecretValue] | None = None,
        vendor_id: str | None = None,
    ) -> AuditReceipt:
        """Write one record; raise ``AuditUnavailable`` if it is not durable within the bound.

        ``details`` are non-secret scalars; each ``secrets`` entry becomes
        ``details["<name>_hmac"]``; ``vendor_id`` names the vendor when there is
        no ``ref`` (vendor-key changes). ``request_id`` defaults to the one bound
        in structlog's contextvars. Bad arguments raise ``ValueError``.
        """
        return self.emit(
            AuditEvent(
                AuditAction(action),
                AuditOutcome(outcome),
                principal=principal,
                ref=ref,
                rule_id=rule_id,
                reason=reason,
                request_id=request_id,
                details=details or {},
                secrets=secrets or {},
                vendor_id=vendor_id,
            )
        )

    async def arecord(
        self,
        action: AuditAction | str,
        outcome: AuditOutcome | str,
        *,
        principal: Principal | None = None,
        ref: IntegrationRef | None = None,
        rule_id: str | None = None,
        reason: str | None = None,
        request_id: str | None = None,
        details: Mapping[str, Any] | None = None,
        secrets: Mapping[str, SecretValue] | None = None,
        vendor_id: str | None = None,
    ) -> AuditReceipt:
        """``record`` for async callers, with the same bound; the event loop is never blocked."""
        return await self.aemit(
            AuditEvent(
                AuditAction(action),
                AuditOutcome(outcome),
                principal=principal,
                ref=ref,
                rule_id=rule_id,
                reason=reason,
                request_id=request_id,
                details=details or {},
                secrets=secrets or {},
                vendor_id=vendor_id,
            )
        )

    def emit(self, event: AuditEvent) -> AuditReceipt:
        """Write a prepared ``AuditEvent`` (see ``AuditEvent.token_issued``)."""
        request = self._request_for(event)
        self._enqueue(request)
        if not request.wait(self._timeout_seconds) and request.abandon():
            raise self._timed_out()
        return request.outcome()

    async def aemit(self, event: AuditEvent) -> AuditReceipt:
        """``emit`` for async callers.

        Records made in one event-loop iteration travel together (at most
        ``_BATCH_MAX_RECORDS``): one queue entry, one timeout timer, one
        wake-up, and one write and fsync, instead of one hand-over each.
        """
        return await self._aenqueue(self._body_for(event))

    async def atoken_issued(self, principal: Principal, ref: IntegrationRef, issued: IssuedToken) -> AuditReceipt:
        """The ``token.issued`` record, as ``aemit(AuditEvent.token_issued(...))`` writes it, for less CPU.

        The token hot path's record is serialised here, ahead, but for its
        chain fields (``prepare_token_issued``); the writer fills those in.
        """
        prepared = prepare_token_issued(self._key, principal, ref, issued, request_id=_bound_request_id())
        return await self._aenqueue(prepared)

    async def _aenqueue(self, body: dict[str, Any] | PreparedRecord) -> AuditReceipt:
        """Add ``body`` to this event loop's batch and wait for its outcome (see ``aemit``)."""
        loop = asyncio.get_running_loop()
        self._check_open()
        batch = self._batches.get(loop)
        if batch is None:
            batch = self._batches[loop] = _LoopBatch(loop)
            loop.call_soon(self._flush_batch, loop)
        index = len(batch.bodies)
        future: asyncio.Future[None] = loop.create_future()
        batch.bodies.append(body)
        batch.futures.append(future)
        if len(batch.bodies) >= _BATCH_MAX_RECORDS:  # a herd: keep the writer busy while the rest arrive
            self._flush_batch(loop)
        try:
            await future
        except asyncio.CancelledError:
            with batch.lock:  # the caller is gone, so nothing will be issued: leave its record out if still possible
                batch.cancelled.add(index)
            raise
        return batch.outcome_of(index)

    def checkpoint(self) -> AuditReceipt:
        """Write a signed checkpoint now."""
        request = _Request("checkpoint")
        self._enqueue(request)
        if not request.wait(self._timeout_seconds) and request.abandon():
            raise self._timed_out()
        return request.outcome()

    def close(self, timeout_seconds: float = 5.0) -> None:
        """Write a final checkpoint (if anything was written since the last) and stop the writer."""
        with self._lifecycle:
            thread, self._closed = self._thread, True
        if thread is None:
            return
        final = _Request("final")
        stop = _Request("stop")
        self._queue.put_nowait(final)
        self._queue.put_nowait(stop)
        if not final.wait(timeout_seconds):
            final.abandon()
            _log.warning("audit_close_timeout", timeout_seconds=timeout_seconds)
        thread.join(timeout_seconds)

    def __enter__(self) -> AuditLog:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- caller side --------------------------------------------------------------

    def _body_for(self, event: AuditEvent) -> dict[str, Any]:
        if event.action in (AuditAction.AUDIT_CHECKPOINT, AuditAction.AUDIT_RECOVERED):
            raise ValueError(f"{event.action} records are written by the audit log itself")
        body = event.body(self._key)
        if body["request_id"] is None:
            body["request_id"] = _bound_request_id()
        return body

    def _request_for(self, event: AuditEvent) -> _Request:
        return _Request("record", self._body_for(event))

    def _check_open(self) -> None:
        if self._thread is None:
            self.start()
        elif self._closed:
            raise AuditUnavailable("the audit log is closed")

    def _enqueue(self, request: _Request) -> None:
        self._check_open()
        if not self._reserve(1):
            raise self._queue_full()
        self._queue.put_nowait(request)

    def _reserve(self, records: int) -> bool:
        """Count ``records`` against ``queue_max_records``; False (nothing counted) if they do not fit."""
        with self._queued_lock:
            if self._queued_records + records > self._settings.queue_max_records:
                return False
            self._queued_records += records
            return True

    def _taken(self, request: _Request) -> None:
        """The writer took ``request`` off the queue: its records no longer count against the bound."""
        size = len(request.bodies) if isinstance(request, _LoopBatch) else int(request.kind == "record")
        if size:
            with self._queued_lock:
                self._queued_records -= size

    def _queue_full(self, records: int = 1) -> AuditUnavailable:
        self._metrics.audit_failures.labels(reason="queue_full").inc(records)
        return AuditUnavailable("audit queue is full; nothing was issued", retry_after_seconds=1.0)

    def _flush_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand this loop's open batch to the writer (or refuse all of it) and start its one timer."""
        batch = self._batches.pop(loop, None)
        if batch is None:
            return
        if self._closed:
            batch.error = AuditUnavailable("the audit log is closed")
        elif not self._reserve(len(batch.bodies)):
            batch.error = self._queue_full(len(batch.bodies))
        else:
            batch.timer = loop.call_later(self._timeout_seconds, self._expire_batch, batch)
            self._queue.put_nowait(batch)
            return
        with batch.lock:
            batch.state = _DONE
        batch.resolve_members()

    def _expire_batch(self, batch: _LoopBatch) -> None:
        """The bound passed before the writer confirmed: every member fails (and is dropped if still queued)."""
        if batch.abandon():
            batch.expired = self._timed_out(len(batch.bodies))
            batch.resolve_members()

    def _timed_out(self, records: int = 1) -> AuditUnavailable:
        self._metrics.audit_failures.labels(reason="timeout").inc(records)
        return AuditUnavailable(
            f"audit sink did not confirm the write within {self._settings.write_timeout_ms} ms; nothing was issued",
            retry_after_seconds=1.0,
        )

    # -- writer thread ------------------------------------------------------------

    def _run(self) -> None:
        _no_wakeup_preemption()
        while not self._stopping:
            try:
                request = self._queue.get(timeout=self._sync_wait())
            except queue.Empty:
                self._sync()
                continue
            self._taken(request)
            if request.kind == "stop":
                break
            batch = [request]
            try:
                self._write_batch(batch)
            except Exception as exc:  # noqa: BLE001 - the writer must survive its own bugs
                _log.error("audit_writer_bug", error=type(exc).__name__)
                self._fail(batch, "internal", exc)
            if self._sync_wait() == 0:
                self._sync()
        self._final_sync()
        self._close_file()
        self._release_lock()

    def _sync_wait(self) -> float | None:
        """Seconds until written records are due for fsync (``fsync: interval``); None if nothing is."""
        if self._unsynced_since is None:
            return None
        due = self._unsynced_since + self._settings.fsync_interval_ms / 1000
        return max(0.0, due - time.monotonic())

    def _sync(self) -> None:
        """Have the syncer fsync what was written but not yet synced (``fsync: interval``)."""
        if self._unsynced_since is None:
            return
        if self._fd is None:
            self._unsynced_since = None
            return
        if self._syncer is None:
            self._syncer = _Syncer(self._sync_failed)
        if self._syncer.busy:  # the last fsync is still running: try again an interval from now
            self._unsynced_since = time.monotonic()
            return
        self._unsynced_since = None
        try:
            self._syncer.submit(self._fd)
        except OSError as exc:  # could not duplicate the descriptor
            self._sync_failed(_errname(exc))
            self._syncer.error = _errname(exc)

    def _sync_failed(self, error: str) -> None:
        """An fsync failed (on the syncer's thread or the writer's): unhealthy and counted at once."""
        self._healthy = False
        self._metrics.audit_failures.labels(reason="fsync").inc()
        _log.warning("audit_write_failed", reason="fsync", error=error)

    def _note_sync_failure(self) -> None:
        """Writer thread: a failed fsync becomes part of the next ``audit.recovered`` record."""
        if self._syncer is not None and self._syncer.error is not None:
            error, self._syncer.error = self._syncer.error, None
            self._notes.failed(f"fsync: {error}", self._now())
            self._close_file()

    def _final_sync(self) -> None:
        """On close: wait for the syncer, then fsync what is left, on this thread."""
        if self._syncer is not None:
            self._syncer.stop(timeout_seconds=5.0)
        if self._unsynced_since is None or self._fd is None:
            return
        self._unsynced_since = None
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self._sync_failed(_errname(exc))

    def _drain(self, batch: list[_Request]) -> None:
        """Add whatever else is queued (up to a batch), noting a stop request."""
        while len(batch) < _MAX_BATCH and not self._stopping:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                return
            self._taken(request)
            if request.kind == "stop":
                self._stopping = True
            else:
                batch.append(request)

    def _now(self) -> str:
        """The current time as ``format_ts`` writes it (``utc_timestamp``: the same format, the second cached)."""
        if self._clock is not None:
            return format_ts(self._clock())
        return utc_timestamp()

    def _write_batch(self, requests: list[_Request]) -> None:
        self._note_sync_failure()
        if not requests and not self._notes.pending:
            return
        if self._next_seq is None and all(r.kind == "final" for r in requests):
            for request in requests:  # closing a log that never wrote: leave the sink untouched
                with request.lock:
                    request.state = _DONE
                    request.receipt = AuditReceipt(-1, GENESIS_HASH, "")
            self._wake(requests)
            return
        try:
            self._ensure_open()
        except SinkLocked as exc:
            self._drain(requests)
            self._fail(requests, "locked", exc, str(exc))
            return
        except TailCorrupt as exc:
            self._drain(requests)
            self._fail(requests, "corrupt", exc, f"{exc}; run `broker audit verify`")
            return
        except OSError as exc:
            self._drain(requests)
            self._fail(requests, "open", exc)
            return
        self._drain(requests)  # opening may have blocked a while; take what queued up meanwhile
        claimed: list[_Request] = []
        for request in requests:
            with request.lock:
                if request.state == _ABANDONED:
                    self._notes.dropped += len(request.bodies) if isinstance(request, _LoopBatch) else 1
                    continue
                request.state = _WRITING
                if isinstance(request, _LoopBatch):  # callers gone before this point: their records stay out
                    request.skipped = frozenset(request.cancelled)
                    self._notes.dropped += len(request.skipped)
            claimed.append(request)
        if not claimed and not self._notes.pending:
            return

        assert self._next_seq is not None
        saved = (self._next_seq, self._prev, self._since_checkpoint)
        lines: list[bytes] = []
        receipts: list[tuple[_Request, AuditReceipt | None]] = []
        if self._notes.pending:
            lines.append(self._seal_next(self._recovered_body())[0])
        for request in claimed:
            if isinstance(request, _LoopBatch):
                request.receipts = [
                    None if index in request.skipped else self._seal_record(body, lines)
                    for index, body in enumerate(request.bodies)
                ]
                receipt = None
            elif request.kind == "record":
                assert request.body is not None
                receipt = self._seal_record(request.body, lines)
            elif request.kind == "checkpoint" or self._since_checkpoint > 0:
                line, receipt = self._seal_checkpoint()
                lines.append(line)
            else:  # "final" with nothing new since the last checkpoint
                receipt = None
            receipts.append((request, receipt))
        data = b"".join(lines)

        try:
            self._write_file(data)
        except OSError as exc:
            self._next_seq, self._prev, self._since_checkpoint = saved
            self._fail(claimed, "write", exc)
            return
        if self._path is not None:
            self._metrics.audit_records.labels(sink="file").inc(len(lines))
        self._file_last_seq = self._next_seq - 1
        self._notes.clear()

        error: AuditUnavailable | None = None
        if self._stdout is not None:
            try:
                self._stdout.write(data)
                self._stdout.flush()
                self._metrics.audit_records.labels(sink="stdout").inc(len(lines))
            except (OSError, ValueError) as exc:
                self._metrics.audit_failures.labels(reason="stdout").inc()
                self._notes.failed(f"stdout: {_errname(exc)}", self._now())
                error = AuditUnavailable(f"audit stdout sink failed ({_errname(exc)})", retry_after_seconds=1.0)
        self._healthy = error is None
        for request, receipt in receipts:
            with request.lock:
                late = request.state == _ABANDONED_WRITING
                request.state = _DONE
                request.error = error
                request.receipt = receipt or AuditReceipt(self._next_seq - 1, self._prev, "")
                gone = request.cancelled if isinstance(request, _LoopBatch) else ()
            if isinstance(request, _LoopBatch):
                for index, member in enumerate(request.receipts):
                    if member is not None and (late or error is not None or index in gone):
                        self._notes.unacknowledge(member.seq)
            elif (late or error is not None) and receipt is not None:
                self._notes.unacknowledge(receipt.seq)
        self._wake(claimed)
        if self._notes.pending and error is None:
            self._write_batch([])

    def _seal_record(self, body: Mapping[str, Any] | PreparedRecord, lines: list[bytes]) -> AuditReceipt:
        """Seal one caller's record into ``lines`` (and a checkpoint after it when one is due)."""
        line, receipt = self._seal_next(body)
        lines.append(line)
        self._since_checkpoint += 1
        if self._since_checkpoint >= self._settings.checkpoint_every_records:
            lines.append(self._seal_checkpoint()[0])
        return receipt

    def _seal_next(self, body: Mapping[str, Any] | PreparedRecord) -> tuple[bytes, AuditReceipt]:
        assert self._next_seq is not None
        ts = self._now()
        if isinstance(body, PreparedRecord):
            line, digest = seal_prepared(body, seq=self._next_seq, ts=ts, prev=self._prev)
        else:
            line, digest = seal(body, seq=self._next_seq, ts=ts, prev=self._prev)
        receipt = AuditReceipt(self._next_seq, digest, ts)
        self._next_seq += 1
        self._prev = digest
        return line, receipt

    def _seal_checkpoint(self) -> tuple[bytes, AuditReceipt]:
        assert self._next_seq is not None
        body = checkpoint_body(self._key, seq=self._next_seq, ts=self._now(), prev=self._prev)
        self._since_checkpoint = 0
        return self._seal_next_with_ts(body)

    def _seal_next_with_ts(self, body: dict[str, Any]) -> tuple[bytes, AuditReceipt]:
        line, digest = seal(body, seq=body["seq"], ts=body["ts"], prev=body["prev"])
        receipt = AuditReceipt(body["seq"], digest, body["ts"])
        self._next_seq = body["seq"] + 1
        self._prev = digest
        return line, receipt

    def _recovered_body(self) -> dict[str, Any]:
        return AuditEvent(AuditAction.AUDIT_RECOVERED, AuditOutcome.SUCCESS, details=self._notes.details()).body(
            self._key
        )

    def _wake(self, requests: list[_Request]) -> None:
        """Tell every waiter of a batch: threads by their event, coroutines with one call per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[Callable[[], None]]] = {}
        for request in requests:
            if request.event is not None:
                request.event.set()
            if request.loop is not None and request.resolve is not None:
                by_loop.setdefault(request.loop, []).append(request.resolve)
        for loop, resolvers in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the caller's event loop is gone
                loop.call_soon_threadsafe(_resolve_all, resolvers)

    def _fail(self, requests: list[_Request], reason: str, exc: BaseException, message: str | None = None) -> None:
        self._healthy = False
        self._metrics.audit_failures.labels(reason=reason).inc()
        self._notes.failed(f"{reason}: {_errname(exc)}", self._now())
        _log.warning("audit_write_failed", reason=reason, error=_errname(exc))
        self._close_file()
        error = AuditUnavailable(
            message or f"audit sink unavailable ({reason}: {_errname(exc)})", retry_after_seconds=1.0
        )
        for request in requests:
            with request.lock:
                request.state = _DONE
                request.error = error
        self._wake(requests)

    # -- file sink ----------------------------------------------------------------

    def _ensure_open(self) -> None:
        if self._path is not None and self._fd is None:
            self._open_file(self._path)
        if self._next_seq is None:
            self._next_seq, self._prev = 0, GENESIS_HASH

    def _open_file(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock(path)
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):
            # A FIFO or device: opening blocks until a reader appears (the caller's bound holds).
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            self._regular = False
            return
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._adopt(fd, path)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._regular = True

    def _adopt(self, fd: int, path: Path) -> None:
        st = os.fstat(fd)
        identity = (st.st_dev, st.st_ino)
        size = st.st_size
        if self._good is not None and self._good[0] == identity and size > self._good[1]:
            # Everything past the last acknowledged byte is ours and was never acknowledged.
            os.ftruncate(fd, self._good[1])
            self._notes.truncated_bytes += size - self._good[1]
            size = self._good[1]
        last, end = read_tail(fd, size)
        if end < size:
            os.ftruncate(fd, end)
            self._notes.truncated_bytes += size - end
            size = end
        if last is None and self._next_seq is None:
            for sibling in reversed(rotated_siblings(path)):
                sfd = os.open(sibling, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    last, _ = read_tail(sfd, os.fstat(sfd).st_size)
                finally:
                    os.close(sfd)
                if last is not None:
                    break
        if last is not None:
            if self._next_seq is None:
                self._next_seq, self._prev = last["seq"] + 1, last["hash"]
                self._file_last_seq = last["seq"]
            elif last["hash"] != self._prev and size > 0:
                self._notes.file_replaced = True
        elif self._next_seq is not None and self._good is not None and self._good[0] != identity:
            self._notes.file_replaced = True
        self._size = size
        self._good = (identity, size)

    def _write_file(self, data: bytes) -> None:
        if self._fd is None:
            return
        if self._regular and self._size > 0 and self._size + len(data) > self._settings.max_file_bytes:
            self._rotate()
        fd = self._fd
        assert fd is not None
        view = memoryview(data)
        try:
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if self._regular and self._settings.fsync == "always":
                os.fsync(fd)
        except OSError:
            if self._regular:
                with contextlib.suppress(OSError):  # else cut back on reopen (see _adopt)
                    os.ftruncate(fd, self._size)
            raise
        self._size += len(data)
        if self._good is not None:
            self._good = (self._good[0], self._size)
        if self._regular and self._settings.fsync == "interval" and self._unsynced_since is None:
            self._unsynced_since = time.monotonic()

    def _rotate(self) -> None:
        assert self._path is not None and self._fd is not None
        path = self._path
        target = path.with_name(f"{path.name}.{self._file_last_seq:012d}")
        if target.exists():
            raise FileExistsError(errno.EEXIST, "rotation target exists")
        os.fsync(self._fd)
        self._unsynced_since = None
        os.rename(path, target)
        self._close_file()
        self._good = None  # the next file is new by our own doing, not a replacement
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        st = os.fstat(fd)
        self._fd, self._regular, self._size = fd, True, 0
        self._good = ((st.st_dev, st.st_ino), 0)

    def _lock(self, path: Path) -> None:
        """Hold ``.<name>.lock`` beside the file while this log lives: one writer per chain."""
        if self._lock_fd is not None:
            return
        fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SinkLocked(
                f"{path} is in use by another audit writer; give each process its own audit file_path"
            ) from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

    def _close_file(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
