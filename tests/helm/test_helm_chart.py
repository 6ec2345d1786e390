"""The Helm chart, checked with real helm 4, kubernetes-validate and the broker's own models."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from helmtools import (
    BAD_VALUES,
    CHART,
    CI_VALUES,
    EXAMPLES,
    NAMESPACE,
    RELEASE,
    REPO,
    Helm,
    HelmError,
    find,
    install_helm,
    kinds,
    kubernetes_validate,
    load_yaml,
    load_yaml_all,
    merged_values,
)
from pydantic import BaseModel
from values_config_schema import CHART_MANAGED, config_schema, secret_fields

from broker.engine.desired import parse_desired
from broker.models import IntegrationRef, Principal
from broker.policy import PolicyEngine, load_policy_dir
from broker.settings import Settings, load_settings

SCHEMA = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
VALUE_SETS = [CHART / "values.yaml", *CI_VALUES]
CI = {path.stem.removesuffix("-values"): path for path in CI_VALUES}
SHIPPED_POLICIES = sorted((REPO / "policies").glob("*.yaml"))


def ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return find(docs, "Deployment")


def broker_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = deployment(docs)["spec"]["template"]["spec"]["containers"]
    return container


def settings_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    return find(docs, "ConfigMap", "-settings")["data"]


def volume(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (hit,) = [v for v in deployment(docs)["spec"]["template"]["spec"]["volumes"] if v["name"] == name]
    return hit


def mount_path(docs: list[dict[str, Any]], name: str) -> str:
    (hit,) = [m for m in broker_container(docs)["volumeMounts"] if m["name"] == name]
    return hit["mountPath"]


def object_schemas(node: Any, where: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every object-typed sub-schema of a JSON schema, with its location."""
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        if node.get("type") == "object":
            found.append((where or "/", node))
        for key, child in node.items():
            found += object_schemas(child, f"{where}/{key}")
    elif isinstance(node, list):
        for index, child in enumerate(node):
            found += object_schemas(child, f"{where}/{index}")
    return found


class TestInstallScript:
    """.ci/install-helm.sh: helm 4 and kubectl from the pinned npm package."""

    def test_helm_is_version_4(self, helm: Helm) -> None:
        """The installed helm reports a v4 version."""
        assert helm.run("version", "--template", "{{.Version}}").stdout.startswith("v4.")

    def test_kubectl_is_installed_beside_helm(self, helm: Helm) -> None:
        """kubectl from the same layer is executable next to helm."""
        kubectl = helm.binary.parent.parent / "kubectl" / "kubectl"
        assert kubectl.is_file()
        assert kubectl.stat().st_mode & 0o111

    def test_second_run_reuses_the_cache(self, helm: Helm) -> None:
        """Running the install script again prints the same helm and leaves the cached binary untouched."""
        before = helm.binary.stat().st_mtime_ns
        assert install_helm() == helm.binary
        assert helm.binary.stat().st_mtime_ns == before


class TestLint:
    """``helm lint --strict`` of the chart."""

    @pytest.mark.parametrize("values", VALUE_SETS, ids=ids(VALUE_SETS))
    def test_lint_strict_passes(self, helm: Helm, values: Path) -> None:
        """The chart lints cleanly with strict checks for every values set."""
        helm.run("lint", "--strict", str(CHART), "--values", str(values))

    def test_package_ships_chart_files_only(self, helm: Helm, tmp_path: Path) -> None:
        """helm package builds an archive with the schema and templates, and without the ci/ values sets."""
        helm.run("package", str(CHART), "--destination", str(tmp_path))
        (archive,) = tmp_path.glob("mspc-broker-*.tgz")
        with tarfile.open(archive) as tar:
            names = set(tar.getnames())
        assert {"mspc-broker/values.schema.json", "mspc-broker/templates/deployment.yaml"} <= names
        assert not [n for n in names if n.startswith("mspc-broker/ci/")]


@pytest.fixture(scope="module")
def validation(helm: Helm, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Every values set rendered to a file and all of them, plus the examples, checked in one
    ``kubernetes-validate --strict -k 1.32.0`` run; returns its messages per file name."""
    out = tmp_path_factory.mktemp("rendered")
    files = []
    for values in VALUE_SETS:
        path = out / values.name
        path.write_text(helm.template_text(values), encoding="utf-8")
        files.append(path)
    result = kubernetes_validate(*files, *EXAMPLES)
    messages: dict[str, list[str]] = {p.name: [] for p in [*files, *EXAMPLES]}
    for line in (result.stdout + result.stderr).splitlines():
        _, _, rest = line.partition(" ")
        name = Path(rest.split(" ", 1)[0]).name
        assert name in messages, line
        messages[name].append(line)
    assert (result.returncode == 0) == (not any(level_is_error(m) for lines in messages.values() for m in lines))
    return messages


def level_is_error(line: str) -> bool:
    return not line.startswith(("INFO", "WARN"))


class TestRenderedManifests:
    """``helm template`` output is valid Kubernetes 1.32 (kubernetes-validate --strict)."""

    @pytest.mark.parametrize("values", VALUE_SETS, ids=ids(VALUE_SETS))
    def test_every_values_set_renders_valid_manifests(self, validation: dict[str, list[str]], values: Path) -> None:
        """Each values set renders to manifests that kubernetes-validate accepts strictly (CRDs aside)."""
        unknown = "Couldn't find schema for kind ServiceMonitor with api version monitoring.coreos.com/v1"
        problems = [line for line in validation[values.name] if unknown not in line]
        assert not problems, "\n".join(problems)

    def test_default_values_render_the_expected_kinds(self, helm: Helm) -> None:
        """Defaults give settings, policies, RBAC, Service, Deployment, PDB and NetworkPolicy, nothing more."""
        assert sorted(kinds(helm.render())) == sorted(
            [
                "ConfigMap",
                "ConfigMap",
                "Deployment",
                "NetworkPolicy",
                "PodDisruptionBudget",
                "Role",
                "RoleBinding",
                "Service",
                "ServiceAccount",
            ]
        )

    def test_namespaced_objects_carry_the_release_namespace(self, helm: Helm) -> None:
        """Every namespaced object names the release namespace, so a plain apply lands right."""
        for doc in helm.render(CI["tokenreview"]):
            if doc["kind"] != "ClusterRoleBinding":
                assert doc["metadata"]["namespace"] == NAMESPACE, doc["kind"]

    def test_pdb_uses_policy_v1beta1_before_kubernetes_1_21(self, helm: Helm) -> None:
        """The PodDisruptionBudget API follows the target cluster's version."""
        assert find(helm.render(), "PodDisruptionBudget")["apiVersion"] == "policy/v1"
        old = helm.render(kube_version="1.20.2")
        assert find(old, "PodDisruptionBudget")["apiVersion"] == "policy/v1beta1"

    def test_pdb_keeps_one_pod_and_never_blocks_drains(self, helm: Helm) -> None:
        """The PDB keeps one pod of two up, and is left out when no pod could ever be evicted."""
        pdb = find(helm.render(), "PodDisruptionBudget")["spec"]
        assert pdb["minAvailable"] == 1
        assert pdb["selector"]["matchLabels"] == deployment(helm.render())["spec"]["selector"]["matchLabels"]
        assert "PodDisruptionBudget" not in kinds(helm.render(set_values={"replicaCount": 1}))


class TestValuesSchema:
    """values.schema.json: closed, documented, and enforced by both jsonschema and helm."""

    def test_schema_is_a_valid_json_schema(self) -> None:
        """The schema itself passes the draft-07 meta-schema."""
        jsonschema.Draft7Validator.check_schema(SCHEMA)

    def test_every_object_level_is_closed(self) -> None:
        """Objects forbid unknown keys; free-form maps (labels, files) still constrain values to strings."""
        for where, node in object_schemas(SCHEMA):
            extra = node.get("additionalProperties")
            assert extra is False or extra == {"type": "string"}, where
            if extra is not False:
                assert "properties" not in node, f"{where}: a map must not also list properties"

    def test_every_key_has_a_description(self) -> None:
        """Every property in the schema says what it is for."""
        for where, node in object_schemas(SCHEMA):
            for key, child in node.get("properties", {}).items():
                assert child.get("description", "").strip(), f"{where}/properties/{key}"

    @pytest.mark.parametrize("values", VALUE_SETS, ids=ids(VALUE_SETS))
    def test_values_files_match_the_schema(self, values: Path) -> None:
        """values.yaml, alone and merged with each values set, validates against the schema."""
        jsonschema.Draft7Validator(SCHEMA).validate(merged_values(values))

    @pytest.mark.parametrize("bad", BAD_VALUES, ids=ids(BAD_VALUES))
    def test_bad_values_are_rejected_by_the_schema(self, bad: Path) -> None:
        """Unknown keys, wrong types, unknown settings and secret values fail jsonschema."""
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft7Validator(SCHEMA).validate(merged_values(bad))

    @pytest.mark.parametrize("bad", BAD_VALUES, ids=ids(BAD_VALUES))
    def test_bad_values_are_rejected_by_helm_template(self, helm: Helm, bad: Path) -> None:
        """helm template refuses the same files, naming the schema."""
        with pytest.raises(HelmError, match="schema"):
            helm.template_text(bad)

    def test_config_keys_are_real_broker_settings(self) -> None:
        """Each config.<group>.<field> in the schema exists in broker.settings with the same JSON type."""
        current = config_schema()["properties"]
        for group, node in SCHEMA["properties"]["config"]["properties"].items():
            assert group in current, f"config.{group} is not a settings group"
            for field, spec in node["properties"].items():
                assert field in current[group]["properties"], (
                    f"config.{group}.{field} is not a setting; run tests/helm/values_config_schema.py --write"
                )
                want = current[group]["properties"][field]
                assert (spec["type"], spec.get("enum")) == (want["type"], want.get("enum")), f"{group}.{field}"

    def test_config_schema_is_current(self) -> None:
        """Every setting the chart may set is offered: the checked-in schema is what the settings give today."""
        assert SCHEMA["properties"]["config"] == config_schema(), "run tests/helm/values_config_schema.py --write"

    def test_config_offers_no_secret_setting(self) -> None:
        """No secret setting (or its *_file) and no chart-managed path can be set through values."""
        for group_name, group_field in Settings.model_fields.items():
            group = group_field.annotation
            assert isinstance(group, type) and issubclass(group, BaseModel)
            offered = set(SCHEMA["properties"]["config"]["properties"][group_name]["properties"])
            hidden = secret_fields(group) | {f for g, f in CHART_MANAGED if g == group_name}
            assert not offered & hidden, group_name

    def test_chart_guards_catch_inconsistent_values(self, helm: Helm) -> None:
        """Settings that cannot work (Vault token auth without a token Secret) fail rendering with a hint."""
        with pytest.raises(HelmError, match=r"secrets\.vaultToken\.existingSecret"):
            helm.template_text(set_values={"config.vault.auth_method": "token"})


class TestSettingsConfigMap:
    """The settings ConfigMap: BROKER_* variables the broker's Settings accept, never a secret."""

    @pytest.mark.parametrize("values", VALUE_SETS, ids=ids(VALUE_SETS))
    def test_every_variable_names_a_setting(self, helm: Helm, values: Path) -> None:
        """Each key is BROKER_<GROUP>__<FIELD> of a real setting."""
        for name in settings_env(helm.render(values)):
            match = re.fullmatch(r"BROKER_([A-Z]+)__([A-Z0-9_]+)", name)
            assert match, name
            group, field = match.group(1).lower(), match.group(2).lower()
            assert group in Settings.model_fields, name
            assert field in Settings.model_fields[group].annotation.model_fields, name  # type: ignore[union-attr]

    @pytest.mark.parametrize("values", VALUE_SETS, ids=ids(VALUE_SETS))
    def test_rendered_settings_load_in_the_broker(
        self, helm: Helm, values: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The broker's own load_settings accepts the variables (files are read in the pod, so *_FILE is left out)."""
        env = settings_env(helm.render(values))
        for name, value in env.items():
            if not name.endswith("_FILE"):
                monkeypatch.setenv(name, value)
        settings = load_settings()
        assert settings.server.host == "0.0.0.0"
        assert settings.server.port == 8080

    def test_whole_numbers_keep_integer_form(self, helm: Helm) -> None:
        """Large integers render as digits, never as 2.592e+06."""
        env = settings_env(helm.render(CI["aws-irsa"]))
        assert env["BROKER_ENGINE__MAX_KEY_AGE_SECONDS"] == "2592000"
        assert settings_env(helm.render(CI["vault-kubernetes"]))["BROKER_VAULT__TIMEOUT_SECONDS"] == "3.5"

    @pytest.mark.parametrize("values", VALUE_SETS, ids=ids(VALUE_SETS))
    def test_no_secret_setting_in_any_configmap(self, helm: Helm, values: Path) -> None:
        """ConfigMaps hold no secret setting; secrets arrive only as *_FILE paths to mounted Secrets."""
        secret_names = {
            f"BROKER_{group.upper()}__{field.upper()}"
            for group, group_field in Settings.model_fields.items()
            for field in secret_fields(group_field.annotation)  # type: ignore[arg-type]
            if not field.endswith("_file")
        }
        for doc in helm.render(values):
            if doc["kind"] == "ConfigMap":
                assert not set(doc.get("data") or {}) & secret_names, doc["metadata"]["name"]

    def test_secret_files_point_at_mounted_secrets(self, helm: Helm) -> None:
        """Each *_FILE variable names a file inside a read-only mount of the referenced Secret."""
        docs = helm.render(CI["aws-irsa"])
        env = settings_env(docs)
        assert env["BROKER_OEM__CLIENT_SECRET_FILE"] == mount_path(docs, "oem-client-secret") + "/client-secret"
        assert env["BROKER_AUDIT__HMAC_KEY_FILE"] == mount_path(docs, "audit-hmac-key") + "/hmac-key"
        secret = volume(docs, "oem-client-secret")["secret"]
        assert secret["secretName"] == "mspc-broker-oem"
        assert secret["items"] == [{"key": "client-secret", "path": "client-secret"}]
        for mount in broker_container(docs)["volumeMounts"]:
            if mount["name"] in {"oem-client-secret", "audit-hmac-key"}:
                assert mount["readOnly"] is True

    @pytest.mark.parametrize(
        ("values", "variable", "volume_name", "key"),
        [
            ("vault-token", "BROKER_VAULT__TOKEN_FILE", "vault-credentials", "token"),
            ("vault-approle", "BROKER_VAULT__SECRET_ID_FILE", "vault-credentials", "secret-id"),
        ],
    )
    def test_vault_credentials_come_from_existing_secrets(
        self, helm: Helm, values: str, variable: str, volume_name: str, key: str
    ) -> None:
        """Vault token and AppRole secret_id are mounted from the named Secret and pointed to by *_FILE."""
        docs = helm.render(CI[values])
        assert settings_env(docs)[variable] == f"{mount_path(docs, volume_name)}/{key}"
        assert volume(docs, volume_name)["secret"]["secretName"] == "mspc-broker-vault"

    def test_vault_kubernetes_auth_gets_a_projected_token(self, helm: Helm) -> None:
        """Kubernetes auth mounts a service-account token with the Vault audience and points the broker at it."""
        docs = helm.render(CI["vault-kubernetes"])
        (source,) = volume(docs, "vault-sa-token")["projected"]["sources"]
        assert source["serviceAccountToken"] == {"audience": "vault", "expirationSeconds": 900, "path": "token"}
        env = settings_env(docs)
        assert env["BROKER_VAULT__KUBERNETES_JWT_PATH"] == mount_path(docs, "vault-sa-token") + "/token"
        assert env["BROKER_VAULT__AUTH_METHOD"] == "kubernetes"

    def test_aws_backend_mounts_no_vault_credentials(self, helm: Helm) -> None:
        """With the AWS backend nothing Vault-related is mounted or set, and IRSA is a ServiceAccount annotation."""
        docs = helm.render(CI["aws-irsa"])
        names = {v["name"] for v in deployment(docs)["spec"]["template"]["spec"]["volumes"]}
        assert not names & {"vault-credentials", "vault-sa-token"}
        env = settings_env(docs)
        assert env["BROKER_STORE__BACKEND"] == "aws"
        assert not [name for name in env if name.startswith("BROKER_VAULT__")]
        annotations = find(docs, "ServiceAccount")["metadata"]["annotations"]
        assert annotations["eks.amazonaws.com/role-arn"] == "arn:aws:iam::123456789012:role/mspc-broker"


class TestDeployment:
    """The broker Deployment: hardened, probed, spread, and rolled when its configuration changes."""

    def test_two_replicas_spread_by_hostname(self, helm: Helm) -> None:
        """Two replicas by default, preferring different nodes."""
        spec = deployment(helm.render())["spec"]
        assert spec["replicas"] == 2
        (term,) = spec["template"]["spec"]["affinity"]["podAntiAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"
        ]
        assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]

    def test_pod_and_container_security_context(self, helm: Helm) -> None:
        """Non-root 10001 with fsGroup, RuntimeDefault seccomp, read-only root, no capabilities, no escalation."""
        docs = helm.render()
        pod = deployment(docs)["spec"]["template"]["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True
        assert pod["runAsUser"] == 10001
        assert pod["fsGroup"] == 10001
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        container = broker_container(docs)["securityContext"]
        assert container["allowPrivilegeEscalation"] is False
        assert container["readOnlyRootFilesystem"] is True
        assert container["capabilities"] == {"drop": ["ALL"]}
        assert container["seccompProfile"] == {"type": "RuntimeDefault"}

    def test_probes_hit_livez_and_readyz(self, helm: Helm) -> None:
        """Startup and liveness probe /livez, readiness probes /readyz, on the named HTTP port."""
        container = broker_container(helm.render())
        assert container["startupProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]

    def test_resources_have_requests_and_limits(self, helm: Helm) -> None:
        """CPU and memory are both requested and limited."""
        resources = broker_container(helm.render())["resources"]
        assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}

    def test_runs_serve_with_settings_from_the_configmap(self, helm: Helm) -> None:
        """The container runs ``serve`` and takes its BROKER_* variables from the settings ConfigMap."""
        docs = helm.render()
        container = broker_container(docs)
        assert container["args"] == ["serve"]
        assert container["envFrom"] == [
            {"configMapRef": {"name": find(docs, "ConfigMap", "-settings")["metadata"]["name"]}}
        ]

    def test_writable_paths_are_emptydirs(self, helm: Helm) -> None:
        """/tmp and the audit directory are emptyDirs and the audit file lives in the latter."""
        docs = helm.render()
        assert mount_path(docs, "tmp") == "/tmp"
        assert "emptyDir" in volume(docs, "tmp")
        assert "emptyDir" in volume(docs, "audit")
        audit_file = Path(settings_env(docs)["BROKER_AUDIT__FILE_PATH"])
        assert str(audit_file.parent) == mount_path(docs, "audit")

    def test_audit_on_a_claim_gets_one_directory_per_pod(self, helm: Helm) -> None:
        """On a shared claim each pod writes its own hash chain under its pod name."""
        docs = helm.render(CI["locked-down"])
        assert volume(docs, "audit")["persistentVolumeClaim"] == {"claimName": "mspc-broker-audit"}
        (mount,) = [m for m in broker_container(docs)["volumeMounts"] if m["name"] == "audit"]
        assert mount["subPathExpr"] == "$(POD_NAME)"

    def test_policies_and_integrations_are_mounted_where_settings_point(self, helm: Helm) -> None:
        """BROKER_POLICY__DIR and BROKER_ENGINE__DESIRED_FILE name the mounted ConfigMaps."""
        docs = helm.render(CI["aws-irsa"])
        env = settings_env(docs)
        assert env["BROKER_POLICY__DIR"] == mount_path(docs, "policies")
        assert env["BROKER_ENGINE__DESIRED_FILE"] == mount_path(docs, "integrations") + "/desired.yaml"
        assert (
            volume(docs, "integrations")["configMap"]["name"]
            == find(docs, "ConfigMap", "-integrations")["metadata"]["name"]
        )

    def test_policy_change_changes_only_the_policies_checksum(self, helm: Helm) -> None:
        """Editing a policy file changes checksum/policies (rolling the pods) and leaves the others alone."""
        before = deployment(helm.render(CI["vault-kubernetes"]))["spec"]["template"]["metadata"]["annotations"]
        edited = {"policies.files.workloads\\.yaml": "version: 1\nrules: []\n"}
        after = deployment(helm.render(CI["vault-kubernetes"], set_values=edited))["spec"]["template"]["metadata"][
            "annotations"
        ]
        assert after["checksum/policies"] != before["checksum/policies"]
        assert after["checksum/settings"] == before["checksum/settings"]
        assert after["checksum/integrations"] == before["checksum/integrations"]

    def test_settings_change_changes_the_settings_checksum(self, helm: Helm) -> None:
        """Changing a setting changes checksum/settings."""
        before = deployment(helm.render())["spec"]["template"]["metadata"]["annotations"]
        after = deployment(helm.render(set_values={"config.log.level": "debug"}))["spec"]["template"]["metadata"][
            "annotations"
        ]
        assert after["checksum/settings"] != before["checksum/settings"]
        assert re.fullmatch(r"[0-9a-f]{64}", after["checksum/settings"])

    def test_image_digest_wins_over_tag(self, helm: Helm) -> None:
        """A digest pins the image; without one the chart's appVersion is the tag."""
        assert broker_container(helm.render())["image"] == "ghcr.io/mspcentric/mspc-broker:0.1.0"
        pinned = broker_container(helm.render(CI["locked-down"]))["image"]
        assert pinned.startswith("ghcr.io/mspcentric/mspc-broker@sha256:")


class TestRbac:
    """Leader-election Role always; the system:auth-delegator binding only for TokenReview."""

    def test_role_grants_lease_verbs_only(self, helm: Helm) -> None:
        """The Role allows get/list/watch/create/update/patch on coordination.k8s.io leases, nothing else."""
        docs = helm.render()
        (rule,) = find(docs, "Role")["rules"]
        assert rule == {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "list", "watch", "create", "update", "patch"],
        }
        binding = find(docs, "RoleBinding")
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": find(docs, "ServiceAccount")["metadata"]["name"], "namespace": NAMESPACE}
        ]

    @pytest.mark.parametrize("values", VALUE_SETS, ids=ids(VALUE_SETS))
    def test_cluster_role_binding_only_in_tokenreview_mode(self, helm: Helm, values: Path) -> None:
        """A ClusterRoleBinding to system:auth-delegator exists exactly when identity.mode is tokenreview."""
        docs = helm.render(values)
        bindings = [d for d in docs if d["kind"] == "ClusterRoleBinding"]
        tokenreview = settings_env(docs)["BROKER_IDENTITY__MODE"] == "tokenreview"
        assert len(bindings) == (1 if tokenreview else 0)
        if tokenreview:
            assert bindings[0]["roleRef"]["name"] == "system:auth-delegator"
            assert bindings[0]["subjects"][0]["namespace"] == NAMESPACE


class TestServiceMonitor:
    """The optional Prometheus Operator ServiceMonitor."""

    @pytest.mark.parametrize("values", VALUE_SETS, ids=ids(VALUE_SETS))
    def test_only_when_enabled(self, helm: Helm, values: Path) -> None:
        """A ServiceMonitor renders exactly when serviceMonitor.enabled is true."""
        enabled = (load_yaml(values) or {}).get("serviceMonitor", {}).get("enabled", False)
        assert kinds(helm.render(values)).count("ServiceMonitor") == (1 if enabled else 0)

    def test_scrapes_the_service_metrics_port(self, helm: Helm) -> None:
        """It selects the broker Service by its labels and scrapes /metrics on the Service's named port."""
        docs = helm.render(CI["servicemonitor"])
        monitor, service = find(docs, "ServiceMonitor"), find(docs, "Service")
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector.items() <= service["metadata"]["labels"].items()
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


class TestNetworkPolicy:
    """Ingress only to the HTTP port from chosen peers; egress open or listed."""

    def test_default_allows_the_port_from_anywhere_and_all_egress(self, helm: Helm) -> None:
        """By default the service port is open to every pod and egress is unrestricted."""
        policy = find(helm.render(), "NetworkPolicy")["spec"]
        assert policy["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}]}]
        assert policy["egress"] == [{}]

    def test_peers_and_egress_destinations_are_selectable(self, helm: Helm) -> None:
        """Configured peers become the ingress sources; with allowAll=false only DNS and listed CIDRs remain."""
        policy = find(helm.render(CI["locked-down"]), "NetworkPolicy")["spec"]
        (ingress,) = policy["ingress"]
        assert ingress["from"] == [
            {
                "namespaceSelector": {"matchLabels": {"mspc-broker.io/client": "true"}},
                "podSelector": {"matchLabels": {"mspc-broker.io/token": "true"}},
            }
        ]
        dns, *rest = policy["egress"]
        assert {p["port"] for p in dns["ports"]} == {53}
        assert [rule["to"][0]["ipBlock"]["cidr"] for rule in rest] == ["10.20.0.0/16", "10.96.0.1/32", "0.0.0.0/0"]
        assert rest[2]["to"][0]["ipBlock"]["except"] == ["169.254.169.254/32"]


class TestPolicyAndIntegrationFiles:
    """Policy and desired-integration files in values reach the pod intact and parse in the broker."""

    def test_shipped_policies_render_and_load_back(self, helm: Helm, tmp_path: Path) -> None:
        """The repository's policies/*.yaml, given with --set-file, load with broker.policy from the ConfigMap."""
        files = {f"policies.files.{p.name.replace('.', chr(92) + '.')}": p for p in SHIPPED_POLICIES}
        data = find(helm.render(set_files=files), "ConfigMap", "-policies")["data"]
        assert sorted(data) == [p.name for p in SHIPPED_POLICIES]
        for name, text in data.items():
            (tmp_path / name).write_text(text, encoding="utf-8")
        assert load_policy_dir(tmp_path).rules

    def test_values_set_policies_load_in_the_broker(self, helm: Helm, tmp_path: Path) -> None:
        """The inline policy of the Vault values set is a valid policy file."""
        data = find(helm.render(CI["vault-kubernetes"]), "ConfigMap", "-policies")["data"]
        for name, text in data.items():
            (tmp_path / name).write_text(text, encoding="utf-8")
        assert load_policy_dir(tmp_path).rules

    def test_desired_integrations_parse_in_the_broker(self, helm: Helm) -> None:
        """The desired-integrations file of the AWS values set parses with the engine's own parser."""
        text = find(helm.render(CI["aws-irsa"]), "ConfigMap", "-integrations")["data"]["desired.yaml"]
        desired = parse_desired(text)
        assert [d.ref for d in desired] == [
            IntegrationRef("org-1", "acme-crm"),
            IntegrationRef("eu-org-7", "acme-billing"),
        ]


class TestExampleWorkloads:
    """helm/examples: workloads that fetch MSPC_TOKENs with a projected service-account token."""

    @pytest.mark.parametrize("example", EXAMPLES, ids=ids(EXAMPLES))
    def test_examples_validate(self, validation: dict[str, list[str]], example: Path) -> None:
        """Every example manifest passes kubernetes-validate --strict for 1.32."""
        assert validation[example.name] == []

    def test_there_are_init_and_sidecar_examples(self) -> None:
        """Both variants exist: a one-shot init container and a --watch sidecar."""
        assert {p.name for p in EXAMPLES} >= {"workload-init.yaml", "workload-sidecar.yaml"}

    @pytest.mark.parametrize("example", EXAMPLES, ids=ids(EXAMPLES))
    def test_projected_token_has_the_broker_audience(self, helm: Helm, example: Path) -> None:
        """The pod's projected token is for the broker's audience, short-lived, at the CLI's default path."""
        pod = find(list(load_yaml_all(example)), "Deployment")["spec"]["template"]["spec"]
        audience = settings_env(helm.render())["BROKER_IDENTITY__AUDIENCE"]
        (projected,) = [v["projected"] for v in pod["volumes"] if "projected" in v]
        (source,) = projected["sources"]
        assert source["serviceAccountToken"]["audience"] == audience
        assert 600 <= source["serviceAccountToken"]["expirationSeconds"] <= 3600
        assert pod["automountServiceAccountToken"] is False
        token_mounts = {
            m["mountPath"] + "/" + source["serviceAccountToken"]["path"]
            for c in pod["initContainers"] + pod["containers"]
            for m in c.get("volumeMounts", [])
            if any(v["name"] == m["name"] and "projected" in v for v in pod["volumes"])
        }
        assert token_mounts == {"/var/run/secrets/mspc-broker/token"}

    @pytest.mark.parametrize("example", EXAMPLES, ids=ids(EXAMPLES))
    def test_init_container_writes_the_token_into_a_shared_emptydir(self, example: Path) -> None:
        """An init container runs ``broker token --org --vendor --out`` into an in-memory emptyDir the app reads."""
        pod = find(list(load_yaml_all(example)), "Deployment")["spec"]["template"]["spec"]
        (init,) = pod["initContainers"]
        assert init["args"][0] == "token"
        assert {a.split("=")[0] for a in init["args"][1:]} >= {"--org", "--vendor", "--out"}
        out = next(a.split("=", 1)[1] for a in init["args"] if a.startswith("--out="))
        shared = {v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
        app = next(c for c in pod["containers"] if c["name"] == "app")
        (app_mount,) = [m for m in app["volumeMounts"] if m["name"] in shared]
        assert app_mount["readOnly"] is True
        assert out.startswith(app_mount["mountPath"] + "/")
        assert {"name": "MSPC_TOKEN_FILE", "value": out} in app["env"]

    def test_sidecar_variant_refreshes_with_watch(self) -> None:
        """The sidecar example keeps a ``broker token --watch`` container running beside the app."""
        pod = find(list(load_yaml_all(REPO / "helm/examples/workload-sidecar.yaml")), "Deployment")["spec"]["template"]
        (sidecar,) = [c for c in pod["spec"]["containers"] if "--watch" in c.get("args", [])]
        assert sidecar["args"][0] == "token"

    @pytest.mark.parametrize("example", EXAMPLES, ids=ids(EXAMPLES))
    def test_broker_url_is_the_chart_service(self, helm: Helm, example: Path) -> None:
        """BROKER_URL points at the chart's Service for release mspc-broker in namespace mspc-broker."""
        service = find(helm.render(), "Service")
        want = f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{service['spec']['ports'][0]['port']}"
        assert service["metadata"]["name"] == RELEASE
        pod = find(list(load_yaml_all(example)), "Deployment")["spec"]["template"]["spec"]
        for container in pod["initContainers"] + pod["containers"]:
            if container.get("args", [None])[0] == "token":
                assert {"name": "BROKER_URL", "value": want} in container["env"]

    @pytest.mark.parametrize("example", EXAMPLES, ids=ids(EXAMPLES))
    def test_shipped_policies_allow_the_example(self, example: Path) -> None:
        """The repository's policies allow each example's service account to fetch its pair's token."""
        docs = list(load_yaml_all(example))
        deploy = find(docs, "Deployment")
        pod = deploy["spec"]["template"]["spec"]
        args = dict(a.split("=", 1) for a in pod["initContainers"][0]["args"][1:])
        principal = Principal(namespace=deploy["metadata"]["namespace"], service_account=pod["serviceAccountName"])
        engine = PolicyEngine.from_policy_set(load_policy_dir(REPO / "policies"))
        decision = engine.decide(principal, "token:issue", IntegrationRef(args["--org"], args["--vendor"]))
        assert decision.allowed, decision
