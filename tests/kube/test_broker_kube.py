"""The broker against a real kube-apiserver: Lease leader election, TokenReview identity, Vault k8s auth."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import hvac
import pytest
from kubecluster import KubeCluster

from broker.errors import StoreAccessDenied
from broker.runtime import Runtime
from broker.settings import load_settings, settings_env
from broker.stores.factory import build_store
from broker.testing.broker import start_broker_thread
from broker.testing.servers import RunningServer, free_port

pytestmark = pytest.mark.kube

NS = "mspc"
POLICY = """
version: 1
rules:
  - id: kube-workload
    effect: allow
    subjects: [{namespace: apps, service_account: payments}]
    integrations: [{organization: "*", vendor: "*"}]
    actions: [token:issue]
"""


@pytest.fixture
def backend() -> str:
    return "vault"


def _apply(kube: KubeCluster, path: str, body: dict[str, Any]) -> None:
    with kube.client() as client:
        response = client.post(path, json=body)
    assert response.status_code in (201, 409), response.text


@pytest.fixture(scope="module")
def rbac(kube: KubeCluster) -> None:
    """The chart's RBAC, by hand: the broker SA may manage Leases in its namespace and review tokens."""
    kube.create_service_account(NS, "broker")
    kube.create_service_account("apps", "payments")
    kube.create_service_account("apps", "other")
    _apply(
        kube,
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "broker-leases"},
            "rules": [
                {
                    "apiGroups": ["coordination.k8s.io"],
                    "resources": ["leases"],
                    "verbs": ["get", "list", "watch", "create", "update", "patch"],
                }
            ],
        },
    )
    _apply(
        kube,
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "broker-leases"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "broker-leases"},
            "subjects": [{"kind": "ServiceAccount", "name": "broker", "namespace": NS}],
        },
    )
    _apply(
        kube,
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "mspc-broker-auth-delegator"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:auth-delegator",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "broker", "namespace": NS}],
        },
    )


def _token_file(tmp_path: Path, name: str, token: str) -> Path:
    path = tmp_path / name
    path.write_text(token)
    return path


class TestLeaseElection:
    def test_one_leads_the_other_takes_over_after_a_kill(
        self,
        kube: KubeCluster,
        rbac: None,
        broker_config: Callable[..., dict[str, Any]],
        seed_vendor: Callable[..., None],
        tmp_path: Path,
        repo_root: Path,
    ) -> None:
        """Two `broker serve` processes share a Kubernetes Lease: exactly one leads; SIGKILL it and the other leads."""
        token = _token_file(tmp_path, "broker-token", kube.request_token(NS, "broker", expiration_seconds=3600))
        lease_name = "leader-" + os.urandom(3).hex()
        config = broker_config(
            engine={
                "leader_election": "kubernetes",
                "kubernetes_api_url": kube.url,
                "lease_namespace": NS,
                "lease_name": lease_name,
                "kubernetes_token_path": str(token),
                "kubernetes_ca_bundle_path": str(kube.ca_path),
                "leader_lease_seconds": 3,
                "reconcile_interval_seconds": 0.3,
                "reconcile_jitter_ratio": 0.0,
            },
            identity={"mode": "static", "static_key_paths": [str(kube.sa_public_key_path)], "issuer": kube.issuer},
            log={"format": "json"},
        )
        seed_vendor(config, "vendor-acme", "acme-vendor-key-dev")
        procs: list[tuple[subprocess.Popen[bytes], str]] = []
        for i in range(2):
            port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
            audit = {**config["audit"], "file_path": str(tmp_path / f"audit-{i}" / "audit.jsonl")}
            env.update(settings_env({**config, "server": {"port": port}, "audit": audit}))
            log = open(tmp_path / f"broker-{i}.log", "wb")  # noqa: SIM115 - closed with the process
            procs.append(
                (
                    subprocess.Popen(
                        [sys.executable, "-m", "broker", "serve"],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        cwd=repo_root,
                    ),
                    f"http://127.0.0.1:{port}",
                )
            )
        try:

            def leaders() -> list[bool]:
                out = []
                for proc, url in procs:
                    if proc.poll() is not None:
                        out.append(False)
                        continue
                    try:
                        out.append(bool(httpx.get(f"{url}/readyz", timeout=2).json()["checks"]["leader"]))
                    except (httpx.HTTPError, KeyError, ValueError):
                        out.append(False)
                return out

            deadline = time.monotonic() + 60
            while sum(state := leaders()) != 1:
                assert time.monotonic() < deadline, state
                time.sleep(0.1)
            first = state.index(True)
            lease = kube.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{lease_name}")
            holder = lease["spec"]["holderIdentity"]
            procs[first][0].send_signal(signal.SIGKILL)
            procs[first][0].wait(10)
            deadline = time.monotonic() + 30
            while not leaders()[1 - first]:
                assert time.monotonic() < deadline, "the survivor never took the lease"
                time.sleep(0.1)
            lease = kube.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{lease_name}")
            assert lease["spec"]["holderIdentity"] not in (None, holder)
            assert lease["spec"]["leaseTransitions"] >= 1
        finally:
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(30)
        # The survivor released the lease on its clean stop.
        lease = kube.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{lease_name}")
        assert lease["spec"].get("holderIdentity") in (None, "")


class TestTokenReviewIdentity:
    def test_tokenrequest_tokens_through_real_tokenreview(
        self,
        kube: KubeCluster,
        rbac: None,
        broker_config: Callable[..., dict[str, Any]],
        seed_vendor: Callable[..., None],
        tmp_path: Path,
    ) -> None:
        """In tokenreview mode a TokenRequest token for the broker's audience is accepted; other audiences are not."""
        reviewer = _token_file(tmp_path, "reviewer", kube.request_token(NS, "broker", expiration_seconds=3600))
        policies = tmp_path / "policies"
        policies.mkdir()
        (policies / "p.yaml").write_text(POLICY)
        config = broker_config(
            identity={
                "mode": "tokenreview",
                "tokenreview_url": kube.url,
                "tokenreview_ca_bundle_path": str(kube.ca_path),
                "tokenreview_token_path": str(reviewer),
            },
            policy={"dir": str(policies), "reload_interval_seconds": 0},
            engine={"reconcile_interval_seconds": 3600, "leader_election": "store"},
        )
        seed_vendor(config, "vendor-acme", "acme-vendor-key-dev")
        runtime = Runtime(load_settings(**config))
        from broker.engine.desired import DesiredIntegration
        from broker.models import IntegrationRef

        assert runtime.engine.provision(DesiredIntegration(IntegrationRef("org-contoso", "vendor-acme"))).ok
        served = start_broker_thread(runtime)
        try:
            body = {"organization_id": "org-contoso", "vendor_id": "vendor-acme"}

            def post(token: str) -> httpx.Response:
                return httpx.post(
                    f"{served.url}/v1/tokens", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=10
                )

            ok = post(kube.request_token("apps", "payments", audience="mspc-broker"))
            assert ok.status_code == 201, ok.text
            assert post(kube.request_token("apps", "payments", audience="vault")).status_code == 401
            assert post(kube.request_token("apps", "other", audience="mspc-broker")).status_code == 403
        finally:
            served.stop()


class TestVaultKubernetesAuth:
    def test_store_logs_in_through_real_tokenreview(
        self, kube: KubeCluster, rbac: None, openbao: RunningServer, tmp_path: Path
    ) -> None:
        """OpenBao's kubernetes auth, backed by the real API server's TokenReview, lets the broker's store in."""
        root = hvac.Client(url=openbao.url, token=openbao.extra["root_token"])
        mount = "k8s-" + os.urandom(3).hex()
        root.sys.enable_auth_method("kubernetes", path=mount)
        reviewer = kube.request_token(NS, "broker", expiration_seconds=3600)
        root.auth.kubernetes.configure(
            kubernetes_host=kube.url,
            kubernetes_ca_cert=kube.ca_path.read_text(),
            token_reviewer_jwt=reviewer,
            disable_local_ca_jwt=True,
            mount_point=mount,
        )
        root.sys.create_or_update_policy(
            "mspc-broker-kube", 'path "secret/*" { capabilities = ["create", "read", "update", "list"] }'
        )
        root.auth.kubernetes.create_role(
            "broker",
            bound_service_account_names=["broker"],
            bound_service_account_namespaces=[NS],
            audience="vault",
            policies=["mspc-broker-kube"],
            mount_point=mount,
        )
        root.secrets.kv.v2.create_or_update_secret(path=f"{mount}/probe", secret={"v": "1"}, mount_point="secret")

        def store_with(token: str) -> Any:
            jwt = _token_file(tmp_path, f"jwt-{os.urandom(2).hex()}", token)
            settings = load_settings(
                vault={
                    "url": openbao.url,
                    "auth_method": "kubernetes",
                    "kubernetes_mount": mount,
                    "kubernetes_role": "broker",
                    "kubernetes_jwt_path": str(jwt),
                }
            )
            return build_store(settings)

        store = store_with(kube.request_token(NS, "broker", audience="vault"))
        store.health()
        assert store.read(f"{mount}/probe").field("v").get_secret_value() == "1"
        store.close()
        with pytest.raises(StoreAccessDenied):
            store_with(kube.request_token("apps", "other", audience="vault")).health()
        with pytest.raises(StoreAccessDenied):
            store_with(kube.request_token(NS, "broker", audience="mspc-broker")).health()
