"""Leader election: only one replica reconciles and rotates.

``StoreLease`` keeps a lease record in the secret store, taken and renewed
with compare-and-swap writes and an expiry. Correctness never
depends on the lease: the CAS intents alone keep two leaders from both
winning a saga. The lease only saves the work of losing. ``KubernetesLease``
is the in-cluster choice (no store versions per renewal, visible with
``kubectl get lease``).
"""

from __future__ import annotations

import json
import ssl
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import httpx
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
        renew_seconds: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._path = path
        self.holder = holder
        self._lease_seconds = lease_seconds
        self._renew_seconds = lease_seconds / 3 if renew_seconds is None else min(renew_seconds, lease_seconds)
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
            if holder == self.holder and expires_at - self._lease_seconds + self._renew_seconds > now:
                return True  # renewed recently: no new store version (AWS counts them)
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


def _micro_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(text: str | None) -> float:
    if not text:
        return 0.0
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class KubernetesLease:
    """A ``coordination.k8s.io/v1`` Lease, taken and renewed with ``resourceVersion`` as the compare.

    ``GET`` the Lease; if another holder renewed it within its
    ``leaseDurationSeconds``, we are not the leader; otherwise ``PUT`` it with
    the ``resourceVersion`` we read (a concurrent writer makes that a 409, so
    two replicas never both take it), or ``POST`` it if it does not exist.
    Any API error means "not leader now" (logged), never an exception.
    """

    def __init__(
        self,
        *,
        api_url: str,
        namespace: str,
        name: str,
        holder: str,
        lease_seconds: float,
        token_path: Path,
        ca_bundle_path: Path | None,
        timeout_seconds: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.holder = holder
        self._path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"
        self._collection = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        self._name = name
        self._lease_seconds = max(1, round(lease_seconds))
        self._token_path = token_path
        self._clock = clock
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(ca_bundle_path)) if ca_bundle_path is not None else True
        )
        self._http = httpx.Client(base_url=api_url, verify=verify, timeout=timeout_seconds, trust_env=False)

    def _headers(self) -> dict[str, str]:
        # Re-read each time: the kubelet rotates projected tokens.
        return {"Authorization": f"Bearer {self._token_path.read_text(encoding='utf-8').strip()}"}

    def _spec(self, previous: dict[str, Any] | None) -> dict[str, Any]:
        now = _micro_time(self._clock())
        spec = dict(previous or {})
        if spec.get("holderIdentity") != self.holder:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if previous else 0)
        spec.update({"holderIdentity": self.holder, "leaseDurationSeconds": self._lease_seconds, "renewTime": now})
        return spec

    def try_acquire(self) -> bool:
        try:
            response = self._http.get(self._path, headers=self._headers())
            if response.status_code == 404:
                body = {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": self._name},
                    "spec": self._spec(None),
                }
                created = self._http.post(self._collection, json=body, headers=self._headers())
                return created.status_code == 201
            response.raise_for_status()
            lease = response.json()
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity")
            expires = _parse_time(spec.get("renewTime")) + float(spec.get("leaseDurationSeconds") or 0)
            if holder not in (None, "", self.holder) and expires > self._clock():
                return False
            lease["spec"] = self._spec(spec)
            updated = self._http.put(self._path, json=lease, headers=self._headers())
            return updated.status_code == 200
        except (httpx.HTTPError, OSError, ValueError) as exc:
            log.warning("kubernetes lease check failed", error=type(exc).__name__)
            return False

    def release(self) -> None:
        try:
            response = self._http.get(self._path, headers=self._headers())
            if response.status_code != 200:
                return
            lease = response.json()
            if (lease.get("spec") or {}).get("holderIdentity") != self.holder:
                return
            lease["spec"]["holderIdentity"] = None
            self._http.put(self._path, json=lease, headers=self._headers())
        except (httpx.HTTPError, OSError, ValueError) as exc:
            log.warning("kubernetes lease release failed", error=type(exc).__name__)
        finally:
            self._http.close()
