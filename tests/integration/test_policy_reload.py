"""PolicyStore hot reload on a real directory: changes picked up, broken files refused, last good set kept."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import pytest

from broker.errors import PolicyInvalid
from broker.metrics import Metrics
from broker.models import IntegrationRef, Principal
from broker.policy import PolicyStore
from broker.settings import PolicySettings

INVOICER = Principal("billing", "invoicer")
ACME = IntegrationRef("org-1", "acme-crm")


def _rule(rule_id: str, vendor: str, ttl: int = 600) -> str:
    return (
        "version: 1\nrules:\n"
        f"  - id: {rule_id}\n    effect: allow\n    subjects: [{{namespace: billing, service_account: invoicer}}]\n"
        f"    integrations: [{{vendor: '{vendor}'}}]\n    actions: [token:issue]\n    max_ttl_seconds: {ttl}\n"
    )


class Recorder:
    """An on_reload callback that remembers what it was told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.event = threading.Event()

    def __call__(self, outcome: str, detail: str) -> None:
        self.calls.append((outcome, detail))
        self.event.set()


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "workloads.yaml").write_text(_rule("billing", "acme-*"))
    return directory


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def store(policy_dir: Path, metrics: Metrics, recorder: Recorder) -> PolicyStore:
    return PolicyStore(PolicySettings(dir=policy_dir), metrics=metrics, on_reload=recorder)


def _reloads(metrics: Metrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("broker_policy_reloads_total", {"outcome": outcome}) or 0.0


class TestPolicyStore:
    def test_initial_load_is_reported(self, store: PolicyStore, metrics: Metrics, recorder: Recorder) -> None:
        """Construction loads the directory and reports 'loaded'."""
        assert store.decide(INVOICER, "token:issue", ACME).rule_id == "billing"
        assert recorder.calls == [("loaded", f"1 rules from 1 files in {store.settings.dir}")]
        assert _reloads(metrics, "loaded") == 1

    def test_invalid_at_start_raises(self, policy_dir: Path) -> None:
        """A broken directory at start-up is an error, not an empty policy."""
        (policy_dir / "broken.yaml").write_text("version: 1\nrules: [{id: x}]\n")
        with pytest.raises(PolicyInvalid, match=r"broken\.yaml"):
            PolicyStore(PolicySettings(dir=policy_dir))

    def test_unchanged(self, store: PolicyStore, recorder: Recorder) -> None:
        """Checking an unchanged directory reports 'unchanged' and calls nobody."""
        assert store.reload_if_changed().outcome == "unchanged"
        assert len(recorder.calls) == 1

    def test_touch_without_change_is_unchanged(self, store: PolicyStore, policy_dir: Path) -> None:
        """A new mtime with the same content is not a reload (content is what counts)."""
        os.utime(policy_dir / "workloads.yaml", ns=(1, 1))
        assert store.reload_if_changed().outcome == "unchanged"

    def test_change_is_reloaded(self, store: PolicyStore, policy_dir: Path, metrics: Metrics) -> None:
        """An edited file is loaded and decisions follow it at once."""
        (policy_dir / "workloads.yaml").write_text(_rule("billing-globex", "globex-*", ttl=120))
        result = store.reload_if_changed()
        assert result.outcome == "reloaded"
        assert not store.decide(INVOICER, "token:issue", ACME).allowed
        decision = store.decide(INVOICER, "token:issue", IntegrationRef("org-1", "globex-psa"))
        assert (decision.rule_id, decision.ttl_cap_seconds) == ("billing-globex", 120)
        assert _reloads(metrics, "reloaded") == 1

    def test_same_size_edit_is_reloaded(self, store: PolicyStore, policy_dir: Path) -> None:
        """An edit that keeps size and mtime is still seen (contents are hashed)."""
        path = policy_dir / "workloads.yaml"
        stat = path.stat()
        path.write_text(_rule("billing", "acmx-*"))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert path.stat().st_size == stat.st_size
        assert store.reload_if_changed().outcome == "reloaded"

    def test_new_and_removed_files(self, store: PolicyStore, policy_dir: Path) -> None:
        """Adding and removing files are changes too."""
        (policy_dir / "auditors.yaml").write_text(
            "version: 1\nrules:\n"
            "  - {id: aud, effect: allow, subjects: [{namespace: security}], actions: [audit:read]}\n"
        )
        assert store.reload_if_changed().outcome == "reloaded"
        assert store.decide(Principal("security", "auditor"), "audit:read").allowed
        (policy_dir / "auditors.yaml").unlink()
        assert store.reload_if_changed().outcome == "reloaded"
        assert not store.decide(Principal("security", "auditor"), "audit:read").allowed

    def test_broken_file_keeps_last_good_set(
        self,
        store: PolicyStore,
        policy_dir: Path,
        metrics: Metrics,
        recorder: Recorder,
        captured_logs: io.StringIO,
    ) -> None:
        """A broken edit is refused, the old rules stay in force, and the refusal is logged, counted and reported."""
        (policy_dir / "workloads.yaml").write_text(_rule("billing", "acme-*") + "    colour: red\n")
        result = store.reload_if_changed()
        assert result.outcome == "rejected"
        assert "kept the last good policies" in result.detail and "workloads.yaml: rule 'billing'" in result.detail
        assert store.decide(INVOICER, "token:issue", ACME).rule_id == "billing"
        assert _reloads(metrics, "rejected") == 1
        assert recorder.calls[-1] == ("rejected", result.detail)
        assert "policy reload rejected" in captured_logs.getvalue()

    def test_broken_version_reported_once(self, store: PolicyStore, policy_dir: Path, metrics: Metrics) -> None:
        """The same broken content is not reported again at every check; a fix reloads."""
        (policy_dir / "workloads.yaml").write_text("version: 1\nrules: [\n")
        assert store.reload_if_changed().outcome == "rejected"
        assert store.reload_if_changed().outcome == "unchanged"
        assert _reloads(metrics, "rejected") == 1
        (policy_dir / "workloads.yaml").write_text(_rule("fixed", "acme-*"))
        assert store.reload_if_changed().outcome == "reloaded"
        assert store.decide(INVOICER, "token:issue", ACME).rule_id == "fixed"

    def test_directory_gone(self, store: PolicyStore, policy_dir: Path) -> None:
        """If the directory disappears the last good set stays and the check says why."""
        (policy_dir / "workloads.yaml").unlink()
        policy_dir.rmdir()
        result = store.reload_if_changed()
        assert result.outcome == "rejected" and "does not exist" in result.detail
        assert store.decide(INVOICER, "token:issue", ACME).allowed

    def test_configmap_symlink_swap(self, tmp_path: Path, recorder: Recorder) -> None:
        """A Kubernetes ConfigMap update (the ..data symlink swapped to a new directory) is picked up."""
        root = tmp_path / "mount"
        (root / "..v1").mkdir(parents=True)
        (root / "..v1" / "workloads.yaml").write_text(_rule("v1", "acme-*"))
        (root / "..data").symlink_to("..v1")
        (root / "workloads.yaml").symlink_to("..data/workloads.yaml")
        store = PolicyStore(PolicySettings(dir=root), on_reload=recorder)
        (root / "..v2").mkdir()
        (root / "..v2" / "workloads.yaml").write_text(_rule("v2", "acme-*"))
        (root / "..data_tmp").symlink_to("..v2")
        (root / "..data_tmp").rename(root / "..data")
        assert store.reload_if_changed().outcome == "reloaded"
        assert store.decide(INVOICER, "token:issue", ACME).rule_id == "v2"

    def test_callback_failure_does_not_break_reload(self, policy_dir: Path) -> None:
        """An on_reload callback that raises is logged; the reload still happens."""

        def explode(outcome: str, detail: str) -> None:
            raise RuntimeError("audit sink down")

        store = PolicyStore(PolicySettings(dir=policy_dir), on_reload=explode)
        (policy_dir / "workloads.yaml").write_text(_rule("after", "acme-*"))
        assert store.reload_if_changed().outcome == "reloaded"
        assert store.decide(INVOICER, "token:issue", ACME).rule_id == "after"

    def test_background_thread_reloads(self, policy_dir: Path, recorder: Recorder) -> None:
        """start() checks every reload_interval_seconds; the change arrives through the callback."""
        store = PolicyStore(PolicySettings(dir=policy_dir, reload_interval_seconds=0.02), on_reload=recorder)
        recorder.event.clear()
        store.start()
        try:
            (policy_dir / "workloads.yaml").write_text(_rule("threaded", "acme-*"))
            assert recorder.event.wait(timeout=10)
        finally:
            store.stop()
        assert recorder.calls[-1][0] == "reloaded"
        assert store.decide(INVOICER, "token:issue", ACME).rule_id == "threaded"
