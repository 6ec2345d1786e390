"""`broker audit verify | hash | query`: exit codes, lookups by token HMAC, filters, streaming."""

from __future__ import annotations

import itertools
import json
import os
import resource
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from pydantic import SecretStr

from broker.audit import AuditEvent, AuditKey, AuditLog, AuditQuery, query_records
from broker.audit.records import format_ts
from broker.cli import cli
from broker.models import IntegrationRef, Principal
from broker.settings import AuditSettings

KEY_TEXT = "audit-key-for-tests-0123456789abcdef"
KEY = AuditKey(KEY_TEXT.encode())
START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ALICE = Principal("payments", "invoicer", pod_name="invoicer-1")
BOB = Principal("billing", "exporter")
REF_A = IntegrationRef("org-1", "vendor-a")
REF_B = IntegrationRef("org-2", "vendor-b")


def minute_clock() -> Callable[[], datetime]:
    """Each record is written one minute after the previous one."""
    counter = itertools.count()
    return lambda: START + timedelta(minutes=next(counter))


def issue(log: AuditLog, principal: Principal, ref: IntegrationRef, token: str, n: int) -> None:
    log.emit(
        AuditEvent.token_issued(
            principal,
            ref,
            rule_id="rule-1",
            token=SecretStr(token),
            vendor_key_version="1",
            partner_key_version="2",
            lease_id=f"lease-{n}",
            ttl_seconds=600,
            stale=False,
        )
    )


@pytest.fixture
def trail(tmp_path: Path, canary: str) -> Path:
    """An audit directory over several rotated files: 20 records, two of them about the canary token.

    seq 0-9: tokens for ALICE at org-1/vendor-a (seq 3 and 7 carry the canary token);
    seq 10-14: tokens for BOB at org-2/vendor-b; seq 15-19: denials for BOB; then a checkpoint.
    """
    directory = tmp_path / "audit"
    settings = AuditSettings(
        file_path=directory / "audit.jsonl",
        hmac_key=SecretStr(KEY_TEXT),
        max_file_bytes=4096,
        fsync=False,
        write_timeout_ms=10_000,
    )
    with AuditLog(settings, clock=minute_clock()) as log:
        for n in range(10):
            issue(log, ALICE, REF_A, canary if n in (3, 7) else f"other-{n}", n)
        for n in range(10, 15):
            issue(log, BOB, REF_B, f"other-{n}", n)
        for _ in range(5):
            log.emit(AuditEvent.token_denied(BOB, REF_A, error_code="POLICY_DENIED", reason="no rule"))
    assert len(list(directory.glob("audit.jsonl.*"))) > 1
    return directory


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "audit.key"
    path.write_text(KEY_TEXT + "\n")
    return path


def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, ["audit", *args], input=stdin, env=env, catch_exceptions=False)


def json_lines(result: Result) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


class TestVerifyCommand:
    def test_clean_trail_exits_zero(self, trail: Path, key_file: Path) -> None:
        """A clean trail prints OK with the record count and exits 0."""
        result = run("verify", str(trail), "--key-file", str(key_file))
        assert result.exit_code == 0
        assert result.stdout.startswith("OK 21 records") and "MACs valid" in result.stdout

    def test_default_paths_come_from_settings(self, trail: Path, key_file: Path) -> None:
        """Without PATH, verify checks the configured file and its rotations, with the configured key."""
        env = {"BROKER_AUDIT__FILE_PATH": str(trail / "audit.jsonl"), "BROKER_AUDIT__HMAC_KEY_FILE": str(key_file)}
        result = run("verify", env=env)
        assert result.exit_code == 0 and "OK 21 records" in result.stdout

    def test_tampered_trail_exits_one_naming_the_line(self, trail: Path) -> None:
        """An edited record makes verify print FAIL with file:line and exit 1."""
        target = sorted(trail.glob("audit.jsonl.*"))[0]
        lines = target.read_bytes().splitlines(keepends=True)
        lines[1] = lines[1].replace(b'"lease-1"', b'"lease-X"')
        target.write_bytes(b"".join(lines))
        result = run("verify", str(trail))
        assert result.exit_code == 1
        assert result.stdout.startswith(f"FAIL {target}:2 (seq 1)")

    def test_verify_as_a_process(self, trail: Path) -> None:
        """`python -m broker audit verify` exits 0 on a clean trail and 1 on a truncated one."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        cmd = [sys.executable, "-m", "broker", "audit", "verify", str(trail)]
        assert subprocess.run(cmd, env=env, capture_output=True, timeout=60, check=False).returncode == 0
        live = trail / "audit.jsonl"
        live.write_bytes(live.read_bytes()[:-5])
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 1 and "incomplete last line" in done.stdout


class TestHashAndQuery:
    def test_hash_of_a_leaked_token_finds_its_records(self, trail: Path, key_file: Path, canary: str) -> None:
        """`audit hash` (argument or stdin) gives the HMAC; `query --hash` then finds exactly that token's records."""
        by_arg = run("hash", canary, "--key-file", str(key_file)).stdout.strip()
        by_stdin = run("hash", "-", "--key-file", str(key_file), stdin=canary + "\n").stdout.strip()
        assert by_arg == by_stdin == KEY.hmac_hex(canary)
        result = run("query", str(trail), "--hash", by_stdin, "--json")
        found = json_lines(result)
        assert [r["seq"] for r in found] == [3, 7]
        assert canary not in result.stdout
        assert all(r["subject"] == "payments/invoicer" for r in found)

    def test_hash_needs_a_key(self) -> None:
        """Without a key `audit hash` fails as a configuration error (exit 2)."""
        result = CliRunner().invoke(cli, ["audit", "hash", "x"])
        assert result.exit_code == 2 and "CONFIG_INVALID" in result.output

    @pytest.mark.parametrize(
        ("args", "expected"),
        [
            (["--subject", "billing/exporter"], list(range(10, 20))),
            (["--org", "org-2", "--vendor", "vendor-b"], list(range(10, 15))),
            (["--action", "token.denied"], list(range(15, 20))),
            (["--outcome", "denied", "--outcome", "success", "--subject", "payments/invoicer"], list(range(10))),
            (["--since", "2026-03-01T12:05:00Z", "--until", "2026-03-01T12:08:00Z"], [5, 6, 7]),
            (["--since", "2026-03-01T13:05:00+01:00", "--action", "token.issued", "--org", "org-1"], [5, 6, 7, 8, 9]),
        ],
    )
    def test_filters(self, trail: Path, args: list[str], expected: list[int]) -> None:
        """Each filter narrows the stream, filters combine with AND, and repeated options mean OR."""
        result = run("query", str(trail), *args, "--json")
        assert result.exit_code == 0, result.output
        assert [r["seq"] for r in json_lines(result)] == expected

    def test_table_output(self, trail: Path) -> None:
        """Without --json, matches print as a table with a count, capped by --limit."""
        result = run("query", str(trail), "--action", "token.issued", "--limit", "3")
        assert result.exit_code == 0
        assert "token.issued" in result.stdout and "3 record(s) shown; more match" in result.stdout

    def test_bad_time_is_a_usage_error(self, trail: Path) -> None:
        """An unparseable --since is refused with a hint."""
        result = run("query", str(trail), "--since", "yesterday")
        assert result.exit_code == 2 and "ISO 8601" in result.output


class TestLargeFiles:
    def test_query_streams_a_large_file(self, tmp_path: Path) -> None:
        """Searching 200k records keeps peak memory small: lines are read and dropped one at a time."""
        template = json.dumps(
            {
                "action": "token.issued",
                "details": {"lease_id": "lease-%(n)d", "token_hmac": "%(h)s"},
                "outcome": "success",
                "seq": 123456789,
                "subject": "payments/invoicer",
                "ts": "%(ts)s",
            },
            separators=(",", ":"),
        ).replace("123456789", "%(n)d")
        needle = KEY.hmac_hex("leaked")
        other = KEY.hmac_hex("other")
        path = tmp_path / "big.jsonl"
        records = 200_000
        with path.open("w") as fh:
            for n in range(records):
                ts = format_ts(START + timedelta(seconds=n))
                fh.write(template % {"n": n, "h": needle if n % 50_000 == 7 else other, "ts": ts} + "\n")
        assert path.stat().st_size > 40_000_000

        tracemalloc.start()
        try:
            found = [r["seq"] for _raw, r in query_records([path], AuditQuery(hmac=needle))]
            _current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # A full parse of every line is too slow under tracemalloc; the process's peak RSS must not grow by
        # anything like the file's size instead.
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        late = sum(1 for _ in query_records([path], AuditQuery(since=START + timedelta(seconds=records - 1000))))
        rss_growth_bytes = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
        assert found == [7, 50_007, 100_007, 150_007]
        assert late == 1000
        assert peak < 2_000_000
        assert rss_growth_bytes < 10_000_000
