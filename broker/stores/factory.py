"""Build the configured ``SecretStore`` and name the secrets the broker uses.

The vendor SDKs stay behind their modules: ``build_store`` imports
``broker.stores.vault`` or ``broker.stores.aws`` only when that backend is
chosen, so a Vault deployment never imports boto3 and vice versa.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pydantic import SecretStr

from broker.errors import ConfigError, SecretNotFound
from broker.metrics import Metrics
from broker.models import IntegrationRef, validate_identifier
from broker.settings import Settings
from broker.stores.base import SecretStore


def build_store(settings: Settings, metrics: Metrics | None = None) -> SecretStore:
    """Return the store ``settings.store.backend`` names, configured from ``settings``."""
    if settings.store.backend == "vault":
        from broker.stores.vault import VaultStore

        return VaultStore(settings.vault, settings.store, metrics=metrics)
    if settings.store.backend == "aws":
        from broker.stores.aws import AwsStore

        return AwsStore(settings.aws, settings.store, metrics=metrics)
    raise ConfigError(f"store.backend: unknown backend {settings.store.backend!r}")


def _render(template: str, setting: str, **values: str) -> str:
    names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    unknown = names - values.keys()
    if unknown:
        raise ConfigError(f"{setting}: unknown placeholder(s) {sorted(unknown)}; allowed: {sorted(values)}")
    return template.format(**values)


def vendor_key_path(settings: Settings, vendor_id: str) -> str:
    """Path (Vault) / secret name (AWS) of a vendor key; the id is validated first."""
    validate_identifier("vendor_id", vendor_id)
    return _render(settings.store.vendor_key_path_template, "store.vendor_key_path_template", vendor_id=vendor_id)


def partner_key_path(settings: Settings, ref: IntegrationRef) -> str:
    """Path / secret name of the partner-key secret of one (organization, vendor) pair."""
    return _render(
        settings.store.partner_key_path_template,
        "store.partner_key_path_template",
        organization_id=ref.organization_id,
        vendor_id=ref.vendor_id,
    )


@dataclass(frozen=True, slots=True)
class VendorKey:
    """The vendor key in use: its value and the store version it came from."""

    path: str
    version: str
    value: SecretStr


@runtime_checkable
class _WholeStringReader(Protocol):
    def read_secret_string(self, path: str, *, version: str) -> SecretStr: ...


def read_vendor_key(store: SecretStore, settings: Settings, vendor_id: str) -> VendorKey:
    """Read the current (else latest) vendor key from ``store.vendor_key_field`` of its secret.

    An empty field name means the whole value: on AWS the whole SecretString; on Vault the
    secret's only field. A missing field is ``SecretNotFound`` naming the field, never a value.
    """
    path = vendor_key_path(settings, vendor_id)
    secret = store.read(path)
    field = settings.store.vendor_key_field
    if field in secret.data:
        return VendorKey(path=path, version=secret.version, value=secret.data[field])
    if field == "":
        if isinstance(store, _WholeStringReader):
            return VendorKey(
                path=path, version=secret.version, value=store.read_secret_string(path, version=secret.version)
            )
        if len(secret.data) == 1:
            (only,) = secret.data.values()
            return VendorKey(path=path, version=secret.version, value=only)
        raise SecretNotFound(
            f"vendor key {path} version {secret.version} has {len(secret.data)} fields; set store.vendor_key_field"
        )
    raise SecretNotFound(f"vendor key {path} version {secret.version} has no field {field!r}")
