"""What the broker writes is what the stock tools show, and what they write the broker reads.

The real ``bao`` CLI and the real ``aws`` CLI (from the venv) run as subprocesses; their
addresses and credentials live only in the subprocess environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from broker.models import IntegrationRef, Stage
from broker.settings import Settings, load_settings
from broker.stores.aws import AwsStore
from broker.stores.factory import build_store, partner_key_path, read_vendor_key, vendor_key_path
from broker.stores.vault import VaultStore
from broker.testing.servers import RunningServer, find_bao_binary


def vals(**fields: str) -> dict[str, SecretStr]:
    return {k: SecretStr(v) for k, v in fields.items()}


def run_bao(server: RunningServer, home: Path, *args: str) -> Any:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "VAULT_ADDR": server.url,
        "VAULT_TOKEN": server.extra["root_token"],
    }
    done = subprocess.run([find_bao_binary(), *args], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if done.stdout.strip() else None


def run_aws(server: RunningServer, home: Path, *args: str) -> Any:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(home / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    aws = str(Path(sys.executable).parent / "aws")
    done = subprocess.run(
        [aws, "secretsmanager", *args, "--endpoint-url", server.url, "--output", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if done.stdout.strip() else None


def vault_settings(server: RunningServer, **store: Any) -> Settings:
    return load_settings(
        store={"backend": "vault", **store},
        vault={"url": server.url, "token": server.extra["root_token"], "timeout_seconds": 2.0},
    )


def aws_settings(server: RunningServer, **store: Any) -> Settings:
    return load_settings(
        store={"backend": "aws", **store},
        aws={"endpoint_url": server.url, "access_key_id": "testing", "secret_access_key": "testing"},
    )


class TestVaultInterop:
    def test_bao_cli_shows_each_version_as_written(self, openbao: RunningServer, tmp_path: Path) -> None:
        """`bao kv get -version=N` shows exactly the fields the broker wrote into version N, and its owner."""
        store = build_store(vault_settings(openbao))
        assert isinstance(store, VaultStore)
        path = partner_key_path(vault_settings(openbao), IntegrationRef("org-" + uuid.uuid4().hex[:8], "vendor-a"))
        v1 = store.write(
            path, vals(partner_key="pk-1", integration_id="i-1"), expected_latest=None, idempotency_key="a"
        )
        store.write(
            path, vals(partner_key="pk-2", integration_id="i-2"), expected_latest=v1.version, idempotency_key="b"
        )
        shown = run_bao(openbao, tmp_path, "kv", "get", "-format=json", "-version=1", "-mount=secret", path)
        assert shown["data"]["data"] == {"partner_key": "pk-1", "integration_id": "i-1"}
        assert str(shown["data"]["metadata"]["version"]) == v1.version
        meta = run_bao(openbao, tmp_path, "kv", "metadata", "get", "-format=json", "-mount=secret", path)
        assert meta["data"]["custom_metadata"]["owner"] == "mspc-broker"
        store.close()

    def test_stage_record_is_readable_with_bao(self, openbao: RunningServer, tmp_path: Path) -> None:
        """Operators can see the stage pointers with `bao kv get _broker/stages/<path>`."""
        store = build_store(vault_settings(openbao))
        path = f"interop/{uuid.uuid4().hex}"
        v1 = store.write(path, vals(k="one"), expected_latest=None, idempotency_key="a").version
        v2 = store.write(path, vals(k="two"), expected_latest=v1, idempotency_key="b").version
        store.move_stage(path, Stage.CURRENT, v1, expected=None)
        store.move_stage(path, Stage.CURRENT, v2, expected=v1)
        shown = run_bao(openbao, tmp_path, "kv", "get", "-format=json", "-mount=secret", f"_broker/stages/{path}")
        assert shown["data"]["data"] == {"current": v2, "previous": v1}
        store.close()

    def test_reads_vendor_key_put_with_bao(self, openbao: RunningServer, tmp_path: Path, canary: str) -> None:
        """A vendor key rotated with `bao kv put` is read at its newest version from the configured field."""
        settings = vault_settings(openbao)
        vendor = "vendor-" + uuid.uuid4().hex[:8]
        path = vendor_key_path(settings, vendor)
        run_bao(openbao, tmp_path, "kv", "put", "-format=json", "-mount=secret", path, "vendor_api_key=old", "x=y")
        run_bao(openbao, tmp_path, "kv", "put", "-format=json", "-mount=secret", path, f"vendor_api_key={canary}")
        store = build_store(settings)
        key = read_vendor_key(store, settings, vendor)
        assert key.value.get_secret_value() == canary
        assert key.version == "2"
        assert key.path == path
        assert canary not in repr(key)
        store.close()


class TestAwsInterop:
    def test_awscli_sees_current_after_the_broker_moves_it(self, moto_server: RunningServer, tmp_path: Path) -> None:
        """After move_stage(current), `aws secretsmanager get-secret-value --version-stage AWSCURRENT` returns it."""
        settings = aws_settings(moto_server)
        store = build_store(settings)
        assert isinstance(store, AwsStore)
        path = partner_key_path(settings, IntegrationRef("org-" + uuid.uuid4().hex[:8], "vendor-a"))
        v1 = store.write(path, vals(partner_key="pk-1"), expected_latest=None, idempotency_key="a").version
        v2 = store.write(path, vals(partner_key="pk-2"), expected_latest=v1, idempotency_key="b").version
        unset = run_aws(moto_server, tmp_path, "get-secret-value", "--secret-id", path, "--version-stage", "AWSCURRENT")
        assert unset["SecretString"] == "{}"  # the placeholder: writes never move AWSCURRENT
        store.move_stage(path, Stage.CURRENT, v1, expected=None)
        store.move_stage(path, Stage.CURRENT, v2, expected=v1)
        current = run_aws(
            moto_server, tmp_path, "get-secret-value", "--secret-id", path, "--version-stage", "AWSCURRENT"
        )
        assert current["VersionId"] == v2
        assert json.loads(current["SecretString"]) == {"partner_key": "pk-2"}
        previous = run_aws(
            moto_server, tmp_path, "get-secret-value", "--secret-id", path, "--version-stage", "AWSPREVIOUS"
        )
        assert previous["VersionId"] == v1
        assert json.loads(previous["SecretString"]) == {"partner_key": "pk-1"}
        store.close()

    def test_reads_vendor_keys_created_with_awscli(self, moto_server: RunningServer, tmp_path: Path) -> None:
        """A JSON vendor key is read from its field; a plain-string one whole when the field name is empty."""
        json_vendor, plain_vendor = "vendor-" + uuid.uuid4().hex[:8], "vendor-" + uuid.uuid4().hex[:8]
        json_settings = aws_settings(moto_server)
        plain_settings = aws_settings(moto_server, vendor_key_field="")
        run_aws(
            moto_server,
            tmp_path,
            "create-secret",
            "--name",
            vendor_key_path(json_settings, json_vendor),
            "--secret-string",
            json.dumps({"vendor_api_key": "vk-json", "other": "x"}),
        )
        run_aws(
            moto_server,
            tmp_path,
            "create-secret",
            "--name",
            vendor_key_path(plain_settings, plain_vendor),
            "--secret-string",
            "vk-plain",
        )
        rotated = run_aws(
            moto_server,
            tmp_path,
            "put-secret-value",
            "--secret-id",
            vendor_key_path(plain_settings, plain_vendor),
            "--secret-string",
            "vk-plain-2",
        )
        store = build_store(json_settings)
        assert read_vendor_key(store, json_settings, json_vendor).value.get_secret_value() == "vk-json"
        plain_key = read_vendor_key(store, plain_settings, plain_vendor)
        assert plain_key.value.get_secret_value() == "vk-plain-2"
        assert plain_key.version == rotated["VersionId"]
        whole = read_vendor_key(store, aws_settings(moto_server, vendor_key_field=""), json_vendor)
        assert json.loads(whole.value.get_secret_value()) == {"vendor_api_key": "vk-json", "other": "x"}
        store.close()


class TestBuildStore:
    @pytest.mark.parametrize("backend", ["vault", "aws"])
    def test_builds_the_configured_backend(
        self, backend: str, openbao: RunningServer, moto_server: RunningServer
    ) -> None:
        """build_store returns the backend settings.store.backend names, ready to use."""
        settings = vault_settings(openbao) if backend == "vault" else aws_settings(moto_server)
        store = build_store(settings)
        assert store.backend == backend
        store.health()
        store.close()
