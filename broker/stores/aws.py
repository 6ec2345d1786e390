"""``SecretStore`` on AWS Secrets Manager, through boto3.

Connection
----------
One ``secretsmanager`` client from a private ``boto3.session.Session``:
explicit keys when ``AwsSettings`` has them, else the default credential
chain (IRSA's web-identity token in a cluster); ``endpoint_url`` for moto or
VPC endpoints; an explicit botocore ``Config`` (connect / read timeouts,
``retries={"mode", "total_max_attempts"}``). The client is thread-safe.

Values are stored as a JSON object string (``{"field": "value"}``). A
SecretString that is not a JSON object (a vendor key pasted as plain text)
reads back as the single field ``""``; ``read_secret_string`` returns the
whole SecretString for ``store.vendor_key_field = ""``.

Versions and write-CAS (decision)
---------------------------------
A secret the broker creates starts with a *placeholder* version
(``create_secret`` with SecretString ``{}``, VersionId
``mspc-broker-version-000000000000-<random>``): Secrets Manager puts
``AWSCURRENT`` on a secret's first version no matter what, and the
placeholder absorbs that, so no real write ever moves a stage. The creator
also parks ``AWSPENDING`` and ``AWSPREVIOUS`` there. A stage whose label sits
on the placeholder (or on no version) is *unset*; the placeholder is hidden
from ``describe`` and ``read``.

Every write goes to a *slot*: version N of a broker secret has the VersionId
``mspc-broker-version-<N, 12 digits>``, and ``write`` puts slot
``expected_latest + 1`` with ``put_secret_value(ClientRequestToken=<slot id>,
VersionStages=["MSPC_BROKER_LATEST"])``. The ClientRequestToken is thus
derived from the write's identity (path + slot), not from
``idempotency_key`` alone: Secrets Manager refuses a second, different value
for an existing token (``ResourceExistsException``), so of N racers for one
slot exactly one creates it and the others get ``Conflict`` -- and a loser
leaves no orphan version behind, so the history holds only winners. A retry
(same expected_latest, same value, hence same slot) finds its version and
returns it with ``created=False``; that is the idempotency, with no key
stored anywhere. ``MSPC_BROKER_LATEST`` is a broker-owned label that marks the
newest version (``read`` falls back to it while ``current`` is unset).
Broker-owned secrets must be written only through the broker.

moto deviations guarded here (moto 5.2.5): a put whose token matches an
``AWSPENDING`` version overwrites it instead of refusing, and moto's token
check is not atomic under concurrent requests. The store therefore checks
the slot before the put and reads the slot back after it; a version that does
not hold this write's value is a ``Conflict``. Real Secrets Manager needs
neither guard.

Stages
------
Native labels: current = ``AWSCURRENT``, pending = ``AWSPENDING``,
previous = ``AWSPREVIOUS``. ``move_stage`` is one
``update_secret_version_stage`` whose ``RemoveFromVersionId`` is the version
the label is on now (the expected one, or the placeholder when unset): the
service refuses the call if the label moved meanwhile (moto enforces this
too: ``InvalidParameterException``), which becomes ``Conflict``. Moving
``AWSCURRENT`` makes Secrets Manager put ``AWSPREVIOUS`` on the old current in
the same call. Unsetting ``current`` moves ``AWSCURRENT`` back to the
placeholder. Reads always name a stage or a VersionId (moto keeps serving the
old version to a bare ``get_secret_value`` after ``AWSCURRENT`` moved).

Every boto3 / botocore error is translated by ``_translated``.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

import boto3
import botocore.config
import botocore.exceptions
from pydantic import SecretStr

from broker.errors import (
    BrokerError,
    ConfigError,
    Conflict,
    InvalidInput,
    SecretNotFound,
    StoreAccessDenied,
    StoreUnavailable,
    snippet,
)
from broker.log import get_logger
from broker.metrics import Metrics, observed
from broker.models import SecretInfo, SecretValue, Stage, VersionInfo, WriteResult
from broker.settings import AwsSettings, StoreSettings

if TYPE_CHECKING:
    from mypy_boto3_secretsmanager import SecretsManagerClient

BACKEND = "aws"
RETRY_AFTER_SECONDS = 1.0
LATEST_LABEL = "MSPC_BROKER_LATEST"
STAGE_LABELS: Mapping[Stage, str] = {
    Stage.CURRENT: "AWSCURRENT",
    Stage.PENDING: "AWSPENDING",
    Stage.PREVIOUS: "AWSPREVIOUS",
}
_LABEL_STAGES = {label: stage for stage, label in STAGE_LABELS.items()}
VERSION_PREFIX = "mspc-broker-version-"
_VERSION_ID = re.compile(r"^mspc-broker-version-(\d{12})(?:-[0-9a-f]+)?$")
PLACEHOLDER_VALUE = "{}"
_POOL_CONNECTIONS = 32
_log = get_logger("stores.aws")

_NOT_FOUND = frozenset({"ResourceNotFoundException"})
_DENIED = frozenset(
    {
        "AccessDeniedException",
        "AccessDenied",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "ExpiredTokenException",
        "ExpiredToken",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "KMSAccessDeniedException",
    }
)
_THROTTLED = frozenset({"ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded"})
_CONFLICT = frozenset({"ResourceExistsException", "PreconditionNotMetException"})
_INVALID = frozenset({"InvalidParameterException", "InvalidRequestException", "ValidationException"})
_DELETION_HINTS = ("deleted", "deletion")


def slot_id(seq: int) -> str:
    """VersionId (and ClientRequestToken, 32 chars) of broker version ``seq``."""
    return f"{VERSION_PREFIX}{seq:012d}"


def slot_of(version_id: str) -> int | None:
    """The slot number of a broker VersionId (0 = placeholder); None for foreign versions."""
    match = _VERSION_ID.match(version_id)
    return int(match.group(1)) if match else None


def _is_placeholder(version_id: str | None) -> bool:
    return version_id is not None and slot_of(version_id) == 0


def _from_client_error(
    exc: botocore.exceptions.ClientError, operation: str, where: str, *, conflict_on_invalid: bool, sensitive: bool
) -> BrokerError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", "Unknown"))
    upstream = str(error.get("Message", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    text = f"aws secretsmanager {operation} of {where}: {code}"
    if not sensitive:
        text += f": {snippet(upstream)}"
    if code in _NOT_FOUND:
        return SecretNotFound(text)
    if code in _DENIED or status in (401, 403):
        return StoreAccessDenied(text + " (check the broker's AWS credentials and IAM / KMS policy)")
    if code in _CONFLICT or (conflict_on_invalid and code == "InvalidParameterException"):
        return Conflict(text)
    if code == "InvalidRequestException" and any(h in upstream.lower() for h in _DELETION_HINTS):
        return SecretNotFound(text + " (the secret is scheduled for deletion)")
    if code in _THROTTLED or status >= 500 or code in {"InternalServiceError", "ServiceUnavailable"}:
        return StoreUnavailable(text, retry_after_seconds=RETRY_AFTER_SECONDS)
    if code in _INVALID:
        return InvalidInput(text)
    return StoreUnavailable(text, retry_after_seconds=RETRY_AFTER_SECONDS)


@contextmanager
def _translated(
    operation: str, where: str, *, conflict_on_invalid: bool = False, sensitive: bool = False
) -> Iterator[None]:
    """Re-raise botocore errors as broker errors (``from exc``); messages carry no values.

    ``sensitive=True`` (calls that carry a SecretString) keeps only the error code: a
    validation message could quote the value, so neither it nor the cause is kept.
    """
    try:
        yield
    except BrokerError:
        raise
    except botocore.exceptions.ClientError as exc:
        error = _from_client_error(exc, operation, where, conflict_on_invalid=conflict_on_invalid, sensitive=sensitive)
        if sensitive:
            raise error from None
        raise error from exc
    except botocore.exceptions.ParamValidationError:
        # Its text may quote a parameter value (SecretString): do not keep it, not even as __cause__.
        raise InvalidInput(f"aws secretsmanager {operation} of {where}: invalid request parameters") from None
    except (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError) as exc:
        raise StoreAccessDenied(f"aws: no usable credentials for {operation} of {where}: {type(exc).__name__}") from exc
    except botocore.exceptions.CredentialRetrievalError as exc:
        raise StoreAccessDenied(f"aws: cannot obtain credentials for {operation} of {where}") from exc
    except botocore.exceptions.BotoCoreError as exc:
        # EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError, ...
        raise StoreUnavailable(
            f"aws secretsmanager unreachable for {operation} of {where}: {type(exc).__name__}",
            retry_after_seconds=RETRY_AFTER_SECONDS,
        ) from exc
    except OSError as exc:
        raise StoreUnavailable(
            f"aws secretsmanager unreachable for {operation} of {where}: {type(exc).__name__}",
            retry_after_seconds=RETRY_AFTER_SECONDS,
        ) from exc
    except Exception as exc:
        raise StoreUnavailable(
            f"aws secretsmanager gave an unexpected answer to {operation} of {where}: {type(exc).__name__}",
            retry_after_seconds=RETRY_AFTER_SECONDS,
        ) from exc


def _parse_value(secret_string: str) -> dict[str, SecretStr]:
    """A JSON object -> its fields; anything else -> the single field ``""`` (the whole string)."""
    try:
        parsed = json.loads(secret_string)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        return {"": SecretStr(secret_string)}
    return {str(k): SecretStr(v if isinstance(v, str) else json.dumps(v)) for k, v in parsed.items()}


def _plain(data: Mapping[str, SecretStr]) -> dict[str, str]:
    return {k: v.get_secret_value() for k, v in data.items()}


def _encode(data: Mapping[str, SecretStr]) -> str:
    return json.dumps(_plain(data), sort_keys=True, separators=(",", ":"))


class AwsStore:
    """Versioned secrets in AWS Secrets Manager (see the module docstring)."""

    backend = BACKEND

    def __init__(
        self,
        settings: AwsSettings,
        store_settings: StoreSettings,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        if settings.access_key_id and settings.secret_access_key is None:
            raise ConfigError("aws.access_key_id needs aws.secret_access_key(_file)")
        if settings.secret_access_key is not None and not settings.access_key_id:
            raise ConfigError("aws.secret_access_key needs aws.access_key_id")
        self._settings = settings
        self._store_settings = store_settings
        self._metrics = metrics
        session = boto3.session.Session(
            aws_access_key_id=settings.access_key_id or None,
            aws_secret_access_key=(
                settings.secret_access_key.get_secret_value() if settings.secret_access_key else None
            ),
            aws_session_token=settings.session_token.get_secret_value() if settings.session_token else None,
            region_name=settings.region,
        )
        config = botocore.config.Config(
            connect_timeout=settings.connect_timeout_seconds,
            read_timeout=settings.read_timeout_seconds,
            retries={"mode": settings.retry_mode, "total_max_attempts": settings.max_attempts},
            max_pool_connections=_POOL_CONNECTIONS,
            user_agent_extra="mspc-broker",
        )
        self._client: SecretsManagerClient = session.client(
            "secretsmanager", endpoint_url=settings.endpoint_url, config=config
        )

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _check_path(path: str) -> str:
        if not path or path != path.strip() or len(path) > 512:
            raise InvalidInput(f"aws: invalid secret name {path!r}")
        return path

    def _get(self, path: str, *, version_id: str | None = None, label: str | None = None) -> dict[str, Any]:
        """GetSecretValue by VersionId or VersionStage (never bare: see the module docstring)."""
        kwargs: dict[str, Any] = {"SecretId": path}
        if version_id is not None:
            kwargs["VersionId"] = version_id
        if label is not None:
            kwargs["VersionStage"] = label
        where = f"{path} {'version ' + version_id if version_id else 'stage ' + str(label)}"
        with _translated("read", where):
            response: dict[str, Any] = dict(self._client.get_secret_value(**kwargs))
        return response

    def _get_or_none(self, path: str, version_id: str) -> dict[str, Any] | None:
        try:
            return self._get(path, version_id=version_id)
        except SecretNotFound:
            return None

    def _describe(self, path: str) -> dict[str, Any]:
        with _translated("describe", path):
            response: dict[str, Any] = dict(self._client.describe_secret(SecretId=path))
        return response

    def _version_ids(self, path: str) -> list[dict[str, Any]]:
        """ListSecretVersionIds (all pages, deprecated versions included)."""
        versions: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"SecretId": path, "IncludeDeprecated": True, "MaxResults": 100}
        with _translated("list versions", path):
            while True:
                page = self._client.list_secret_version_ids(**kwargs)
                versions.extend(dict(v) for v in page.get("Versions", []))
                token = page.get("NextToken")
                if not token:
                    return versions
                kwargs["NextToken"] = token

    def _to_value(self, path: str, response: Mapping[str, Any]) -> SecretValue:
        if "SecretString" not in response:
            raise InvalidInput(f"aws: {path} holds SecretBinary; the broker reads SecretString secrets only")
        labels = response.get("VersionStages") or []
        created = response.get("CreatedDate")
        return SecretValue(
            path=path,
            version=str(response["VersionId"]),
            data=_parse_value(str(response["SecretString"])),
            created_at=created if isinstance(created, datetime) else None,
            stages=frozenset(_LABEL_STAGES[label] for label in labels if label in _LABEL_STAGES),
        )

    def _create(self, path: str) -> None:
        """CreateSecret with the placeholder version; AWSPENDING / AWSPREVIOUS parked on it. Exists -> no-op."""
        placeholder = f"{slot_id(0)}-{secrets.token_hex(8)}"
        kwargs: dict[str, Any] = {
            "Name": path,
            "ClientRequestToken": placeholder,
            "SecretString": PLACEHOLDER_VALUE,
            "Description": "Managed by mspc-broker; write it only through the broker.",
            "Tags": [
                {"Key": "owner", "Value": self._store_settings.owner},
                {"Key": "managed-by", "Value": "mspc-broker"},
            ],
        }
        if self._settings.kms_key_id:
            kwargs["KmsKeyId"] = self._settings.kms_key_id
        try:
            with _translated("create", path):
                self._client.create_secret(**kwargs)
        except Conflict:
            return  # created by somebody else meanwhile
        for label in (STAGE_LABELS[Stage.PENDING], STAGE_LABELS[Stage.PREVIOUS]):
            with _translated("stage init", path):
                self._client.update_secret_version_stage(SecretId=path, VersionStage=label, MoveToVersionId=placeholder)
        _log.info("store_secret_created", backend=BACKEND, path=path)

    # -- SecretStore ----------------------------------------------------------------------------

    def read(self, path: str, *, version: str | None = None, stage: Stage | None = None) -> SecretValue:
        """GetSecretValue by VersionId, by stage label, else AWSCURRENT (or MSPC_BROKER_LATEST while unset)."""
        with observed(self._metrics, BACKEND, "read"):
            path = self._check_path(path)
            if version is not None:
                if _is_placeholder(version):
                    raise SecretNotFound(f"aws: {path} has no version {version}")
                response = self._get(path, version_id=version)
            elif stage is not None:
                response = self._get(path, label=STAGE_LABELS[Stage(stage)])
                if _is_placeholder(response.get("VersionId")):
                    raise SecretNotFound(f"aws: stage {Stage(stage).value} of {path} is not set")
            else:
                response = self._get(path, label=STAGE_LABELS[Stage.CURRENT])
                if _is_placeholder(response.get("VersionId")):
                    try:
                        response = self._get(path, label=LATEST_LABEL)
                    except SecretNotFound:
                        raise SecretNotFound(f"aws: {path} has no versions yet") from None
            value = self._to_value(path, response)
            _log.debug("store_read", backend=BACKEND, path=path, version=value.version)
            return value

    def read_secret_string(self, path: str, *, version: str) -> SecretStr:
        """The whole SecretString of one version (``store.vendor_key_field = ""``)."""
        with observed(self._metrics, BACKEND, "read"):
            response = self._get(self._check_path(path), version_id=version)
            if "SecretString" not in response:
                raise InvalidInput(f"aws: {path} holds SecretBinary; the broker reads SecretString secrets only")
            return SecretStr(str(response["SecretString"]))

    def describe(self, path: str) -> SecretInfo:
        """DescribeSecret + ListSecretVersionIds; no values."""
        with observed(self._metrics, BACKEND, "describe"):
            path = self._check_path(path)
            described = self._describe(path)
            listed = self._version_ids(path)
            deleted = described.get("DeletedDate") is not None
            labels_of: dict[str, list[str]] = {
                str(k): list(v) for k, v in (described.get("VersionIdsToStages") or {}).items()
            }
            stages: dict[Stage, str] = {}
            latest: str | None = None
            current: str | None = None
            for vid, labels in labels_of.items():
                if _is_placeholder(vid):
                    continue
                for label in labels:
                    if label in _LABEL_STAGES:
                        stages[_LABEL_STAGES[label]] = vid
                    if label == LATEST_LABEL:
                        latest = vid
                    if label == STAGE_LABELS[Stage.CURRENT]:
                        current = vid

            def order(v: Mapping[str, Any]) -> tuple[int, float, int]:
                slot = slot_of(str(v["VersionId"]))
                created = v.get("CreatedDate")
                stamp = created.timestamp() if isinstance(created, datetime) else 0.0
                return (0, stamp, 0) if slot is None else (1, 0.0, slot)

            versions = []
            for v in sorted((v for v in listed if not _is_placeholder(str(v["VersionId"]))), key=order):
                vid = str(v["VersionId"])
                created = v.get("CreatedDate")
                versions.append(
                    VersionInfo(
                        version=vid,
                        created_at=created if isinstance(created, datetime) else None,
                        stages=frozenset(s for s, holder in stages.items() if holder == vid),
                        deleted=deleted,
                    )
                )
            tags = {t.get("Key"): t.get("Value") for t in described.get("Tags") or []}
            return SecretInfo(
                path=path,
                versions=tuple(versions),
                stages=stages,
                latest_version=latest or current,
                owner=tags.get("owner"),
            )

    def write(
        self,
        path: str,
        data: Mapping[str, SecretStr],
        *,
        expected_latest: str | None,
        idempotency_key: str,
    ) -> WriteResult:
        """PutSecretValue into slot expected_latest + 1 (token = slot id); see the module docstring."""
        with observed(self._metrics, BACKEND, "write"):
            path = self._check_path(path)
            if not data or not all(isinstance(k, str) and k for k in data):
                raise InvalidInput("aws: a secret needs at least one non-empty field name")
            wanted = _plain(data)
            if expected_latest is None:
                slot = 1
            else:
                seq = slot_of(expected_latest)
                if not seq:
                    raise Conflict(f"aws: {expected_latest!r} is not a broker-written version of {path}")
                slot = seq + 1
            target = slot_id(slot)
            log = _log.bind(backend=BACKEND, path=path, expected_latest=expected_latest, slot=slot)
            existing = self._get_or_none(path, target)
            if existing is not None:
                return self._settle(path, target, existing, wanted, log)
            if expected_latest is not None:
                previous = self._get_or_none(path, expected_latest)
                if previous is None:
                    raise Conflict(f"aws: {path} has no version {expected_latest}; re-read and retry")
                if _plain(_parse_value(str(previous.get("SecretString", "")))) == wanted:
                    log.info("store_write_unchanged", version=expected_latest)
                    return WriteResult(version=expected_latest, created=False)
            else:
                self._create(path)
                foreign = [
                    vid for vid in (self._describe(path).get("VersionIdsToStages") or {}) if slot_of(str(vid)) is None
                ]
                if foreign:
                    raise Conflict(f"aws: {path} already has versions not written by the broker")
            try:
                with _translated("write", f"{path} slot {slot}", sensitive=True):
                    self._client.put_secret_value(
                        SecretId=path,
                        ClientRequestToken=target,
                        SecretString=_encode(data),
                        VersionStages=[LATEST_LABEL],
                    )
            except Conflict:
                log.info("store_write_conflict")
                raise Conflict(
                    f"aws: {path} is not at version {expected_latest or 'none'} any more; re-read and retry"
                ) from None
            written = self._get_or_none(path, target)
            if written is None or _plain(_parse_value(str(written.get("SecretString", "")))) != wanted:
                log.warning("store_write_lost_after_put")
                raise Conflict(f"aws: {path} slot {slot} was taken concurrently; re-read and retry")
            log.info("store_write", version=target)
            return WriteResult(version=target, created=True)

    @staticmethod
    def _settle(
        path: str, target: str, existing: Mapping[str, Any], wanted: Mapping[str, str], log: Any
    ) -> WriteResult:
        if _plain(_parse_value(str(existing.get("SecretString", "")))) == wanted:
            log.info("store_write_replayed", version=target)
            return WriteResult(version=target, created=False)
        log.info("store_write_conflict")
        raise Conflict(f"aws: {path} already has a newer version than expected; re-read and retry")

    def move_stage(self, path: str, stage: Stage, version: str | None, *, expected: str | None) -> None:
        """UpdateSecretVersionStage with RemoveFromVersionId = where the label is now (the compare)."""
        with observed(self._metrics, BACKEND, "move_stage"):
            path = self._check_path(path)
            stage = Stage(stage)
            label = STAGE_LABELS[stage]
            labels_of = self._describe(path).get("VersionIdsToStages") or {}
            holder = next((str(v) for v, labels in labels_of.items() if label in labels), None)
            placeholder = next((str(v) for v in labels_of if _is_placeholder(str(v))), None)
            now = None if holder is None or _is_placeholder(holder) else holder
            if now != expected:
                raise Conflict(f"aws: stage {stage.value} of {path} is at {now or 'unset'}, not {expected or 'unset'}")
            if version == expected:
                return
            kwargs: dict[str, Any] = {"SecretId": path, "VersionStage": label}
            if holder is not None:
                kwargs["RemoveFromVersionId"] = holder
            if version is not None:
                if _is_placeholder(version) or version not in {str(v["VersionId"]) for v in self._version_ids(path)}:
                    raise SecretNotFound(f"aws: {path} has no version {version}")
                kwargs["MoveToVersionId"] = version
            elif stage is Stage.CURRENT:
                if placeholder is None:
                    raise InvalidInput(
                        f"aws: current of {path} cannot be unset (the secret was not created by the broker)"
                    )
                kwargs["MoveToVersionId"] = placeholder
            elif placeholder is not None:
                kwargs["MoveToVersionId"] = placeholder
            with _translated("move stage", f"{path} stage {stage.value}", conflict_on_invalid=True):
                self._client.update_secret_version_stage(**kwargs)
            _log.info(
                "store_stage_moved",
                backend=BACKEND,
                path=path,
                stage=stage.value,
                to_version=version,
                from_version=expected,
            )

    def read_latest(self, path: str) -> SecretValue:
        """GetSecretValue of ``MSPC_BROKER_LATEST``: the newest version, whatever the stages say."""
        with observed(self._metrics, BACKEND, "read"):
            path = self._check_path(path)
            try:
                response = self._get(path, label=LATEST_LABEL)
            except SecretNotFound:
                raise SecretNotFound(f"aws: {path} has no versions yet") from None
            return self._to_value(path, response)

    def promote(self, path: str, version: str, *, expected_current: str | None) -> None:
        """``move_stage`` of current, then of pending (Secrets Manager moves one label at a time)."""
        labels = (self._describe(self._check_path(path)).get("VersionIdsToStages") or {}).get(version) or []
        if STAGE_LABELS[Stage.PENDING] not in labels:
            raise Conflict(f"aws: pending of {path} is not at {version}")
        self.move_stage(path, Stage.CURRENT, version, expected=expected_current)
        self.move_stage(path, Stage.PENDING, None, expected=version)

    def health(self) -> None:
        """ListSecrets (MaxResults=1): the endpoint answers and the credentials are accepted."""
        with observed(self._metrics, BACKEND, "health"), _translated("health", "ListSecrets"):
            self._client.list_secrets(MaxResults=1)

    def close(self) -> None:
        """Close the client's connection pool."""
        self._client.close()
