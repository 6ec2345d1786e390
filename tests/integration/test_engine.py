"""The provisioning engine against real stores (OpenBao, moto) and the simulator over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from broker.audit import AuditLog
from broker.engine.core import Engine
from broker.engine.desired import DesiredIntegration
from broker.engine.state import PARTNER_KEY_FIELD, load_state
from broker.errors import Conflict, OemRejectedToken, RotationBudgetExceeded
from broker.metrics import Metrics
from broker.models import IntegrationRef, Stage
from broker.mspc_token import compose
from broker.oem.client import HttpOemClient
from broker.settings import Settings, load_settings
from broker.stores.base import SecretStore
from broker.stores.factory import build_store

REF = IntegrationRef("org-contoso", "vendor-acme")
VENDOR_KEY = "acme-vendor-key-dev"
RUNNER = Path(__file__).with_name("engine_runner.py")


class FakeClock:
    """Wall-clock time that tests move forward explicitly."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Harness:
    """An engine and the real clients behind it."""

    def __init__(self, config: dict[str, Any], **engine_kw: Any) -> None:
        self.config = config
        self.settings: Settings = load_settings(**config)
        self.metrics = Metrics()
        self.store: SecretStore = build_store(self.settings)
        self.oem = HttpOemClient(self.settings.oem)
        self.audit = AuditLog(self.settings.audit).start()
        self.engine = Engine(self.settings, self.store, self.oem, audit=self.audit, metrics=self.metrics, **engine_kw)

    def partner(self, stage: Stage = Stage.CURRENT) -> Any:
        return self.store.read(self.engine.partner_path(REF), stage=stage)

    def token_for(self, version: str) -> SecretStr:
        value = self.store.read(self.engine.partner_path(REF), version=version)
        return compose(SecretStr(VENDOR_KEY), value.field(PARTNER_KEY_FIELD))

    def versions(self) -> int:
        return len(self.store.describe(self.engine.partner_path(REF)).versions)

    def close(self) -> None:
        self.audit.close()
        self.oem.close()
        self.store.close()


@pytest.fixture
def harness(
    broker_config: Callable[..., dict[str, Any]], seed_vendor: Callable[..., None]
) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(config: dict[str, Any] | None = None, **engine_kw: Any) -> Harness:
        config = config or broker_config()
        seed_vendor(config, REF.vendor_id, VENDOR_KEY)
        h = Harness(config, **engine_kw)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def run_engine(config_file: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(RUNNER), str(config_file), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class TestLifecycle:
    def test_provision_rotate_rollback_retire(self, harness: Callable[..., Harness], sim: Any) -> None:
        """Provision, rotate (old key valid in grace), roll back, then retire: keys work exactly when they should."""
        clock = FakeClock()
        h = harness(clock=clock)
        desired = DesiredIntegration(REF, grace_seconds=600)

        first = h.engine.provision(desired)
        assert (first.action, first.ok) == ("provisioned", True)
        h.oem.probe_vendor_api(h.token_for(first.version or ""))
        assert h.engine.provision(desired).action == "unchanged"
        assert len(sim.live_integrations()) == 1

        second = h.engine.rotate(desired)
        assert second.action == "rotated" and second.version != first.version
        status = h.engine.status(desired)
        assert (status.current_version, status.previous_version) == (second.version, first.version)
        assert [r.version for r in status.retiring] == [first.version]
        h.oem.probe_vendor_api(h.token_for(first.version or ""))  # still valid during the grace
        h.oem.probe_vendor_api(h.token_for(second.version or ""))

        back = h.engine.rollback(REF, grace_seconds=600)
        assert back.version == first.version
        assert h.partner().version == first.version
        status = h.engine.status(desired)
        assert status.previous_version == second.version
        assert [r.version for r in status.retiring] == [second.version]

        clock.advance(601)
        assert h.engine.retire_due(REF) == 1
        with pytest.raises(OemRejectedToken):
            h.oem.probe_vendor_api(h.token_for(second.version or ""))
        h.oem.probe_vendor_api(h.token_for(first.version or ""))
        status = h.engine.status(desired)
        assert status.previous_version is None and status.retiring == ()
        assert len(sim.live_integrations()) == 1
        with pytest.raises(Conflict):
            h.engine.rollback(REF)

    def test_break_glass_revoke(self, harness: Callable[..., Harness], sim: Any) -> None:
        """Revoke rotates with zero grace: the old key is refused at once, the new one works."""
        h = harness()
        desired = DesiredIntegration(REF)
        old = h.engine.provision(desired).version or ""
        new = h.engine.revoke(desired)
        assert new.action == "revoked" and new.version != old
        with pytest.raises(OemRejectedToken):
            h.oem.probe_vendor_api(h.token_for(old))
        h.oem.probe_vendor_api(h.token_for(new.version or ""))
        assert len(sim.live_integrations()) == 1

    def test_scheduled_rotation_by_key_age(self, harness: Callable[..., Harness]) -> None:
        """reconcile_one rotates a key older than max_key_age and leaves a young one alone."""
        clock = FakeClock()
        h = harness(clock=clock)
        desired = DesiredIntegration(REF, max_key_age_seconds=3600, grace_seconds=60)
        first = h.engine.reconcile_one(desired)
        assert first.action == "provisioned"
        assert h.engine.reconcile_one(desired).action == "unchanged"
        clock.advance(3601)
        rotated = h.engine.reconcile_one(desired)
        assert rotated.action == "rotated" and rotated.version != first.version
        assert h.engine.reconcile_one(desired).action == "unchanged"

    def test_rotation_budget_per_day(
        self, harness: Callable[..., Harness], broker_config: Callable[..., dict[str, Any]], sim: Any
    ) -> None:
        """Past engine.max_rotations_per_day a rotation is refused with a code; break-glass revoke still works."""
        h = harness(broker_config(engine={"max_rotations_per_day": 2}))
        desired = DesiredIntegration(REF)
        h.engine.provision(desired)
        assert h.engine.rotate(desired).ok
        assert h.engine.rotate(desired).ok
        versions = h.versions()
        with pytest.raises(RotationBudgetExceeded) as info:
            h.engine.rotate(desired)
        assert info.value.code == "ROTATION_BUDGET_EXCEEDED"
        assert h.versions() == versions
        assert h.engine.revoke(desired).action == "revoked"

    def test_retention_keeps_old_versions_bounded(
        self, harness: Callable[..., Harness], broker_config: Callable[..., dict[str, Any]], sim: Any
    ) -> None:
        """Vault keeps at most store.max_versions; on AWS only the live stages keep a label, so every older
        version is deprecated and left to Secrets Manager's own limit (its API cannot delete a version)."""
        config = broker_config(store={"max_versions": 3}, engine={"max_rotations_per_day": 20})
        h = harness(config)
        desired = DesiredIntegration(REF, grace_seconds=0)
        h.engine.provision(desired)
        for _ in range(4):
            assert h.engine.rotate(desired).ok
        path = h.engine.partner_path(REF)
        if config["store"]["backend"] == "vault":
            assert h.versions() <= 3
            return
        import boto3

        native = boto3.client(
            "secretsmanager",
            endpoint_url=config["aws"]["endpoint_url"],
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        listed = native.list_secret_version_ids(SecretId=path, IncludeDeprecated=True)["Versions"]
        labelled = [v for v in listed if v.get("VersionStages")]
        assert len(listed) >= 5 and len(labelled) <= 4, labelled  # current, previous, pending, newest marker
        current = h.partner().version
        assert any(v["VersionId"] == current and "AWSCURRENT" in v["VersionStages"] for v in labelled)

    def test_failed_probe_rolls_back(self, harness: Callable[..., Harness], seed_vendor: Any, sim: Any) -> None:
        """A rotation whose probe fails discards pending, keeps current, and revokes the useless integration."""
        h = harness()
        desired = DesiredIntegration(REF)
        current = h.engine.provision(desired).version
        versions = h.versions()
        seed_vendor(h.config, REF.vendor_id, "not-the-vendor-key")
        outcome = h.engine.rotate(desired)
        assert (outcome.action, outcome.ok) == ("probe_failed", False)
        assert outcome.code is not None
        info = h.store.describe(h.engine.partner_path(REF))
        assert info.stages.get(Stage.CURRENT) == current
        assert info.stages.get(Stage.PENDING) is None
        assert h.versions() == versions + 1  # the failed key stays in history, never staged
        assert len(sim.live_integrations()) == 1
        status = h.engine.status(desired)
        assert status.state == "degraded" and status.last_error == outcome.code
        assert h.metrics.rotations.labels(outcome="probe_failed")._value.get() == 1


class TestReconcilePass:
    def test_vendor_key_changed_during_a_pass_is_read_again(
        self, harness: Callable[..., Harness], seed_vendor: Any, sim: Any
    ) -> None:
        """A pass reads a vendor key once; a probe refused with that copy reads it again and uses a new version."""
        other = IntegrationRef("org-fabrikam", REF.vendor_id)
        written: list[str] = []

        def on_step(step: str, ref: IntegrationRef) -> None:
            # The second saga fixes the vendor key after the pass has read (and kept) the bad one.
            if step == "pending_staged" and ref == other and not written:
                seed_vendor(h.config, REF.vendor_id, VENDOR_KEY)
                written.append(step)

        h = harness(on_step=on_step)
        seed_vendor(h.config, REF.vendor_id, "not-the-vendor-key")
        outcomes = h.engine.reconcile_all([DesiredIntegration(REF), DesiredIntegration(other)], concurrency=1)
        by_ref = {o.ref: o for o in outcomes}
        assert by_ref[REF].action == "probe_failed"  # a fresh read gave the same bad version: refused
        assert by_ref[other].action == "provisioned"
        assert written == ["pending_staged"]
        assert len(sim.live_integrations()) == 1


class TestRaces:
    def test_three_processes_race_one_rotation(self, harness: Callable[..., Harness], sim: Any, tmp_path: Path) -> None:
        """Three engine processes asked to replace the same key: one new version, one new OEM integration."""
        h = harness()
        desired = DesiredIntegration(REF)
        h.engine.provision(desired)
        before_versions = h.versions()
        config_file = tmp_path / "config.json"
        config_file.write_text(json.dumps(h.config))
        go = tmp_path / "go"
        ready = [tmp_path / f"ready-{i}" for i in range(3)]
        procs = [
            run_engine(
                config_file,
                "rotate",
                REF.organization_id,
                REF.vendor_id,
                "--go-file",
                str(go),
                "--ready-file",
                str(ready[i]),
            )
            for i in range(3)
        ]
        # Start them together: each has read the current version it means to replace.
        deadline = time.monotonic() + 60
        while not all(r.exists() for r in ready):
            assert time.monotonic() < deadline, "runners did not get ready"
            assert all(p.poll() is None for p in procs), "a runner exited early"
            time.sleep(0.01)
        go.touch()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
        actions = sorted(r["action"] for r in results)
        assert actions == ["busy", "busy", "rotated"], results
        assert h.versions() == before_versions + 1
        assert len(sim.integrations()) == 2


CRASH_STEPS = ["intent_recorded", "oem_created", "key_stored", "pending_staged", "probed", "promoted"]


class TestCrashRecovery:
    @pytest.mark.parametrize("step", CRASH_STEPS)
    def test_sigkill_at_step_then_reconcile(
        self,
        harness: Callable[..., Harness],
        broker_config: Callable[..., dict[str, Any]],
        sim: Any,
        tmp_path: Path,
        step: str,
    ) -> None:
        """A rotation killed at any step ends, after one reconcile, with one working current and no lost key."""
        config = broker_config(engine={"intent_stale_seconds": 0.001})
        h = harness(config)
        desired = DesiredIntegration(REF)
        first = h.engine.provision(desired).version
        config_file = tmp_path / "config.json"
        config_file.write_text(json.dumps(config))
        proc = run_engine(config_file, "rotate", REF.organization_id, REF.vendor_id, "--crash-at", step)
        proc.communicate(timeout=60)
        assert proc.returncode == -9, f"runner was not killed at {step}"

        outcome = h.engine.reconcile_one(desired)
        assert outcome.ok, outcome
        info = h.store.describe(h.engine.partner_path(REF))
        current = info.stages.get(Stage.CURRENT)
        assert current is not None and current != first
        assert info.stages.get(Stage.PENDING) is None
        h.oem.probe_vendor_api(h.token_for(current))
        state = load_state(h.store, h.engine.state_path(REF)).state
        assert state.intent is None
        # Exactly one rotation's key was kept: a key stored before the crash is the one promoted.
        assert h.versions() == 2
        live = {i["id"] for i in sim.live_integrations()}
        if step == "oem_created":
            # The crashed run's integration has no stored key: found, reported and revoked.
            assert [o.revoked for o in state.orphans] == [True]
            assert len(sim.integrations()) == 3
        else:
            assert state.orphans == []
            assert len(sim.integrations()) == 2
        assert len(live) == 2  # the new current and the previous one in its grace


class TestOemTrouble:
    def test_lost_response_orphan_is_revoked(self, harness: Callable[..., Harness], sim: Any) -> None:
        """A create whose answer was lost is retried; the extra integration is found and revoked."""
        h = harness()
        sim.add_fault(lose_response=True, endpoint="integration.create", requests=1)
        outcome = h.engine.provision(DesiredIntegration(REF))
        assert outcome.ok and outcome.orphans == 1
        assert len(sim.integrations()) == 2
        assert len(sim.live_integrations()) == 1
        state = load_state(h.store, h.engine.state_path(REF)).state
        assert [o.revoked for o in state.orphans] == [True]
        assert h.versions() == 1

    def test_5xx_storm_then_success(self, harness: Callable[..., Harness], sim: Any) -> None:
        """With half the OEM answers failing, provisioning still ends with exactly one current key."""
        h = harness()
        sim.set_faults([{"error_rate": 0.5, "endpoint": "integration.create"}], seed=7)
        outcome = h.engine.provision(DesiredIntegration(REF))
        assert outcome.ok
        assert h.versions() == 1
        assert len(sim.live_integrations()) == 1

    def test_oem_down_leaves_no_half_state(
        self, harness: Callable[..., Harness], broker_config: Callable[..., dict[str, Any]], sim: Any
    ) -> None:
        """An OEM that keeps failing gives a coded failure, no key, no open intent; the next run succeeds."""
        # Bounded by the attempts, not the deadline: a deadline that ran out mid-request would make the
        # outcome unknown (OEM_OUTCOME_UNKNOWN), which a slow machine did once with a 1 s deadline.
        h = harness(broker_config(oem={"deadline_seconds": 30.0, "max_attempts": 3}))
        sim.set_faults([{"error_rate": 1.0, "endpoint": "integration.create"}])
        outcome = h.engine.reconcile_one(DesiredIntegration(REF))
        assert not outcome.ok and outcome.code == "OEM_UNAVAILABLE"
        state = load_state(h.store, h.engine.state_path(REF)).state
        assert state.intent is None and state.last_error == "OEM_UNAVAILABLE"
        sim.clear_faults()
        assert h.engine.reconcile_one(DesiredIntegration(REF)).action == "provisioned"


class TestStoreLease:
    def test_one_holder_renewals_are_cheap_takeover_after_expiry(self, harness: Callable[..., Harness]) -> None:
        """Only one replica holds the lease; renewing inside the window writes nothing; an expired lease moves."""
        from broker.engine.leader import StoreLease

        h = harness()
        clock = FakeClock()
        path = h.settings.engine.leader_path
        a = StoreLease(h.store, path, "replica-a", lease_seconds=30, renew_seconds=10, clock=clock)
        b = StoreLease(h.store, path, "replica-b", lease_seconds=30, renew_seconds=10, clock=clock)
        assert a.try_acquire() and not b.try_acquire()
        written = len(h.store.describe(path).versions)
        clock.advance(5)
        assert a.try_acquire() and not b.try_acquire()
        assert len(h.store.describe(path).versions) == written  # no version for a renewal inside the window
        clock.advance(6)
        assert a.try_acquire()
        assert len(h.store.describe(path).versions) == written + 1
        clock.advance(31)  # a stopped renewing (crashed)
        assert b.try_acquire() and not a.try_acquire()
        b.release()
        assert a.try_acquire()
