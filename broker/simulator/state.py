"""The simulator's mutable world: organizations, users, integrations, keys.

Partner keys are kept only as SHA-256 hashes, in memory and in the state
file; organization OEM tokens are kept in clear because the OEM API echoes
them (``POST /api/oem-api/user``), so the state file is created mode 0600; inspection shows a short fingerprint
(``fingerprint``) so tests can tell which key is live without the key
ever leaving the simulator a second time.

With a state path, every mutation is written atomically (temp file, fsync,
rename), so a restarted simulator keeps its integrations and revocations.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from broker.errors import ConfigError
from broker.simulator.seed import Seed

STATE_FORMAT_VERSION = 1
FINGERPRINT_CHARS = 16


def token_hash(value: str) -> str:
    """Full SHA-256 hex digest of a key or token (what the simulator stores)."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def same_secret(a: str, b: str) -> bool:
    """Constant-time comparison of two secret strings (any Unicode)."""
    return secrets.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def fingerprint(value: str) -> str:
    """Short SHA-256 prefix of a key, as shown by ``/_sim/integrations``."""
    return token_hash(value)[:FINGERPRINT_CHARS]


def new_object_id() -> str:
    """A 24-hex-digit id, like the ids in the MSPC examples."""
    return secrets.token_hex(12)


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Organization:
    """An organization (tenant); ``allowed_vendor_ids`` None = every vendor."""

    id: str
    name: str
    oem_token: str
    vendor_organization_id: str | None = None
    email: str | None = None
    allowed_vendor_ids: list[str] | None = None
    seeded: bool = False
    created_at: str = field(default_factory=_now_iso)

    def allows(self, vendor_id: str) -> bool:
        """Whether this organization may integrate with ``vendor_id``."""
        return self.allowed_vendor_ids is None or vendor_id in self.allowed_vendor_ids


@dataclass
class User:
    """A user of an organization (the first is the owner)."""

    organization_id: str
    email: str
    vendor_user_id: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    role: str = "member"


@dataclass
class Integration:
    """An organization's integration with one vendor."""

    id: str
    organization_id: str
    vendor_id: str
    kind: str
    client_id: str
    created_at: str = field(default_factory=_now_iso)
    partner_key_hash: str | None = None
    status: str = "active"
    revoked_at: str | None = None
    credential_fields: list[str] = field(default_factory=list)
    accounts: dict[str, dict[str, Any]] = field(default_factory=dict)
    services: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        """Not revoked (its partner key, if any, is accepted)."""
        return self.revoked_at is None

    def inspect(self) -> dict[str, Any]:
        """The inspection view: ids, times, key fingerprint and status; never a key."""
        return {
            "id": self.id,
            "organizationId": self.organization_id,
            "vendorId": self.vendor_id,
            "integrationKind": self.kind,
            "clientId": self.client_id,
            "createdAt": self.created_at,
            "integrationStatus": self.status,
            "live": self.live,
            "revokedAt": self.revoked_at,
            "partnerKeyFingerprint": self.partner_key_hash[:FINGERPRINT_CHARS] if self.partner_key_hash else None,
            "accounts": len(self.accounts),
            "services": len(self.services),
        }


class World:
    """All simulated OEM state; every method is safe to call from any thread."""

    def __init__(self, seed: Seed, state_path: Path | None = None) -> None:
        self.seed = seed
        self.state_path = state_path
        self.lock = threading.RLock()
        self.organizations: dict[str, Organization] = {}
        self.deleted_seed_organizations: set[str] = set()
        self.users: list[User] = []
        self.integrations: dict[str, Integration] = {}
        # partner_key_hash -> integration, so a Vendor API call finds its integration without a scan.
        self._by_partner_key: dict[str, Integration] = {}
        self._from_seed()
        if state_path is not None and state_path.exists():
            self._load(state_path)

    # -- lifecycle ---------------------------------------------------------

    def reset(self) -> None:
        """Back to the seed: created organizations, users and integrations are gone."""
        with self.lock:
            self._from_seed()
            self.save()

    def _from_seed(self) -> None:
        with self.lock:
            self.organizations = {
                o.id: Organization(
                    id=o.id,
                    name=o.name,
                    oem_token=o.oem_token,
                    vendor_organization_id=o.vendor_organization_id,
                    email=o.email,
                    allowed_vendor_ids=list(o.allowed_vendor_ids),
                    seeded=True,
                )
                for o in self.seed.organizations
            }
            self.deleted_seed_organizations = set()
            self.users = []
            self.integrations = {}
            self._by_partner_key = {}

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("version") != STATE_FORMAT_VERSION:
                raise ValueError(f"unsupported state version {data.get('version')!r}")
            with self.lock:
                for raw in data.get("organizations", []):
                    org = Organization(**raw)
                    self.organizations[org.id] = org
                for org_id in data.get("deletedSeedOrganizations", []):
                    self.organizations.pop(org_id, None)
                    self.deleted_seed_organizations.add(org_id)
                self.users = [User(**raw) for raw in data.get("users", [])]
                self.integrations = {raw["id"]: Integration(**raw) for raw in data.get("integrations", [])}
                self._by_partner_key = {i.partner_key_hash: i for i in self.integrations.values() if i.partner_key_hash}
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"cannot load simulator state {path}: {type(exc).__name__}: {exc}") from None

    def save(self) -> None:
        """Write the state file atomically (no-op without a state path)."""
        if self.state_path is None:
            return
        with self.lock:
            doc = {
                "version": STATE_FORMAT_VERSION,
                "organizations": [asdict(o) for o in self.organizations.values() if not o.seeded],
                "deletedSeedOrganizations": sorted(self.deleted_seed_organizations),
                "users": [asdict(u) for u in self.users],
                "integrations": [asdict(i) for i in self.integrations.values()],
            }
            directory = self.state_path.parent
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".sim-state-", dir=directory)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    json.dump(doc, handle, indent=1, sort_keys=True)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, self.state_path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    # -- lookups -----------------------------------------------------------

    def organization_by_token(self, oem_token: str) -> Organization | None:
        """The organization whose OEM token this is."""
        with self.lock:
            return next((o for o in self.organizations.values() if same_secret(o.oem_token, oem_token)), None)

    def organization_by_vendor_id(self, vendor_organization_id: str) -> Organization | None:
        """The organization created with this ``vendorOrganizationId``."""
        with self.lock:
            return next(
                (o for o in self.organizations.values() if o.vendor_organization_id == vendor_organization_id), None
            )

    def integration_by_partner_key(self, partner_key: str) -> Integration | None:
        """The integration that issued this partner key (live or revoked)."""
        digest = token_hash(partner_key)
        with self.lock:
            # Looked up by the SHA-256 digest (its timing tells nothing about the key); confirmed in constant time.
            found = self._by_partner_key.get(digest)
            return found if found is not None and same_secret(found.partner_key_hash or "", digest) else None

    def live_integrations(self, organization_id: str, vendor_id: str) -> list[Integration]:
        """Live integrations for one (organization, vendor) pair."""
        with self.lock:
            return [
                i
                for i in self.integrations.values()
                if i.live and i.organization_id == organization_id and i.vendor_id == vendor_id
            ]

    # -- mutations -----------------------------------------------------------

    def create_organization(
        self, *, name: str, email: str, vendor_organization_id: str | None
    ) -> tuple[Organization, str]:
        """Create an organization allowing every vendor; return it and its new OEM token."""
        token = "oem_" + secrets.token_urlsafe(32)
        with self.lock:
            org = Organization(
                id=new_object_id(),
                name=name,
                oem_token=token,
                vendor_organization_id=vendor_organization_id,
                email=email,
            )
            self.organizations[org.id] = org
            self.save()
        return org, token

    def delete_organization(self, org: Organization) -> None:
        """Delete an organization, its users, and revoke its integrations."""
        with self.lock:
            self.organizations.pop(org.id, None)
            if org.seeded:
                self.deleted_seed_organizations.add(org.id)
            self.users = [u for u in self.users if u.organization_id != org.id]
            for integration in self.integrations.values():
                if integration.organization_id == org.id and integration.live:
                    integration.revoked_at = _now_iso()
                    integration.status = "revoked"
            self.save()

    def add_user(self, user: User) -> None:
        """Add a user (the organization's first user becomes its owner)."""
        with self.lock:
            if not any(u.organization_id == user.organization_id for u in self.users):
                user.role = "owner"
            self.users.append(user)
            self.save()

    def remove_user(self, user: User) -> None:
        """Remove one user."""
        with self.lock:
            self.users.remove(user)
            self.save()

    def create_integration(
        self, *, organization_id: str, vendor_id: str, kind: str, client_id: str, credential_fields: list[str]
    ) -> tuple[Integration, str | None]:
        """Create an integration; external ones get a new partner key, returned once."""
        partner_key = "pk_" + secrets.token_urlsafe(32) if kind == "external" else None
        with self.lock:
            integration = Integration(
                id=new_object_id(),
                organization_id=organization_id,
                vendor_id=vendor_id,
                kind=kind,
                client_id=client_id,
                partner_key_hash=token_hash(partner_key) if partner_key else None,
                credential_fields=credential_fields,
            )
            self.integrations[integration.id] = integration
            if integration.partner_key_hash:
                self._by_partner_key[integration.partner_key_hash] = integration
            self.save()
        return integration, partner_key

    def revoke_integration(self, integration: Integration) -> None:
        """Revoke an integration: its partner key stops working at once."""
        with self.lock:
            integration.revoked_at = _now_iso()
            integration.status = "revoked"
            self.save()

    def touch(self) -> None:
        """Persist after an in-place change (accounts, services, status)."""
        self.save()
