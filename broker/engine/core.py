"""The provisioning and rotation engine: a crash-safe saga per integration.

One saga (provision, rotate, revoke) runs under an *intent* recorded with
compare-and-swap in the integration's state record (``engine.state``): the
CAS winner alone proceeds, across threads, processes and replicas. Steps::

    intent_recorded -> oem_created -> key_stored -> pending_staged
        -> probed -> promoted -> intent_closed

* The partner key is written as a new store version *before* anything else
  happens with it, tagged with the intent id, so once the OEM answered and the
  write returned, the key is never lost.
* A crashed saga leaves an intent whose ``updated_at`` grows old; after
  ``engine.intent_stale_seconds`` another run takes it over (CAS again). If
  the crashed run had stored its key, the saga resumes from there; if not, the
  OEM may hold an integration nobody has a key for, so the run provisions
  afresh and sweeps orphans (``integration/list``; revoked when supported).
* A failed probe discards ``pending`` and leaves ``current`` untouched.
* A replaced key stays valid for the grace period, then is revoked at the OEM
  (when supported) and marked retired by ``retire_due``.

The engine is synchronous; ``reconcile_all`` runs sagas on a bounded pool.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import SecretStr

from broker.engine.desired import DesiredIntegration
from broker.engine.ports import AuditPort, NullAudit, OemPort
from broker.engine.state import (
    INTEGRATION_ID_FIELD,
    INTENT_ID_FIELD,
    PARTNER_KEY_FIELD,
    IntegrationState,
    Intent,
    Loaded,
    Orphan,
    RetiringKey,
    load_state,
    save_state,
)
from broker.errors import (
    BrokerError,
    Conflict,
    IntegrationNotFound,
    NotFound,
    OemOutcomeUnknown,
    OemUnavailable,
    RotationBudgetExceeded,
    SecretNotFound,
)
from broker.log import get_logger
from broker.metrics import Metrics
from broker.models import IntegrationRef, SecretInfo, SecretValue, Stage
from broker.mspc_token import compose
from broker.settings import Settings
from broker.stores.base import SagaStore, SecretStore
from broker.stores.factory import partner_key_path, vendor_key_path

log = get_logger("engine")

StepHook = Callable[[str, IntegrationRef], None]

# A state record and the partner key's describe, read in that order (see Engine._acquire).
_Known = tuple[Loaded, SecretInfo | None]

_STEP_ACTION = {
    "provision": "provision.step",
    "rotate": "rotation.step",
    "sweep": "provision.step",
    "rollback": "rollback.step",
    "revoke": "revoke.step",
}

STEPS = (
    "intent_recorded",
    "oem_created",
    "key_stored",
    "pending_staged",
    "probed",
    "promoted",
    "intent_closed",
    "revoked",
    "retired",
)


_PATHS_REMEMBERED = 4096  # rendered paths kept per engine (forgotten all at once when full)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one engine operation did to one integration."""

    ref: IntegrationRef
    action: str
    ok: bool = True
    version: str | None = None
    code: str | None = None
    message: str = ""
    orphans: int = 0


@dataclass(frozen=True, slots=True)
class IntegrationStatus:
    """A status row: versions, ages, state; never a key."""

    ref: IntegrationRef
    current_version: str | None
    pending_version: str | None
    previous_version: str | None
    key_created_at: datetime | None
    key_age_seconds: float | None
    next_rotation_at: float | None
    state: str
    retiring: tuple[RetiringKey, ...] = ()
    orphans: tuple[Orphan, ...] = ()
    last_error: str | None = None
    versions: int = 0
    stage_map: dict[str, str] = field(default_factory=dict)


def default_owner() -> str:
    """A replica id: host name plus a random suffix (unique per process)."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


class Engine:
    """Provision, rotate, roll back and revoke partner keys (module docstring)."""

    def __init__(
        self,
        settings: Settings,
        store: SecretStore,
        oem: OemPort,
        *,
        audit: AuditPort | None = None,
        metrics: Metrics | None = None,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
        on_step: StepHook | None = None,
        on_key_change: Callable[[IntegrationRef], None] | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._oem = oem
        self._audit: AuditPort = audit or NullAudit()
        self._metrics = metrics
        self.owner = owner or default_owner()
        self._clock = clock
        self._on_step = on_step
        self._on_key_change = on_key_change
        # Vendor keys read during the running reconcile_all pass(es) (see _probe); None outside a pass.
        self._vendor_memo: dict[str, SecretValue] | None = None
        # Rendered secret paths (asked for on every token request; the templates are fixed settings).
        self._paths: dict[IntegrationRef | str, str] = {}
        self._passes = 0
        self._pass_lock = threading.Lock()
        self._promote = store.promote if isinstance(store, SagaStore) else self._promote_in_two_moves

    def _promote_in_two_moves(self, path: str, version: str, *, expected_current: str | None) -> None:
        """``SagaStore.promote`` for a store without it: current to ``version``, then pending unset."""
        self._store.move_stage(path, Stage.CURRENT, version, expected=expected_current)
        self._store.move_stage(path, Stage.PENDING, None, expected=version)

    # -- paths -------------------------------------------------------------

    def partner_path(self, ref: IntegrationRef) -> str:
        path = self._paths.get(ref)
        if path is None:
            path = self._remember_path(ref, partner_key_path(self._settings, ref))
        return path

    def state_path(self, ref: IntegrationRef) -> str:
        return self._settings.engine.state_path_template.format(
            organization_id=ref.organization_id, vendor_id=ref.vendor_id
        )

    def vendor_path(self, vendor_id: str) -> str:
        path = self._paths.get(vendor_id)
        if path is None:
            path = self._remember_path(vendor_id, vendor_key_path(self._settings, vendor_id))
        return path

    def _remember_path(self, key: IntegrationRef | str, path: str) -> str:
        if len(self._paths) >= _PATHS_REMEMBERED:
            self._paths.clear()
        self._paths[key] = path
        return path

    # -- small helpers -----------------------------------------------------

    def _step(self, name: str, ref: IntegrationRef) -> None:
        if self._on_step is not None:
            self._on_step(name, ref)

    def _emit(self, op: str, step: str, outcome: str, ref: IntegrationRef, **details: Any) -> None:
        """One audit record per saga step (``provision.step``, ``rotation.step`` ...)."""
        action = _STEP_ACTION.get(op, "provision.step")
        fields = {k: v for k, v in details.items() if v is not None}
        fields["step"] = step
        # Best effort: the state record already holds every step, and failing
        # here (between the OEM answer and the key write) would orphan a key.
        try:
            self._audit.record(action, outcome, ref=ref, details=fields)
        except BrokerError as exc:
            log.error("audit record lost", action=action, step=step, ref=str(ref), code=exc.code)

    def _orphan(self, ref: IntegrationRef, integration_id: str, *, revoked: bool, reason: str) -> None:
        try:
            self._audit.record(
                "orphan.detected",
                "failure",
                ref=ref,
                reason=reason,
                details={"integration_id": integration_id, "revoked": revoked},
            )
        except BrokerError as exc:
            log.error("audit record lost", action="orphan.detected", ref=str(ref), code=exc.code)

    def _count(self, kind: str, outcome: str) -> None:
        if self._metrics is not None:
            counter = self._metrics.provisions if kind == "provision" else self._metrics.rotations
            counter.labels(outcome=outcome).inc()

    def _describe(self, path: str) -> SecretInfo | None:
        try:
            return self._store.describe(path)
        except SecretNotFound:
            return None

    def vendor_key(self, vendor_id: str) -> SecretValue:
        """Read a vendor key's current version (read-only to the broker)."""
        return self._store.read(self.vendor_path(vendor_id))

    def vendor_secret(self, value: SecretValue) -> SecretStr:
        """The vendor key inside a vendor-key secret (``store.vendor_key_field``, or its only field)."""
        name = self._settings.store.vendor_key_field
        if name in value.data:
            return value.data[name]
        if name == "" and len(value.data) == 1:
            return next(iter(value.data.values()))
        raise SecretNotFound(f"vendor key {value.path} version {value.version} has no field {name!r}")

    def _grace(self, desired: DesiredIntegration | None) -> int:
        if desired is not None and desired.grace_seconds is not None:
            return desired.grace_seconds
        return self._settings.engine.grace_seconds

    def _max_age(self, desired: DesiredIntegration | None) -> int:
        if desired is not None and desired.max_key_age_seconds is not None:
            return desired.max_key_age_seconds
        return self._settings.engine.max_key_age_seconds

    def _stale(self, intent: Intent) -> bool:
        return self._clock() - intent.updated_at >= self._settings.engine.intent_stale_seconds

    # -- intents -----------------------------------------------------------

    def _acquire(
        self,
        ref: IntegrationRef,
        op: str,
        grace_seconds: int,
        expected_current: str | None = None,
        known: _Known | None = None,
    ) -> tuple[Loaded, Intent | None, SecretInfo | None]:
        """CAS-record an intent; returns (state, stale intent taken over or None, partner-key info read).

        ``known`` is a state record and a partner-key describe the caller read
        just now, in that order; otherwise both are read here (same order).
        The order is what makes them safe to reuse: every saga writes the state
        record before and after it writes a partner-key version, so if the
        intent's CAS over that state version wins, no saga ran since the
        describe. Stage moves outside a saga (rollback, retire) may still have
        happened; every later move is a compare-and-swap on its pointer, so a
        stale copy ends in ``Conflict``, never in a wrong pointer.

        Raises ``Conflict`` if a live intent is held by somebody else, the CAS
        lost, or ``current`` is no longer ``expected_current`` (somebody else
        already rotated the key this caller meant to replace).
        """
        path = self.state_path(ref)
        if known is None:
            loaded = load_state(self._store, path)
            info = self._describe(self.partner_path(ref))
        else:
            loaded, info = known
        state = loaded.state.model_copy(deep=True)
        taken_over: Intent | None = None
        if state.intent is not None:
            if not self._stale(state.intent):
                raise Conflict(f"{ref}: a {state.intent.op} by {state.intent.owner} is in progress")
            taken_over = state.intent
        current = info.stages.get(Stage.CURRENT) if info else None
        if expected_current is not None and current != expected_current and taken_over is None:
            raise Conflict(f"{ref}: current is {current}, not {expected_current}: already rotated")
        if op == "rotate":
            self._check_rotation_budget(ref, state)
        now = self._clock()
        state.intent = Intent(
            op=op,
            owner=self.owner,
            started_at=now,
            updated_at=now,
            old_current=current,
            grace_seconds=grace_seconds,
        )
        if taken_over is not None:
            state.orphan_check = True
        loaded = save_state(self._store, path, loaded, state)
        self._step("intent_recorded", ref)
        return loaded, taken_over, info

    def _check_rotation_budget(self, ref: IntegrationRef, state: IntegrationState) -> None:
        """Refuse a rotation past ``engine.max_rotations_per_day`` (each one writes several versions)."""
        day_ago = self._clock() - 86400
        recent = [t for t in state.rotation_times if t > day_ago]
        limit = self._settings.engine.max_rotations_per_day
        if len(recent) >= limit:
            raise RotationBudgetExceeded(
                f"{ref} was rotated {len(recent)} times in the last 24 h (engine.max_rotations_per_day={limit}); "
                "use revoke for an emergency"
            )

    def _close(self, ref: IntegrationRef, loaded: Loaded, mutate: Callable[[IntegrationState], None]) -> Loaded:
        """Apply ``mutate`` and clear the intent, retrying CAS if only non-intent fields moved."""
        path = self.state_path(ref)
        for _ in range(5):
            state = loaded.state.model_copy(deep=True)
            mutate(state)
            state.intent = None
            try:
                return save_state(self._store, path, loaded, state)
            except Conflict:
                fresh = load_state(self._store, path)
                mine = loaded.state.intent
                if fresh.state.intent is None or mine is None or fresh.state.intent.id != mine.id:
                    raise
                loaded = fresh
        raise Conflict(f"{ref}: state record kept changing")

    # -- the saga ----------------------------------------------------------

    def _find_intent_version(self, ref: IntegrationRef, intent: Intent) -> tuple[SecretValue | None, SecretInfo | None]:
        """The partner-key version a (crashed) intent stored, if any, and the describe it was found by."""
        info = self._describe(self.partner_path(ref))
        if info is None:
            return None, None
        candidates = [info.stages.get(Stage.PENDING), info.stages.get(Stage.CURRENT), info.latest_version]
        for version in dict.fromkeys(v for v in candidates if v):
            try:
                value = self._store.read(self.partner_path(ref), version=version)
            except NotFound:
                continue
            marker = value.data.get(INTENT_ID_FIELD)
            if marker is not None and marker.get_secret_value() == intent.id:
                return value, info
        return None, info

    def _run(self, ref: IntegrationRef, op: str, grace_seconds: int, expected_current: str | None = None) -> Outcome:
        return self._saga(ref, op, grace_seconds, expected_current)[0]

    def _saga(
        self,
        ref: IntegrationRef,
        op: str,
        grace_seconds: int,
        expected_current: str | None = None,
        known: _Known | None = None,
    ) -> tuple[Outcome, Loaded | None]:
        """Run one saga; returns its outcome and the state record it left (None if unknown)."""
        loaded, taken_over, info = self._acquire(ref, op, grace_seconds, expected_current, known)
        intent = loaded.state.intent
        assert intent is not None
        ppath = self.partner_path(ref)
        if taken_over is not None:
            self._emit(taken_over.op, "intent_taken_over", "success", ref, stale_intent_id=taken_over.id)
            found, info = self._find_intent_version(ref, taken_over)
            if found is not None:
                # The crashed run stored its key: adopt its id so the stored
                # version matches, and continue from the stage moves.
                intent = intent.model_copy(
                    update={"id": taken_over.id, "old_current": taken_over.old_current, "op": taken_over.op}
                )
                loaded = save_state(
                    self._store, self.state_path(ref), loaded, loaded.state.model_copy(update={"intent": intent})
                )
                return self._finish(ref, loaded, intent, found, info, resumed=True)

        try:
            created = self._oem.create_external_integration(ref)
        except BrokerError as exc:
            ambiguous = isinstance(exc, OemOutcomeUnknown | OemUnavailable)
            code = exc.code

            def failed(state: IntegrationState) -> None:
                state.touch_error(code)
                state.orphan_check = state.orphan_check or ambiguous

            self._close(ref, loaded, failed)
            self._count(op, "oem_error")
            self._emit(op, "oem_create", "failure", ref, error_code=exc.code, orphan_suspected=ambiguous)
            raise
        self._step("oem_created", ref)
        self._emit(op, "oem_created", "success", ref, integration_id=created.integration_id)
        if created.possible_duplicate:
            self._emit(op, "orphan_suspected", "failure", ref, reason="create retried after an ambiguous failure")

        # `info` is from before the OEM call: nobody else writes here while we hold the intent, and
        # the write re-reads the latest version itself if that ever proves wrong (Conflict).
        data = {
            PARTNER_KEY_FIELD: created.partner_key,
            INTEGRATION_ID_FIELD: SecretStr(created.integration_id),
            INTENT_ID_FIELD: SecretStr(intent.id),
        }
        written, info = self._write_with_retry(ppath, data, info, intent.id)
        self._step("key_stored", ref)
        self._emit(op, "key_stored", "success", ref, partner_key_version=written, integration_id=created.integration_id)
        value = SecretValue(ppath, written, data)
        if created.possible_duplicate:
            loaded = save_state(
                self._store,
                self.state_path(ref),
                loaded,
                loaded.state.model_copy(update={"orphan_check": True}),
            )
        return self._finish(ref, loaded, intent, value, info, resumed=False)

    def _write_with_retry(
        self, path: str, data: dict[str, SecretStr], info: SecretInfo | None, intent_id: str
    ) -> tuple[str, SecretInfo | None]:
        """Append the partner key; returns its version and the last describe if it still holds (None if not)."""
        expected = info.latest_version if info else None
        for _ in range(5):
            try:
                written = self._store.write(path, data, expected_latest=expected, idempotency_key=intent_id)
                return written.version, info
            except Conflict:
                info = self._describe(path)
                expected = info.latest_version if info else None
        raise Conflict(f"{path}: could not append the partner key after 5 attempts")

    def _finish(
        self,
        ref: IntegrationRef,
        loaded: Loaded,
        intent: Intent,
        value: SecretValue,
        info: SecretInfo | None,
        *,
        resumed: bool,
    ) -> tuple[Outcome, Loaded | None]:
        """Stage, probe, promote and close; ``info`` is the partner key's describe since the intent was recorded.

        The stage pointers are taken from ``info`` instead of being read again:
        each move is a compare-and-swap on the pointer, so one that moved
        meanwhile (a rollback, another replica) makes the move fail with
        ``Conflict`` exactly as a fresh read would have shown.
        """
        ppath = self.partner_path(ref)
        op = intent.op
        stages = info.stages if info is not None else {}
        version = value.version
        if stages.get(Stage.CURRENT) != version:
            pending = stages.get(Stage.PENDING)
            if pending != version:
                self._store.move_stage(ppath, Stage.PENDING, version, expected=pending)
            self._step("pending_staged", ref)
            try:
                self._probe(ref, value)
            except BrokerError as exc:
                return self._probe_failed(ref, loaded, intent, value, exc), None
            self._step("probed", ref)
            self._promote(ppath, version, expected_current=stages.get(Stage.CURRENT))
        self._step("promoted", ref)
        if self._on_key_change is not None:
            self._on_key_change(ref)
        old_current = intent.old_current
        old_integration = self._integration_id(ppath, old_current) if old_current and old_current != version else None
        now = self._clock()

        def closed(state: IntegrationState) -> None:
            state.touch_error(None)
            state.probe_failures = 0
            state.last_rotation_at = now
            if op != "provision":
                state.rotation_times = [*[t for t in state.rotation_times if t > now - 86400][-100:], now]
            if old_current and old_integration and old_current != version:
                state.retiring.append(
                    RetiringKey(
                        version=old_current, integration_id=old_integration, retire_at=now + intent.grace_seconds
                    )
                )

        loaded = self._close(ref, loaded, closed)
        self._step("intent_closed", ref)
        kind = "provision" if op == "provision" else "rotate"
        self._count(kind, "success")
        self._emit(
            op, "promoted", "success", ref, partner_key_version=version, previous_version=old_current, resumed=resumed
        )
        log.info("partner key promoted", ref=str(ref), op=op, version=version, resumed=resumed)
        action = op + ("d" if op.endswith("e") else "ed")
        if loaded.state.orphan_check:
            # The sweep writes the state record again: the caller must read it anew.
            return Outcome(ref, action, version=version, orphans=self.sweep_orphans(ref)), None
        return Outcome(ref, action, version=version), loaded

    def _probe(self, ref: IntegrationRef, value: SecretValue) -> None:
        """Call the Vendor API with the new partner key and the vendor key.

        Inside ``reconcile_all`` the vendor key is read once per pass; if a
        probe with that copy fails, the key is read again and, if it has
        changed meanwhile, the probe is repeated with the new one, so the
        answer is the same as with a fresh read.
        """
        partner = value.field(PARTNER_KEY_FIELD)
        memo = self._vendor_memo
        if memo is None:
            self._oem.probe_vendor_api(compose(self.vendor_secret(self.vendor_key(ref.vendor_id)), partner))
            return
        vendor = memo.get(ref.vendor_id)
        if vendor is None:
            vendor = memo[ref.vendor_id] = self.vendor_key(ref.vendor_id)
        try:
            self._oem.probe_vendor_api(compose(self.vendor_secret(vendor), partner))
        except BrokerError:
            fresh = memo[ref.vendor_id] = self.vendor_key(ref.vendor_id)
            if fresh.version == vendor.version:
                raise
            self._oem.probe_vendor_api(compose(self.vendor_secret(fresh), partner))

    def _probe_failed(
        self, ref: IntegrationRef, loaded: Loaded, intent: Intent, value: SecretValue, exc: BrokerError
    ) -> Outcome:
        ppath = self.partner_path(ref)
        self._store.move_stage(ppath, Stage.PENDING, None, expected=value.version)
        integration_id = value.field(INTEGRATION_ID_FIELD).get_secret_value()
        revoked = self._revoke_quietly(ref, integration_id)

        def failed(state: IntegrationState) -> None:
            state.touch_error(exc.code)
            state.probe_failures += 1
            if not revoked:
                state.orphans.append(Orphan(integration_id=integration_id, detected_at=self._clock()))

        self._close(ref, loaded, failed)
        kind = "provision" if intent.op == "provision" else "rotate"
        self._count(kind, "probe_failed")
        self._emit(
            intent.op, "probe", "failure", ref, error_code=exc.code, partner_key_version=value.version, rolled_back=True
        )
        log.warning("probe failed; pending discarded, current untouched", ref=str(ref), code=exc.code)
        return Outcome(ref, "probe_failed", ok=False, version=value.version, code=exc.code, message=exc.message)

    def _integration_id(self, path: str, version: str) -> str | None:
        try:
            value = self._store.read(path, version=version)
        except NotFound:
            return None
        marker = value.data.get(INTEGRATION_ID_FIELD)
        return marker.get_secret_value() if marker is not None else None

    def _revoke_quietly(self, ref: IntegrationRef, integration_id: str) -> bool:
        if not self._settings.oem.revoke_supported:
            return False
        try:
            self._oem.revoke_integration(integration_id)
        except NotFound:
            return True
        except BrokerError as exc:
            self._emit("revoke", "oem_revoke", "failure", ref, integration_id=integration_id, error_code=exc.code)
            return False
        self._step("revoked", ref)
        self._emit("revoke", "oem_revoked", "success", ref, integration_id=integration_id)
        return True

    # -- public operations ---------------------------------------------------

    def provision(self, desired: DesiredIntegration) -> Outcome:
        """Make sure the integration has a ``current`` partner key."""
        info = self._describe(self.partner_path(desired.ref))
        if info is not None and info.stages.get(Stage.CURRENT):
            return Outcome(desired.ref, "unchanged", version=info.stages[Stage.CURRENT])
        return self._run(desired.ref, "provision", self._grace(desired))

    def rotate(
        self, desired: DesiredIntegration, *, grace_seconds: int | None = None, expected_current: str | None = None
    ) -> Outcome:
        """Replace the current partner key now (the old one stays valid for the grace period).

        With ``expected_current``, rotate only if that version is still
        current: several callers asking to replace the same key (replicas,
        repeated commands) produce exactly one rotation; the others get
        ``Conflict``.
        """
        grace = self._grace(desired) if grace_seconds is None else grace_seconds
        info = self._describe(self.partner_path(desired.ref))
        current = info.stages.get(Stage.CURRENT) if info is not None else None
        op = "rotate" if current else "provision"
        return self._run(desired.ref, op, grace, expected_current)

    def revoke(self, desired: DesiredIntegration) -> Outcome:
        """Break glass: rotate with zero grace and revoke the old key at once (no rotation budget)."""
        info = self._describe(self.partner_path(desired.ref))
        op = "revoke" if info is not None and info.stages.get(Stage.CURRENT) else "provision"
        outcome = self._run(desired.ref, op, 0)
        if not outcome.ok:
            return outcome
        self.retire_due(desired.ref, force=True)
        return Outcome(desired.ref, "revoked", version=outcome.version, orphans=outcome.orphans)

    def rollback(self, ref: IntegrationRef, *, grace_seconds: int | None = None) -> Outcome:
        """Promote ``previous`` back to ``current`` if it has not been revoked yet.

        The demoted key stays valid for ``grace_seconds`` (default: the
        setting), like a key replaced by rotation.
        """
        ppath = self.partner_path(ref)
        spath = self.state_path(ref)
        info = self._describe(ppath)
        if info is None or not info.stages.get(Stage.CURRENT):
            raise IntegrationNotFound(f"{ref} has no current partner key")
        previous = info.stages.get(Stage.PREVIOUS)
        current = info.stages[Stage.CURRENT]
        loaded = load_state(self._store, spath)
        if previous is None or not any(r.version == previous for r in loaded.state.retiring):
            raise Conflict(f"{ref}: no previous partner key that is still valid (revoked or never rotated)")
        if loaded.state.intent is not None and not self._stale(loaded.state.intent):
            raise Conflict(f"{ref}: a {loaded.state.intent.op} is in progress")
        self._store.move_stage(ppath, Stage.CURRENT, previous, expected=current)
        if self._on_key_change is not None:
            self._on_key_change(ref)
        demoted_id = self._integration_id(ppath, current)
        now = self._clock()
        grace = self._settings.engine.grace_seconds if grace_seconds is None else grace_seconds
        for _ in range(5):
            state = loaded.state.model_copy(deep=True)
            state.retiring = [r for r in state.retiring if r.version != previous]
            if demoted_id:
                state.retiring.append(RetiringKey(version=current, integration_id=demoted_id, retire_at=now + grace))
            try:
                save_state(self._store, spath, loaded, state)
                break
            except Conflict:
                loaded = load_state(self._store, spath)
        self._count("rotate", "rolled_back")
        self._emit("rollback", "promoted", "success", ref, partner_key_version=previous, demoted_version=current)
        return Outcome(ref, "rolled_back", version=previous)

    def retire_due(self, ref: IntegrationRef, *, force: bool = False) -> int:
        """Revoke and retire replaced keys whose grace has ended; returns how many."""
        return self._retire_due(ref, load_state(self._store, self.state_path(ref)), force=force)

    def _retire_due(self, ref: IntegrationRef, loaded: Loaded, *, force: bool = False) -> int:
        """``retire_due`` on a state record read (or written) just now; its saves are CAS over it."""
        spath = self.state_path(ref)
        ppath = self.partner_path(ref)
        now = self._clock()
        due = [r for r in loaded.state.retiring if force or r.retire_at <= now]
        if not due:
            return 0
        info = self._describe(ppath)
        done: list[RetiringKey] = []
        for item in due:
            if info is not None and info.stages.get(Stage.CURRENT) == item.version:
                continue  # rolled back to it meanwhile
            if self._settings.oem.revoke_supported and not self._revoke_quietly(ref, item.integration_id):
                continue
            if info is not None and info.stages.get(Stage.PREVIOUS) == item.version:
                with contextlib.suppress(Conflict):
                    self._store.move_stage(ppath, Stage.PREVIOUS, None, expected=item.version)
            done.append(item)
            self._step("retired", ref)
            self._emit(
                "revoke",
                "retired",
                "success",
                ref,
                partner_key_version=item.version,
                integration_id=item.integration_id,
            )
        if done:
            versions = {d.version for d in done}
            for _ in range(5):
                state = loaded.state.model_copy(deep=True)
                state.retiring = [r for r in state.retiring if r.version not in versions]
                state.retired.extend(done)
                try:
                    save_state(self._store, spath, loaded, state)
                    break
                except Conflict:
                    loaded = load_state(self._store, spath)
        return len(done)

    def known_integration_ids(self, ref: IntegrationRef) -> set[str]:
        """Integration ids held in any readable partner-key version."""
        ppath = self.partner_path(ref)
        info = self._describe(ppath)
        ids: set[str] = set()
        if info is None:
            return ids
        for v in info.versions:
            if v.deleted or v.destroyed:
                continue
            found = self._integration_id(ppath, v.version)
            if found:
                ids.add(found)
        return ids

    def sweep_orphans(self, ref: IntegrationRef) -> int:
        """Find OEM integrations for ``ref`` that no stored key refers to; revoke when supported.

        Runs under an intent of its own, so it never races a saga that has
        created an integration but not stored its key yet.
        """
        try:
            loaded, _, _ = self._acquire(ref, "sweep", 0)
        except Conflict:
            return 0
        known = self.known_integration_ids(ref)
        known.update(r.integration_id for r in loaded.state.retiring)
        listed = self._oem.list_integrations(ref.organization_id)
        already = {o.integration_id for o in loaded.state.orphans}
        found: list[Orphan] = []
        for item in listed:
            if item.vendor_id != ref.vendor_id or item.integration_id in known or item.integration_id in already:
                continue
            revoked = self._revoke_quietly(ref, item.integration_id)
            found.append(Orphan(integration_id=item.integration_id, detected_at=self._clock(), revoked=revoked))
            if self._metrics is not None:
                self._metrics.orphans.labels(action="revoked" if revoked else "reported").inc()
            self._orphan(ref, item.integration_id, revoked=revoked, reason="listed at the OEM, no stored key")

        def closed(state: IntegrationState) -> None:
            state.orphans.extend(found)
            state.orphan_check = False

        self._close(ref, loaded, closed)
        return len(found)

    def _key_since(self, info: SecretInfo | None, current: str | None, state: IntegrationState) -> float:
        """When the current key took office: the engine's own promotion time, else the store's created_at."""
        if state.last_rotation_at is not None:
            return state.last_rotation_at
        created = next((v.created_at for v in info.versions if v.version == current), None) if info else None
        return created.timestamp() if created else self._clock()

    # -- reconcile -----------------------------------------------------------

    def reconcile_one(self, desired: DesiredIntegration) -> Outcome:
        """Bring one integration to its desired state (provision, rotate when old, retire, sweep)."""
        ref = desired.ref
        try:
            # State first, then the describe: _acquire may reuse both (see there).
            loaded = load_state(self._store, self.state_path(ref))
            if loaded.state.intent is not None and not self._stale(loaded.state.intent):
                return Outcome(ref, "busy", message=f"{loaded.state.intent.op} by {loaded.state.intent.owner}")
            info = self._describe(self.partner_path(ref))
            current = info.stages.get(Stage.CURRENT) if info else None
            after: Loaded | None = loaded
            if current is None or loaded.state.intent is not None:
                op = "provision" if current is None else "rotate"
                outcome, after = self._saga(ref, op, self._grace(desired), current, (loaded, info))
            else:
                age = self._clock() - self._key_since(info, current, loaded.state)
                if self._metrics is not None:
                    self._metrics.key_age_seconds.labels(ref.organization_id, ref.vendor_id).set(age)
                if age >= self._max_age(desired):
                    outcome, after = self._saga(ref, "rotate", self._grace(desired), current, (loaded, info))
                else:
                    outcome = Outcome(ref, "unchanged", version=current)
                    if loaded.state.orphan_check:
                        outcome = Outcome(ref, "unchanged", version=current, orphans=self.sweep_orphans(ref))
                        after = None
            self._retire_due(ref, after if after is not None else load_state(self._store, self.state_path(ref)))
            return outcome
        except Conflict as exc:
            return Outcome(ref, "busy", code=exc.code, message=exc.message)
        except BrokerError as exc:
            log.warning("reconcile failed", ref=str(ref), code=exc.code)
            return Outcome(ref, "failed", ok=False, code=exc.code, message=exc.message)

    def reconcile_all(
        self,
        desired: Iterable[DesiredIntegration],
        *,
        progress: Callable[[Outcome], None] | None = None,
        concurrency: int | None = None,
    ) -> list[Outcome]:
        """Reconcile many integrations on a bounded thread pool."""
        items = list(desired)
        workers = max(1, min(concurrency or self._settings.engine.concurrency, len(items) or 1))
        results: list[Outcome] = []
        lock = threading.Lock()
        with self._pass_lock:
            self._passes += 1
            if self._vendor_memo is None:
                self._vendor_memo = {}

        def one(item: DesiredIntegration) -> Outcome:
            outcome = self.reconcile_one(item)
            with lock:
                results.append(outcome)
            if progress is not None:
                progress(outcome)
            return outcome

        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reconcile") as pool:
                list(pool.map(one, items))
        finally:
            with self._pass_lock:
                self._passes -= 1
                if not self._passes:
                    self._vendor_memo = None
        return results

    # -- status ----------------------------------------------------------------

    def status(self, desired: DesiredIntegration) -> IntegrationStatus:
        """Versions, ages, next rotation and state of one integration (no secrets)."""
        ref = desired.ref
        info = self._describe(self.partner_path(ref))
        loaded = load_state(self._store, self.state_path(ref))
        st = loaded.state
        stages = dict(info.stages) if info else {}
        current = stages.get(Stage.CURRENT)
        created = None
        if info is not None and current is not None:
            created = next((v.created_at for v in info.versions if v.version == current), None)
        now = self._clock()
        since = self._key_since(info, current, st) if current else None
        age = now - since if since is not None else None
        next_rotation = since + self._max_age(desired) if since is not None else None
        if st.intent is not None:
            state = f"{st.intent.op}-in-progress" + (" (stale)" if self._stale(st.intent) else "")
        elif current is None:
            state = "failed" if st.last_error else "missing"
        elif st.last_error:
            state = "degraded"
        else:
            state = "ok"
        return IntegrationStatus(
            ref=ref,
            current_version=current,
            pending_version=stages.get(Stage.PENDING),
            previous_version=stages.get(Stage.PREVIOUS),
            key_created_at=created,
            key_age_seconds=age,
            next_rotation_at=next_rotation,
            state=state,
            retiring=tuple(st.retiring),
            orphans=tuple(st.orphans),
            last_error=st.last_error,
            versions=len(info.versions) if info else 0,
            stage_map={k.value: v for k, v in stages.items()},
        )


def find_desired(items: Sequence[DesiredIntegration], ref: IntegrationRef) -> DesiredIntegration:
    """The desired entry for ``ref``, or a bare one (ad-hoc CLI use)."""
    for item in items:
        if item.ref == ref:
            return item
    return DesiredIntegration(ref)
