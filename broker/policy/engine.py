"""``PolicyEngine.decide``: deny by default, explicit deny wins, smallest TTL cap.

The decision for (principal, action, integration):

1. a matching ``deny`` rule decides: denied, ``rule_id`` = the first such
   rule in file order;
2. otherwise the matching ``allow`` rules decide: allowed; the TTL cap is the
   smallest ``max_ttl_seconds`` among them (a rule without a cap imposes
   none) and ``rule_id`` is the rule that set it (ties and no caps: the first
   in file order);
3. otherwise denied with ``rule_id`` None: "no rule matched (default deny)".

A rule matches when one of its subjects matches the principal's namespace
and service account, the action is one of its actions, and one of its
integrations matches the (organization, vendor) pair. For an action without
an integration (``ref`` None) an allow rule must be unscoped (no
``integrations`` or an ``*``/``*`` entry), while a deny rule applies
whatever its integration scope: unscoped questions are answered fail-closed,
and list endpoints should decide per item.

Globs are compiled once at construction; ``decide`` only looks up the rules
of the action and calls precompiled matchers, and remembers its answers: a
decision depends on nothing but the rules (fixed for an engine: a reload
builds a new one) and the five names it is asked about.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import translate
from pathlib import Path

from broker.models import Decision, IntegrationRef, Principal
from broker.policy.loader import PolicySet
from broker.policy.schema import Rule

Matcher = Callable[[str], bool]
_GLOB_META = frozenset("*?[")


def _always(_value: str) -> bool:
    return True


def compile_glob(pattern: str) -> Matcher:
    """A predicate for one glob: ``*`` is constant, a literal is ``==``, else a compiled regex."""
    if pattern == "*":
        return _always
    if not _GLOB_META & set(pattern):
        return pattern.__eq__
    regex = re.compile(translate(pattern))
    return lambda value: regex.match(value) is not None


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule with its globs compiled."""

    id: str
    allow: bool
    source: Path | None
    subjects: tuple[tuple[Matcher, Matcher], ...]
    integrations: tuple[tuple[Matcher, Matcher], ...] | None
    actions: frozenset[str]
    max_ttl_seconds: int | None

    @classmethod
    def build(cls, rule: Rule, source: Path | None = None) -> CompiledRule:
        return cls(
            id=rule.id,
            allow=rule.effect == "allow",
            source=source,
            subjects=tuple((compile_glob(s.namespace), compile_glob(s.service_account)) for s in rule.subjects),
            integrations=None
            if rule.unscoped
            else tuple((compile_glob(i.organization), compile_glob(i.vendor)) for i in rule.integrations or ()),
            actions=rule.expanded_actions,
            max_ttl_seconds=rule.max_ttl_seconds,
        )

    def matches(self, principal: Principal, ref: IntegrationRef | None) -> bool:
        """Subject and integration match (the action was matched by the index)."""
        if not any(ns(principal.namespace) and sa(principal.service_account) for ns, sa in self.subjects):
            return False
        if self.integrations is None:
            return True
        if ref is None:
            return not self.allow
        return any(org(ref.organization_id) and ven(ref.vendor_id) for org, ven in self.integrations)


_NO_CAP = float("inf")
_MEMO_SIZE = 4096  # decisions remembered per engine; forgotten all at once when full


class PolicyEngine:
    """Decides (principal, action, integration) against a fixed list of rules."""

    def __init__(self, rules: Iterable[CompiledRule]) -> None:
        self.rules = tuple(rules)
        denies: dict[str, list[CompiledRule]] = {}
        allows: dict[str, list[CompiledRule]] = {}
        for rule in self.rules:
            for action in rule.actions:
                (allows if rule.allow else denies).setdefault(action, []).append(rule)
        self._denies = {a: tuple(r) for a, r in denies.items()}
        self._allows = {a: tuple(r) for a, r in allows.items()}
        self._memo: dict[tuple[str, str, str, str | None, str | None], Decision] = {}

    @classmethod
    def from_policy_set(cls, policy_set: PolicySet) -> PolicyEngine:
        """An engine over every rule of a loaded policy set, in file order."""
        return cls(CompiledRule.build(rule, path) for path, rule in policy_set.rules())

    @classmethod
    def from_rules(cls, rules: Iterable[Rule]) -> PolicyEngine:
        """An engine over schema rules (tests and tools)."""
        return cls(CompiledRule.build(rule) for rule in rules)

    def decide(self, principal: Principal, action: str, ref: IntegrationRef | None = None) -> Decision:
        """Allow or deny, with the deciding rule and a reason (see the module docstring)."""
        key = (
            principal.namespace,
            principal.service_account,
            action,
            ref.organization_id if ref is not None else None,
            ref.vendor_id if ref is not None else None,
        )
        decision = self._memo.get(key)
        if decision is None:
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            decision = self._memo[key] = self._decide(principal, action, ref)
        return decision

    def _decide(self, principal: Principal, action: str, ref: IntegrationRef | None) -> Decision:
        for rule in self._denies.get(action, ()):
            if rule.matches(principal, ref):
                return Decision(False, rule.id, f"denied by rule {rule.id}")
        best: CompiledRule | None = None
        best_cap = _NO_CAP
        for rule in self._allows.get(action, ()):
            if rule.matches(principal, ref):
                cap = _NO_CAP if rule.max_ttl_seconds is None else rule.max_ttl_seconds
                if best is None or cap < best_cap:
                    best, best_cap = rule, cap
        if best is None:
            return Decision(False, None, "no rule matched (default deny)")
        return Decision(True, best.id, f"rule {best.id} allows {action}", best.max_ttl_seconds)


__all__ = ["CompiledRule", "PolicyEngine", "compile_glob"]
