"""Helpers for the chart checks: a real helm 4 (installed by .ci/install-helm.sh), renders, validation.

helm runs with its cache, config and data homes in a temporary directory, so
nothing from the machine's helm setup leaks in. If helm cannot be installed,
every test that needs it fails (``install_helm`` calls ``pytest.fail``).
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "mspc-broker"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
EXAMPLES = sorted((REPO / "helm" / "examples").glob("*.yaml"))
BAD_VALUES = sorted((Path(__file__).parent / "bad-values").glob("*.yaml"))
INSTALL_SCRIPT = REPO / ".ci" / "install-helm.sh"
KUBE_VERSION = "1.32.0"
RELEASE = "mspc-broker"
NAMESPACE = "mspc-broker"


def tools_cache() -> Path:
    """The install script's cache, under the real home even when a test swapped $HOME."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache")
    return Path(base) / "mspc-broker" / "tools"


def install_helm() -> Path:
    """Run .ci/install-helm.sh (a no-op when cached) and return the helm path it prints."""
    env = {**os.environ, "MSPC_TOOLS_CACHE": str(tools_cache())}
    proc = subprocess.run(
        ["bash", str(INSTALL_SCRIPT)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if proc.returncode != 0:
        pytest.fail(f"{INSTALL_SCRIPT} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


class HelmError(Exception):
    """helm exited non-zero; the message is its stderr."""


@dataclass
class Helm:
    """A helm binary with private homes, bound to this repository's chart."""

    binary: Path
    env: dict[str, str]
    _renders: dict[tuple[Any, ...], list[dict[str, Any]]] = field(default_factory=dict)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run helm; raise ``HelmError`` with its stderr on failure."""
        proc = subprocess.run(
            [str(self.binary), *args], env=self.env, capture_output=True, text=True, timeout=60, check=False
        )
        if proc.returncode != 0:
            raise HelmError(proc.stderr.strip())
        return proc

    def template_text(
        self,
        *values_files: Path,
        set_values: Mapping[str, str | int | bool] | None = None,
        set_files: Mapping[str, Path] | None = None,
        kube_version: str = KUBE_VERSION,
    ) -> str:
        """``helm template`` of the chart as release mspc-broker in namespace mspc-broker."""
        args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", kube_version]
        for path in values_files:
            args += ["--values", str(path)]
        for key, value in (set_values or {}).items():
            if isinstance(value, str):
                args += ["--set-string", f"{key}={value}"]
            else:
                args += ["--set", f"{key}={json.dumps(value)}"]
        for key, path in (set_files or {}).items():
            args += ["--set-file", f"{key}={path}"]
        return self.run(*args).stdout

    def render(
        self,
        *values_files: Path,
        set_values: Mapping[str, str | int | bool] | None = None,
        set_files: Mapping[str, Path] | None = None,
        kube_version: str = KUBE_VERSION,
    ) -> list[dict[str, Any]]:
        """The rendered manifests as dicts (cached per arguments)."""
        key = (values_files, tuple((set_values or {}).items()), tuple((set_files or {}).items()), kube_version)
        if key not in self._renders:
            text = self.template_text(
                *values_files, set_values=set_values, set_files=set_files, kube_version=kube_version
            )
            self._renders[key] = [doc for doc in yaml.safe_load_all(text) if doc]
        return self._renders[key]


def kubernetes_validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    """Run ``kubernetes-validate --strict -k 1.32.0`` on files (from this venv)."""
    cli = Path(sys.executable).parent / "kubernetes-validate"
    return subprocess.run(
        [str(cli), "--strict", "--quiet", "-k", KUBE_VERSION, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def find(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    """The one manifest of ``kind`` whose name ends with ``name_suffix``."""
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(hits) == 1, f"expected one {kind} *{name_suffix}, got {[d['metadata']['name'] for d in hits]}"
    return hits[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    """Kinds of the rendered manifests, in order."""
    return [d["kind"] for d in docs]


def load_yaml(path: Path) -> Any:
    """Parse one YAML file."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_all(path: Path) -> Iterator[Any]:
    """Parse every document of a YAML file."""
    return (doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc)


def merged_values(*overlays: Path) -> dict[str, Any]:
    """values.yaml with overlays applied as helm does: maps merge, other values replace, null deletes."""

    def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in over.items():
            if value is None:
                out.pop(key, None)
            elif isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
        return out

    values: dict[str, Any] = load_yaml(CHART / "values.yaml")
    for path in overlays:
        values = merge(values, load_yaml(path) or {})
    return values
