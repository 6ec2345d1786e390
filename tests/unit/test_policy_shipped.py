"""The policies shipped in policies/, their examples, and the `broker policy` commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.cli import cli
from broker.models import IntegrationRef, Principal
from broker.policy import PolicyEngine, load_policy_dir, run_examples

DOCUMENTED_IDS = {
    "workloads-billing",
    "workloads-reporting",
    "platform-admins",
    "security-auditors",
    "deny-acme-legacy",
    "deny-sandbox-namespaces",
}


@pytest.fixture(scope="module")
def shipped(repo_root: Path) -> Path:
    return repo_root / "policies"


class TestShippedPolicies:
    def test_every_example_passes(self, shipped: Path) -> None:
        """Every example of every shipped file holds (the same code as `broker policy test`)."""
        results = run_examples(load_policy_dir(shipped))
        assert [(r.path.name, r.index, r.problems) for r in results if not r.passed] == []
        assert {r.path.name for r in results} == {p.name for p in shipped.glob("*.yaml")}

    def test_documented_rule_ids_exist(self, shipped: Path) -> None:
        """The rule ids the README promises are exactly the shipped ones."""
        ids = {rule.id for _, rule in load_policy_dir(shipped).rules()}
        assert ids == DOCUMENTED_IDS
        readme = (shipped / "README.md").read_text()
        assert all(f"`{rule_id}`" in readme for rule_id in ids)

    def test_each_user_group_is_covered(self, shipped: Path) -> None:
        """Workloads issue tokens, admins manage integrations, auditors read the trail; nobody else anything."""
        engine = PolicyEngine.from_policy_set(load_policy_dir(shipped))
        pair = IntegrationRef("org-1", "acme-crm")
        invoicer = Principal("billing", "invoicer")
        assert engine.decide(invoicer, "token:issue", pair).ttl_cap_seconds == 900
        assert engine.decide(Principal("platform", "broker-admin"), "integration:provision", pair).allowed
        assert engine.decide(Principal("security", "auditor"), "audit:read").allowed
        assert not engine.decide(Principal("default", "default"), "token:issue", pair).allowed


class TestPolicyTestCommand:
    def test_shipped_policies_pass(self, shipped: Path) -> None:
        """`broker policy test DIR` prints a table and exits 0 when every example holds."""
        result = CliRunner().invoke(cli, ["policy", "test", str(shipped)])
        assert result.exit_code == 0, result.output
        assert "policy examples" in result.output and "workloads-billing" in result.output
        assert " 0 failed" in result.output

    def test_directory_from_settings(self, shipped: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without DIR the directory comes from BROKER_POLICY__DIR."""
        monkeypatch.setenv("BROKER_POLICY__DIR", str(shipped))
        assert CliRunner().invoke(cli, ["policy", "test"]).exit_code == 0

    def test_failing_example_exits_1(self, shipped: Path, tmp_path: Path) -> None:
        """A wrong expectation is reported as FAIL with the problem, and the exit code is 1."""
        for path in shipped.glob("*.yaml"):
            shutil.copy(path, tmp_path)
        (tmp_path / "zz.yaml").write_text(
            "version: 1\nexamples:\n"
            "  - {subject: billing/invoicer, organization: o, vendor: acme-legacy,\n"
            "     action: token:issue, expect: allow}\n"
        )
        result = CliRunner().invoke(cli, ["policy", "test", str(tmp_path)])
        assert result.exit_code == 1
        assert "FAIL" in result.output and "expected allow, got deny" in result.output
        assert "1 failed" in result.output

    def test_invalid_policy_is_one_error_line(self, tmp_path: Path) -> None:
        """A broken file gives 'error POLICY_INVALID: <file>: ...' and exit 1, no traceback."""
        (tmp_path / "bad.yaml").write_text("version: 1\nrules:\n  - id: x\n")
        result = CliRunner().invoke(cli, ["policy", "test", str(tmp_path)])
        assert result.exit_code == 1
        assert result.output.startswith(f"error POLICY_INVALID: {tmp_path / 'bad.yaml'}: rule 'x' (rules[0])")
        assert "Traceback" not in result.output


class TestPolicyCheckCommand:
    def _check(self, shipped: Path, *args: str) -> tuple[int, str]:
        result = CliRunner().invoke(cli, ["policy", "check", "--dir", str(shipped), *args])
        return result.exit_code, result.output

    def test_allowed_as_json(self, shipped: Path) -> None:
        """--json prints the decision, the deciding rule and its file; exit 0 when allowed."""
        code, output = self._check(
            shipped,
            "--subject",
            "billing/invoicer",
            "--org",
            "o1",
            "--vendor",
            "acme-crm",
            "--action",
            "token:issue",
            "--json",
        )
        assert code == 0
        assert json.loads(output) == {
            "allowed": True,
            "rule_id": "workloads-billing",
            "rule_file": str(shipped / "workloads.yaml"),
            "reason": "rule workloads-billing allows token:issue",
            "ttl_cap_seconds": 900,
        }

    def test_denied_by_rule(self, shipped: Path) -> None:
        """A denied request prints DENY and the rule that denied it; exit 1."""
        code, output = self._check(
            shipped,
            "--subject",
            "billing/invoicer",
            "--org",
            "o1",
            "--vendor",
            "acme-legacy",
            "--action",
            "token:issue",
        )
        assert code == 1
        assert "DENY" in output and "denied by rule deny-acme-legacy" in output and "deny.yaml" in output

    def test_nothing_matched(self, shipped: Path) -> None:
        """A request no rule matches says so."""
        code, output = self._check(shipped, "--subject", "default/default", "--action", "audit:read")
        assert code == 1 and "no rule matched (default deny)" in output

    def test_bad_input(self, shipped: Path) -> None:
        """A malformed subject or unknown action is one INVALID_INPUT line."""
        code, output = self._check(shipped, "--subject", "billing", "--action", "token:isue")
        assert code == 1
        assert output.startswith("error INVALID_INPUT: subject 'billing' must be <namespace>/<service-account>")
        assert "unknown action 'token:isue'" in output
