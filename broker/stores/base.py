"""The ``SecretStore`` contract: a small Protocol with domain verbs.

Two implementations (``vault.VaultStore``, ``aws.AwsStore``) and a caching
wrapper share it, and one contract test suite runs against each real backend.

Model
-----
A secret lives at a *path* (Vault: under the KV v2 mount; AWS: the secret
name) and holds immutable *versions*; each version is a flat map of field
name -> secret string. Three *stage pointers* (``current``, ``pending``,
``previous``) each point at one version or at nothing.

* ``write`` appends a version with optimistic concurrency: the caller names
  the latest version it saw (``expected_latest``; ``None`` = the secret must
  not exist yet). A writer that lost the race gets ``Conflict``. The same
  ``idempotency_key`` retried returns the version the first attempt made
  (``created=False``); a value equal to the latest version creates nothing.
  Writes never move a stage.
* ``move_stage`` is compare-and-swap of one pointer: it succeeds only if the
  pointer is at ``expected`` (``None`` = unset), else ``Conflict``. Moving
  ``current`` sets ``previous`` to the old current in the same step.
* Every vendor-SDK error is translated: ``SecretNotFound``,
  ``StoreAccessDenied``, ``Conflict``, ``StoreUnavailable``. No message
  contains a secret value.

All methods are blocking; async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from pydantic import SecretStr

from broker.models import SecretInfo, SecretValue, Stage, WriteResult


@runtime_checkable
class SecretStore(Protocol):
    """Versioned secrets with stage pointers (see the module docstring)."""

    backend: str

    def read(self, path: str, *, version: str | None = None, stage: Stage | None = None) -> SecretValue:
        """Return one version: by ``version``, by ``stage``, else ``current`` (or the latest if unstaged)."""
        ...

    def describe(self, path: str) -> SecretInfo:
        """Return versions (oldest first), stage pointers, latest version and owner; no values."""
        ...

    def write(
        self,
        path: str,
        data: Mapping[str, SecretStr],
        *,
        expected_latest: str | None,
        idempotency_key: str,
    ) -> WriteResult:
        """Append a version if ``expected_latest`` still is the latest; see the module docstring."""
        ...

    def move_stage(self, path: str, stage: Stage, version: str | None, *, expected: str | None) -> None:
        """Point ``stage`` at ``version`` (``None`` = unset) iff it points at ``expected`` now."""
        ...

    def health(self) -> None:
        """Return if the backend answers and the broker's credentials work; raise otherwise."""
        ...

    def close(self) -> None:
        """Release connections and background renewals."""
        ...


@runtime_checkable
class SagaStore(SecretStore, Protocol):
    """Two extra verbs that save round trips on the engine's hot path.

    Both real stores have them; the engine checks once (``isinstance``) and
    falls back to the plain verbs for any other ``SecretStore``, so wrappers
    and fakes need not implement them.
    """

    def read_latest(self, path: str) -> SecretValue:
        """Return the newest version, whatever the stage pointers say (``SecretNotFound`` if none)."""
        ...

    def promote(self, path: str, version: str, *, expected_current: str | None) -> None:
        """Move ``current`` from ``expected_current`` to ``version`` (``previous`` = the old current) and unset
        ``pending``, which must point at ``version``; ``Conflict`` if either pointer is elsewhere.

        The same as ``move_stage(current)`` then ``move_stage(pending, None)``; Vault does both in one
        compare-and-swap, AWS in that order (a crash in between leaves ``pending`` on the new current).
        """
        ...
