"""The policy file format, as strict pydantic models (unknown keys are errors).

One YAML file holds ``version: 1``, a list of ``rules`` and a list of
``examples``; ``policies/README.md`` documents the format for people.
Globs are fnmatch-style (``*``, ``?``, ``[a-z]``, ``[!x]``), case-sensitive,
matched against the whole value, and limited to the characters the matched
value may contain, so a typo such as an unclosed ``[`` is an error rather
than a pattern that silently never matches.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Annotated, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from broker.models import IDENTIFIER_PATTERN

ACTIONS: tuple[str, ...] = (
    "token:issue",
    "integration:read",
    "integration:provision",
    "integration:rotate",
    "integration:revoke",
    "audit:read",
)
"""Every action a rule may name (globs such as ``integration:*`` expand to these)."""

_NAMESPACE_CHARS = "a-z0-9-"
_SERVICE_ACCOUNT_CHARS = "a-z0-9.-"
_IDENTIFIER_CHARS = "A-Za-z0-9_.-"
_ACTION_CHARS = "a-z:"
_RULE_ID = r"^[a-z0-9][a-z0-9._-]{0,62}$"
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SERVICE_ACCOUNT = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def _glob_pattern(chars: str) -> re.Pattern[str]:
    return re.compile(rf"^(?:\*|\?|\[!?[{chars}]+\]|[{chars}])+$")


_GLOB_SYNTAX = {
    "namespace": _glob_pattern(_NAMESPACE_CHARS),
    "service account": _glob_pattern(_SERVICE_ACCOUNT_CHARS),
    "organization": _glob_pattern(_IDENTIFIER_CHARS),
    "vendor": _glob_pattern(_IDENTIFIER_CHARS),
    "action": _glob_pattern(_ACTION_CHARS),
}


def _glob(kind: str) -> AfterValidator:
    syntax = _GLOB_SYNTAX[kind]

    def check(value: str) -> str:
        if not syntax.fullmatch(value) or len(value) > 253:
            raise ValueError(
                f"invalid {kind} glob {value!r}: use letters/digits/'-' as the value allows, "
                "'*', '?' and closed [...] classes"
            )
        return value

    return AfterValidator(check)


def expand_actions(pattern: str) -> tuple[str, ...]:
    """Known actions a name or glob stands for (empty if none)."""
    return tuple(a for a in ACTIONS if fnmatch.fnmatchcase(a, pattern))


def _known_action_glob(value: str) -> str:
    if not expand_actions(value):
        raise ValueError(f"unknown action {value!r}; known actions: {', '.join(ACTIONS)}")
    return value


def _known_action(value: str) -> str:
    if value not in ACTIONS:
        raise ValueError(f"unknown action {value!r}; known actions: {', '.join(ACTIONS)}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SubjectMatch(_Strict):
    """Which workloads a rule is about: namespace and service-account globs."""

    namespace: Annotated[str, _glob("namespace")]
    service_account: Annotated[str, _glob("service account")] = "*"


class IntegrationMatch(_Strict):
    """Which (organization, vendor) pairs a rule is about: two globs."""

    organization: Annotated[str, _glob("organization")] = "*"
    vendor: Annotated[str, _glob("vendor")] = "*"

    @property
    def unscoped(self) -> bool:
        """True when this entry matches every pair."""
        return self.organization == "*" and self.vendor == "*"


class Rule(_Strict):
    """One allow or deny rule; ``id`` is unique across all files."""

    id: Annotated[str, Field(pattern=_RULE_ID)]
    description: str = ""
    effect: Literal["allow", "deny"]
    subjects: Annotated[list[SubjectMatch], Field(min_length=1)]
    integrations: Annotated[list[IntegrationMatch], Field(min_length=1)] | None = None
    actions: Annotated[list[Annotated[str, _glob("action"), AfterValidator(_known_action_glob)]], Field(min_length=1)]
    max_ttl_seconds: Annotated[int, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _ttl_only_on_allow(self) -> Self:
        if self.max_ttl_seconds is not None and self.effect != "allow":
            raise ValueError("max_ttl_seconds only applies to allow rules")
        return self

    @property
    def expanded_actions(self) -> frozenset[str]:
        """The known actions this rule covers, globs expanded."""
        return frozenset(a for pattern in self.actions for a in expand_actions(pattern))

    @property
    def unscoped(self) -> bool:
        """True when the rule applies to every integration (and to actions without one)."""
        return self.integrations is None or any(i.unscoped for i in self.integrations)


def _subject(value: str) -> str:
    namespace, _, name = value.partition("/")
    if not _NAMESPACE.fullmatch(namespace) or not _SERVICE_ACCOUNT.fullmatch(name):
        raise ValueError(f"subject {value!r} must be <namespace>/<service-account>")
    return value


def _identifier(value: str) -> str:
    if not IDENTIFIER_PATTERN.fullmatch(value) or ".." in value:
        raise ValueError(f"{value!r} is not a valid organization / vendor id")
    return value


class Example(_Strict):
    """A decision the file's author expects; ``broker policy test`` checks every one."""

    description: str = ""
    subject: Annotated[str, AfterValidator(_subject)]
    organization: Annotated[str, AfterValidator(_identifier)] | None = None
    vendor: Annotated[str, AfterValidator(_identifier)] | None = None
    action: Annotated[str, AfterValidator(_known_action)]
    expect: Literal["allow", "deny"]
    rule: str | None = Field(None, description="Expected deciding rule id; omit to not check it.")
    max_ttl_seconds: int | None = Field(None, description="Expected TTL cap; omit to not check it.")

    @model_validator(mode="after")
    def _pair(self) -> Self:
        if (self.organization is None) != (self.vendor is None):
            raise ValueError("give both organization and vendor, or neither")
        return self

    @property
    def namespace(self) -> str:
        return self.subject.partition("/")[0]

    @property
    def service_account(self) -> str:
        return self.subject.partition("/")[2]


class PolicyFile(_Strict):
    """One policy file."""

    version: Literal[1]
    description: str = ""
    rules: list[Rule] = Field(default_factory=list)
    examples: list[Example] = Field(default_factory=list)


__all__ = ["ACTIONS", "Example", "IntegrationMatch", "PolicyFile", "Rule", "SubjectMatch", "expand_actions"]
