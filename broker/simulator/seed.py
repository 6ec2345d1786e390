"""The simulator's seed: OEM clients, vendors and organizations.

A seed is a YAML (or JSON) file::

    clients:
      - id: dev-client
        secret: dev-client-secret
        scopes: [vendor_manage, "oem:partner_token"]
    vendors:
      - id: vendor-acme
        name: Acme Backup
        vendor_key: acme-vendor-key        # the VENDOR_TOKEN half; no ':'
        integration_type: external         # shown in the vendor list
        credential_template: {"api key": "", "api username": ""}
    organizations:
      - id: org-contoso                    # the MSPC organizationId
        name: Contoso MSP
        oem_token: contoso-oem-token       # organizationOemToken
        vendor_organization_id: contoso    # the integrator's own id (optional)
        email: admin@contoso.example       # optional; user placement by domain
        allowed_vendor_ids: [vendor-acme]

Organizations created through the OEM API allow every seeded vendor.
A default seed for local development ships with the package
(``default_seed.yaml``).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from broker.errors import ConfigError

PARTNER_TOKEN_SCOPE = "oem:partner_token"  # noqa: S105 - a scope name, not a secret
VENDOR_MANAGE_SCOPE = "vendor_manage"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SeedClient(_Strict):
    """An OEM API client: credentials and the scopes it may ask for."""

    id: str = Field(min_length=1)
    secret: str = Field(min_length=1)
    scopes: tuple[str, ...] = (VENDOR_MANAGE_SCOPE, PARTNER_TOKEN_SCOPE)


class SeedVendor(_Strict):
    """A vendor template and its vendor key (the first half of MSPC_TOKEN)."""

    id: str = Field(min_length=1)
    name: str
    vendor_key: str = Field(min_length=1)
    integration_type: str = "external"
    integration_status: str = "active"
    credential_template: dict[str, str] = Field(default_factory=lambda: {"api key": "", "api username": ""})

    @field_validator("vendor_key")
    @classmethod
    def _no_colon(cls, value: str) -> str:
        if ":" in value:
            raise ValueError("a vendor key must not contain ':' (MSPC_TOKEN splits at the first ':')")
        return value


class SeedOrganization(_Strict):
    """An organization (tenant) and the vendors it allows."""

    id: str = Field(min_length=1)
    name: str
    oem_token: str = Field(min_length=1)
    vendor_organization_id: str | None = None
    email: str | None = None
    allowed_vendor_ids: tuple[str, ...] = ()


class Seed(_Strict):
    """Everything the simulator starts from."""

    clients: tuple[SeedClient, ...]
    vendors: tuple[SeedVendor, ...]
    organizations: tuple[SeedOrganization, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> Seed:
        for kind, ids in (
            ("client", [c.id for c in self.clients]),
            ("vendor", [v.id for v in self.vendors]),
            ("organization", [o.id for o in self.organizations]),
            ("vendor key", [v.vendor_key for v in self.vendors]),
            ("organization oem_token", [o.oem_token for o in self.organizations]),
        ):
            if len(ids) != len(set(ids)):
                raise ValueError(f"duplicate {kind} in seed")
        vendor_ids = {v.id for v in self.vendors}
        for org in self.organizations:
            unknown = sorted(set(org.allowed_vendor_ids) - vendor_ids)
            if unknown:
                raise ValueError(f"organization {org.id} allows unknown vendor(s) {unknown}")
        return self

    def client(self, client_id: str) -> SeedClient | None:
        """The client with this id, if any."""
        return next((c for c in self.clients if c.id == client_id), None)

    def vendor(self, vendor_id: str) -> SeedVendor | None:
        """The vendor with this id, if any."""
        return next((v for v in self.vendors if v.id == vendor_id), None)

    def organization(self, organization_id: str) -> SeedOrganization | None:
        """The seeded organization with this id, if any."""
        return next((o for o in self.organizations if o.id == organization_id), None)


def parse_seed(data: Any, source: str = "seed") -> Seed:
    """Validate a decoded seed document; raise ``ConfigError`` naming each problem (never a value)."""
    try:
        return Seed.model_validate(data)
    except ValidationError as exc:
        problems = [
            ".".join(str(p) for p in err["loc"]) + ": " + err["msg"]
            for err in exc.errors(include_input=False, include_url=False)
        ]
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


def load_seed(path: Path | None = None) -> Seed:
    """Load a seed file (YAML or JSON); ``None`` loads the packaged development seed."""
    if path is None:
        text = resources.files("broker.simulator").joinpath("default_seed.yaml").read_text(encoding="utf-8")
        source = "default_seed.yaml"
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read seed file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if source.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{source}: not valid YAML/JSON ({type(exc).__name__})") from None
    return parse_seed(data, source)
