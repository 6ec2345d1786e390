"""PolicyEngine.decide: deny by default, explicit deny wins, globs, smallest TTL cap."""

from __future__ import annotations

import fnmatch
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.models import IntegrationRef, Principal
from broker.policy import PolicyEngine, Rule
from broker.policy.engine import compile_glob


def _engine(*rules: dict[str, Any]) -> PolicyEngine:
    return PolicyEngine.from_rules(Rule.model_validate(r) for r in rules)


def _who(subject: str) -> Principal:
    namespace, name = subject.split("/")
    return Principal(namespace=namespace, service_account=name)


def _pair(pair: str) -> IntegrationRef:
    org, vendor = pair.split("/")
    return IntegrationRef(org, vendor)


BILLING = {
    "id": "billing",
    "effect": "allow",
    "subjects": [{"namespace": "billing", "service_account": "invoicer"}],
    "integrations": [{"vendor": "acme-*"}],
    "actions": ["token:issue"],
    "max_ttl_seconds": 900,
}
TEAM_WIDE = {
    "id": "team-wide",
    "effect": "allow",
    "subjects": [{"namespace": "bill*"}],
    "actions": ["token:issue"],
    "max_ttl_seconds": 300,
}
UNCAPPED = {
    "id": "uncapped",
    "effect": "allow",
    "subjects": [{"namespace": "billing"}],
    "actions": ["token:issue", "integration:read"],
}
DENY_LEGACY = {
    "id": "deny-legacy",
    "effect": "deny",
    "subjects": [{"namespace": "*"}],
    "integrations": [{"vendor": "acme-legacy"}],
    "actions": ["token:issue"],
}
ADMINS = {
    "id": "admins",
    "effect": "allow",
    "subjects": [{"namespace": "platform", "service_account": "broker-admin"}],
    "actions": ["integration:*"],
}
AUDITORS = {
    "id": "auditors",
    "effect": "allow",
    "subjects": [{"namespace": "security", "service_account": "audit[0-9]"}],
    "integrations": [{"organization": "org-?"}],
    "actions": ["audit:read", "integration:read"],
}


class TestPolicyEngine:
    @pytest.mark.parametrize(
        ("subject", "action", "pair", "allowed", "rule_id", "reason"),
        [
            ("billing/invoicer", "token:issue", "org-1/acme-crm", True, "billing", "rule billing allows token:issue"),
            ("billing/invoicer", "token:issue", "org-1/globex", False, None, "no rule matched (default deny)"),
            ("billing/payments", "token:issue", "org-1/acme-crm", False, None, "no rule matched (default deny)"),
            ("billing/invoicer", "integration:read", "org-1/acme-crm", False, None, "no rule matched (default deny)"),
            (
                "billing/invoicer",
                "token:issue",
                "org-1/acme-legacy",
                False,
                "deny-legacy",
                "denied by rule deny-legacy",
            ),
            (
                "platform/broker-admin",
                "integration:revoke",
                "o/v",
                True,
                "admins",
                "rule admins allows integration:revoke",
            ),
            ("platform/broker-admin", "token:issue", "o/v", False, None, "no rule matched (default deny)"),
            ("platform/broker-admin", "audit:read", None, False, None, "no rule matched (default deny)"),
            (
                "security/audit7",
                "integration:read",
                "org-9/v",
                True,
                "auditors",
                "rule auditors allows integration:read",
            ),
            ("security/audit7", "integration:read", "org-10/v", False, None, "no rule matched (default deny)"),
            ("security/auditx", "integration:read", "org-9/v", False, None, "no rule matched (default deny)"),
        ],
    )
    def test_decision_table(
        self, subject: str, action: str, pair: str | None, allowed: bool, rule_id: str | None, reason: str
    ) -> None:
        """Each request gets the decision, deciding rule and reason of the table."""
        engine = _engine(BILLING, DENY_LEGACY, ADMINS, AUDITORS)
        decision = engine.decide(_who(subject), action, _pair(pair) if pair else None)
        assert (decision.allowed, decision.rule_id, decision.reason) == (allowed, rule_id, reason)

    def test_empty_policy_denies_everything(self) -> None:
        """With no rules every action is denied by default."""
        decision = PolicyEngine([]).decide(_who("billing/invoicer"), "token:issue", _pair("o/v"))
        assert (decision.allowed, decision.rule_id) == (False, None)

    def test_explicit_deny_wins_over_allow(self) -> None:
        """A matching deny overrides any number of matching allows, whatever the file order."""
        for order in [(BILLING, UNCAPPED, DENY_LEGACY), (DENY_LEGACY, UNCAPPED, BILLING)]:
            decision = _engine(*order).decide(_who("billing/invoicer"), "token:issue", _pair("o/acme-legacy"))
            assert (decision.allowed, decision.rule_id) == (False, "deny-legacy")

    def test_smallest_ttl_cap_wins(self) -> None:
        """With several matching allows the smallest cap applies and its rule is reported."""
        decision = _engine(BILLING, UNCAPPED, TEAM_WIDE).decide(
            _who("billing/invoicer"), "token:issue", _pair("o/acme-crm")
        )
        assert (decision.allowed, decision.rule_id, decision.ttl_cap_seconds) == (True, "team-wide", 300)

    def test_uncapped_allow_does_not_lift_a_cap(self) -> None:
        """An allow without a cap next to a capped allow leaves the cap in force."""
        decision = _engine(UNCAPPED, BILLING).decide(_who("billing/invoicer"), "token:issue", _pair("o/acme-crm"))
        assert (decision.rule_id, decision.ttl_cap_seconds) == ("billing", 900)

    def test_only_uncapped_allows_give_no_cap(self) -> None:
        """When no matching allow sets a cap the decision has none and names the first rule."""
        decision = _engine(UNCAPPED).decide(_who("billing/invoicer"), "token:issue", _pair("o/v"))
        assert (decision.allowed, decision.rule_id, decision.ttl_cap_seconds) == (True, "uncapped", None)

    def test_unscoped_questions_fail_closed(self) -> None:
        """Without an integration, scoped allows do not apply but scoped denies do."""
        engine = _engine(AUDITORS, UNCAPPED, DENY_LEGACY)
        assert not engine.decide(_who("security/audit1"), "integration:read").allowed
        assert engine.decide(_who("billing/x"), "integration:read").rule_id == "uncapped"
        assert engine.decide(_who("billing/x"), "token:issue").rule_id == "deny-legacy"

    def test_unknown_action_is_denied(self) -> None:
        """An action no rule can name is denied by default."""
        engine = _engine(ADMINS)
        assert not engine.decide(_who("platform/broker-admin"), "integration:delete", _pair("o/v")).allowed

    def test_several_subjects_and_integrations(self) -> None:
        """A rule matches if any of its subjects and any of its integrations match."""
        engine = _engine(
            {
                "id": "multi",
                "effect": "allow",
                "subjects": [{"namespace": "a"}, {"namespace": "b", "service_account": "x"}],
                "integrations": [{"organization": "o1"}, {"vendor": "v2"}],
                "actions": ["token:issue"],
            }
        )
        assert engine.decide(_who("a/any"), "token:issue", _pair("o1/v9")).allowed
        assert engine.decide(_who("b/x"), "token:issue", _pair("o9/v2")).allowed
        assert not engine.decide(_who("b/y"), "token:issue", _pair("o1/v2")).allowed
        assert not engine.decide(_who("a/any"), "token:issue", _pair("o9/v9")).allowed


class TestGlobs:
    @given(
        pattern=st.from_regex(r"[a-c*?]{1,6}|[a-c]{0,2}\[!?[a-c]{1,2}\][a-c*]{0,2}", fullmatch=True),
        value=st.from_regex(r"[a-c]{0,6}", fullmatch=True),
    )
    def test_compiled_glob_agrees_with_fnmatch(self, pattern: str, value: str) -> None:
        """Precompiled matchers decide exactly as fnmatch.fnmatchcase."""
        assert compile_glob(pattern)(value) == fnmatch.fnmatchcase(value, pattern)

    def test_globs_are_case_sensitive_and_whole_value(self) -> None:
        """'acme-*' matches acme-crm but not ACME-crm nor x-acme-crm."""
        match = compile_glob("acme-*")
        assert match("acme-crm") and not match("ACME-crm") and not match("x-acme-crm")


class TestRememberedDecisions:
    """``decide`` remembers its answers per engine; they are the answers it would compute afresh."""

    SUBJECTS = ("billing/invoicer", "billing/other", "ops/admin", "team-x/y")
    ACTIONS = ("token:issue", "integration:read", "integration:rotate")
    PAIRS = (None, "o/acme-crm", "o/acme-legacy", "p/beta")

    def _questions(self) -> list[tuple[Principal, str, IntegrationRef | None]]:
        return [(_who(s), a, _pair(p) if p else None) for s in self.SUBJECTS for a in self.ACTIONS for p in self.PAIRS]

    def test_repeated_questions_get_the_computed_answer(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Asked three times over (the memo full and cleared in between), every answer equals a fresh engine's."""
        rules = (BILLING, TEAM_WIDE, UNCAPPED, DENY_LEGACY, ADMINS)
        monkeypatch.setattr("broker.policy.engine._MEMO_SIZE", 7)  # forces clears mid-way
        engine = _engine(*rules)
        questions = self._questions()
        for _ in range(3):
            for principal, action, ref in questions:
                assert engine.decide(principal, action, ref) == _engine(*rules).decide(principal, action, ref)
        assert len(engine._memo) <= 7

    def test_a_new_engine_does_not_inherit_answers(self) -> None:
        """A reload builds a new engine: the old one's remembered allow does not survive a rule change."""
        before = _engine(UNCAPPED)
        assert before.decide(_who("billing/x"), "token:issue", _pair("o/acme-legacy")).allowed
        after = _engine(UNCAPPED, DENY_LEGACY)
        assert not after.decide(_who("billing/x"), "token:issue", _pair("o/acme-legacy")).allowed
