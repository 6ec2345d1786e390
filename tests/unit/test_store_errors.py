"""Error translation at the store borders: every hvac / botocore failure becomes a broker error.

These are the narrow mapping tests (exceptions built by hand); the same mappings are
exercised against the real servers in tests/integration/test_store_contract.py.
"""

from __future__ import annotations

import botocore.exceptions
import hvac.exceptions
import pytest
import requests

from broker.errors import (
    BrokerError,
    ConfigError,
    Conflict,
    InvalidIdentifier,
    InvalidInput,
    SecretNotFound,
    StoreAccessDenied,
    StoreUnavailable,
)
from broker.models import IntegrationRef
from broker.settings import load_settings
from broker.stores import aws, vault
from broker.stores.factory import partner_key_path, vendor_key_path


def raised_by_vault(exc: BaseException, *, login: bool = False) -> BrokerError:
    with pytest.raises(BrokerError) as info, vault._translated("read", "secret/x", login=login):
        raise exc
    assert info.value.__cause__ is exc
    return info.value


def client_error(code: str, message: str = "upstream says no", status: int = 400) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetSecretValue",
    )


def raised_by_aws(exc: BaseException, *, conflict_on_invalid: bool = False) -> BrokerError:
    with (
        pytest.raises(BrokerError) as info,
        aws._translated("read", "mspc/x", conflict_on_invalid=conflict_on_invalid),
    ):
        raise exc
    return info.value


class TestVaultErrorMapping:
    @pytest.mark.parametrize(
        ("exc", "expected"),
        [
            (hvac.exceptions.InvalidPath(errors=[]), SecretNotFound),
            (hvac.exceptions.Forbidden(errors=["permission denied"]), StoreAccessDenied),
            (hvac.exceptions.Unauthorized(errors=["missing client token"]), StoreAccessDenied),
            (
                hvac.exceptions.InvalidRequest(errors=["check-and-set parameter did not match the current version"]),
                Conflict,
            ),
            (hvac.exceptions.InvalidRequest(errors=["no data provided"]), InvalidInput),
            (hvac.exceptions.RateLimitExceeded(errors=["rate limited"]), StoreUnavailable),
            (hvac.exceptions.InternalServerError(errors=["boom"]), StoreUnavailable),
            (hvac.exceptions.VaultDown(errors=["Vault is sealed"]), StoreUnavailable),
            (hvac.exceptions.UnexpectedError("412"), StoreUnavailable),
            (requests.exceptions.ConnectionError("refused"), StoreUnavailable),
            (requests.exceptions.ReadTimeout("slow"), StoreUnavailable),
            (KeyError("data"), StoreUnavailable),
        ],
    )
    def test_maps_each_failure(self, exc: BaseException, expected: type[BrokerError]) -> None:
        """Each hvac / requests failure becomes one broker error class, chained with ``from``."""
        error = raised_by_vault(exc)
        assert type(error) is expected

    def test_unavailable_carries_a_retry_hint(self) -> None:
        """STORE_UNAVAILABLE says when to retry."""
        error = raised_by_vault(requests.exceptions.ConnectionError("refused"))
        assert error.code == "STORE_UNAVAILABLE"
        assert error.retry_after_seconds

    def test_a_refused_login_is_access_denied(self) -> None:
        """During a login a 400 (bad secret_id or JWT) means the credentials were refused."""
        error = raised_by_vault(hvac.exceptions.InvalidRequest(errors=["invalid role or secret ID"]), login=True)
        assert type(error) is StoreAccessDenied

    def test_upstream_text_is_cut(self) -> None:
        """Upstream error text is cut to a short snippet before it enters a message."""
        error = raised_by_vault(hvac.exceptions.Forbidden(errors=["x" * 5000]))
        assert len(error.message) < 600

    def test_sensitive_calls_withhold_a_rejection_text(self, canary: str) -> None:
        """For a write carrying data, a 400's text (which could quote it) is dropped, cause included."""
        with pytest.raises(BrokerError) as info, vault._translated("write", "secret/x", sensitive=True):
            raise hvac.exceptions.InvalidRequest(errors=[f"bad value {canary}"])
        assert type(info.value) is InvalidInput
        assert canary not in str(info.value)
        assert info.value.__cause__ is None

    def test_broker_errors_pass_through(self) -> None:
        """A broker error raised inside the border is not re-wrapped."""
        original = Conflict("already ours")
        with pytest.raises(Conflict) as info, vault._translated("read", "secret/x"):
            raise original
        assert info.value is original


class TestAwsErrorMapping:
    @pytest.mark.parametrize(
        ("exc", "expected"),
        [
            (client_error("ResourceNotFoundException"), SecretNotFound),
            (client_error("AccessDeniedException"), StoreAccessDenied),
            (client_error("UnrecognizedClientException"), StoreAccessDenied),
            (client_error("InvalidClientTokenId", status=403), StoreAccessDenied),
            (client_error("403", "<ErrorResponse>...</ErrorResponse>", status=403), StoreAccessDenied),
            (client_error("ExpiredTokenException"), StoreAccessDenied),
            (client_error("ResourceExistsException"), Conflict),
            (client_error("InvalidRequestException", "secret is marked for deletion"), SecretNotFound),
            (client_error("InvalidRequestException", "something else"), InvalidInput),
            (client_error("InvalidParameterException"), InvalidInput),
            (client_error("ThrottlingException"), StoreUnavailable),
            (client_error("InternalServiceError", status=500), StoreUnavailable),
            (client_error("SomethingNew", status=503), StoreUnavailable),
            (botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), StoreUnavailable),
            (botocore.exceptions.ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"), StoreUnavailable),
            (botocore.exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), StoreUnavailable),
            (botocore.exceptions.NoCredentialsError(), StoreAccessDenied),
            (ValueError("odd"), StoreUnavailable),
        ],
    )
    def test_maps_each_failure(self, exc: BaseException, expected: type[BrokerError]) -> None:
        """Each botocore failure becomes one broker error class, chained with ``from``."""
        error = raised_by_aws(exc)
        assert type(error) is expected
        assert error.__cause__ is exc

    def test_invalid_parameter_is_a_conflict_for_stage_moves(self) -> None:
        """A refused RemoveFromVersionId (InvalidParameterException) means the stage moved: Conflict."""
        error = raised_by_aws(client_error("InvalidParameterException"), conflict_on_invalid=True)
        assert type(error) is Conflict

    def test_parameter_validation_text_is_dropped(self, canary: str) -> None:
        """botocore may quote parameter values; neither the message nor a cause keeps them."""
        error = raised_by_aws(botocore.exceptions.ParamValidationError(report=f"SecretString: {canary}"))
        assert type(error) is InvalidInput
        assert canary not in str(error)
        assert error.__cause__ is None
        assert error.__suppress_context__

    def test_sensitive_calls_keep_only_the_code(self, canary: str) -> None:
        """For calls carrying a SecretString, the upstream message (which could quote it) is dropped."""
        with pytest.raises(BrokerError) as info, aws._translated("write", "mspc/x", sensitive=True):
            raise client_error("ValidationException", f"Value '{canary}' at 'secretString' failed")
        assert type(info.value) is InvalidInput
        assert "ValidationException" in str(info.value)
        assert canary not in str(info.value)
        assert info.value.__cause__ is None
        assert info.value.__suppress_context__

    def test_unavailable_carries_a_retry_hint(self) -> None:
        """STORE_UNAVAILABLE says when to retry."""
        error = raised_by_aws(botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
        assert error.code == "STORE_UNAVAILABLE"
        assert error.retry_after_seconds


class TestStorePaths:
    def test_vendor_and_partner_paths(self) -> None:
        """Paths are rendered from the templates with validated ids."""
        settings = load_settings()
        assert vendor_key_path(settings, "acme") == "mspc/vendor-keys/acme"
        assert partner_key_path(settings, IntegrationRef("org-1", "acme")) == "mspc/partner-keys/org-1/acme"

    def test_unsafe_vendor_id_is_refused(self) -> None:
        """A vendor id that could escape its path is refused before any store call."""
        with pytest.raises(InvalidIdentifier):
            vendor_key_path(load_settings(), "../other")

    def test_unknown_placeholder_is_a_config_error(self) -> None:
        """A template naming an unknown placeholder is a configuration error, not a KeyError."""
        settings = load_settings(store={"vendor_key_path_template": "keys/{vendor}"})
        with pytest.raises(ConfigError):
            vendor_key_path(settings, "acme")
