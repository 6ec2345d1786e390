"""verify_chain: every kind of tampering is found at the right record; clean chains pass."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from broker.audit import AuditAction, AuditKey, AuditLog, AuditOutcome, canonical, record_hash, verify_chain
from broker.models import IntegrationRef
from broker.settings import AuditSettings

KEY_TEXT = "audit-key-for-tests-0123456789abcdef"
KEY = AuditKey(KEY_TEXT.encode())
REF = IntegrationRef("org-1", "vendor-a")


def write_chain(directory: Path, records: int, **settings: Any) -> Path:
    """Write ``records`` rotation.step records (plus the closing checkpoint) and return the file."""
    path = directory / "audit.jsonl"
    options: dict[str, Any] = {"checkpoint_every_records": 1000, "fsync": False, "write_timeout_ms": 10_000} | settings
    with AuditLog(AuditSettings(file_path=path, hmac_key=SecretStr(KEY_TEXT), **options)) as log:
        for i in range(records):
            log.record(AuditAction.ROTATION_STEP, AuditOutcome.SUCCESS, ref=REF, details={"step": f"s{i}"})
    return path


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def rewrite(path: Path, new_lines: list[bytes]) -> None:
    path.write_bytes(b"".join(new_lines))


def rehashed(record: dict[str, Any]) -> bytes:
    record["hash"] = record_hash(record)
    return canonical(record) + b"\n"


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """A clean 10-record chain plus its closing checkpoint (seq 10)."""
    return write_chain(tmp_path, 10)


class TestCleanChains:
    def test_clean_chain_verifies(self, chain: Path) -> None:
        """An untouched file verifies, checkpoint MAC included."""
        report = verify_chain([chain], key=KEY)
        assert report.ok, report.summary()
        assert (report.records, report.checkpoints, report.macs_checked) == (11, 1, True)
        assert report.summary().startswith("OK 11 records")

    def test_rotated_files_in_any_order(self, tmp_path: Path) -> None:
        """A chain rotated over several files verifies from its directory or from files given shuffled."""
        path = write_chain(tmp_path, 60, max_file_bytes=4096, checkpoint_every_records=7)
        files = sorted(tmp_path.glob("audit.jsonl*"))
        assert len(files) > 3
        random.Random(1).shuffle(files)
        assert verify_chain(files, key=KEY).ok
        report = verify_chain([tmp_path], key=KEY)
        assert report.ok, report.summary()
        assert report.records == len(b"".join(p.read_bytes() for p in files).splitlines())
        assert path.exists()

    def test_without_key_macs_are_reported_unchecked(self, chain: Path) -> None:
        """Without the key the chain is checked but the summary says MACs were not."""
        report = verify_chain([chain])
        assert report.ok and not report.macs_checked
        assert "NOT checked" in report.summary()


class TestTamperDetection:
    def test_edited_field(self, chain: Path) -> None:
        """Editing a field without rehashing is caught at that very line."""
        content = lines(chain)
        content[3] = content[3].replace(b'"outcome":"success"', b'"outcome":"failure"')
        rewrite(chain, content)
        problem = verify_chain([chain], key=KEY).problem
        assert problem is not None and problem.line == 4 and "edited" in problem.message

    def test_deleted_line(self, chain: Path) -> None:
        """A deleted record is caught where it is missing."""
        content = lines(chain)
        del content[3]
        rewrite(chain, content)
        problem = verify_chain([chain], key=KEY).problem
        assert problem is not None and problem.line == 4 and "missing" in problem.message

    def test_inserted_forged_line(self, chain: Path) -> None:
        """A well-forged insert (right seq, prev and hash) is caught at the next record, which names it."""
        content = lines(chain)
        forged = json.loads(content[3])
        forged["details"]["step"] = "forged"
        content.insert(3, rehashed(forged))
        rewrite(chain, content)
        problem = verify_chain([chain], key=KEY).problem
        assert problem is not None and problem.line == 5 and "inserted" in problem.message
        assert f"{chain}:4" in problem.message

    def test_inserted_naive_line(self, chain: Path) -> None:
        """An inserted copy of an earlier line is caught at the insert."""
        content = lines(chain)
        content.insert(5, content[1])
        rewrite(chain, content)
        problem = verify_chain([chain], key=KEY).problem
        assert problem is not None and problem.line == 6

    def test_swapped_lines(self, chain: Path) -> None:
        """Two swapped records are caught at the first of them."""
        content = lines(chain)
        content[3], content[4] = content[4], content[3]
        rewrite(chain, content)
        problem = verify_chain([chain], key=KEY).problem
        assert problem is not None and problem.line == 4 and "expected seq 3" in problem.message

    def test_truncated_last_line(self, chain: Path) -> None:
        """A file cut inside its last line is reported as truncated at that line."""
        data = chain.read_bytes()
        chain.write_bytes(data[:-20])
        problem = verify_chain([chain], key=KEY).problem
        assert problem is not None and problem.line == 11 and "incomplete" in problem.message

    def test_edited_and_rehashed(self, chain: Path) -> None:
        """Editing a record and recomputing its hash breaks the link of the record after it."""
        content = lines(chain)
        record = json.loads(content[3])
        record["details"]["step"] = "nothing to see"
        content[3] = rehashed(record)
        rewrite(chain, content)
        problem = verify_chain([chain], key=KEY).problem
        assert problem is not None and problem.line == 5 and "prev does not match" in problem.message

    def test_reforged_chain_fails_the_checkpoint_mac(self, chain: Path) -> None:
        """Rewriting every hash after an edit passes the links, but not the key-signed checkpoint."""
        content = lines(chain)
        prev = None
        for i, raw in enumerate(content):
            record = json.loads(raw)
            if i == 3:
                record["outcome"] = "failure"
            if prev is not None:
                record["prev"] = prev
                if record["action"] == "audit.checkpoint":
                    record["details"]["head"] = prev
            content[i] = rehashed(record)
            prev = record["hash"]
        rewrite(chain, content)
        problem = verify_chain([chain], key=KEY).problem
        assert problem is not None and problem.line == 11 and "MAC" in problem.message
        assert verify_chain([chain]).ok  # without the key, only the MAC could tell

    def test_reformatted_line(self, chain: Path) -> None:
        """A line that is not in canonical form (e.g. re-serialised with spaces) is flagged."""
        content = lines(chain)
        content[2] = json.dumps(json.loads(content[2])).encode() + b"\n"
        rewrite(chain, content)
        problem = verify_chain([chain], key=KEY).problem
        assert problem is not None and problem.line == 3 and "canonical" in problem.message

    def test_wrong_key(self, chain: Path) -> None:
        """Verifying with another key names the key mismatch rather than calling the chain forged."""
        problem = verify_chain([chain], key=AuditKey(b"x" * 32)).problem
        assert problem is not None and "another key" in problem.message

    def test_deleted_middle_file(self, tmp_path: Path) -> None:
        """A rotated file removed from the middle of the chain is caught where its records are missing."""
        write_chain(tmp_path, 60, max_file_bytes=4096)
        rotated = sorted(tmp_path.glob("audit.jsonl.*"))
        rotated[1].unlink()
        problem = verify_chain([tmp_path], key=KEY).problem
        assert problem is not None and problem.path == str(rotated[2]) and problem.line == 1
        assert "missing" in problem.message

    def test_missing_oldest_file_needs_partial(self, tmp_path: Path) -> None:
        """A chain that does not start at genesis fails, unless --partial accepts retention."""
        write_chain(tmp_path, 60, max_file_bytes=4096)
        min(tmp_path.glob("audit.jsonl.*")).unlink()
        report = verify_chain([tmp_path], key=KEY)
        assert report.problem is not None and "genesis" in report.problem.message
        assert verify_chain([tmp_path], key=KEY, partial=True).ok

    def test_no_files(self, tmp_path: Path) -> None:
        """An empty directory is not a valid audit trail."""
        assert not verify_chain([tmp_path]).ok
