"""Fail closed, never hang: a broken, blocked or full sink gives AuditUnavailable within the bound,
and the log recovers by itself with its chain intact.

These work as root too: no chmod tricks. Broken = the parent path is a regular file; blocked = a
FIFO nobody reads; full = RLIMIT_FSIZE in a subprocess.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from broker.audit import AuditAction, AuditKey, AuditLog, AuditOutcome, verify_chain
from broker.errors import AuditUnavailable
from broker.metrics import Metrics
from broker.models import IntegrationRef
from broker.settings import AuditSettings

KEY_TEXT = "audit-key-for-tests-0123456789abcdef"
KEY = AuditKey(KEY_TEXT.encode())
REF = IntegrationRef("org-1", "vendor-a")
BOUND_MS = 500  # generous: the success paths share it on a loaded CI machine
BOUND_SECONDS = BOUND_MS / 1000
MARGIN_SECONDS = 0.5


def settings(path: Path, **options: Any) -> AuditSettings:
    values: dict[str, Any] = {"checkpoint_every_records": 1000, "write_timeout_ms": BOUND_MS} | options
    return AuditSettings(file_path=path, hmac_key=SecretStr(KEY_TEXT), **values)


def step(log: AuditLog, i: int, pad: int = 0) -> int:
    details: dict[str, Any] = {"step": f"s{i}"} | ({"pad": "x" * pad} if pad else {})
    return log.record(AuditAction.ROTATION_STEP, AuditOutcome.SUCCESS, ref=REF, details=details).seq


def timed_failure(call: Any) -> float:
    """Run ``call``, expect AuditUnavailable, return how long it took."""
    start = time.perf_counter()
    with pytest.raises(AuditUnavailable):
        call()
    return time.perf_counter() - start


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def records(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines()]


class FifoReader:
    """Reads a FIFO to EOF in a thread (the audit sink's far end)."""

    def __init__(self, fd: int | None = None, path: Path | None = None) -> None:
        self.data = bytearray()
        self._fd, self._path = fd, path
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> FifoReader:
        self._thread.start()
        return self

    def _run(self) -> None:
        fd = self._fd if self._fd is not None else os.open(self._path, os.O_RDONLY)  # type: ignore[arg-type]
        try:
            while chunk := os.read(fd, 65536):
                self.data += chunk
        finally:
            os.close(fd)

    def join(self) -> bytes:
        self._thread.join(10)
        assert not self._thread.is_alive()
        return bytes(self.data)


class TestBrokenSink:
    def test_unwritable_path_fails_fast_then_recovers(self, tmp_path: Path) -> None:
        """A path whose parent is a regular file fails within the bound; once fixed, the next write works
        and the chain starts with an audit.recovered record."""
        blocker = tmp_path / "blocker"
        blocker.write_text("not a directory")
        path = blocker / "audit.jsonl"
        metrics = Metrics()
        with AuditLog(settings(path), metrics=metrics) as log:
            assert timed_failure(lambda: step(log, 1)) < BOUND_SECONDS + MARGIN_SECONDS
            assert timed_failure(lambda: step(log, 2)) < BOUND_SECONDS + MARGIN_SECONDS
            assert sample(metrics, "broker_audit_failures_total", reason="open") == 2
            assert not log.healthy
            blocker.unlink()
            blocker.mkdir()
            assert step(log, 3) == 1
            assert log.healthy
        written = records(path.read_bytes())
        assert written[0]["action"] == "audit.recovered"
        assert written[0]["details"]["failures"] == 2
        assert written[0]["details"]["last_failure"] == "open: EEXIST"
        assert verify_chain([path], key=KEY).ok


class TestBlockedSink:
    def test_blocked_open_times_out_then_recovers(self, tmp_path: Path) -> None:
        """A FIFO with no reader blocks the writer; record and arecord give up within the bound, their
        records are dropped (never in the chain), and writing resumes once a reader appears."""
        fifo = tmp_path / "audit.fifo"
        os.mkfifo(fifo)
        metrics = Metrics()
        log = AuditLog(settings(fifo), metrics=metrics).start()
        assert timed_failure(lambda: step(log, 1)) < BOUND_SECONDS + MARGIN_SECONDS
        assert (
            timed_failure(lambda: asyncio.run(log.arecord("broker.started", "success")))
            < BOUND_SECONDS + MARGIN_SECONDS
        )
        assert sample(metrics, "broker_audit_failures_total", reason="timeout") == 2
        reader = FifoReader(path=fifo).start()
        assert step(log, 2) == 1  # seq 0 is the audit.recovered note
        log.close()
        data = reader.join()
        written = records(data)
        assert [r["action"] for r in written] == ["audit.recovered", "rotation.step", "audit.checkpoint"]
        assert written[0]["details"]["dropped_records"] == 2
        captured = tmp_path / "captured.jsonl"
        captured.write_bytes(data)
        assert verify_chain([captured], key=KEY).ok

    def test_blocked_write_lands_late_and_is_flagged(self, tmp_path: Path) -> None:
        """A write stuck mid-way (pipe full) times out for its caller; when it lands later, an
        audit.recovered record lists its seq as unacknowledged, so nobody mistakes it for an issued token."""
        fifo = tmp_path / "audit.fifo"
        os.mkfifo(fifo)
        read_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader that does not read (yet)
        log = AuditLog(settings(fifo)).start()
        last_ok = -1
        for i in range(200):
            start = time.perf_counter()
            try:
                last_ok = step(log, i, pad=4000)
            except AuditUnavailable:
                assert time.perf_counter() - start < BOUND_SECONDS + MARGIN_SECONDS
                break
        else:
            pytest.fail("the pipe never filled")
        fcntl.fcntl(read_fd, fcntl.F_SETFL, fcntl.fcntl(read_fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        reader = FifoReader(fd=read_fd).start()
        after = step(log, 999)
        log.close()
        data = reader.join()
        written = records(data)
        recovered = [r for r in written if r["action"] == "audit.recovered"]
        assert recovered and recovered[0]["details"]["unacknowledged_seqs"] == [last_ok + 1]
        assert after == last_ok + 3  # the late record, the note, then this one
        captured = tmp_path / "captured.jsonl"
        captured.write_bytes(data)
        assert verify_chain([captured], key=KEY).ok

    def test_full_queue_fails_at_once(self, tmp_path: Path) -> None:
        """With the writer stuck and the queue full, record fails immediately rather than waiting."""
        fifo = tmp_path / "audit.fifo"
        os.mkfifo(fifo)
        metrics = Metrics()
        log = AuditLog(settings(fifo, queue_max_records=1, write_timeout_ms=100), metrics=metrics).start()
        timed_failure(lambda: step(log, 1))  # taken by the writer, which blocks opening the FIFO
        timed_failure(lambda: step(log, 2))  # stays queued
        assert timed_failure(lambda: step(log, 3)) < 0.05
        assert sample(metrics, "broker_audit_failures_total", reason="queue_full") == 1
        reader = FifoReader(path=fifo).start()
        log.close()
        assert records(reader.join())[0]["details"]["dropped_records"] == 2

    def test_a_batch_that_does_not_fit_fails_at_once(self, tmp_path: Path) -> None:
        """The bound counts records: one loop iteration's batch larger than the room left is refused whole."""
        path = tmp_path / "audit.jsonl"
        metrics = Metrics()
        log = AuditLog(settings(path, queue_max_records=3, write_timeout_ms=100), metrics=metrics).start()

        async def five() -> list[BaseException | object]:
            calls = (log.arecord("broker.started", "success") for _ in range(5))
            return await asyncio.gather(*calls, return_exceptions=True)

        started = time.monotonic()
        outcomes = asyncio.run(five())
        assert time.monotonic() - started < 0.05
        assert all(isinstance(o, AuditUnavailable) and "queue is full" in o.message for o in outcomes)
        assert sample(metrics, "broker_audit_failures_total", reason="queue_full") == 5
        log.close()
        assert not path.exists()  # nothing was written: the refused records are in no chain


_DISK_FULL_SCRIPT = r"""
import json, resource, signal, sys, time
from pathlib import Path
from pydantic import SecretStr
from broker.audit import AuditLog
from broker.errors import AuditUnavailable
from broker.models import IntegrationRef
from broker.settings import AuditSettings

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path, limit, key = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
_soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
settings = AuditSettings(file_path=path, hmac_key=SecretStr(key), write_timeout_ms=500, checkpoint_every_records=1000)
log = AuditLog(settings).start()
ref = IntegrationRef("org-1", "vendor-a")

def step(i):
    return log.record("revoke.step", "success", ref=ref, details={"step": f"s{i}"}).seq

out = {"ok": 0, "failures": []}
for i in range(10000):
    start = time.perf_counter()
    try:
        step(i)
        out["ok"] += 1
    except AuditUnavailable as exc:
        data = path.read_bytes()
        out["failures"].append({"elapsed": time.perf_counter() - start, "message": str(exc),
                                "size": len(data), "ends_with_newline": data.endswith(b"\n")})
        if len(out["failures"]) == 2:
            break
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
out["after"] = step(-1)
log.close()
print(json.dumps(out))
"""


class TestFullDisk:
    def test_file_size_limit_fails_within_bound_and_recovers(self, tmp_path: Path) -> None:
        """When the file cannot grow (RLIMIT_FSIZE standing in for a full disk) writes fail within the
        bound, the torn line is cut back at once, and after space returns the chain still verifies."""
        path = tmp_path / "audit.jsonl"
        limit = 8192
        result = subprocess.run(
            [sys.executable, "-c", _DISK_FULL_SCRIPT, str(path), str(limit), KEY_TEXT],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        out = json.loads(result.stdout.strip().splitlines()[-1])
        assert out["ok"] > 5 and len(out["failures"]) == 2
        for failure in out["failures"]:
            assert failure["elapsed"] < 0.5 + MARGIN_SECONDS
            assert "EFBIG" in failure["message"]
            assert failure["size"] <= limit and failure["ends_with_newline"]
        assert out["after"] == out["ok"] + 1  # after the audit.recovered note
        written = records(path.read_bytes())
        assert written[out["ok"]]["action"] == "audit.recovered"
        assert written[out["ok"]]["details"]["failures"] == 2
        assert verify_chain([path], key=KEY).ok
