"""The per-integration state record: intents, retiring keys, orphans.

It is a secret of its own (path from ``engine.state_path_template``) whose
versions are the history of the integration's saga; every change is a
compare-and-swap ``write`` on its latest version, so across processes and
replicas exactly one writer wins each step. It holds ids, versions and
times, never a key.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from broker.errors import SecretNotFound
from broker.stores.base import SagaStore, SecretStore

STATE_FIELD = "state"

# Fields of a partner-key version (one version per OEM integration).
PARTNER_KEY_FIELD = "partner_api_key"
INTEGRATION_ID_FIELD = "integration_id"
INTENT_ID_FIELD = "intent_id"

MAX_HISTORY = 20


class Intent(BaseModel):
    """An open saga step: who runs it, what it does, where it got to."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    op: str
    owner: str
    started_at: float
    updated_at: float
    old_current: str | None = None
    grace_seconds: int = 0


class RetiringKey(BaseModel):
    """A replaced partner key, valid until ``retire_at``, then revoked."""

    model_config = ConfigDict(extra="forbid")

    version: str
    integration_id: str
    retire_at: float


class Orphan(BaseModel):
    """An OEM integration the broker created but holds no key for."""

    model_config = ConfigDict(extra="forbid")

    integration_id: str
    detected_at: float
    revoked: bool = False


class IntegrationState(BaseModel):
    """Everything the engine remembers about one integration, besides the keys."""

    model_config = ConfigDict(extra="forbid")

    intent: Intent | None = None
    retiring: list[RetiringKey] = Field(default_factory=list)
    retired: list[RetiringKey] = Field(default_factory=list)
    orphans: list[Orphan] = Field(default_factory=list)
    orphan_check: bool = False
    last_rotation_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    probe_failures: int = 0
    rotation_times: list[float] = Field(default_factory=list)

    def touch_error(self, code: str | None) -> None:
        self.last_error = code
        self.last_error_at = time.time() if code else None


@dataclass(frozen=True, slots=True)
class Loaded:
    """A state record as read, with the store version to compare against."""

    state: IntegrationState
    version: str | None


def load_state(store: SecretStore, path: str) -> Loaded:
    """Read the latest state record (an empty one if none exists yet).

    A state record has no stage pointers, so the latest version is what
    ``read`` would return; ``read_latest`` gets it without the stage lookup.
    """
    try:
        value = store.read_latest(path) if isinstance(store, SagaStore) else store.read(path)
    except SecretNotFound:
        return Loaded(IntegrationState(), None)
    raw = value.field(STATE_FIELD).get_secret_value()
    return Loaded(IntegrationState.model_validate(json.loads(raw)), value.version)


def save_state(store: SecretStore, path: str, loaded: Loaded, state: IntegrationState) -> Loaded:
    """CAS-write ``state`` over ``loaded``; ``Conflict`` if somebody wrote in between."""
    state.retired = state.retired[-MAX_HISTORY:]
    state.orphans = state.orphans[-MAX_HISTORY:]
    body = json.dumps(state.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    result = store.write(
        path,
        {STATE_FIELD: SecretStr(body)},
        expected_latest=loaded.version,
        idempotency_key=f"state-{uuid.uuid4().hex}",
    )
    return Loaded(state, result.version)
