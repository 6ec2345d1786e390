"""The one orchestrator: authenticate -> decide -> read -> compose -> audit.

Routes call ``BrokerService`` and nothing else. Policy is decided before any
secret is read; an issued token is audited (fail closed: no audit, no token)
before it is returned; every refusal is audited too.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import SecretStr

from broker.engine.core import Engine, IntegrationStatus, Outcome
from broker.engine.desired import DesiredIntegration, DesiredState
from broker.errors import (
    AuthenticationFailed,
    BrokerError,
    IntegrationNotFound,
    IntegrationPending,
    PolicyDenied,
    SecretNotFound,
    TtlUnsatisfiable,
)
from broker.log import get_logger
from broker.metrics import Metrics
from broker.models import Decision, IntegrationRef, IssuedToken, Principal, Stage
from broker.mspc_token import compose
from broker.settings import Settings
from broker.stores.caching import CachedRead, CachingStore

log = get_logger("service")

TOKEN_ISSUE = "token:issue"  # noqa: S105 - an action name
INTEGRATION_READ = "integration:read"
INTEGRATION_PROVISION = "integration:provision"
INTEGRATION_ROTATE = "integration:rotate"
INTEGRATION_REVOKE = "integration:revoke"
AUDIT_READ = "audit:read"
# A desired integration without a partner key yet is provisioned by the leader's next pass (or its retry).
PENDING_RETRY_AFTER_SECONDS = 5.0


class _RandomIds:
    """Random ids in the format of ``uuid.uuid4().hex``, cut from one ``os.urandom`` read per 256.

    A system call per id, or a ``uuid.UUID`` object per id, is a measurable
    share of a token request: the ids are made 256 at a time, from the same
    CSPRNG output, with the version and variant bits of a UUID 4 set.
    Thread-safe (``list.pop`` is atomic; a refill races harmlessly); a forked
    child starts afresh.
    """

    _IDS_PER_READ = 256
    # UUID 4: version nibble 4 (byte 6), variant bits 10 (byte 8).
    _CLEAR = int.from_bytes(bytes([0xFF] * 6 + [0x0F, 0xFF, 0x3F] + [0xFF] * 7) * _IDS_PER_READ, "big")
    _SET = int.from_bytes(bytes([0] * 6 + [0x40, 0, 0x80] + [0] * 7) * _IDS_PER_READ, "big")

    def __init__(self) -> None:
        self._ids: list[str] = []
        os.register_at_fork(after_in_child=self._ids.clear)

    def __call__(self) -> str:
        try:
            return self._ids.pop()
        except IndexError:
            raw = os.urandom(16 * self._IDS_PER_READ)
            text = ((int.from_bytes(raw, "big") & self._CLEAR) | self._SET).to_bytes(len(raw), "big").hex()
            ids = [text[i : i + 32] for i in range(0, len(text), 32)]
            self._ids.extend(ids[1:])
            return ids[0]


new_id = _RandomIds()


class AuthenticatorPort(Protocol):
    async def authenticate_async(self, bearer: str) -> Principal: ...


class PolicyPort(Protocol):
    def decide(self, principal: Principal, action: str, ref: IntegrationRef | None) -> Decision: ...


class AuditPort(Protocol):
    async def arecord(
        self,
        action: str,
        outcome: str,
        *,
        principal: Principal | None = None,
        ref: IntegrationRef | None = None,
        rule_id: str | None = None,
        reason: str | None = None,
        details: Mapping[str, Any] | None = None,
        secrets: Mapping[str, SecretStr] | None = None,
    ) -> Any: ...

    async def atoken_issued(self, principal: Principal, ref: IntegrationRef, issued: IssuedToken) -> Any: ...


class BrokerService:
    """Everything the HTTP API can ask for, each step policy-checked and audited."""

    def __init__(
        self,
        settings: Settings,
        *,
        authenticator: AuthenticatorPort,
        policy: PolicyPort,
        cache: CachingStore,
        audit: AuditPort,
        engine: Engine,
        desired: DesiredState,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        trigger_reconcile: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self._auth = authenticator
        self._policy = policy
        self._cache = cache
        self._audit = audit
        self._engine = engine
        self.desired = desired
        self._metrics = metrics
        self._clock = clock
        self._trigger = trigger_reconcile
        # labels() takes a lock and builds a key: the two children of the token counter, looked up once.
        self._tokens_issued = {stale: metrics.tokens_issued.labels(stale=str(stale).lower()) for stale in (False, True)}

    # -- authentication and policy ---------------------------------------------

    async def authenticate(self, bearer: str | None) -> Principal:
        """Verify the caller; failures are audited and raise ``AuthenticationFailed``."""
        try:
            if not bearer:
                raise AuthenticationFailed("missing bearer token (Authorization: Bearer <service-account token>)")
            # Cache hits answer inline; a signature check or JWKS refetch runs off the event loop.
            return await self._auth.authenticate_async(bearer)
        except AuthenticationFailed as exc:
            await self._audit.arecord("auth.failed", "failure", reason=exc.message, details={"error_code": exc.code})
            raise

    async def authorize(self, principal: Principal, action: str, ref: IntegrationRef | None) -> Decision:
        """Decide, audit a denial, raise ``PolicyDenied``; return the allowing decision."""
        decision = self._policy.decide(principal, action, ref)
        if not decision.allowed:
            is_token = action == TOKEN_ISSUE
            await self._audit.arecord(
                "token.denied" if is_token else "admin.action",
                "denied",
                principal=principal,
                ref=ref,
                rule_id=decision.rule_id,
                reason=decision.reason,
                details={"error_code": PolicyDenied.code} if is_token else {"operation": action},
            )
            if action == TOKEN_ISSUE:
                self._metrics.tokens_denied.labels(code=PolicyDenied.code).inc()
            raise PolicyDenied(f"{principal.subject} may not {action} {ref or ''}: {decision.reason}".strip())
        return decision

    def check(self, principal: Principal, action: str, ref: IntegrationRef | None) -> Decision:
        """Dry run: the decision, without side effects."""
        return self._policy.decide(principal, action, ref)

    # -- tokens --------------------------------------------------------------------

    async def _read(self, path: str, stage: Stage | None) -> CachedRead:
        hit = self._cache.peek(path, stage=stage)
        if hit is not None:
            return hit
        return await asyncio.to_thread(self._cache.read_cached, path, stage=stage)

    async def issue_token(self, principal: Principal, ref: IntegrationRef, min_ttl_seconds: int = 0) -> IssuedToken:
        """Issue an MSPC_TOKEN for ``ref`` (policy first, audit before return)."""
        decision = await self.authorize(principal, TOKEN_ISSUE, ref)
        try:
            partner = await self._read(self._engine.partner_path(ref), Stage.CURRENT)
        except SecretNotFound:
            if self.desired.get(ref) is not None:  # wanted, but the leader has not provisioned it yet
                await self._deny(principal, ref, decision, IntegrationPending.code, "desired, no partner key yet")
                raise IntegrationPending(
                    f"integration {ref} is being provisioned (no partner key yet); retry",
                    retry_after_seconds=PENDING_RETRY_AFTER_SECONDS,
                ) from None
            await self._deny(principal, ref, decision, IntegrationNotFound.code, "no current partner key")
            raise IntegrationNotFound(f"integration {ref} is not provisioned (no current partner key)") from None
        vendor = await self._read(self._engine.vendor_path(ref.vendor_id), None)

        now = self._clock()
        ttl = self._settings.tokens.default_ttl_seconds
        if decision.ttl_cap_seconds is not None:
            ttl = min(ttl, decision.ttl_cap_seconds)
        ttl = min(ttl, self._settings.tokens.max_ttl_seconds)
        created = partner.value.created_at
        if created is not None:
            desired = self.desired.get(ref)
            max_age = (desired.max_key_age_seconds if desired else None) or self._settings.engine.max_key_age_seconds
            grace = (desired.grace_seconds if desired else None) or self._settings.engine.grace_seconds
            retire_at = created.timestamp() + max_age + grace
            ttl = min(ttl, int(retire_at - now))
        if ttl < max(min_ttl_seconds, 1):
            await self._deny(principal, ref, decision, TtlUnsatisfiable.code, f"ttl {ttl}s < min {min_ttl_seconds}s")
            raise TtlUnsatisfiable(
                f"cannot issue a token with at least {min_ttl_seconds}s left: policy, settings and the partner "
                f"key's retirement allow {max(ttl, 0)}s"
            )

        token = compose(self._engine.vendor_secret(vendor.value), partner.value.field("partner_api_key"))
        issued = IssuedToken(
            token=token,
            expires_at=datetime.fromtimestamp(now + ttl, tz=UTC),
            ttl_seconds=ttl,
            lease_id=new_id(),
            partner_key_version=partner.value.version,
            vendor_key_version=vendor.value.version,
            stale=partner.stale or vendor.stale,
            rule_id=decision.rule_id,
        )
        await self._audit.atoken_issued(principal, ref, issued)  # fail closed: no record, no token
        self._tokens_issued[issued.stale].inc()
        return issued

    async def _deny(self, principal: Principal, ref: IntegrationRef, decision: Decision, code: str, why: str) -> None:
        self._metrics.tokens_denied.labels(code=code).inc()
        await self._audit.arecord(
            "token.denied",
            "failure",
            principal=principal,
            ref=ref,
            rule_id=decision.rule_id,
            reason=why,
            details={"error_code": code},
        )

    # -- admin ---------------------------------------------------------------------

    def _desired_or_404(self, ref: IntegrationRef) -> DesiredIntegration:
        desired = self.desired.get(ref)
        if desired is None:
            raise IntegrationNotFound(f"integration {ref} is not a desired integration")
        return desired

    async def list_integrations(self, principal: Principal) -> list[IntegrationStatus]:
        """Status of every desired integration the caller may read."""
        await self.authorize(principal, INTEGRATION_READ, None)
        items = [d for d in self.desired if self._policy.decide(principal, INTEGRATION_READ, d.ref).allowed]
        return await asyncio.to_thread(lambda: [self._engine.status(d) for d in items])

    async def get_integration(self, principal: Principal, ref: IntegrationRef) -> IntegrationStatus:
        await self.authorize(principal, INTEGRATION_READ, ref)
        desired = self._desired_or_404(ref)
        return await asyncio.to_thread(self._engine.status, desired)

    async def add_integration(self, principal: Principal, item: DesiredIntegration) -> Outcome:
        """Add a desired integration and provision it now."""
        decision = await self.authorize(principal, INTEGRATION_PROVISION, item.ref)
        new = self.desired.add(item)
        await self._audit.arecord(
            "admin.action",
            "success",
            principal=principal,
            ref=item.ref,
            rule_id=decision.rule_id,
            details={"operation": "add_integration", "new": new},
        )
        return await self._engine_call(principal, decision, "provision", self._engine.provision, item)

    async def rotate(self, principal: Principal, ref: IntegrationRef) -> Outcome:
        decision = await self.authorize(principal, INTEGRATION_ROTATE, ref)
        return await self._engine_call(principal, decision, "rotate", self._engine.rotate, self._desired_or_404(ref))

    async def rollback(self, principal: Principal, ref: IntegrationRef) -> Outcome:
        decision = await self.authorize(principal, INTEGRATION_ROTATE, ref)
        desired = self._desired_or_404(ref)

        def rollback(ref: IntegrationRef) -> Outcome:
            return self._engine.rollback(ref, grace_seconds=desired.grace_seconds)

        return await self._engine_call(principal, decision, "rollback", rollback, ref)

    async def revoke(self, principal: Principal, ref: IntegrationRef) -> Outcome:
        decision = await self.authorize(principal, INTEGRATION_REVOKE, ref)
        return await self._engine_call(principal, decision, "revoke", self._engine.revoke, self._desired_or_404(ref))

    async def _engine_call(
        self, principal: Principal, decision: Decision, name: str, func: Callable[[Any], Outcome], arg: Any
    ) -> Outcome:
        ref = arg if isinstance(arg, IntegrationRef) else arg.ref
        try:
            outcome = await asyncio.to_thread(func, arg)
        except BrokerError as exc:
            await self._audit.arecord(
                "admin.action",
                "failure",
                principal=principal,
                ref=ref,
                rule_id=decision.rule_id,
                details={"operation": name, "error_code": exc.code},
            )
            raise
        await self._audit.arecord(
            "admin.action",
            "success" if outcome.ok else "failure",
            principal=principal,
            ref=ref,
            rule_id=decision.rule_id,
            details={
                "operation": name,
                "result": outcome.action,
                "partner_key_version": outcome.version,
                "error_code": outcome.code,
            },
        )
        return outcome
