"""Leader election: only one replica reconciles and rotates.

``StoreLease`` keeps a lease record in the secret store, taken and renewed
with compare-and-swap writes and an expiry. (In a cluster, a Kubernetes
Lease is the better home; see ``KubernetesLease``.) Correctness never
depends on the lease: the CAS intents alone keep two leaders from both
winning a saga. The lease only saves the work of losing.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from pydantic import SecretStr

from broker.errors import BrokerError, Conflict, SecretNotFound
from broker.log import get_logger
from broker.stores.base import SecretStore

log = get_logger("leader")

LEASE_FIELD = "lease"


class Lease(Protocol):
    """A leadership lease."""

    holder: str

    def try_acquire(self) -> bool:
        """Take or renew the lease; True while this replica leads."""
        ...

    def release(self) -> None:
        """Give the lease up (clean shutdown)."""
        ...


class StoreLease:
    """A lease record ``{holder, expires_at}`` in the store, moved by CAS."""

    def __init__(
        self,
        store: SecretStore,
        path: str,
        holder: str,
        *,
        lease_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._path = path
        self.holder = holder
        self._lease_seconds = lease_seconds
        self._clock = clock

    def _read(self) -> tuple[dict[str, object], str | None]:
        try:
            value = self._store.read(self._path)
        except SecretNotFound:
            return {}, None
        return json.loads(value.field(LEASE_FIELD).get_secret_value()), value.version

    def _write(self, body: dict[str, object], expected: str | None) -> None:
        self._store.write(
            self._path,
            {LEASE_FIELD: SecretStr(json.dumps(body, sort_keys=True))},
            expected_latest=expected,
            idempotency_key=f"lease-{uuid.uuid4().hex}",
        )

    def try_acquire(self) -> bool:
        try:
            record, version = self._read()
            now = self._clock()
            holder = record.get("holder")
            expires_at = float(str(record.get("expires_at", 0)))
            if holder not in (None, self.holder) and expires_at > now:
                return False
            self._write({"holder": self.holder, "expires_at": now + self._lease_seconds}, version)
            return True
        except Conflict:
            return False
        except BrokerError as exc:
            log.warning("leader lease check failed", code=exc.code)
            return False

    def release(self) -> None:
        try:
            record, version = self._read()
            if record.get("holder") == self.holder:
                self._write({"holder": None, "expires_at": 0}, version)
        except BrokerError as exc:
            log.warning("leader lease release failed", code=exc.code)
