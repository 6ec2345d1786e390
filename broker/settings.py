"""All broker settings, in one pydantic-settings model with nested groups.

Environment variables use the prefix ``BROKER_`` and ``__`` between group and
field, e.g. ``BROKER_VAULT__URL``. Every secret setting ``x`` has a sibling
``x_file`` that names a file to read it from (a Kubernetes secret mount); the
file is read at start-up; setting both is an error, so nobody
wonders which one is used. Durations carry their unit in the name.

Settings are built once (``load_settings``) and passed down; nothing reads
the environment at import time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.errors import ConfigError

ENV_PREFIX = "BROKER_"
ENV_NESTED_DELIMITER = "__"


class _Group(BaseModel):
    """A settings group: strict keys; ``<secret>_file`` fills ``<secret>``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _read_secret_files(self) -> Self:
        for name in type(self).model_fields:
            file_field = f"{name}_file"
            if file_field not in type(self).model_fields:
                continue
            path = getattr(self, file_field)
            if path is None:
                continue
            if getattr(self, name) is not None:
                raise ValueError(f"set only one of {name} and {file_field}")
            try:
                text = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise ValueError(f"{file_field}: cannot read {path}: {exc.strerror}") from None
            if not text:
                raise ValueError(f"{file_field}: {path} is empty")
            object.__setattr__(self, name, SecretStr(text))
        return self


class StoreSettings(_Group):
    """Which secret store holds vendor keys and partner keys, and where."""

    backend: Literal["vault", "aws"] = Field(
        "vault", description="Secret store backend: 'vault' (Vault / OpenBao KV v2) or 'aws' (Secrets Manager)."
    )
    vendor_key_path_template: str = Field(
        "mspc/vendor-keys/{vendor_id}",
        description="Path (Vault, under the KV mount) or secret name (AWS) of a vendor key; placeholders: {vendor_id}.",
    )
    vendor_key_field: str = Field(
        "vendor_api_key",
        description="Field of the vendor-key secret holding the key (AWS: JSON key; empty = the whole SecretString).",
    )
    partner_key_path_template: str = Field(
        "mspc/partner-keys/{organization_id}/{vendor_id}",
        description="Path / secret name of a partner-key secret; placeholders: {organization_id}, {vendor_id}.",
    )
    owner: str = Field(
        "mspc-broker",
        description="Owner recorded on secrets the broker writes (Vault custom_metadata / AWS tag 'owner').",
    )
    max_versions: int = Field(
        20,
        ge=2,
        le=100,
        description="Versions kept per partner-key secret: Vault's KV v2 max_versions. On AWS only the live stages "
        "keep a staging label, so older versions are deprecated and Secrets Manager removes them past its own limit "
        "(its API cannot delete a version).",
    )


class VaultSettings(_Group):
    """Vault / OpenBao connection. Nothing falls back to VAULT_* or ~/.vault-token."""

    url: str = Field("http://127.0.0.1:8200", description="Vault address, e.g. https://vault.example:8200.")
    namespace: str | None = Field(None, description="Vault Enterprise / OpenBao namespace, if any.")
    kv_mount: str = Field("secret", description="Mount path of the KV v2 engine.")
    ca_bundle_path: Path | None = Field(None, description="PEM CA bundle to verify Vault's TLS certificate.")
    auth_method: Literal["token", "approle", "kubernetes"] = Field(
        "token", description="How the broker logs in: token, approle or kubernetes."
    )
    token: SecretStr | None = Field(None, description="Vault token (auth_method=token).")
    token_file: Path | None = Field(None, description="File holding the Vault token.")
    approle_mount: str = Field("approle", description="Mount path of the AppRole auth method.")
    role_id: str | None = Field(None, description="AppRole role_id (auth_method=approle).")
    secret_id: SecretStr | None = Field(None, description="AppRole secret_id (auth_method=approle).")
    secret_id_file: Path | None = Field(None, description="File holding the AppRole secret_id.")
    kubernetes_mount: str = Field(
        "kubernetes",
        description=(
            "Mount path of the auth method used for auth_method=kubernetes: a 'kubernetes' auth method or a 'jwt' "
            "auth method that trusts the cluster's service-account issuer; both log in with role + jwt at "
            "auth/<mount>/login."
        ),
    )
    kubernetes_role: str | None = Field(None, description="Vault role for Kubernetes auth.")
    kubernetes_jwt_path: Path = Field(
        Path("/var/run/secrets/kubernetes.io/serviceaccount/token"),
        description="Projected service-account token read at each Kubernetes login.",
    )
    stage_record_prefix: str = Field(
        "_broker/stages",
        description=(
            "KV path prefix (under kv_mount) of the broker's stage records: KV v2 has no labels, so the "
            "current/pending/previous pointers of <path> live in the CAS-protected secret <prefix>/<path>. "
            "The broker's policy needs read/create/update there as well."
        ),
    )
    timeout_seconds: float = Field(5.0, gt=0, description="Timeout of each HTTP call to Vault, in seconds.")
    token_renew_before_seconds: float = Field(
        60.0,
        ge=0,
        description=(
            "Renew (or log in again) this many seconds before the Vault token expires, in seconds; capped at "
            "half the token's TTL so short-lived tokens are not renewed in a tight loop."
        ),
    )


class AwsSettings(_Group):
    """AWS Secrets Manager connection; the default credential chain unless keys are given."""

    region: str = Field("us-east-1", description="AWS region of Secrets Manager.")
    endpoint_url: str | None = Field(None, description="Endpoint override (moto, VPC endpoints).")
    access_key_id: str | None = Field(None, description="Explicit access key id; unset = default chain (IRSA).")
    secret_access_key: SecretStr | None = Field(None, description="Explicit secret access key.")
    secret_access_key_file: Path | None = Field(None, description="File holding the secret access key.")
    session_token: SecretStr | None = Field(None, description="Explicit session token.")
    connect_timeout_seconds: float = Field(3.0, gt=0, description="botocore connect timeout, in seconds.")
    read_timeout_seconds: float = Field(5.0, gt=0, description="botocore read timeout, in seconds.")
    max_attempts: int = Field(3, ge=1, le=10, description="botocore total attempts per call.")
    retry_mode: Literal["standard", "adaptive", "legacy"] = Field("standard", description="botocore retry mode.")
    kms_key_id: str | None = Field(None, description="KMS key for secrets the broker creates; unset = AWS managed.")


class OemSettings(_Group):
    """The MSPC OEM API (provisioning) and Vendor API (probe)."""

    base_url: str = Field("http://127.0.0.1:8300", description="Base URL of the OEM API host.")
    vendor_api_base_url: str | None = Field(None, description="Base URL of the Vendor API; unset = same as base_url.")
    client_id: str = Field("", description="OEM client id.")
    client_secret: SecretStr | None = Field(None, description="OEM client secret.")
    client_secret_file: Path | None = Field(None, description="File holding the OEM client secret.")
    scope: str = Field("oem:partner_token", description="Scope sent in the OEM credential envelope.")
    ca_bundle_path: Path | None = Field(None, description="PEM CA bundle for the OEM / Vendor API TLS.")
    connect_timeout_seconds: float = Field(3.0, gt=0, description="Connect timeout per attempt, in seconds.")
    read_timeout_seconds: float = Field(10.0, gt=0, description="Read timeout per attempt, in seconds.")
    deadline_seconds: float = Field(30.0, gt=0, description="Overall deadline of one call across retries, in seconds.")
    max_attempts: int = Field(5, ge=1, le=20, description="Attempts per call, the first included.")
    backoff_base_seconds: float = Field(0.2, gt=0, description="First retry backoff (full jitter), in seconds.")
    backoff_max_seconds: float = Field(5.0, gt=0, description="Cap of one retry backoff, in seconds.")
    revoke_supported: bool = Field(
        True, description="Whether the OEM offers DELETE /api/oem-api/integration/{id} (an extension)."
    )


class IdentitySettings(_Group):
    """How workloads authenticate: Kubernetes projected service-account JWTs."""

    mode: Literal["jwks", "static", "tokenreview"] = Field(
        "jwks", description="jwks: verify with the issuer's JWKS; static: PEM files; tokenreview: ask the API server."
    )
    issuer: str = Field(
        "https://kubernetes.default.svc.cluster.local", description="Expected 'iss' of workload tokens."
    )
    audience: str = Field("mspc-broker", description="The broker's own audience; tokens for others are refused.")
    jwks_url: str | None = Field(
        None, description="JWKS URL; unset = discovered from {issuer}/.well-known/openid-configuration."
    )
    jwks_ca_bundle_path: Path | None = Field(None, description="PEM CA bundle for the JWKS / discovery URL.")
    static_key_paths: list[Path] = Field(default_factory=list, description="PEM public keys (mode=static).")
    clock_skew_seconds: int = Field(30, ge=0, le=300, description="Tolerated clock skew for exp/nbf/iat, in seconds.")
    max_token_bytes: int = Field(8192, ge=512, description="Largest bearer token accepted, in bytes.")
    jwks_refresh_min_interval_seconds: float = Field(
        10.0, ge=0, description="At most one JWKS refetch per this many seconds (unknown kid floods)."
    )
    jwks_cache_seconds: float = Field(300.0, ge=0, description="How long fetched keys are trusted, in seconds.")
    http_timeout_seconds: float = Field(3.0, gt=0, description="Timeout of JWKS / TokenReview calls, in seconds.")
    verified_cache_size: int = Field(10000, ge=0, description="Verified tokens remembered (by hash) until expiry.")
    verified_cache_max_seconds: float = Field(
        300.0, ge=0, description="Longest a verified token is reused unverified (never past exp), in seconds."
    )
    jwks_max_stale_seconds: float = Field(
        3600.0, ge=0, description="Keep the last good keys this long while the issuer is unreachable, in seconds."
    )
    tokenreview_url: str = Field(
        "https://kubernetes.default.svc", description="Kubernetes API server base URL (mode=tokenreview)."
    )
    tokenreview_ca_bundle_path: Path | None = Field(
        None, description="PEM CA bundle of the API server (mode=tokenreview); unset = system CAs."
    )
    tokenreview_token_path: Path = Field(
        Path("/var/run/secrets/kubernetes.io/serviceaccount/token"),
        description="The broker's own service-account token, read at each TokenReview call.",
    )
    jwks_token_path: Path | None = Field(
        None,
        description="Bearer token file for discovery / JWKS on the issuer's own host (in-cluster: the broker's "
        "service-account token); unset = anonymous.",
    )


class PolicySettings(_Group):
    """Where policies live and how often they are reloaded."""

    dir: Path = Field(Path("policies"), description="Directory of policy YAML files.")
    reload_interval_seconds: float = Field(5.0, ge=0, description="Check for changed files this often; 0 = never.")


class AuditSettings(_Group):
    """The hash-chained audit trail."""

    @field_validator("fsync", mode="before")
    @classmethod
    def _fsync_bool(cls, value: Any) -> Any:
        """Before ``fsync`` had modes it was a bool: true meant always, false never."""
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"
        if isinstance(value, bool):
            return "always" if value else "never"
        return value

    file_path: Path | None = Field(Path("audit/audit.jsonl"), description="Audit file; unset = no file sink.")
    stdout: bool = Field(False, description="Also write audit records to stdout.")
    hmac_key: SecretStr | None = Field(None, description="Key for HMAC-SHA256 of tokens and keys in records.")
    hmac_key_file: Path | None = Field(None, description="File holding the audit HMAC key.")
    write_timeout_ms: int = Field(200, ge=1, description="Longest a request waits for the audit sink, in milliseconds.")
    max_file_bytes: int = Field(
        64 * 1024 * 1024, ge=4096, description="Rotate the audit file past this size, in bytes."
    )
    checkpoint_every_records: int = Field(1000, ge=1, description="Write a checkpoint record every N records.")
    allow_ephemeral_key: bool = Field(
        False,
        description="Dev only: without hmac_key, use a random per-process key (HMACs cannot be looked up later).",
    )
    fsync: Literal["always", "interval", "never"] = Field(
        "interval",
        description=(
            "always: a record is fsynced before its request is answered (a power loss loses nothing answered); "
            "interval: answered once written to the file (a broker crash loses nothing), fsynced within "
            "fsync_interval_ms (a power loss can lose that much); never: left to the OS. true = always, false = never."
        ),
    )
    fsync_interval_ms: int = Field(
        1000, ge=1, description="With fsync: interval, the longest a written record waits for fsync, in milliseconds."
    )
    queue_max_records: int = Field(
        10000, ge=1, description="Records waiting for the writer at most; past this, writes fail at once."
    )


class TokenSettings(_Group):
    """Lifetimes of issued MSPC_TOKENs and the cache behind them."""

    default_ttl_seconds: int = Field(
        900, ge=1, description="TTL of an issued token when policy sets no cap, in seconds."
    )
    max_ttl_seconds: int = Field(3600, ge=1, description="Upper bound of any token TTL, in seconds.")
    cache_ttl_seconds: float = Field(60.0, ge=0, description="How long a cached key is fresh, in seconds.")
    max_stale_seconds: float = Field(
        300.0, ge=0, description="Serve the last good key this long during a backend outage, in seconds."
    )


class EngineSettings(_Group):
    """Provisioning, rotation and reconcile."""

    desired_file: Path | None = Field(None, description="YAML file of desired integrations.")
    reconcile_interval_seconds: float = Field(60.0, gt=0, description="Reconcile loop period, in seconds.")
    reconcile_jitter_ratio: float = Field(
        0.1, ge=0, le=1, description="Random jitter added to each period, as a fraction."
    )
    max_key_age_seconds: int = Field(
        30 * 24 * 3600, gt=0, description="Rotate partner keys older than this, in seconds."
    )
    grace_seconds: int = Field(
        3600, ge=0, description="Old partner key stays valid this long after rotation (>= tokens.max_ttl_seconds)."
    )
    intent_stale_seconds: float = Field(
        120.0, gt=0, description="An open intent older than this is taken over, in seconds."
    )
    concurrency: int = Field(16, ge=1, le=256, description="Integrations provisioned in parallel.")
    max_rotations_per_day: int = Field(
        10,
        ge=1,
        le=20,
        description="Rotations of one integration allowed per 24 h (each writes ~5 store versions; AWS Secrets "
        "Manager allows about 100 versions per secret per day). Break-glass revoke is not limited.",
    )
    vendor_key_poll_seconds: float = Field(30.0, gt=0, description="Check vendor keys for new versions this often.")
    state_path_template: str = Field(
        "mspc/broker-state/{organization_id}/{vendor_id}",
        description="Path / secret name of each integration's state record (intents, retiring keys, orphans).",
    )
    leader_path: str = Field(
        "mspc/broker-state/_leader", description="Path / secret name of the store-based leader lease."
    )
    leader_election: Literal["auto", "store", "kubernetes"] = Field(
        "auto",
        description="Where the leader lease lives: a Kubernetes Lease (in a cluster), a record in the store, "
        "or auto (kubernetes when KUBERNETES_SERVICE_HOST is set, else store).",
    )
    lease_name: str = Field("mspc-broker-leader", description="Name of the Kubernetes Lease.")
    lease_namespace: str | None = Field(
        None, description="Namespace of the Kubernetes Lease; unset = the pod's own (from the service account)."
    )
    kubernetes_api_url: str | None = Field(
        None, description="Kubernetes API URL; unset = https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT."
    )
    kubernetes_token_path: Path = Field(
        Path("/var/run/secrets/kubernetes.io/serviceaccount/token"),
        description="Service-account token for the Kubernetes API (Lease calls).",
    )
    kubernetes_ca_bundle_path: Path | None = Field(
        Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"),
        description="CA bundle of the Kubernetes API.",
    )
    leader_lease_seconds: float = Field(30.0, gt=0, description="Leader lease duration, in seconds.")
    leader_renew_seconds: float = Field(
        10.0,
        gt=0,
        description="Renew the leader lease at most this often, in seconds; each store-lease renewal is a store "
        "version (AWS without Kubernetes: use >= 1800 with a lease of >= 3600 to stay well under ~100/day).",
    )


class ServerSettings(_Group):
    """The broker's HTTP listener."""

    host: str = Field("127.0.0.1", description="Listen address.")
    port: int = Field(8080, ge=0, le=65535, description="Listen port (0 = pick a free one).")
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Worker processes on the one port (one Python process uses one core): each a whole "
        "broker with its own cache and its own audit chain (worker N writes <audit dir>/worker-N/); metrics are "
        "added up across workers. Set to the pod's CPU limit.",
    )
    drain_seconds: float = Field(
        5.0,
        ge=0,
        description="On SIGTERM keep serving this long while /readyz answers 503 (load balancers move away), "
        "then shut down, in seconds; keep drain + shutdown grace below terminationGracePeriodSeconds.",
    )
    shutdown_grace_seconds: float = Field(
        20.0, gt=0, description="On SIGTERM, wait this long for in-flight requests to finish, in seconds."
    )
    readiness_max_age_seconds: float = Field(
        30.0, gt=0, description="/readyz fails if a backend was last reached longer ago, in seconds."
    )


class LogSettings(_Group):
    """Structured logging."""

    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Minimum log level.")
    format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto = console on a TTY, JSON lines otherwise."
    )


class Settings(BaseSettings):
    """The whole configuration. Build with ``load_settings()``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    store: StoreSettings = Field(default_factory=StoreSettings, description="Secret store.")
    vault: VaultSettings = Field(default_factory=VaultSettings, description="Vault / OpenBao.")
    aws: AwsSettings = Field(default_factory=AwsSettings, description="AWS Secrets Manager.")
    oem: OemSettings = Field(default_factory=OemSettings, description="OEM / Vendor API.")
    identity: IdentitySettings = Field(default_factory=IdentitySettings, description="Workload identity.")
    policy: PolicySettings = Field(default_factory=PolicySettings, description="Policies.")
    audit: AuditSettings = Field(default_factory=AuditSettings, description="Audit trail.")
    tokens: TokenSettings = Field(default_factory=TokenSettings, description="Issued tokens.")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="Provisioning engine.")
    server: ServerSettings = Field(default_factory=ServerSettings, description="HTTP server.")
    log: LogSettings = Field(default_factory=LogSettings, description="Logging.")

    @model_validator(mode="after")
    def _grace_covers_tokens(self) -> Self:
        # A replaced key must outlive every token built from it.
        if self.engine.grace_seconds < self.tokens.max_ttl_seconds:
            raise ValueError(
                f"engine.grace_seconds ({self.engine.grace_seconds}) must be at least "
                f"tokens.max_ttl_seconds ({self.tokens.max_ttl_seconds}): tokens would outlive their key"
            )
        return self


def _env_name(loc: tuple[int | str, ...]) -> str:
    parts = [str(p) for p in loc if not isinstance(p, int)]
    return ENV_PREFIX + ENV_NESTED_DELIMITER.join(p.upper() for p in parts)


def settings_env(config: dict[str, dict[str, Any]]) -> dict[str, str]:
    """A nested settings dict as ``BROKER_GROUP__FIELD`` environment variables (for subprocesses)."""
    env: dict[str, str] = {}
    for group, values in config.items():
        for name, value in values.items():
            if value is None:
                continue
            key = f"{ENV_PREFIX}{group}{ENV_NESTED_DELIMITER}{name}".upper()
            if isinstance(value, bool):
                env[key] = str(value).lower()
            elif isinstance(value, list | dict):
                env[key] = json.dumps(value)
            else:
                env[key] = str(value)
    return env


def load_settings(**overrides: Any) -> Settings:
    """Build ``Settings`` from the environment (and keyword overrides).

    A bad value raises ``ConfigError`` whose message is one line per problem,
    naming the environment variable; the offending value is never echoed.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_input=False, include_url=False):
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{_env_name(err['loc'])}: {msg}" if err["loc"] else msg)
        raise ConfigError("; ".join(problems)) from None


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "").replace("pathlib.", "").replace("pydantic.types.", "")
    return text.replace("NoneType", "None").replace("SecretStr", "secret").replace(" | ", " or ")


def reference_markdown() -> str:
    """The configuration reference (README): every setting with env var, type, default and description."""
    lines: list[str] = []
    for group_name, group_field in Settings.model_fields.items():
        model = group_field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        lines.append(f"#### `{group_name}`: {(model.__doc__ or '').strip().splitlines()[0]}")
        lines.append("")
        lines.append("| env var | type | default | description |")
        lines.append("|---|---|---|---|")
        for name, info in model.model_fields.items():
            env = f"{ENV_PREFIX}{group_name}{ENV_NESTED_DELIMITER}{name}".upper()
            if info.default_factory is not None:
                default: Any = info.default_factory()  # type: ignore[call-arg]
            else:
                default = info.default
            type_name = _type_name(info.annotation)
            shown = "—" if default is None or "secret" in type_name else f"`{default}`"
            description = (info.description or "").replace("|", "\\|")
            lines.append(f"| `{env}` | {type_name} | {shown} | {description} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
