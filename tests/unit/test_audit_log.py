"""AuditLog: chain continuity, restart from the tail, rotation, checkpoints, sinks, repair."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import SecretStr

from broker.audit import AuditAction, AuditKey, AuditLog, AuditOutcome, verify_chain
from broker.audit import writer as writer_module
from broker.errors import AuditUnavailable, ConfigError
from broker.metrics import Metrics
from broker.models import IntegrationRef, Principal
from broker.settings import AuditSettings

KEY_TEXT = "audit-key-for-tests-0123456789abcdef"
KEY = AuditKey(KEY_TEXT.encode())
REF = IntegrationRef("org-1", "vendor-a")
PRINCIPAL = Principal("payments", "invoicer")


def settings(path: Path | None, **options: Any) -> AuditSettings:
    values: dict[str, Any] = {"checkpoint_every_records": 1000, "fsync": False, "write_timeout_ms": 10_000} | options
    return AuditSettings(file_path=path, hmac_key=SecretStr(KEY_TEXT), **values)


def step(log: AuditLog, i: int) -> int:
    return log.record(AuditAction.ROTATION_STEP, AuditOutcome.SUCCESS, ref=REF, details={"step": f"s{i}"}).seq


def records(*paths: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for p in paths for line in p.read_bytes().splitlines()]


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


class TestRecording:
    def test_receipts_follow_the_file(self, tmp_path: Path) -> None:
        """Each record gets the next seq, and the receipt's hash is the one written."""
        path = tmp_path / "audit.jsonl"
        with AuditLog(settings(path)) as log:
            receipts = [log.record(AuditAction.BROKER_STARTED, AuditOutcome.SUCCESS) for _ in range(3)]
        written = records(path)
        assert [r.seq for r in receipts] == [0, 1, 2]
        assert [(w["seq"], w["hash"]) for w in written[:3]] == [(r.seq, r.hash) for r in receipts]

    def test_the_writer_thread_alone_runs_under_sched_batch(self, tmp_path: Path) -> None:
        """The writer's wake-ups do not preempt running threads; the caller's scheduling is untouched."""
        with AuditLog(settings(tmp_path / "audit.jsonl")) as log:
            step(log, 0)
            writer = log._thread
            assert writer is not None and writer.native_id is not None
            assert os.sched_getscheduler(writer.native_id) == os.SCHED_BATCH
            assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER

    def test_missing_sink_is_a_config_error(self) -> None:
        """With neither a file nor stdout there is nowhere to audit, so the log refuses to exist."""
        with pytest.raises(ConfigError, match="sink"):
            AuditLog(settings(None))

    def test_missing_key_is_a_config_error(self, tmp_path: Path) -> None:
        """Without an audit key the log refuses to start."""
        with pytest.raises(ConfigError):
            AuditLog(AuditSettings(file_path=tmp_path / "a.jsonl"))

    def test_internal_actions_are_refused(self, tmp_path: Path) -> None:
        """Callers cannot write checkpoints or recovery notes themselves."""
        with AuditLog(settings(tmp_path / "a.jsonl")) as log, pytest.raises(ValueError):
            log.record(AuditAction.AUDIT_CHECKPOINT, AuditOutcome.SUCCESS)

    def test_concurrent_writers_form_one_chain(self, tmp_path: Path) -> None:
        """Records from many threads get distinct seqs and one valid chain."""
        path = tmp_path / "audit.jsonl"
        seqs: list[int] = []
        lock = threading.Lock()
        with AuditLog(settings(path, checkpoint_every_records=25)) as log:

            def work(n: int) -> None:
                for i in range(40):
                    seq = step(log, n * 100 + i)
                    with lock:
                        seqs.append(seq)

            threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert len(set(seqs)) == 320
        report = verify_chain([path], key=KEY)
        assert report.ok, report.summary()
        assert report.checkpoints >= 320 // 25

    def test_async_record(self, tmp_path: Path) -> None:
        """arecord writes under the same bound without blocking the event loop, concurrently."""
        path = tmp_path / "audit.jsonl"

        async def main(log: AuditLog) -> list[int]:
            receipts = await asyncio.gather(
                *(log.arecord(AuditAction.POLICY_RELOADED, "success", details={"n": i}) for i in range(50))
            )
            return [r.seq for r in receipts]

        with AuditLog(settings(path)) as log:
            seqs = asyncio.run(main(log))
        assert sorted(seqs) == list(range(50))
        assert verify_chain([path], key=KEY).ok

    def test_a_loop_iteration_is_one_batch_and_a_cancelled_caller_stays_out(self, tmp_path: Path) -> None:
        """Records made in one event-loop iteration reach the file together; one whose caller is cancelled
        before the writer takes them is left out (and reported as dropped), the others land in order."""
        path = tmp_path / "audit.jsonl"

        async def main(log: AuditLog) -> list[int]:
            tasks = [
                asyncio.ensure_future(log.arecord(AuditAction.POLICY_RELOADED, "success", details={"n": i}))
                for i in range(5)
            ]
            await asyncio.sleep(0)  # every task has made its record; the batch is handed over next iteration
            tasks[2].cancel()
            done = await asyncio.gather(*tasks, return_exceptions=True)
            assert isinstance(done[2], asyncio.CancelledError)
            return [r.seq for r in done if not isinstance(r, BaseException)]

        with AuditLog(settings(path)) as log:
            seqs = asyncio.run(main(log))
            step(log, 9)
        written = records(path)
        # The note about the dropped record comes first, then the batch without it.
        assert written[0]["action"] == "audit.recovered" and written[0]["details"]["dropped_records"] == 1
        assert seqs == [1, 2, 3, 4]
        assert [r["details"]["n"] for r in written[1:5]] == [0, 1, 3, 4]
        assert verify_chain([path], key=KEY).ok

    def test_request_id_comes_from_the_log_context(self, tmp_path: Path) -> None:
        """Without request_id=, the record carries the request id bound in structlog's contextvars."""
        path = tmp_path / "audit.jsonl"
        with AuditLog(settings(path)) as log:
            structlog.contextvars.bind_contextvars(request_id="req-42")
            step(log, 1)
            log.record(AuditAction.BROKER_STARTED, AuditOutcome.SUCCESS, request_id="explicit")
        assert [r["request_id"] for r in records(path)[:2]] == ["req-42", "explicit"]

    def test_metrics_count_records_per_sink(self, tmp_path: Path) -> None:
        """audit_records{sink} counts every line written to each sink."""
        metrics = Metrics()
        out = io.BytesIO()
        with AuditLog(settings(tmp_path / "a.jsonl", stdout=True), metrics=metrics, stdout=out) as log:
            step(log, 1)
        assert sample(metrics, "broker_audit_records_total", sink="file") == 2  # the record and the final checkpoint
        assert sample(metrics, "broker_audit_records_total", sink="stdout") == 2


class TestSinks:
    def test_stdout_and_file_get_the_same_lines(self, tmp_path: Path) -> None:
        """With both sinks, stdout carries byte-identical records."""
        path = tmp_path / "audit.jsonl"
        out = io.BytesIO()
        with AuditLog(settings(path, stdout=True), stdout=out) as log:
            for i in range(5):
                step(log, i)
        assert out.getvalue() == path.read_bytes()

    def test_stdout_only(self) -> None:
        """A stdout-only log writes a verifiable chain from genesis."""
        out = io.BytesIO()
        with AuditLog(settings(None, stdout=True), stdout=out) as log:
            step(log, 1)
        lines = out.getvalue().splitlines()
        assert json.loads(lines[0])["seq"] == 0 and len(lines) == 2


class FsyncSpy:
    """Wraps the real ``os.fsync``: notes when each call on the audit file happens, and can fail the first ones."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fail: int = 0, hold: threading.Event | None = None
    ) -> None:
        self.path = path = tmp_path / "audit.jsonl"
        path.touch()
        self.fail = fail
        self.calls: list[float] = []
        self.called = threading.Event()
        real = os.fsync

        def fsync(fd: int) -> None:
            if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                self.calls.append(time.monotonic())
                self.called.set()
                if hold is not None:  # a disk that takes its time
                    assert hold.wait(30)
                if self.fail > 0:
                    self.fail -= 1
                    raise OSError(errno.EIO, "injected I/O error")
            real(fd)

        monkeypatch.setattr(writer_module.os, "fsync", fsync)


def wait_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class TestFsync:
    """When a record counts as written: ``fsync`` always, interval (the default) or never."""

    def test_the_default_is_interval(self) -> None:
        assert AuditSettings().fsync == "interval"
        assert (AuditSettings(fsync=True).fsync, AuditSettings(fsync="false").fsync) == ("always", "never")

    def test_always_syncs_before_the_record_is_acknowledged(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        spy = FsyncSpy(monkeypatch, tmp_path)
        path = spy.path
        with AuditLog(settings(path, fsync="always")) as log:
            for i in range(3):
                before = len(spy.calls)
                step(log, i)
                assert len(spy.calls) == before + 1

    def test_interval_acknowledges_first_and_syncs_within_the_interval(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        spy = FsyncSpy(monkeypatch, tmp_path)
        path = spy.path
        with AuditLog(settings(path, fsync="interval", fsync_interval_ms=100)) as log:
            step(log, 0)
            acknowledged = time.monotonic()
            assert spy.calls == []  # the caller did not wait for the disk
            assert spy.called.wait(5)
            assert spy.calls[0] - acknowledged >= 0.05  # due 100 ms after the write, not at once
        assert verify_chain([path], key=KEY).ok

    def test_interval_syncs_many_records_once(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Records written within one interval share one fsync (here the one at close)."""
        spy = FsyncSpy(monkeypatch, tmp_path)
        with AuditLog(settings(spy.path, fsync="interval", fsync_interval_ms=60_000)) as log:
            for i in range(20):
                step(log, i)
            assert spy.calls == []
        assert len(spy.calls) == 1

    def test_a_slow_fsync_holds_up_no_write(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """While the interval's fsync is stuck on the disk, records are still written and acknowledged."""
        release = threading.Event()
        spy = FsyncSpy(monkeypatch, tmp_path, hold=release)
        with AuditLog(settings(spy.path, fsync="interval", fsync_interval_ms=10, write_timeout_ms=2000)) as log:
            step(log, 0)
            assert spy.called.wait(5)  # the fsync has started, and hangs
            receipts = [step(log, i) for i in range(1, 6)]
            assert receipts == [1, 2, 3, 4, 5] and log.healthy
            assert len(spy.calls) == 1  # one fsync at a time
            release.set()
        assert verify_chain([spy.path], key=KEY).ok

    def test_never_leaves_it_to_the_kernel(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        spy = FsyncSpy(monkeypatch, tmp_path)
        path = spy.path
        with AuditLog(settings(path, fsync="never")) as log:
            for i in range(5):
                step(log, i)
        assert spy.calls == []
        assert len(records(path)) == 6  # and a final checkpoint

    def test_a_failed_background_fsync_is_reported_and_recovers(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """EIO from fsync means written records may not be on disk: unhealthy, counted, told in audit.recovered."""
        spy = FsyncSpy(monkeypatch, tmp_path, fail=1)
        path = spy.path
        metrics = Metrics()
        with AuditLog(settings(path, fsync="interval", fsync_interval_ms=10), metrics=metrics) as log:
            step(log, 0)
            wait_until(lambda: not log.healthy)
            assert sample(metrics, "broker_audit_failures_total", reason="fsync") == 1
            step(log, 1)
            assert log.healthy
        assert spy.calls
        written = records(path)
        recovered = [r for r in written if r["action"] == "audit.recovered"]
        assert len(recovered) == 1
        assert recovered[0]["details"]["failures"] == 1
        assert recovered[0]["details"]["last_failure"] == "fsync: EIO"
        assert [r["details"].get("step") for r in written if r["action"] == "rotation.step"] == ["s0", "s1"]
        assert verify_chain([path], key=KEY).ok


class TestCheckpoints:
    def test_checkpoint_every_n_records(self, tmp_path: Path) -> None:
        """A signed checkpoint follows every N records, carrying the count and the chain head."""
        path = tmp_path / "audit.jsonl"
        with AuditLog(settings(path, checkpoint_every_records=3)) as log:
            for i in range(7):
                step(log, i)
        written = records(path)
        checkpoints = [r for r in written if r["action"] == "audit.checkpoint"]
        assert [c["seq"] for c in checkpoints] == [3, 7, 9]  # after 3, after 6 more, and the final one at close
        for c in checkpoints:
            assert c["details"] == {"count": c["seq"], "head": c["prev"]}
            assert KEY.mac_ok(c) and c["key_id"] == KEY.key_id

    def test_unused_log_leaves_no_file(self, tmp_path: Path) -> None:
        """Starting and closing a log that never recorded anything creates no audit file."""
        with AuditLog(settings(tmp_path / "audit.jsonl")):
            pass
        assert not (tmp_path / "audit.jsonl").exists()

    def test_close_without_news_adds_no_checkpoint(self, tmp_path: Path) -> None:
        """Closing right after a checkpoint (or a restart with nothing new) writes nothing."""
        path = tmp_path / "audit.jsonl"
        with AuditLog(settings(path)) as log:
            step(log, 1)
        size = path.stat().st_size
        with AuditLog(settings(path)):
            pass
        assert path.stat().st_size == size


class TestRestart:
    def test_restart_continues_the_chain(self, tmp_path: Path) -> None:
        """A new AuditLog on the same file links its first record to the last one on disk."""
        path = tmp_path / "audit.jsonl"
        for round_ in range(3):
            with AuditLog(settings(path)) as log:
                step(log, round_)
        assert [r["seq"] for r in records(path)] == list(range(6))
        assert verify_chain([path], key=KEY).ok

    def test_restart_reads_only_the_tail(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Continuing a large file reads a bounded tail, not the whole file."""
        path = tmp_path / "audit.jsonl"
        with AuditLog(settings(path)) as log:
            for i in range(3000):
                step(log, i)
        size = path.stat().st_size
        read: list[int] = []
        real_pread = os.pread

        def counting_pread(fd: int, n: int, offset: int) -> bytes:
            read.append(n)
            return real_pread(fd, n, offset)

        monkeypatch.setattr(writer_module.os, "pread", counting_pread)
        with AuditLog(settings(path)) as log:
            assert step(log, 0) == 3003  # 3000 records and 3 checkpoints before it
        assert size > 1_000_000 and sum(read) <= 2 * 64 * 1024

    def test_restart_after_rotation_with_the_file_gone(self, tmp_path: Path) -> None:
        """If the live file is missing (crash right after rotating), the chain continues from the newest rotation."""
        path = tmp_path / "audit.jsonl"
        with AuditLog(settings(path, max_file_bytes=4096)) as log:
            for i in range(40):
                step(log, i)
        newest = tmp_path / f"audit.jsonl.{records(path)[-1]['seq']:012d}"
        path.rename(newest)  # renamed, and the process died before creating the new file
        with AuditLog(settings(path, max_file_bytes=4096)) as log:
            step(log, 99)
        assert records(path)[0]["prev"] == records(newest)[-1]["hash"]
        assert verify_chain([tmp_path], key=KEY).ok

    def test_torn_tail_is_cut_and_reported(self, tmp_path: Path) -> None:
        """A half-written last line (a crash mid-write, never acknowledged) is cut on start and reported."""
        path = tmp_path / "audit.jsonl"
        with AuditLog(settings(path)) as log:
            step(log, 1)
        with path.open("ab") as fh:
            fh.write(b'{"action":"token.iss')
        with AuditLog(settings(path)) as log:
            step(log, 2)
        written = records(path)
        recovered = [r for r in written if r["action"] == "audit.recovered"]
        assert len(recovered) == 1 and recovered[0]["details"]["truncated_bytes"] == 20
        assert verify_chain([path], key=KEY).ok

    def test_unreadable_last_line_fails_closed(self, tmp_path: Path) -> None:
        """A complete but unreadable last line stops every write (AuditUnavailable) until someone looks."""
        path = tmp_path / "audit.jsonl"
        path.write_bytes(b"garbage\n")
        metrics = Metrics()
        with AuditLog(settings(path), metrics=metrics) as log, pytest.raises(AuditUnavailable, match="verify"):
            step(log, 1)
        assert sample(metrics, "broker_audit_failures_total", reason="corrupt") >= 1
        assert path.read_bytes() == b"garbage\n"


class TestRotation:
    def test_rotation_keeps_one_chain(self, tmp_path: Path) -> None:
        """Past max_file_bytes the file is renamed <name>.<last seq> and the chain runs on into the new file."""
        path = tmp_path / "audit.jsonl"
        with AuditLog(settings(path, max_file_bytes=4096)) as log:
            for i in range(60):
                step(log, i)
        rotated = sorted(tmp_path.glob("audit.jsonl.*"))
        assert len(rotated) >= 3
        for older, newer in zip([*rotated, path], [*rotated, path][1:], strict=False):
            last, first = records(older)[-1], records(newer)[0]
            assert int(older.name.rsplit(".", 1)[1]) == last["seq"]
            assert first["prev"] == last["hash"] and first["seq"] == last["seq"] + 1
        assert all(p.stat().st_size <= 4096 for p in rotated)
        assert verify_chain([tmp_path], key=KEY).ok

    def test_second_writer_fails_closed(self, tmp_path: Path) -> None:
        """A second writer on the same file gets AuditUnavailable instead of forking the chain;
        once the first closes, it can take over and continue the chain."""
        path = tmp_path / "audit.jsonl"
        first = AuditLog(settings(path)).start()
        step(first, 1)
        with AuditLog(settings(path)) as second:
            with pytest.raises(AuditUnavailable, match="another audit writer"):
                step(second, 2)
            first.close()
            assert step(second, 3) == 3  # after the first log's record and its final checkpoint
        assert verify_chain([tmp_path], key=KEY).ok

    def test_files_are_private(self, tmp_path: Path) -> None:
        """Audit files are created 0600."""
        path = tmp_path / "audit.jsonl"
        with AuditLog(settings(path)) as log:
            step(log, 1)
        assert path.stat().st_mode & 0o777 == 0o600
