"""Run the ``examples`` of policy files against the whole set, and print results.

This is the code behind ``broker policy test`` and ``broker policy check``;
the test suite runs the shipped policies through the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from broker.errors import InvalidInput
from broker.models import Decision, IntegrationRef, Principal
from broker.policy.engine import PolicyEngine
from broker.policy.loader import PolicySet
from broker.policy.schema import Example


@dataclass(frozen=True, slots=True)
class ExampleResult:
    """One example and how the engine decided it."""

    path: Path
    index: int
    example: Example
    decision: Decision
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.problems


def check_example(engine: PolicyEngine, example: Example) -> tuple[Decision, tuple[str, ...]]:
    """Decide one example; the problems list says how the decision differs from the expectation."""
    principal = Principal(namespace=example.namespace, service_account=example.service_account)
    ref = None
    if example.organization is not None and example.vendor is not None:
        ref = IntegrationRef(example.organization, example.vendor)
    decision = engine.decide(principal, example.action, ref)
    problems = []
    if decision.allowed != (example.expect == "allow"):
        problems.append(f"expected {example.expect}, got {'allow' if decision.allowed else 'deny'}")
    if "rule" in example.model_fields_set and decision.rule_id != example.rule:
        problems.append(f"expected rule {example.rule}, decided by {decision.rule_id}")
    if "max_ttl_seconds" in example.model_fields_set and decision.ttl_cap_seconds != example.max_ttl_seconds:
        problems.append(f"expected TTL cap {example.max_ttl_seconds}, got {decision.ttl_cap_seconds}")
    return decision, tuple(problems)


def run_examples(policy_set: PolicySet, engine: PolicyEngine | None = None) -> list[ExampleResult]:
    """Check every example of every file against the whole policy set."""
    engine = engine or PolicyEngine.from_policy_set(policy_set)
    results = []
    for path, index, example in policy_set.examples():
        decision, problems = check_example(engine, example)
        results.append(ExampleResult(path, index, example, decision, problems))
    return results


def make_console() -> Console:
    """A console for CLI output: the terminal's width, or wide enough for whole rows when piped."""
    console = Console()
    if not console.is_terminal:
        console.width = 200
    return console


def render_results(results: list[ExampleResult], console: Console) -> None:
    """A table of every example and its outcome, then a one-line summary."""
    table = Table(title="policy examples", show_lines=False)
    for column in ("", "file", "#", "subject", "integration", "action", "expect", "decided by", "problem"):
        table.add_column(column)
    for r in results:
        ex = r.example
        table.add_row(
            "[green]PASS[/]" if r.passed else "[red]FAIL[/]",
            r.path.name,
            str(r.index),
            ex.subject,
            f"{ex.organization}/{ex.vendor}" if ex.organization else "-",
            ex.action,
            ex.expect,
            r.decision.rule_id or "(default deny)",
            "; ".join(r.problems),
        )
    console.print(table)
    failed = sum(1 for r in results if not r.passed)
    console.print(f"{len(results) - failed} passed, {failed} failed")


def decision_dict(decision: Decision, rule_source: Path | None) -> dict[str, object]:
    """A decision as JSON-ready data."""
    return {
        "allowed": decision.allowed,
        "rule_id": decision.rule_id,
        "rule_file": str(rule_source) if rule_source else None,
        "reason": decision.reason,
        "ttl_cap_seconds": decision.ttl_cap_seconds,
    }


def render_decision(decision: Decision, rule_source: Path | None, console: Console) -> None:
    """Print one decision for people."""
    verdict = "[green]ALLOW[/]" if decision.allowed else "[red]DENY[/]"
    console.print(f"{verdict}  {decision.reason}")
    if decision.rule_id is not None:
        console.print(f"rule: {decision.rule_id} ({rule_source})")
    if decision.ttl_cap_seconds is not None:
        console.print(f"ttl cap: {decision.ttl_cap_seconds} s")


def explain(
    policy_set: PolicySet, *, subject: str, action: str, organization: str | None, vendor: str | None
) -> tuple[Decision, Path | None]:
    """Decide one request given as strings (``ns/sa``); returns the decision and the deciding rule's file.

    Raises ``InvalidInput`` for a malformed subject, an unknown action or
    only one of organization / vendor.
    """
    try:
        example = Example(subject=subject, action=action, organization=organization, vendor=vendor, expect="allow")
    except ValidationError as exc:
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors(include_url=False))
        raise InvalidInput(problems) from None
    engine = PolicyEngine.from_policy_set(policy_set)
    decision, _ = check_example(engine, example)
    source = next((r.source for r in engine.rules if r.id == decision.rule_id), None)
    return decision, source


__all__ = [
    "ExampleResult",
    "check_example",
    "decision_dict",
    "explain",
    "render_decision",
    "render_results",
    "run_examples",
]
