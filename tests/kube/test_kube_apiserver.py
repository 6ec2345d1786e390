"""The chart and the identity plumbing against a real kube-apiserver (opt-in: ``pytest -m kube``)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import yaml
from helmtools import CHART, CI_VALUES, EXAMPLES, NAMESPACE, Helm
from kubecluster import ISSUER, KubeCluster

pytestmark = [pytest.mark.kube, pytest.mark.timeout(1800)]

CI = {path.stem.removesuffix("-values"): path for path in CI_VALUES}
DRY_RUN_SETS = {
    "default": (),
    "tokenreview": (CI["tokenreview"],),
    "aws-irsa": (CI["aws-irsa"],),
    "vault-kubernetes": (CI["vault-kubernetes"],),
    "locked-down": (CI["locked-down"],),
}


def server_version(kube: KubeCluster) -> str:
    return kube.version.lstrip("v").split("-")[0].split("+")[0]


def apply_dry_run(kube: KubeCluster, kubectl: Path, manifests: str) -> str:
    """``kubectl apply --dry-run=server --validate=strict -f -``; returns stdout, fails the test with stderr."""
    result = kube.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", stdin=manifests, kubectl=kubectl)
    assert result.returncode == 0, result.stderr
    return result.stdout


def claims(token: str, kube: KubeCluster, audience: str) -> dict[str, Any]:
    """Verify a service-account JWT with the cluster's signing key and return its claims."""
    decoded: dict[str, Any] = jwt.decode(
        token,
        kube.sa_public_key_path.read_bytes(),
        algorithms=["RS256"],
        audience=audience,
        issuer=ISSUER,
    )
    return decoded


class TestControlPlane:
    """The fixture's etcd + kube-apiserver."""

    def test_is_kubernetes_1_20_and_ready(self, kube: KubeCluster) -> None:
        """The API server reports v1.20.2 and answers /readyz for the admin."""
        assert kube.version == "v1.20.2"
        with kube.client() as client:
            assert client.get("/readyz").status_code == 200

    def test_rejects_unknown_tokens(self, kube: KubeCluster) -> None:
        """A bearer token the server does not know gets 401."""
        with kube.client(token="not-a-token") as client:
            assert client.get("/api/v1/namespaces").status_code == 401


class TestChartDryRun:
    """The rendered chart is accepted by a real API server (server-side dry run, strict validation)."""

    @pytest.mark.parametrize("name", sorted(DRY_RUN_SETS))
    def test_rendered_chart_applies(self, kube: KubeCluster, kubectl: Path, helm: Helm, name: str) -> None:
        """helm template for the server's version, then kubectl apply --dry-run=server, creates every object."""
        kube.create_namespace(NAMESPACE)
        text = helm.template_text(*DRY_RUN_SETS[name], kube_version=server_version(kube))
        out = apply_dry_run(kube, kubectl, text)
        rendered = [d for d in yaml.safe_load_all(text) if d]
        assert out.count("(server dry run)") == len(rendered), out
        assert ("clusterrolebinding" in out) == (name == "tokenreview")

    def test_invalid_manifest_is_refused(self, kube: KubeCluster, kubectl: Path, helm: Helm) -> None:
        """The same dry run refuses a broken Deployment, so a pass above means something."""
        kube.create_namespace(NAMESPACE)
        text = helm.template_text(kube_version=server_version(kube)).replace("replicas: 2", "replicas: two")
        result = kube.kubectl("apply", "--dry-run=server", "-f", "-", stdin=text, kubectl=kubectl)
        assert result.returncode != 0
        assert "replicas" in result.stderr

    @pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
    def test_example_workloads_apply(self, kube: KubeCluster, kubectl: Path, example: Path) -> None:
        """The example workloads (projected token, init container, --watch sidecar) are accepted as written."""
        manifests = example.read_text(encoding="utf-8")
        for doc in yaml.safe_load_all(manifests):
            if doc:
                kube.create_namespace(doc["metadata"]["namespace"])
        out = apply_dry_run(kube, kubectl, manifests)
        assert "deployment.apps/" in out


@pytest.fixture(scope="module")
def installed(kube: KubeCluster, kubectl: Path, helm: Helm) -> dict[str, str]:
    """The tokenreview values set applied for real in namespace mspc-broker; the broker SA's API token."""
    kube.create_namespace(NAMESPACE)
    text = helm.template_text(CI["tokenreview"], kube_version=server_version(kube))
    result = kube.kubectl("apply", "-f", "-", stdin=text, kubectl=kubectl)
    assert result.returncode == 0, result.stderr
    return {"token": kube.request_token(NAMESPACE, "mspc-broker")}


class TestChartRbac:
    """The chart's RBAC, installed for real, grants exactly what the broker needs."""

    def test_broker_may_manage_leases_in_its_namespace(self, kube: KubeCluster, installed: dict[str, str]) -> None:
        """The broker's service account can create and update a Lease in the release namespace."""
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "mspc-broker-leader", "namespace": NAMESPACE},
            "spec": {"holderIdentity": "pod-a", "leaseDurationSeconds": 30},
        }
        path = f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases"
        created = kube.request("POST", path, lease, token=installed["token"])
        created["spec"]["holderIdentity"] = "pod-b"
        updated = kube.request("PUT", f"{path}/mspc-broker-leader", created, token=installed["token"])
        assert updated["spec"]["holderIdentity"] == "pod-b"

    def test_broker_may_not_touch_leases_elsewhere_or_read_secrets(
        self, kube: KubeCluster, installed: dict[str, str]
    ) -> None:
        """Outside its namespace, and for Secrets, the broker's service account is forbidden."""
        kube.create_namespace("kube-system")
        with kube.client(installed["token"]) as client:
            assert client.get("/apis/coordination.k8s.io/v1/namespaces/kube-system/leases").status_code == 403
            assert client.get(f"/api/v1/namespaces/{NAMESPACE}/secrets").status_code == 403

    def test_tokenreview_mode_lets_the_broker_review_workload_tokens(
        self, kube: KubeCluster, installed: dict[str, str]
    ) -> None:
        """With the auth-delegator binding the broker itself can TokenReview a workload's token."""
        kube.create_service_account("billing", "invoicer")
        workload = kube.request_token("billing", "invoicer", audience="mspc-broker")
        status = kube.token_review(workload, ["mspc-broker"], as_token=installed["token"])
        assert status["authenticated"] is True
        assert status["user"]["username"] == "system:serviceaccount:billing:invoicer"
        assert status["audiences"] == ["mspc-broker"]

    def test_without_the_binding_tokenreview_is_forbidden(self, kube: KubeCluster) -> None:
        """A service account without system:auth-delegator (the default values) may not review tokens."""
        kube.create_service_account("other", "plain")
        plain = kube.request_token("other", "plain")
        with pytest.raises(httpx.HTTPStatusError) as info:
            kube.token_review(plain, ["mspc-broker"], as_token=plain)
        assert info.value.response.status_code == 403


class TestTokenRequest:
    """Projected-style tokens from the TokenRequest API: what the broker's identity layer will verify."""

    def test_token_carries_nested_kubernetes_io_claims(self, kube: KubeCluster) -> None:
        """A token for audience mspc-broker names the namespace and service account in the kubernetes.io claim."""
        account = kube.create_service_account("billing", "invoicer")
        token = kube.request_token("billing", "invoicer", audience="mspc-broker", expiration_seconds=600)
        got = claims(token, kube, "mspc-broker")
        assert got["aud"] == ["mspc-broker"]
        assert got["sub"] == "system:serviceaccount:billing:invoicer"
        assert got["kubernetes.io"]["namespace"] == "billing"
        assert got["kubernetes.io"]["serviceaccount"] == {"name": "invoicer", "uid": account["metadata"]["uid"]}
        assert got["exp"] - got["iat"] == 600

    def test_audience_is_bound(self, kube: KubeCluster) -> None:
        """A token for the vault audience is not a broker token, and TokenReview says so."""
        kube.create_service_account("billing", "invoicer")
        token = kube.request_token("billing", "invoicer", audience="vault")
        with pytest.raises(jwt.InvalidAudienceError):
            claims(token, kube, "mspc-broker")
        assert kube.token_review(token, ["mspc-broker"]).get("authenticated", False) is False
        assert kube.token_review(token, ["vault"])["authenticated"] is True

    def test_review_checks_the_audiences_the_reviewer_names(self, kube: KubeCluster) -> None:
        """TokenReview checks the audiences the caller names (else --api-audiences): the broker must send its own."""
        kube.create_service_account("billing", "invoicer")
        token = kube.request_token("billing", "invoicer", audience="someone-else")
        assert kube.token_review(token, ["someone-else"]).get("authenticated", False) is True
        assert kube.token_review(token, None).get("authenticated", False) is False
        api_token = kube.request_token("billing", "invoicer", audience=ISSUER)
        assert kube.token_review(api_token, ["mspc-broker"]).get("authenticated", False) is False


class TestOidcDiscovery:
    """The issuer's discovery document and JWKS, as the broker's jwks identity mode reads them."""

    def test_discovery_names_the_issuer_and_jwks(self, kube: KubeCluster) -> None:
        """/.well-known/openid-configuration gives the issuer and a JWKS URL, without credentials."""
        context = ssl.create_default_context(cafile=str(kube.ca_path))
        response = httpx.get(f"{kube.url}/.well-known/openid-configuration", verify=context)
        assert response.status_code == 200
        document = response.json()
        assert document["issuer"] == ISSUER
        assert document["jwks_uri"] == kube.jwks_url
        assert "RS256" in document["id_token_signing_alg_values_supported"]

    def test_jwks_verifies_a_requested_token(self, kube: KubeCluster) -> None:
        """The anonymous JWKS holds the key (by kid) that verifies a TokenRequest token."""
        kube.create_service_account("billing", "invoicer")
        token = kube.request_token("billing", "invoicer", audience="mspc-broker")
        context = ssl.create_default_context(cafile=str(kube.ca_path))
        keys = httpx.get(kube.jwks_url, verify=context).json()["keys"]
        kid = jwt.get_unverified_header(token)["kid"]
        (jwk,) = [k for k in keys if k["kid"] == kid]
        key = jwt.PyJWK(jwk).key
        decoded = jwt.decode(token, key, algorithms=["RS256"], audience="mspc-broker", issuer=ISSUER)
        assert decoded["kubernetes.io"]["serviceaccount"]["name"] == "invoicer"


class TestHelmRelease:
    """helm 4 installs and upgrades the chart on the real API server."""

    RELEASE_NAMESPACE = "helm-release"

    def helm_cmd(self, helm: Helm, kube: KubeCluster, *args: str) -> str:
        """Run helm against this cluster in the release namespace; returns stdout."""
        return helm.run(*args, "--namespace", self.RELEASE_NAMESPACE, "--kubeconfig", str(kube.kubeconfig)).stdout

    def deployment(self, kube: KubeCluster) -> dict[str, Any]:
        """The release's Deployment as stored by the API server."""
        path = f"/apis/apps/v1/namespaces/{self.RELEASE_NAMESPACE}/deployments/mspc-broker"
        result: dict[str, Any] = kube.request("GET", path)
        return result

    def test_install_then_upgrade_rolls_only_on_change(self, kube: KubeCluster, helm: Helm) -> None:
        """Install picks the server's PDB API; an unchanged upgrade keeps the pod template, a policy edit changes it."""
        kube.create_namespace(self.RELEASE_NAMESPACE)
        chart = str(CHART)
        self.helm_cmd(helm, kube, "install", "mspc-broker", chart)
        pdb = kube.request(
            "GET", f"/apis/policy/v1beta1/namespaces/{self.RELEASE_NAMESPACE}/poddisruptionbudgets/mspc-broker"
        )
        assert pdb["spec"]["minAvailable"] == 1
        first = self.deployment(kube)

        self.helm_cmd(helm, kube, "upgrade", "mspc-broker", chart)
        unchanged = self.deployment(kube)
        assert unchanged["metadata"]["generation"] == first["metadata"]["generation"]

        self.helm_cmd(
            helm, kube, "upgrade", "mspc-broker", chart, "--set-string", "policies.files.extra\\.yaml=version: 1"
        )
        changed = self.deployment(kube)
        assert changed["metadata"]["generation"] == first["metadata"]["generation"] + 1
        before = first["spec"]["template"]["metadata"]["annotations"]
        after = changed["spec"]["template"]["metadata"]["annotations"]
        assert after["checksum/policies"] != before["checksum/policies"]
        assert after["checksum/settings"] == before["checksum/settings"]
        assert "revision: 3" in self.helm_cmd(helm, kube, "status", "mspc-broker").lower()
