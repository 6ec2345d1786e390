"""A real, API-only Kubernetes control plane on loopback: etcd + kube-apiserver v1.20.2.

``start_cluster()`` builds (once, cached) or finds kube-apiserver through
``tests/kube/build-apiserver.sh``, generates a CA, a serving certificate and
service-account signing keys with ``cryptography``, starts etcd and the API
server on free loopback ports, and polls ``/readyz``. Both processes are
stopped by PID. There is no controller-manager or scheduler: objects are
stored and validated, nothing runs.

It also works outside pytest, e.g. for a quick look::

    .venv/bin/python -c "import sys; sys.path.insert(0, 'tests/kube'); import kubecluster as k; \
c = k.start_cluster(); print(c.url, c.admin_token); input(); c.stop()"
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import pwd
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from broker.testing.servers import RunningServer, free_port

BUILD_SCRIPT = Path(__file__).resolve().parent / "build-apiserver.sh"
INSTALL_HELM = Path(__file__).resolve().parents[2] / ".ci" / "install-helm.sh"
ISSUER = "https://kubernetes.default.svc.cluster.local"
API_AUDIENCES = (ISSUER, "mspc-broker", "vault")
START_TIMEOUT_SECONDS = 60.0
BUILD_TIMEOUT_SECONDS = 1800.0


class ClusterError(RuntimeError):
    """The control plane could not be built or started; the message carries the log tail."""


def build_apiserver() -> Path:
    """Path of kube-apiserver v1.20.2, built into the cache by build-apiserver.sh on first use."""
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_SECONDS,
        check=False,
        env=_tool_env(),
    )
    if proc.returncode != 0:
        raise ClusterError(f"{BUILD_SCRIPT} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def find_kubectl() -> Path:
    """kubectl installed beside helm by .ci/install-helm.sh (the cache the helm tests use)."""
    proc = subprocess.run(
        ["bash", str(INSTALL_HELM)], capture_output=True, text=True, timeout=600, check=False, env=_tool_env()
    )
    if proc.returncode != 0:
        raise ClusterError(f"{INSTALL_HELM} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1]).parent.parent / "kubectl" / "kubectl"


def _tool_env() -> dict[str, str]:
    """The environment for the build/install scripts: caches under the real home, even if $HOME was swapped."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache")
    return {
        **os.environ,
        "MSPC_TOOLS_CACHE": f"{cache}/mspc-broker/tools",
        "MSPC_KUBE_CACHE": f"{cache}/mspc-broker/kube",
        "HOME": pwd.getpwuid(os.getuid()).pw_dir,
    }


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_pki(directory: Path) -> dict[str, Path]:
    """A CA, a serving certificate for 127.0.0.1/localhost and an SA signing key pair, as PEM files."""
    now = dt.datetime.now(dt.UTC)
    ca_key, server_key, sa_key = _key(), _key(), _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mspc-test-kube-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.DNSName("localhost"),
                    x509.DNSName("kubernetes.default.svc"),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {
        "ca.crt": ca.public_bytes(serialization.Encoding.PEM),
        "server.crt": server.public_bytes(serialization.Encoding.PEM),
        "server.key": _pem_key(server_key),
        "sa.key": _pem_key(sa_key),
        "sa.pub": sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    }
    out = {}
    for name, data in paths.items():
        path = directory / name
        path.write_bytes(data)
        path.chmod(0o600)
        out[name] = path
    return out


def _spawn(name: str, argv: list[str], url: str, workdir: Path) -> RunningServer:
    log_path = workdir / f"{name}.log"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir)}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    return RunningServer(name=name, url=url, process=process, log_path=log_path, workdir=workdir)


def _poll(server: RunningServer, ready: Any, deadline: float) -> None:
    delay = 0.05
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ClusterError(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail(3000)}")
        try:
            if ready():
                return
        except httpx.HTTPError:
            pass
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
    raise ClusterError(f"{server.name} not ready in time:\n{server.log_tail(3000)}")


@dataclass
class KubeCluster:
    """A running etcd + kube-apiserver, and helpers that talk to it as the admin."""

    url: str
    ca_path: Path
    admin_token: str
    sa_public_key_path: Path
    kubeconfig: Path
    workdir: Path
    version: str
    startup_seconds: float
    processes: list[RunningServer] = field(default_factory=list)

    issuer: str = ISSUER

    @property
    def jwks_url(self) -> str:
        """The service-account signing keys (JWKS), readable anonymously."""
        return f"{self.url}/openid/v1/jwks"

    def client(self, token: str | None = None) -> httpx.Client:
        """An HTTPS client for the API server, authenticated as the admin unless ``token`` is given."""
        return httpx.Client(
            base_url=self.url,
            verify=ssl.create_default_context(cafile=str(self.ca_path)),
            headers={"Authorization": f"Bearer {token or self.admin_token}"},
            timeout=10.0,
        )

    def request(self, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None) -> Any:
        """One API call; returns the decoded JSON, raises ``httpx.HTTPStatusError`` on 4xx/5xx."""
        with self.client(token) as client:
            response = client.request(method, path, json=body)
        response.raise_for_status()
        return response.json()

    def create_namespace(self, name: str) -> None:
        """Create a namespace (no error if it exists)."""
        self._create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def create_service_account(self, namespace: str, name: str) -> dict[str, Any]:
        """Create a namespace (if needed) and a ServiceAccount in it; returns the ServiceAccount."""
        self.create_namespace(namespace)
        self._create(
            f"/api/v1/namespaces/{namespace}/serviceaccounts",
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}},
        )
        result: dict[str, Any] = self.request("GET", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}")
        return result

    def request_token(
        self, namespace: str, service_account: str, audience: str | None = None, expiration_seconds: int = 600
    ) -> str:
        """A service-account token from the TokenRequest API (audience None = the API server's own)."""
        spec: dict[str, Any] = {"expirationSeconds": expiration_seconds}
        if audience is not None:
            spec["audiences"] = [audience]
        result = self.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        token: str = result["status"]["token"]
        return token

    def token_review(self, token: str, audiences: list[str] | None, as_token: str | None = None) -> dict[str, Any]:
        """POST a TokenReview (as the admin unless ``as_token``) and return its status.

        ``audiences`` None leaves spec.audiences out: the server then checks its own --api-audiences.
        """
        spec: dict[str, Any] = {"token": token}
        if audiences is not None:
            spec["audiences"] = audiences
        result = self.request(
            "POST",
            "/apis/authentication.k8s.io/v1/tokenreviews",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec},
            token=as_token,
        )
        status: dict[str, Any] = result["status"]
        return status

    def kubectl(
        self, *args: str, stdin: str | None = None, kubectl: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster with its own kubeconfig (never ~/.kube)."""
        binary = kubectl or find_kubectl()
        return subprocess.run(
            [str(binary), "--kubeconfig", str(self.kubeconfig), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.workdir)},
        )

    def _create(self, path: str, body: dict[str, Any]) -> None:
        with self.client() as client:
            response = client.post(path, json=body)
        if response.status_code != 409:
            response.raise_for_status()

    def stop(self) -> None:
        """Stop the API server, then etcd, by PID."""
        for server in reversed(self.processes):
            server.stop()


def _kubeconfig(path: Path, url: str, ca_path: Path, token: str) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "test",
                "cluster": {
                    "server": url,
                    "certificate-authority-data": base64.b64encode(ca_path.read_bytes()).decode(),
                },
            }
        ],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
        "current-context": "test",
    }
    path.write_text(json.dumps(config), encoding="utf-8")
    path.chmod(0o600)


def start_cluster(workdir: Path | None = None, apiserver: Path | None = None) -> KubeCluster:
    """Start etcd and kube-apiserver on free loopback ports and wait for ``/readyz``."""
    apiserver = apiserver or build_apiserver()
    etcd = shutil.which("etcd")
    if etcd is None:
        raise ClusterError("etcd not found: tests/kube/build-apiserver.sh installs etcd-server")
    workdir = workdir or Path(tempfile.mkdtemp(prefix="kube-"))
    pki = write_pki(workdir)
    admin_token = secrets.token_urlsafe(24)
    tokens = workdir / "tokens.csv"
    tokens.write_text(f"{admin_token},admin,admin-uid,system:masters\n", encoding="utf-8")
    tokens.chmod(0o600)

    started = time.monotonic()
    deadline = started + START_TIMEOUT_SECONDS
    client_port, peer_port, api_port = free_port(), free_port(), free_port()
    etcd_url = f"http://127.0.0.1:{client_port}"
    processes: list[RunningServer] = []
    try:
        etcd_server = _spawn(
            "etcd",
            [
                etcd,
                "--name=test",
                f"--data-dir={workdir / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=test=http://127.0.0.1:{peer_port}",
                "--log-level=warn",
            ],
            etcd_url,
            workdir,
        )
        processes.append(etcd_server)
        _poll(etcd_server, lambda: httpx.get(f"{etcd_url}/health", timeout=1.0).status_code == 200, deadline)

        url = f"https://127.0.0.1:{api_port}"
        api = _spawn(
            "kube-apiserver",
            [
                str(apiserver),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                "--insecure-port=0",
                f"--cert-dir={workdir / 'certs'}",
                f"--tls-cert-file={pki['server.crt']}",
                f"--tls-private-key-file={pki['server.key']}",
                f"--client-ca-file={pki['ca.crt']}",
                f"--token-auth-file={tokens}",
                "--authorization-mode=Node,RBAC",
                f"--service-account-issuer={ISSUER}",
                f"--service-account-key-file={pki['sa.pub']}",
                f"--service-account-signing-key-file={pki['sa.key']}",
                f"--api-audiences={','.join(API_AUDIENCES)}",
                f"--service-account-jwks-uri={url}/openid/v1/jwks",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--enable-priority-and-fairness=false",
                "--v=0",
            ],
            url,
            workdir,
        )
        processes.append(api)

        def ready() -> bool:
            response = httpx.get(
                f"{url}/readyz",
                verify=ssl.create_default_context(cafile=str(pki["ca.crt"])),
                headers={"Authorization": f"Bearer {admin_token}"},
                timeout=2.0,
            )
            return response.status_code == 200

        _poll(api, ready, deadline)
    except BaseException:
        for server in reversed(processes):
            server.stop()
        raise
    startup = time.monotonic() - started
    version = httpx.get(
        f"{url}/version",
        verify=ssl.create_default_context(cafile=str(pki["ca.crt"])),
        headers={"Authorization": f"Bearer {admin_token}"},
    ).json()["gitVersion"]
    kubeconfig = workdir / "kubeconfig"
    _kubeconfig(kubeconfig, url, pki["ca.crt"], admin_token)
    cluster = KubeCluster(
        url=url,
        ca_path=pki["ca.crt"],
        admin_token=admin_token,
        sa_public_key_path=pki["sa.pub"],
        kubeconfig=kubeconfig,
        workdir=workdir,
        version=version,
        startup_seconds=startup,
        processes=processes,
    )
    # Like EKS and GKE: OIDC discovery and the JWKS are readable without credentials.
    cluster.request(
        "POST",
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "anonymous-service-account-issuer-discovery"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:service-account-issuer-discovery",
            },
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:unauthenticated"}],
        },
    )
    return cluster
