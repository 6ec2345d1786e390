"""Desired integrations: which (organizationId, vendorId) pairs must exist.

File format (YAML)::

    integrations:
      - organizationId: org-1
        vendorId: acme-crm
        rotation:                 # optional, per integration
          maxKeyAgeSeconds: 86400
          graceSeconds: 3600

Ids are validated (``broker.models.validate_identifier``) before they touch a
secret path, so ``../`` or ``a/b`` never reach a store. Duplicate pairs are
refused. The admin API adds pairs at run time through ``DesiredState.add``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker.errors import ConfigError, InvalidIdentifier
from broker.models import IntegrationRef


class RotationOverride(BaseModel):
    """Per-integration rotation settings (both optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    max_key_age_seconds: int | None = Field(None, alias="maxKeyAgeSeconds", gt=0)
    grace_seconds: int | None = Field(None, alias="graceSeconds", ge=0)


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    organization_id: str = Field(alias="organizationId")
    vendor_id: str = Field(alias="vendorId")
    rotation: RotationOverride = Field(default_factory=RotationOverride)


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    integrations: list[_Entry] = Field(default_factory=list)


@dataclass(frozen=True, slots=True)
class DesiredIntegration:
    """One integration the broker must keep provisioned."""

    ref: IntegrationRef
    max_key_age_seconds: int | None = None
    grace_seconds: int | None = None


def parse_desired(text: str, source: str = "<desired>") -> list[DesiredIntegration]:
    """Parse and validate a desired-integrations document; ``ConfigError`` names the problem."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    try:
        parsed = _File.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{source}: {where}: {first['msg']}") from None
    out: list[DesiredIntegration] = []
    seen: set[IntegrationRef] = set()
    for index, entry in enumerate(parsed.integrations):
        try:
            ref = IntegrationRef(entry.organization_id, entry.vendor_id)
        except InvalidIdentifier as exc:
            raise ConfigError(f"{source}: integrations.{index}: {exc.message}") from None
        if ref in seen:
            raise ConfigError(f"{source}: integrations.{index}: duplicate integration {ref}")
        seen.add(ref)
        out.append(DesiredIntegration(ref, entry.rotation.max_key_age_seconds, entry.rotation.grace_seconds))
    return out


def load_desired(path: Path) -> list[DesiredIntegration]:
    """Read ``path`` (see the module docstring for the format)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read desired integrations: {exc.strerror}") from None
    return parse_desired(text, str(path))


class DesiredState:
    """The current set of desired integrations (file + admin additions), thread-safe."""

    def __init__(self, items: Iterable[DesiredIntegration] = ()) -> None:
        self._lock = threading.Lock()
        self._items: dict[IntegrationRef, DesiredIntegration] = {i.ref: i for i in items}

    def add(self, item: DesiredIntegration) -> bool:
        """Add (or update) one integration; True if it was new."""
        with self._lock:
            new = item.ref not in self._items
            self._items[item.ref] = item
            return new

    def get(self, ref: IntegrationRef) -> DesiredIntegration | None:
        with self._lock:
            return self._items.get(ref)

    def __iter__(self) -> Iterator[DesiredIntegration]:
        with self._lock:
            return iter(list(self._items.values()))

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
