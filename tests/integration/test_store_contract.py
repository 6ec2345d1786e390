"""The SecretStore contract, run against a real OpenBao dev server and a real moto server.

Every test in ``TestSecretStoreContract`` runs once per backend on a fresh, unique path.
Backend-specific behaviour (native deletion, bad credentials, a stopped server) follows
in one class per backend.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import httpx
import hvac
import pytest
from pydantic import SecretStr

from broker.errors import (
    BrokerError,
    Conflict,
    SecretNotFound,
    StoreAccessDenied,
    StoreUnavailable,
)
from broker.metrics import Metrics
from broker.models import Stage
from broker.settings import AwsSettings, StoreSettings, VaultSettings
from broker.stores.aws import AwsStore
from broker.stores.base import SagaStore, SecretStore
from broker.stores.vault import VaultStore
from broker.testing.servers import RunningServer, find_bao_binary, free_port, start_moto, start_openbao

WRITERS = 8
ROUNDS = 4


def vals(**fields: str) -> dict[str, SecretStr]:
    return {k: SecretStr(v) for k, v in fields.items()}


def plain(data: Any) -> dict[str, str]:
    return {k: v.get_secret_value() for k, v in data.items()}


def vault_store(server: RunningServer, metrics: Metrics | None = None, **overrides: Any) -> VaultStore:
    settings = VaultSettings(url=server.url, token=SecretStr(server.extra["root_token"]), **overrides)
    return VaultStore(settings, StoreSettings(), metrics=metrics)


def aws_store(server: RunningServer, metrics: Metrics | None = None, **overrides: Any) -> AwsStore:
    fields: dict[str, Any] = {
        "endpoint_url": server.url,
        "access_key_id": "testing",
        "secret_access_key": SecretStr("testing"),
    }
    fields.update(overrides)
    return AwsStore(AwsSettings(**fields), StoreSettings(), metrics=metrics)


def race(n: int, action: Callable[[int], Any]) -> list[Any]:
    """Run ``action(i)`` in ``n`` threads released together; return results or raised errors."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = action(i)
        except BrokerError as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def cause_chain_text(exc: BaseException) -> str:
    parts = []
    seen: BaseException | None = exc
    while seen is not None:
        parts.append(f"{seen!s} {seen!r}")
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture(params=["vault", "aws"])
def store(
    request: pytest.FixtureRequest, openbao: RunningServer, moto_server: RunningServer, metrics: Metrics
) -> Iterator[SecretStore]:
    """A store of each backend, built from settings, on the session's real server."""
    built: SecretStore = vault_store(openbao, metrics) if request.param == "vault" else aws_store(moto_server, metrics)
    try:
        yield built
    finally:
        built.close()


@pytest.fixture
def other(store: SecretStore, openbao: RunningServer, moto_server: RunningServer) -> Iterator[SecretStore]:
    """A second store object on the same backend and server: another process or replica."""
    built: SecretStore = vault_store(openbao) if store.backend == "vault" else aws_store(moto_server)
    try:
        yield built
    finally:
        built.close()


@pytest.fixture
def path() -> str:
    return f"contract/{uuid.uuid4().hex}"


class TestSecretStoreContract:
    def test_is_a_secret_store(self, store: SecretStore) -> None:
        """Both stores satisfy the SecretStore protocol."""
        assert isinstance(store, SecretStore)
        assert store.backend in {"vault", "aws"}

    def test_first_write_then_read(self, store: SecretStore, path: str) -> None:
        """A first write (expected_latest=None) creates a version that read returns with its fields."""
        result = store.write(path, vals(partner_key="k1", note="x"), expected_latest=None, idempotency_key="a")
        assert result.created
        value = store.read(path)
        assert value.version == result.version
        assert plain(value.data) == {"partner_key": "k1", "note": "x"}
        assert value.created_at is not None
        assert value.stages == frozenset()

    def test_version_history_and_old_version(self, store: SecretStore, path: str) -> None:
        """Three writes give three versions oldest first; an old version stays readable by id."""
        v1 = store.write(path, vals(k="one"), expected_latest=None, idempotency_key="1").version
        v2 = store.write(path, vals(k="two"), expected_latest=v1, idempotency_key="2").version
        v3 = store.write(path, vals(k="three"), expected_latest=v2, idempotency_key="3").version
        info = store.describe(path)
        assert [v.version for v in info.versions] == [v1, v2, v3]
        assert all(v.created_at is not None for v in info.versions)
        assert not any(v.deleted or v.destroyed for v in info.versions)
        assert info.latest_version == v3
        assert info.owner == "mspc-broker"
        assert plain(store.read(path, version=v1).data) == {"k": "one"}
        assert plain(store.read(path).data) == {"k": "three"}

    def test_stale_expected_latest_conflicts(self, store: SecretStore, path: str) -> None:
        """A writer naming a version that is no longer the latest gets Conflict and writes nothing."""
        v1 = store.write(path, vals(k="one"), expected_latest=None, idempotency_key="1").version
        store.write(path, vals(k="two"), expected_latest=v1, idempotency_key="2")
        with pytest.raises(Conflict) as info:
            store.write(path, vals(k="late"), expected_latest=v1, idempotency_key="3")
        assert info.value.code == "CONFLICT"
        with pytest.raises(Conflict):
            store.write(path, vals(k="again"), expected_latest=None, idempotency_key="4")
        assert len(store.describe(path).versions) == 2

    def test_concurrent_writers_one_wins_each_round(self, store: SecretStore, path: str) -> None:
        """Eight writers race from the same latest version each round: exactly one wins, none is lost."""
        latest = store.write(path, vals(k="seed"), expected_latest=None, idempotency_key="seed").version
        winners = [latest]
        for round_no in range(ROUNDS):
            expected = latest

            def attempt(i: int, expected: str = expected, round_no: int = round_no) -> Any:
                return store.write(
                    path, vals(k=f"r{round_no}-w{i}"), expected_latest=expected, idempotency_key=f"{round_no}-{i}"
                )

            results = race(WRITERS, attempt)
            won = [(i, r) for i, r in enumerate(results) if not isinstance(r, BrokerError)]
            lost = [r for r in results if isinstance(r, BrokerError)]
            assert len(won) == 1, results
            assert all(isinstance(r, Conflict) for r in lost), lost
            i, result = won[0]
            assert result.created
            latest = result.version
            winners.append(latest)
            assert plain(store.read(path, version=latest).data) == {"k": f"r{round_no}-w{i}"}
        info = store.describe(path)
        assert [v.version for v in info.versions] == winners
        assert info.latest_version == latest

    def test_idempotent_retry_returns_first_version(self, store: SecretStore, path: str) -> None:
        """Retrying a write with the same key returns the version the first attempt made, created=False."""
        first = store.write(path, vals(k="one"), expected_latest=None, idempotency_key="op-1")
        again = store.write(path, vals(k="one"), expected_latest=None, idempotency_key="op-1")
        assert again.version == first.version
        assert not again.created
        second = store.write(path, vals(k="two"), expected_latest=first.version, idempotency_key="op-2")
        late_retry = store.write(path, vals(k="one"), expected_latest=None, idempotency_key="op-1")
        assert late_retry.version == first.version
        assert not late_retry.created
        assert [v.version for v in store.describe(path).versions] == [first.version, second.version]

    def test_unchanged_value_creates_no_version(self, store: SecretStore, path: str) -> None:
        """Writing a value equal to the latest version returns that version with created=False."""
        v1 = store.write(path, vals(a="1", b="2"), expected_latest=None, idempotency_key="1").version
        same = store.write(path, vals(b="2", a="1"), expected_latest=v1, idempotency_key="2")
        assert same.version == v1
        assert not same.created
        assert len(store.describe(path).versions) == 1

    def test_stage_moves(self, store: SecretStore, path: str) -> None:
        """move_stage sets a pointer; moving current puts the old current in previous; reads follow stages."""
        v1 = store.write(path, vals(k="one"), expected_latest=None, idempotency_key="1").version
        v2 = store.write(path, vals(k="two"), expected_latest=v1, idempotency_key="2").version
        store.move_stage(path, Stage.CURRENT, v1, expected=None)
        assert store.read(path).version == v1
        assert store.read(path).stages == frozenset({Stage.CURRENT})
        store.move_stage(path, Stage.PENDING, v2, expected=None)
        assert store.read(path, stage=Stage.PENDING).version == v2
        store.move_stage(path, Stage.CURRENT, v2, expected=v1)
        info = store.describe(path)
        assert dict(info.stages) == {Stage.CURRENT: v2, Stage.PENDING: v2, Stage.PREVIOUS: v1}
        assert plain(store.read(path, stage=Stage.PREVIOUS).data) == {"k": "one"}
        store.move_stage(path, Stage.PENDING, None, expected=v2)
        assert Stage.PENDING not in store.describe(path).stages
        with pytest.raises(SecretNotFound):
            store.read(path, stage=Stage.PENDING)

    def test_stage_move_with_wrong_expected_conflicts(self, store: SecretStore, path: str) -> None:
        """move_stage refuses with Conflict when the pointer is not at the expected version."""
        v1 = store.write(path, vals(k="one"), expected_latest=None, idempotency_key="1").version
        v2 = store.write(path, vals(k="two"), expected_latest=v1, idempotency_key="2").version
        store.move_stage(path, Stage.CURRENT, v1, expected=None)
        with pytest.raises(Conflict):
            store.move_stage(path, Stage.CURRENT, v2, expected=None)
        with pytest.raises(Conflict):
            store.move_stage(path, Stage.PENDING, v2, expected=v1)
        assert dict(store.describe(path).stages) == {Stage.CURRENT: v1}

    def test_writes_never_move_a_stage(self, store: SecretStore, path: str) -> None:
        """A new version does not become current; read() keeps returning current."""
        v1 = store.write(path, vals(k="one"), expected_latest=None, idempotency_key="1").version
        store.move_stage(path, Stage.CURRENT, v1, expected=None)
        v2 = store.write(path, vals(k="two"), expected_latest=v1, idempotency_key="2").version
        assert store.read(path).version == v1
        info = store.describe(path)
        assert dict(info.stages) == {Stage.CURRENT: v1}
        assert info.latest_version == v2

    def test_concurrent_stage_moves_one_wins(self, store: SecretStore, path: str) -> None:
        """Eight movers of current from the same version race: one wins, the rest Conflict, previous is the old one."""
        versions = [store.write(path, vals(k="v0"), expected_latest=None, idempotency_key="0").version]
        for i in range(1, WRITERS + 1):
            versions.append(
                store.write(path, vals(k=f"v{i}"), expected_latest=versions[-1], idempotency_key=str(i)).version
            )
        old = versions[0]
        store.move_stage(path, Stage.CURRENT, old, expected=None)
        results = race(WRITERS, lambda i: store.move_stage(path, Stage.CURRENT, versions[i + 1], expected=old))
        won = [i for i, r in enumerate(results) if not isinstance(r, BrokerError)]
        assert len(won) == 1, results
        assert all(isinstance(r, Conflict) for i, r in enumerate(results) if i not in won)
        stages = dict(store.describe(path).stages)
        assert stages[Stage.CURRENT] == versions[won[0] + 1]
        assert stages[Stage.PREVIOUS] == old
        assert store.read(path).version == versions[won[0] + 1]

    def test_missing_things_are_secret_not_found(self, store: SecretStore, path: str) -> None:
        """A missing path, a missing version and an unset stage all raise SecretNotFound."""
        with pytest.raises(SecretNotFound) as info:
            store.read(path)
        assert info.value.code == "SECRET_NOT_FOUND"
        with pytest.raises(SecretNotFound):
            store.describe(path)
        v1 = store.write(path, vals(k="one"), expected_latest=None, idempotency_key="1").version
        with pytest.raises(SecretNotFound):
            store.read(path, stage=Stage.PREVIOUS)
        with pytest.raises(SecretNotFound):
            store.read(path, version=v1 + "999")
        with pytest.raises(SecretNotFound):
            store.move_stage(path, Stage.CURRENT, v1 + "999", expected=None)

    def test_read_latest_ignores_stages(self, store: SecretStore, path: str) -> None:
        """read_latest returns the newest version even while current points at an older one."""
        assert isinstance(store, SagaStore)
        with pytest.raises(SecretNotFound):
            store.read_latest(path)
        v1 = store.write(path, vals(k="one"), expected_latest=None, idempotency_key="1").version
        assert plain(store.read_latest(path).data) == {"k": "one"}
        store.move_stage(path, Stage.CURRENT, v1, expected=None)
        v2 = store.write(path, vals(k="two"), expected_latest=v1, idempotency_key="2").version
        latest = store.read_latest(path)
        assert (latest.version, plain(latest.data)) == (v2, {"k": "two"})
        assert store.read(path).version == v1

    def test_promote_moves_pending_to_current(self, store: SecretStore, other: SecretStore, path: str) -> None:
        """promote makes pending current (old current -> previous, pending unset) only if both pointers are as named."""
        assert isinstance(store, SagaStore)
        v1 = store.write(path, vals(k="one"), expected_latest=None, idempotency_key="1").version
        v2 = store.write(path, vals(k="two"), expected_latest=v1, idempotency_key="2").version
        store.move_stage(path, Stage.PENDING, v1, expected=None)
        store.promote(path, v1, expected_current=None)
        assert dict(store.describe(path).stages) == {Stage.CURRENT: v1}
        store.move_stage(path, Stage.PENDING, v2, expected=None)
        with pytest.raises(Conflict):
            store.promote(path, v2, expected_current=v2)
        with pytest.raises(Conflict):
            store.promote(path, v1, expected_current=v1)
        other.move_stage(path, Stage.CURRENT, v2, expected=v1)  # another client moved current meanwhile
        with pytest.raises(Conflict):
            store.promote(path, v2, expected_current=v1)
        assert dict(store.describe(path).stages) == {Stage.CURRENT: v2, Stage.PENDING: v2, Stage.PREVIOUS: v1}
        other.move_stage(path, Stage.CURRENT, v1, expected=v2)
        store.promote(path, v2, expected_current=v1)
        assert dict(other.describe(path).stages) == {Stage.CURRENT: v2, Stage.PREVIOUS: v1}
        assert store.read(path).version == v2

    def test_health(self, store: SecretStore) -> None:
        """health() returns when the backend answers and accepts the broker's credentials."""
        store.health()

    def test_metrics_record_calls_and_errors(self, store: SecretStore, path: str, metrics: Metrics) -> None:
        """Each operation counts a call and its latency; a failed one counts its error code."""
        store.write(path, vals(k="one"), expected_latest=None, idempotency_key="1")
        with pytest.raises(Conflict):
            store.write(path, vals(k="two"), expected_latest=None, idempotency_key="2")
        text = metrics.render().decode()
        b = store.backend
        assert f'broker_backend_calls_total{{backend="{b}",operation="write"}} 2.0' in text
        assert f'broker_backend_errors_total{{backend="{b}",code="CONFLICT",operation="write"}} 1.0' in text
        assert f'broker_backend_call_seconds_count{{backend="{b}",operation="write"}} 2.0' in text

    def test_canary_never_leaks(self, store: SecretStore, path: str, captured_logs: Any, canary: str) -> None:
        """A secret value appears in no log line and in no error text, its causes included."""
        v1 = store.write(path, vals(partner_key=canary), expected_latest=None, idempotency_key="1").version
        store.read(path)
        store.move_stage(path, Stage.CURRENT, v1, expected=None)
        errors: list[BaseException] = []
        for action in (
            lambda: store.write(path, vals(partner_key=canary + "2"), expected_latest=None, idempotency_key="2"),
            lambda: store.move_stage(path, Stage.CURRENT, v1, expected="nope"),
            lambda: store.read(path, stage=Stage.PENDING),
            lambda: store.write(path, {"": SecretStr(canary)}, expected_latest=v1, idempotency_key="3"),
        ):
            with pytest.raises(BrokerError) as info:
                action()
            errors.append(info.value)
        value = store.read(path)
        assert canary not in repr(value)
        assert canary not in str(value.data)
        logs = captured_logs.getvalue()
        assert "store_write" in logs
        assert canary not in logs
        for exc in errors:
            assert canary not in cause_chain_text(exc)


class TestTwoClients:
    """What one store object learned is never taken for the truth once another client has moved on."""

    def test_write_after_another_client_wrote(self, store: SecretStore, other: SecretStore, path: str) -> None:
        """A writer whose latest version is outdated gets Conflict; the same value as the new latest replays it."""
        v1 = store.write(path, vals(k="one"), expected_latest=None, idempotency_key="1").version
        assert other.read(path).version == v1
        v2 = other.write(path, vals(k="two"), expected_latest=v1, idempotency_key="2").version
        with pytest.raises(Conflict):
            store.write(path, vals(k="late"), expected_latest=v1, idempotency_key="3")
        again = store.write(path, vals(k="two"), expected_latest=v1, idempotency_key="2")
        assert (again.version, again.created) == (v2, False)
        v3 = store.write(path, vals(k="three"), expected_latest=v2, idempotency_key="4").version
        assert [v.version for v in other.describe(path).versions] == [v1, v2, v3]

    def test_create_after_a_miss_when_another_client_created(
        self, store: SecretStore, other: SecretStore, path: str
    ) -> None:
        """A path seen empty, then created by another client: a create with another value is a Conflict."""
        with pytest.raises(SecretNotFound):
            store.describe(path)
        with pytest.raises(SecretNotFound):
            store.read(path)
        v1 = other.write(path, vals(k="theirs"), expected_latest=None, idempotency_key="a").version
        with pytest.raises(Conflict):
            store.write(path, vals(k="mine"), expected_latest=None, idempotency_key="b")
        same = store.write(path, vals(k="theirs"), expected_latest=None, idempotency_key="a")
        assert (same.version, same.created) == (v1, False)
        info = other.describe(path)
        assert [v.version for v in info.versions] == [v1]
        assert info.owner == "mspc-broker"

    def test_stage_moves_after_another_client_moved(self, store: SecretStore, other: SecretStore, path: str) -> None:
        """A stage move is decided on the pointer as it is now, whoever moved it last."""
        v1 = store.write(path, vals(k="one"), expected_latest=None, idempotency_key="1").version
        v2 = store.write(path, vals(k="two"), expected_latest=v1, idempotency_key="2").version
        store.move_stage(path, Stage.PENDING, v1, expected=None)
        store.move_stage(path, Stage.CURRENT, v1, expected=None)
        other.move_stage(path, Stage.PENDING, None, expected=v1)
        other.move_stage(path, Stage.CURRENT, v2, expected=v1)
        with pytest.raises(Conflict):
            store.move_stage(path, Stage.PENDING, v2, expected=v1)
        with pytest.raises(Conflict):
            store.move_stage(path, Stage.CURRENT, v1, expected=None)
        store.move_stage(path, Stage.PENDING, v2, expected=None)
        store.move_stage(path, Stage.CURRENT, v1, expected=v2)
        stages = dict(other.describe(path).stages)
        assert stages == {Stage.CURRENT: v1, Stage.PENDING: v2, Stage.PREVIOUS: v2}
        assert other.read(path).version == v1


def _wait_until(condition: Callable[[], bool], timeout_seconds: float, what: str) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class TestVaultStoreBackend:
    def test_deleted_and_destroyed_versions(self, openbao: RunningServer, path: str) -> None:
        """Versions soft-deleted or destroyed with the native API read as SecretNotFound naming their state."""
        store = vault_store(openbao)
        v1 = store.write(path, vals(k="one"), expected_latest=None, idempotency_key="1").version
        v2 = store.write(path, vals(k="two"), expected_latest=v1, idempotency_key="2").version
        store.write(path, vals(k="three"), expected_latest=v2, idempotency_key="3")
        root = hvac.Client(url=openbao.url, token=openbao.extra["root_token"])
        root.secrets.kv.v2.delete_secret_versions(path=path, versions=[1], mount_point="secret")
        root.secrets.kv.v2.destroy_secret_versions(path=path, versions=[2], mount_point="secret")
        with pytest.raises(SecretNotFound, match="deleted") as deleted:
            store.read(path, version=v1)
        assert deleted.value.code == "SECRET_NOT_FOUND"
        with pytest.raises(SecretNotFound, match="destroyed") as destroyed:
            store.read(path, version=v2)
        assert destroyed.value.code == "SECRET_NOT_FOUND"
        flags = {v.version: (v.deleted, v.destroyed) for v in store.describe(path).versions}
        assert flags == {"1": (True, False), "2": (False, True), "3": (False, False)}
        with pytest.raises(SecretNotFound):
            store.move_stage(path, Stage.CURRENT, v2, expected=None)
        store.close()

    def test_secret_metadata_records_owner_and_cas(self, openbao: RunningServer, path: str) -> None:
        """A secret the broker creates carries owner custom_metadata, max_versions and cas_required."""
        store = vault_store(openbao)
        store.write(path, vals(k="one"), expected_latest=None, idempotency_key="1")
        root = hvac.Client(url=openbao.url, token=openbao.extra["root_token"])
        meta = root.secrets.kv.v2.read_secret_metadata(path=path, mount_point="secret")["data"]
        assert meta["custom_metadata"]["owner"] == "mspc-broker"
        assert meta["max_versions"] == StoreSettings().max_versions
        assert meta["cas_required"] is True
        store.close()

    def test_reserved_stage_tree_is_refused(self, openbao: RunningServer) -> None:
        """Secret paths inside the stage-record tree are refused as invalid input."""
        store = vault_store(openbao)
        with pytest.raises(BrokerError) as info:
            store.read("_broker/stages/x")
        assert info.value.code == "INVALID_INPUT"
        store.close()

    def test_bad_token_is_access_denied(self, openbao: RunningServer, path: str, canary: str) -> None:
        """A token Vault does not know gives STORE_ACCESS_DENIED on every call, without echoing the token."""
        store = VaultStore(VaultSettings(url=openbao.url, token=SecretStr(canary)), StoreSettings())
        for call in (store.health, lambda: store.read(path)):
            with pytest.raises(StoreAccessDenied) as info:
                call()
            assert info.value.code == "STORE_ACCESS_DENIED"
            assert canary not in cause_chain_text(info.value)
        store.close()

    def test_stopped_server_is_unavailable_quickly(self, tmp_path: Any) -> None:
        """After the server is stopped, calls fail with STORE_UNAVAILABLE and a retry hint within seconds."""
        server = start_openbao(workdir=tmp_path)
        store = vault_store(server, timeout_seconds=1.0)
        try:
            path = "stopped/" + uuid.uuid4().hex
            store.write(path, vals(k="one"), expected_latest=None, idempotency_key="1")
        finally:
            server.stop()
        started = time.monotonic()
        for call in (store.health, lambda: store.read(path)):
            with pytest.raises(StoreUnavailable) as info:
                call()
            assert info.value.code == "STORE_UNAVAILABLE"
            assert info.value.retry_after_seconds
        assert time.monotonic() - started < 5
        store.close()


def start_tls_openbao(workdir: Any) -> tuple[RunningServer, str]:
    """Start ``bao server -dev -dev-tls`` (its own CA in ``workdir``); return the server and the CA path."""
    port = free_port()
    log_path = workdir / "openbao-tls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["HOME"] = str(workdir)
    argv = [
        find_bao_binary(),
        "server",
        "-dev",
        "-dev-tls",
        f"-dev-tls-cert-dir={workdir}",
        f"-dev-listen-address=127.0.0.1:{port}",
        "-dev-root-token-id=root-token",
        "-dev-no-store-token",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    server = RunningServer("openbao-tls", f"https://127.0.0.1:{port}", process, log_path, workdir)
    server.extra["root_token"] = "root-token"
    ca = str(workdir / "vault-ca.pem")

    def ready() -> bool:
        if not os.path.exists(ca):
            return False
        context = ssl.create_default_context(cafile=ca)
        if process.poll() is not None:
            raise AssertionError(f"openbao -dev-tls exited:\n{server.log_tail()}")
        try:
            return httpx.get(f"{server.url}/v1/sys/health", verify=context, timeout=1.0).status_code == 200
        except (httpx.HTTPError, OSError):
            return False

    try:
        _wait_until(ready, 30, "the TLS OpenBao server answers")
    except BaseException:
        server.stop()
        raise
    return server, ca


class TestVaultTls:
    def test_ca_bundle_is_used_and_ambient_ca_settings_are_not(
        self, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Over TLS the configured CA bundle verifies Vault; REQUESTS_CA_BUNDLE / VAULT_CACERT alone do not."""
        server, ca = start_tls_openbao(tmp_path)
        try:
            monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca)
            monkeypatch.setenv("VAULT_CACERT", ca)
            unverified = vault_store(server, timeout_seconds=2.0)
            with pytest.raises(StoreUnavailable, match="SSLCertVerificationError"):
                unverified.health()
            unverified.close()
            verified = vault_store(server, timeout_seconds=2.0, ca_bundle_path=ca)
            path = "tls/" + uuid.uuid4().hex
            v1 = verified.write(path, vals(k="one"), expected_latest=None, idempotency_key="1").version
            assert plain(verified.read(path, version=v1).data) == {"k": "one"}
            verified.close()
        finally:
            server.stop()


class TestAwsStoreBackend:
    def test_deleted_secret_is_secret_not_found(self, moto_server: RunningServer, path: str) -> None:
        """A secret scheduled for deletion, then force-deleted, reads as SecretNotFound with its code."""
        store = aws_store(moto_server)
        store.write(path, vals(k="one"), expected_latest=None, idempotency_key="1")
        native = boto3.client(
            "secretsmanager",
            endpoint_url=moto_server.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        native.delete_secret(SecretId=path, RecoveryWindowInDays=7)
        with pytest.raises(SecretNotFound, match="deletion") as scheduled:
            store.read(path)
        assert scheduled.value.code == "SECRET_NOT_FOUND"
        assert all(v.deleted for v in store.describe(path).versions)
        native.delete_secret(SecretId=path, ForceDeleteWithoutRecovery=True)
        with pytest.raises(SecretNotFound) as gone:
            store.read(path)
        assert gone.value.code == "SECRET_NOT_FOUND"
        store.close()

    def test_secret_is_tagged_and_placeholder_hidden(self, moto_server: RunningServer, path: str) -> None:
        """A secret the broker creates is tagged with its owner; the placeholder version never shows."""
        store = aws_store(moto_server)
        v1 = store.write(path, vals(k="one"), expected_latest=None, idempotency_key="1").version
        info = store.describe(path)
        assert info.owner == "mspc-broker"
        assert [v.version for v in info.versions] == [v1]
        assert dict(info.stages) == {}
        store.close()

    def test_client_config_and_kms_key_come_from_settings(self, moto_server: RunningServer, path: str) -> None:
        """Timeouts, retries and the KMS key are the configured ones, not botocore's defaults."""
        store = aws_store(
            moto_server,
            connect_timeout_seconds=1.5,
            read_timeout_seconds=2.5,
            max_attempts=4,
            retry_mode="adaptive",
            kms_key_id="alias/mspc-broker",
        )
        config = store._client.meta.config
        assert (config.connect_timeout, config.read_timeout) == (1.5, 2.5)
        assert config.retries == {"mode": "adaptive", "total_max_attempts": 4}
        store.write(path, vals(k="one"), expected_latest=None, idempotency_key="1")
        native = boto3.client(
            "secretsmanager",
            endpoint_url=moto_server.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        assert native.describe_secret(SecretId=path)["KmsKeyId"] == "alias/mspc-broker"
        store.close()

    def test_moto_enforces_the_compares_the_store_relies_on(self, moto_server: RunningServer, path: str) -> None:
        """The server refuses a stale RemoveFromVersionId and a reused ClientRequestToken with another value."""
        native = boto3.client(
            "secretsmanager",
            endpoint_url=moto_server.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        token_a, token_b = "a" * 32, "b" * 32
        native.create_secret(Name=path, SecretString="{}", ClientRequestToken=token_a)
        native.put_secret_value(
            SecretId=path, SecretString='{"k":"1"}', ClientRequestToken=token_b, VersionStages=["X"]
        )
        with pytest.raises(native.exceptions.InvalidParameterException):
            native.update_secret_version_stage(
                SecretId=path, VersionStage="AWSCURRENT", MoveToVersionId=token_a, RemoveFromVersionId=token_b
            )
        with pytest.raises(native.exceptions.ResourceExistsException):
            native.put_secret_value(
                SecretId=path, SecretString='{"k":"2"}', ClientRequestToken=token_b, VersionStages=["X"]
            )

    def test_bad_keys_are_access_denied(
        self, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, path: str, canary: str
    ) -> None:
        """A moto server that enforces IAM refuses unknown keys: STORE_ACCESS_DENIED, key not echoed."""
        monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")
        server = start_moto(workdir=tmp_path)
        try:
            store = aws_store(server, access_key_id="AKIAUNKNOWN000000000", secret_access_key=SecretStr(canary))
            for call in (store.health, lambda: store.read(path)):
                with pytest.raises(StoreAccessDenied) as info:
                    call()
                assert info.value.code == "STORE_ACCESS_DENIED"
                assert canary not in cause_chain_text(info.value)
            store.close()
        finally:
            server.stop()

    def test_stopped_server_is_unavailable_quickly(self, tmp_path: Any) -> None:
        """After the server is stopped, calls fail with STORE_UNAVAILABLE and a retry hint within seconds."""
        server = start_moto(workdir=tmp_path)
        store = aws_store(server, connect_timeout_seconds=1.0, read_timeout_seconds=1.0, max_attempts=2)
        try:
            path = "stopped/" + uuid.uuid4().hex
            store.write(path, vals(k="one"), expected_latest=None, idempotency_key="1")
        finally:
            server.stop()
        started = time.monotonic()
        for call in (store.health, lambda: store.read(path)):
            with pytest.raises(StoreUnavailable) as info:
                call()
            assert info.value.code == "STORE_UNAVAILABLE"
            assert info.value.retry_after_seconds
        assert time.monotonic() - started < 10
        store.close()
