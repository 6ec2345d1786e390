"""Policies: who may get which token, and why.

- ``schema``: the strict file format (``policies/README.md`` for people);
- ``loader``: a directory of YAML files -> a validated ``PolicySet``;
- ``engine``: ``PolicyEngine.decide(principal, action, ref) -> Decision``;
- ``store``: ``PolicyStore``, the set in force, hot-reloaded;
- ``examples``: the files' ``examples`` run as tests (``broker policy test``).
"""

from __future__ import annotations

from broker.policy.engine import CompiledRule, PolicyEngine
from broker.policy.examples import ExampleResult, check_example, run_examples
from broker.policy.loader import PolicySet, load_policy_dir
from broker.policy.schema import ACTIONS, Example, PolicyFile, Rule
from broker.policy.store import PolicyStore, ReloadOutcome, ReloadResult

__all__ = [
    "ACTIONS",
    "CompiledRule",
    "Example",
    "ExampleResult",
    "PolicyEngine",
    "PolicyFile",
    "PolicySet",
    "PolicyStore",
    "ReloadOutcome",
    "ReloadResult",
    "Rule",
    "check_example",
    "load_policy_dir",
    "run_examples",
]
