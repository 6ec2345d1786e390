"""Read a directory of policy files into a validated ``PolicySet``.

Files are ``*.yaml`` / ``*.yml`` directly in the directory (names starting
with ``.`` are skipped, as are the ``..data`` links of a Kubernetes
ConfigMap mount), read in name order. Rule order is file order, then order
within the file. Any problem raises ``PolicyInvalid`` whose message names
the file, the rule (id and index) and the problem, one line per problem.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from broker.errors import PolicyInvalid
from broker.policy.schema import Example, PolicyFile, Rule

POLICY_SUFFIXES = (".yaml", ".yml")
MAX_POLICY_FILE_BYTES = 1024 * 1024


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last one silently)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


@dataclass(frozen=True, slots=True)
class PolicyDocument:
    """One parsed policy file and where it came from."""

    path: Path
    policy: PolicyFile


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Every policy file of a directory, validated together; ``fingerprint`` hashes names and contents."""

    directory: Path
    documents: tuple[PolicyDocument, ...]
    fingerprint: str

    def rules(self) -> Iterator[tuple[Path, Rule]]:
        """Every rule with its file, in evaluation order."""
        for doc in self.documents:
            for rule in doc.policy.rules:
                yield doc.path, rule

    def examples(self) -> Iterator[tuple[Path, int, Example]]:
        """Every example with its file and index."""
        for doc in self.documents:
            for index, example in enumerate(doc.policy.examples):
                yield doc.path, index, example


def read_policy_dir(directory: Path) -> list[tuple[Path, bytes]]:
    """The policy files of ``directory`` and their bytes, in name order; raises ``PolicyInvalid``."""
    if not directory.is_dir():
        raise PolicyInvalid(f"{directory}: policy directory does not exist")
    files = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or path.suffix not in POLICY_SUFFIXES or not path.is_file():
            continue
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise PolicyInvalid(f"{path}: cannot read: {exc.strerror}") from None
        if len(data) > MAX_POLICY_FILE_BYTES:
            raise PolicyInvalid(f"{path}: larger than {MAX_POLICY_FILE_BYTES} bytes")
        files.append((path, data))
    return files


def fingerprint(files: Sequence[tuple[Path, bytes]]) -> str:
    """SHA-256 over the names and contents of ``files``."""
    digest = hashlib.sha256()
    for path, data in files:
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()


def _where(raw: Any, loc: tuple[int | str, ...]) -> str:
    """'rule 'id' (rules[2]): subjects[0].namespace' for a pydantic error location."""
    head = ""
    rest = loc
    if len(loc) >= 2 and loc[0] in ("rules", "examples") and isinstance(loc[1], int):
        section, index = str(loc[0]), loc[1]
        rest = loc[2:]
        items = raw.get(section) if isinstance(raw, dict) else None
        item = items[index] if isinstance(items, list) and index < len(items) else None
        rule_id = item.get("id") if isinstance(item, dict) and section == "rules" else None
        head = f"rule {rule_id!r} ({section}[{index}])" if rule_id is not None else f"{section}[{index}]"
    path = ""
    for part in rest:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else part
    return ": ".join(p for p in (head, path) if p) or "top level"


def parse_policy_file(path: Path, data: bytes) -> PolicyFile:
    """Parse and validate one file's bytes; raises ``PolicyInvalid`` naming file, rule and problem."""
    try:
        raw = yaml.load(data, Loader=_StrictLoader)  # noqa: S506 - _StrictLoader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise PolicyInvalid(f"{path}: {line}YAML error: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise PolicyInvalid(f"{path}: YAML error: {type(exc).__name__}") from None
    if not isinstance(raw, dict):
        raise PolicyInvalid(f"{path}: top level must be a mapping with 'version: 1' and 'rules'")
    try:
        return PolicyFile.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False, include_input=False):
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"{path}: {_where(raw, err['loc'])}: {message}")
        raise PolicyInvalid("\n".join(problems)) from None


def parse_policy_set(directory: Path, files: Sequence[tuple[Path, bytes]]) -> PolicySet:
    """Validate every file and the set as a whole (rule ids unique across files)."""
    documents = tuple(PolicyDocument(path, parse_policy_file(path, data)) for path, data in files)
    seen: dict[str, Path] = {}
    problems = []
    for doc in documents:
        for index, rule in enumerate(doc.policy.rules):
            if rule.id in seen:
                problems.append(f"{doc.path}: rule {rule.id!r} (rules[{index}]): duplicate id, also in {seen[rule.id]}")
            else:
                seen[rule.id] = doc.path
    if problems:
        raise PolicyInvalid("\n".join(problems))
    return PolicySet(directory, documents, fingerprint(files))


def load_policy_dir(directory: Path) -> PolicySet:
    """Read and validate every policy file of ``directory``; raises ``PolicyInvalid``."""
    return parse_policy_set(directory, read_policy_dir(directory))


__all__ = [
    "PolicyDocument",
    "PolicySet",
    "fingerprint",
    "load_policy_dir",
    "parse_policy_file",
    "parse_policy_set",
    "read_policy_dir",
]
