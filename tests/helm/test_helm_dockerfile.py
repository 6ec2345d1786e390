"""helm/Dockerfile, read as instructions (no Docker engine here to build it)."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

from helmtools import REPO

DOCKERFILE = REPO / "helm" / "Dockerfile"
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|clang|make|build-essential|cmake|cargo|rustc|python3?-dev|libc6?-dev|git|curl|wget)\b"
)


@dataclass
class Stage:
    """One build stage: its FROM line and its instructions."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        """Arguments of every instruction with this keyword."""
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        """Arguments of the last instruction with this keyword (the one that takes effect)."""
        found = self.all(keyword)
        return found[-1] if found else None


def parse_dockerfile(text: str) -> list[Stage]:
    """Split a Dockerfile into stages of (KEYWORD, arguments), joining continuation lines."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


STAGES = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
FINAL = STAGES[-1]


class TestDockerfile:
    """The image: wheels built in a builder stage, a slim non-root runtime that runs ``broker serve``."""

    def test_is_multi_stage_with_a_named_builder(self) -> None:
        """There is a named builder stage before the final stage."""
        assert len(STAGES) >= 2
        assert STAGES[0].name == "builder"

    def test_builder_builds_wheels_with_pip(self) -> None:
        """The builder stage runs ``pip wheel`` on the project."""
        assert any("pip wheel" in run for run in STAGES[0].all("RUN"))

    def test_final_stage_is_python_311_slim(self) -> None:
        """The runtime base is python:3.11-slim."""
        assert FINAL.base == "python:3.11-slim"

    def test_final_stage_installs_only_the_builder_wheels(self) -> None:
        """The runtime installs from the builder's wheels offline (--no-index), taking nothing else from it."""
        installs = [run for run in FINAL.all("RUN") if "pip install" in run]
        assert installs
        for run in installs:
            assert "--no-index" in run
            assert "from=builder" in run

    def test_final_stage_has_no_build_tools(self) -> None:
        """Nothing in the runtime stage installs or fetches a compiler or build tool."""
        for run in FINAL.all("RUN"):
            assert not ("apt-get install" in run and BUILD_TOOLS.search(run)), run
            assert not re.search(r"\b(curl|wget|git)\b", run), run

    def test_final_stage_copies_no_source_tree(self) -> None:
        """The runtime stage copies no files from the build context."""
        assert FINAL.all("COPY") == [] and FINAL.all("ADD") == []

    def test_runs_as_uid_10001(self) -> None:
        """The effective USER is numeric, non-root 10001 (the chart's runAsUser), and a matching user exists."""
        user = FINAL.last("USER")
        assert user is not None
        uid = user.split(":")[0]
        assert uid == "10001"
        assert any("--uid 10001" in run for run in FINAL.all("RUN"))

    def test_entrypoint_is_broker_and_cmd_is_serve(self) -> None:
        """ENTRYPOINT ["broker"] and CMD ["serve"], in exec form."""
        assert json.loads(FINAL.last("ENTRYPOINT") or "null") == ["broker"]
        assert json.loads(FINAL.last("CMD") or "null") == ["serve"]

    def test_listens_on_all_interfaces_on_the_chart_port(self) -> None:
        """The image defaults the broker to 0.0.0.0:8080 and exposes 8080."""
        env = " ".join(FINAL.all("ENV"))
        pairs = dict(item.split("=", 1) for item in shlex.split(env) if "=" in item)
        assert pairs["BROKER_SERVER__HOST"] == "0.0.0.0"
        assert pairs["BROKER_SERVER__PORT"] == "8080"
        assert FINAL.all("EXPOSE") == ["8080"]

    def test_parser_sees_continuations_and_stage_names(self) -> None:
        """The small parser joins backslash lines and reads ``FROM image AS name``."""
        stages = parse_dockerfile("FROM a:1 AS b\nRUN x \\\n  && y\nFROM c\nUSER 1\n")
        assert [(s.base, s.name) for s in stages] == [("a:1", "b"), ("c", None)]
        assert stages[0].all("RUN") == ["x  && y"]
        assert stages[1].last("USER") == "1"
