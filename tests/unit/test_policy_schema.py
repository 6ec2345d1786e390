"""Policy files: strict schema; every error names the file, the rule and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.errors import PolicyInvalid
from broker.policy import load_policy_dir

GOOD_RULE = """\
  - id: {id}
    effect: allow
    subjects: [{{namespace: billing, service_account: invoicer}}]
    actions: [token:issue]
"""


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def _error(directory: Path) -> str:
    with pytest.raises(PolicyInvalid) as info:
        load_policy_dir(directory)
    assert info.value.code == "POLICY_INVALID"
    return info.value.message


class TestPolicySchema:
    def test_valid_files_load_in_name_order(self, tmp_path: Path) -> None:
        """Every *.yaml / *.yml file is read in name order; other and hidden files are ignored."""
        _write(tmp_path, "b.yml", "version: 1\nrules:\n" + GOOD_RULE.format(id="second"))
        _write(tmp_path, "a.yaml", "version: 1\nrules:\n" + GOOD_RULE.format(id="first"))
        _write(tmp_path, "README.md", "not yaml: [")
        _write(tmp_path, ".hidden.yaml", "not yaml: [")
        policy_set = load_policy_dir(tmp_path)
        assert [rule.id for _, rule in policy_set.rules()] == ["first", "second"]

    @pytest.mark.parametrize(
        ("rule_text", "problem"),
        [
            ("    colour: red\n", "colour: Extra inputs are not permitted"),
            ("    max_ttl_seconds: 0\n", "max_ttl_seconds: Input should be greater than 0"),
            ("    max_ttl_seconds: '60'\n", "max_ttl_seconds: Input should be a valid integer"),
        ],
    )
    def test_bad_rule_fields(self, tmp_path: Path, rule_text: str, problem: str) -> None:
        """Unknown keys and badly typed values name the file, the rule id and index, and the field."""
        _write(
            tmp_path,
            "w.yaml",
            "version: 1\nrules:\n" + GOOD_RULE.format(id="ok") + GOOD_RULE.format(id="bad") + rule_text,
        )
        message = _error(tmp_path)
        assert message.startswith(f"{tmp_path / 'w.yaml'}: rule 'bad' (rules[1]): ")
        assert problem in message

    @pytest.mark.parametrize(
        ("field", "value", "problem"),
        [
            ("subjects", "[{namespace: 'bil[ling'}]", "subjects[0].namespace: invalid namespace glob 'bil[ling'"),
            ("subjects", "[{namespace: Billing}]", "invalid namespace glob 'Billing'"),
            ("subjects", "[{namespace: 'a b'}]", "invalid namespace glob"),
            ("subjects", "[{service_account: x}]", "subjects[0].namespace: Field required"),
            ("subjects", "[]", "subjects: List should have at least 1 item"),
            ("integrations", "[{vendor: 'acme/*'}]", "integrations[0].vendor: invalid vendor glob"),
            ("actions", "[token:isue]", "actions[0]: unknown action 'token:isue'"),
            ("actions", "['secrets:*']", "unknown action 'secrets:*'"),
            ("effect", "maybe", "effect: Input should be 'allow' or 'deny'"),
            ("id", "Has Spaces", "id: String should match pattern"),
        ],
    )
    def test_bad_values(self, tmp_path: Path, field: str, value: str, problem: str) -> None:
        """Bad globs, unknown actions and malformed fields are refused with the problem spelled out."""
        rule = {
            "id": "r1",
            "effect": "allow",
            "subjects": "[{namespace: billing}]",
            "actions": "[token:issue]",
        }
        rule[field] = value
        text = "version: 1\nrules:\n  - " + "\n    ".join(f"{k}: {v}" for k, v in rule.items()) + "\n"
        _write(tmp_path, "p.yaml", text)
        message = _error(tmp_path)
        assert "p.yaml: " in message and ("rule 'r1' (rules[0])" in message or "rules[0]" in message)
        assert problem in message

    def test_duplicate_ids_across_files(self, tmp_path: Path) -> None:
        """A rule id used in two files is refused, naming both files."""
        _write(tmp_path, "a.yaml", "version: 1\nrules:\n" + GOOD_RULE.format(id="same"))
        _write(tmp_path, "b.yaml", "version: 1\nrules:\n" + GOOD_RULE.format(id="other") + GOOD_RULE.format(id="same"))
        message = _error(tmp_path)
        assert message == f"{tmp_path / 'b.yaml'}: rule 'same' (rules[1]): duplicate id, also in {tmp_path / 'a.yaml'}"

    def test_duplicate_ids_in_one_file(self, tmp_path: Path) -> None:
        """A rule id used twice in one file is refused too."""
        _write(tmp_path, "a.yaml", "version: 1\nrules:\n" + GOOD_RULE.format(id="same") * 2)
        assert "rule 'same' (rules[1]): duplicate id" in _error(tmp_path)

    def test_duplicate_yaml_keys(self, tmp_path: Path) -> None:
        """A key repeated in one mapping (which YAML would silently collapse) is an error with its line."""
        _write(tmp_path, "a.yaml", "version: 1\nrules:\n" + GOOD_RULE.format(id="r") + "    effect: deny\n")
        assert _error(tmp_path) == f"{tmp_path / 'a.yaml'}: line 7: YAML error: duplicate key 'effect'"

    def test_yaml_syntax_error(self, tmp_path: Path) -> None:
        """Unparseable YAML names the file and line."""
        _write(tmp_path, "a.yaml", "version: 1\nrules: [\n")
        assert _error(tmp_path).startswith(f"{tmp_path / 'a.yaml'}: line 3: YAML error")

    @pytest.mark.parametrize(
        ("text", "problem"),
        [
            ("rules: []\n", "a.yaml: version: Field required"),
            ("version: 2\nrules: []\n", "version: Input should be 1"),
            ("- a\n", "top level must be a mapping"),
            ("", "top level must be a mapping"),
        ],
    )
    def test_file_level_problems(self, tmp_path: Path, text: str, problem: str) -> None:
        """A file without version 1 or not a mapping is refused."""
        _write(tmp_path, "a.yaml", text)
        assert problem in _error(tmp_path)

    def test_ttl_cap_only_on_allow(self, tmp_path: Path) -> None:
        """max_ttl_seconds on a deny rule is refused (it could never apply)."""
        _write(
            tmp_path,
            "a.yaml",
            "version: 1\nrules:\n  - id: d\n    effect: deny\n    subjects: [{namespace: x}]\n"
            "    actions: ['*']\n    max_ttl_seconds: 60\n",
        )
        assert "rule 'd' (rules[0]): max_ttl_seconds only applies to allow rules" in _error(tmp_path)

    @pytest.mark.parametrize(
        ("example", "problem"),
        [
            ("{subject: billing, action: token:issue, expect: allow}", "must be <namespace>/<service-account>"),
            (
                "{subject: a/b, organization: o, action: token:issue, expect: allow}",
                "give both organization and vendor",
            ),
            ("{subject: a/b, action: token:issued, expect: allow}", "unknown action 'token:issued'"),
            ("{subject: a/b, action: audit:read, expect: maybe}", "expect: Input should be 'allow' or 'deny'"),
        ],
    )
    def test_bad_examples(self, tmp_path: Path, example: str, problem: str) -> None:
        """Malformed examples are refused, naming the example index."""
        _write(tmp_path, "a.yaml", f"version: 1\nexamples:\n  - {example}\n")
        message = _error(tmp_path)
        assert "examples[0]" in message and problem in message

    def test_missing_directory(self, tmp_path: Path) -> None:
        """A policy directory that does not exist is an error naming it."""
        assert _error(tmp_path / "nope") == f"{tmp_path / 'nope'}: policy directory does not exist"
