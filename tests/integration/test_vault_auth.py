"""How VaultStore logs in and keeps its token alive, against a real OpenBao dev server.

Short real TTLs (two seconds) drive renewal and re-login; the tests poll for the
condition they need (a control token has expired, the old token is gone) instead of
sleeping for a guessed time.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from broker.errors import ConfigError, StoreAccessDenied
from broker.settings import StoreSettings, VaultSettings
from broker.stores.vault import VaultStore
from broker.testing.servers import RunningServer

POLICY = "broker-kv"
POLICY_HCL = """
path "secret/data/*" { capabilities = ["create", "read", "update"] }
path "secret/metadata/*" { capabilities = ["create", "read", "update"] }
"""
ISSUER = "https://kubernetes.default.svc.cluster.local"
SUBJECT = "system:serviceaccount:mspc:broker"


def vals(**fields: str) -> dict[str, SecretStr]:
    return {k: SecretStr(v) for k, v in fields.items()}


def root_client(server: RunningServer) -> hvac.Client:
    client = hvac.Client(url=server.url, token=server.extra["root_token"])
    client.sys.create_or_update_policy(name=POLICY, policy=POLICY_HCL)
    return client


def token_alive(root: hvac.Client, accessor: str) -> bool:
    try:
        root.auth.token.lookup_accessor(accessor)
    except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden, hvac.exceptions.InvalidPath):
        return False
    return True


def wait_until(condition: Callable[[], bool], what: str, timeout_seconds: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting until {what}")


def store_for(server: RunningServer, **settings: Any) -> VaultStore:
    return VaultStore(VaultSettings(url=server.url, timeout_seconds=2.0, **settings), StoreSettings())


def round_trip(store: VaultStore) -> None:
    path = f"auth/{uuid.uuid4().hex}"
    version = store.write(path, vals(k="v"), expected_latest=None, idempotency_key="1").version
    assert store.read(path).version == version


@pytest.fixture
def approle(openbao: RunningServer) -> Callable[..., tuple[str, str]]:
    """Enable AppRole on a fresh mount; return a factory of (mount, role_id, secret_id) for a role."""
    root = root_client(openbao)
    mount = f"approle-{uuid.uuid4().hex[:8]}"
    root.sys.enable_auth_method("approle", path=mount)

    def make(**token_settings: Any) -> tuple[str, str]:
        root.auth.approle.create_or_update_approle(
            role_name="broker", token_policies=[POLICY], mount_point=mount, **token_settings
        )
        role_id = root.auth.approle.read_role_id("broker", mount_point=mount)["data"]["role_id"]
        secret_id = root.auth.approle.generate_secret_id("broker", mount_point=mount)["data"]["secret_id"]
        return mount, role_id + "\n" + secret_id

    return make


class TestAppRoleAuth:
    def test_login_and_use(self, openbao: RunningServer, approle: Callable[..., tuple[str, str]]) -> None:
        """With role_id and secret_id the store logs in on first use and can write and read."""
        mount, ids = approle(token_ttl="1h")
        role_id, secret_id = ids.split("\n")
        store = store_for(
            openbao, auth_method="approle", approle_mount=mount, role_id=role_id, secret_id=SecretStr(secret_id)
        )
        round_trip(store)
        assert store.token_accessor
        store.health()
        store.close()

    def test_logs_in_again_before_the_token_expires(
        self, openbao: RunningServer, approle: Callable[..., tuple[str, str]]
    ) -> None:
        """With a 2 s non-renewable token, a call after the first token died works on a fresh login."""
        mount, ids = approle(token_ttl="2s", token_max_ttl="2s")
        role_id, secret_id = ids.split("\n")
        store = store_for(
            openbao,
            auth_method="approle",
            approle_mount=mount,
            role_id=role_id,
            secret_id=SecretStr(secret_id),
            token_renew_before_seconds=1.0,
        )
        root = root_client(openbao)
        round_trip(store)
        first = store.token_accessor
        assert first is not None
        wait_until(lambda: not token_alive(root, first), "the first token expired")
        round_trip(store)
        assert store.token_accessor != first
        store.close()

    def test_bad_secret_id_is_access_denied(
        self, openbao: RunningServer, approle: Callable[..., tuple[str, str]], canary: str
    ) -> None:
        """A wrong secret_id gives STORE_ACCESS_DENIED naming the login path, never the secret_id."""
        mount, ids = approle(token_ttl="1h")
        role_id = ids.split("\n")[0]
        store = store_for(
            openbao, auth_method="approle", approle_mount=mount, role_id=role_id, secret_id=SecretStr(canary)
        )
        with pytest.raises(StoreAccessDenied) as info:
            store.health()
        assert info.value.code == "STORE_ACCESS_DENIED"
        assert f"auth/{mount}/login" in str(info.value)
        assert canary not in str(info.value)
        assert canary not in repr(info.value.__cause__)
        store.close()

    def test_missing_role_id_is_a_config_error(self, openbao: RunningServer) -> None:
        """auth_method=approle without role_id / secret_id is refused when the store is built."""
        with pytest.raises(ConfigError):
            store_for(openbao, auth_method="approle")


class TestTokenAuth:
    def test_renews_a_short_lived_token(self, openbao: RunningServer) -> None:
        """A renewable 2 s token is renewed in time: after an unrenewed twin expired, the store still works."""
        root = root_client(openbao)
        kwargs: dict[str, Any] = {"policies": [POLICY], "ttl": "2s", "explicit_max_ttl": "1m", "renewable": True}
        token = root.auth.token.create(**kwargs)["auth"]
        twin = root.auth.token.create(**kwargs)["auth"]
        store = store_for(openbao, token=SecretStr(token["client_token"]), token_renew_before_seconds=1.0)
        round_trip(store)
        wait_until(lambda: not token_alive(root, twin["accessor"]), "the unrenewed twin token expired")
        round_trip(store)
        assert store.token_accessor == token["accessor"]
        assert token_alive(root, token["accessor"])
        store.close()

    def test_no_token_is_a_config_error_not_an_ambient_fallback(
        self, openbao: RunningServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """Without a configured token the store refuses to start, even if VAULT_TOKEN / ~/.vault-token exist."""
        monkeypatch.setenv("VAULT_TOKEN", openbao.extra["root_token"])
        monkeypatch.setenv("VAULT_ADDR", openbao.url)
        (Path.home() / ".vault-token").write_text(openbao.extra["root_token"])
        with pytest.raises(ConfigError):
            store_for(openbao)

    def test_ambient_vault_variables_are_ignored(
        self, openbao: RunningServer, monkeypatch: pytest.MonkeyPatch, canary: str
    ) -> None:
        """VAULT_ADDR / VAULT_TOKEN in the environment change nothing: the configured bad token is used."""
        monkeypatch.setenv("VAULT_TOKEN", openbao.extra["root_token"])
        monkeypatch.setenv("VAULT_ADDR", "http://127.0.0.1:1")
        store = store_for(openbao, token=SecretStr(canary))
        with pytest.raises(StoreAccessDenied):
            store.health()
        store.close()


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def service_account_jwt(key: rsa.RSAPrivateKey, *, audience: str = "vault", ttl_seconds: int = 600) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "sub": SUBJECT,
        "aud": [audience],
        "iat": now,
        "nbf": now,
        "exp": now + ttl_seconds,
        "kubernetes.io": {"namespace": "mspc", "serviceaccount": {"name": "broker", "uid": str(uuid.uuid4())}},
    }
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "test"})


@pytest.fixture
def jwt_mount(openbao: RunningServer, signing_key: rsa.RSAPrivateKey) -> Callable[..., str]:
    """A jwt auth method trusting the test key as the cluster issuer; returns a role factory."""
    root = root_client(openbao)
    mount = f"k8s-jwt-{uuid.uuid4().hex[:8]}"
    root.sys.enable_auth_method("jwt", path=mount)
    pem = (
        signing_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    root.auth.jwt.configure(jwt_validation_pubkeys=[pem], bound_issuer=ISSUER, path=mount)

    def role(**token_settings: Any) -> str:
        root.auth.jwt.create_role(
            name="broker",
            role_type="jwt",
            user_claim="sub",
            bound_subject=SUBJECT,
            bound_audiences=["vault"],
            token_policies=[POLICY],
            allowed_redirect_uris=None,
            path=mount,
            **token_settings,
        )
        return mount

    return role


class TestKubernetesAuth:
    def test_login_through_a_jwt_mount(
        self, openbao: RunningServer, jwt_mount: Callable[..., str], signing_key: rsa.RSAPrivateKey, tmp_path: Path
    ) -> None:
        """auth_method=kubernetes logs in at a jwt mount with role + the projected token file."""
        mount = jwt_mount(token_ttl="1h")
        token_file = tmp_path / "token"
        token_file.write_text(service_account_jwt(signing_key))
        store = store_for(
            openbao,
            auth_method="kubernetes",
            kubernetes_mount=mount,
            kubernetes_role="broker",
            kubernetes_jwt_path=token_file,
        )
        round_trip(store)
        store.close()

    def test_token_file_is_read_at_each_login(
        self, openbao: RunningServer, jwt_mount: Callable[..., str], signing_key: rsa.RSAPrivateKey, tmp_path: Path
    ) -> None:
        """Each re-login reads the token file again: a bad file is refused, a rotated good one works."""
        mount = jwt_mount(token_ttl="2s", token_max_ttl="2s")
        token_file = tmp_path / "token"
        token_file.write_text(service_account_jwt(signing_key))
        store = store_for(
            openbao,
            auth_method="kubernetes",
            kubernetes_mount=mount,
            kubernetes_role="broker",
            kubernetes_jwt_path=token_file,
            token_renew_before_seconds=1.0,
        )
        root = root_client(openbao)
        round_trip(store)
        first = store.token_accessor
        assert first is not None
        token_file.write_text(service_account_jwt(signing_key, audience="someone-else"))
        wait_until(lambda: not token_alive(root, first), "the first token expired")
        with pytest.raises(StoreAccessDenied):
            round_trip(store)
        token_file.write_text(service_account_jwt(signing_key))
        round_trip(store)
        assert store.token_accessor not in (None, first)
        store.close()

    def test_wrong_audience_is_access_denied(
        self, openbao: RunningServer, jwt_mount: Callable[..., str], signing_key: rsa.RSAPrivateKey, tmp_path: Path
    ) -> None:
        """A service-account token for another audience is refused: STORE_ACCESS_DENIED."""
        mount = jwt_mount(token_ttl="1h")
        token_file = tmp_path / "token"
        token_file.write_text(service_account_jwt(signing_key, audience="not-vault"))
        store = store_for(
            openbao,
            auth_method="kubernetes",
            kubernetes_mount=mount,
            kubernetes_role="broker",
            kubernetes_jwt_path=token_file,
        )
        with pytest.raises(StoreAccessDenied) as info:
            store.health()
        assert info.value.code == "STORE_ACCESS_DENIED"
        store.close()

    def test_missing_token_file_is_access_denied(self, openbao: RunningServer, tmp_path: Path) -> None:
        """A missing projected token file is reported as STORE_ACCESS_DENIED naming the file."""
        store = store_for(
            openbao, auth_method="kubernetes", kubernetes_role="broker", kubernetes_jwt_path=tmp_path / "absent"
        )
        with pytest.raises(StoreAccessDenied, match="absent"):
            store.health()
        store.close()
