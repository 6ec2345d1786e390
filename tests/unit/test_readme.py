"""The README stays true: its commands are what CI runs, and its settings reference is current."""

from __future__ import annotations

import re
from pathlib import Path

from broker.settings import reference_markdown


class TestReadme:
    def test_settings_reference_is_current(self, repo_root: Path) -> None:
        """The configuration reference in the README is exactly what `broker config --reference` prints."""
        text = (repo_root / "README.md").read_text()
        block = re.search(r"<!-- settings-reference:start -->\n(.*)<!-- settings-reference:end -->", text, re.S)
        assert block, "README lacks the settings-reference markers"
        assert block.group(1) == reference_markdown(), "run: broker config --reference, and paste it into README.md"

    def test_opens_with_the_two_commands(self, repo_root: Path) -> None:
        """The first code block holds the local-stack command, then the test command."""
        text = (repo_root / "README.md").read_text()
        first = re.search(r"```bash\n(.*?)```", text, re.S)
        assert first
        commands = [line for line in first.group(1).splitlines() if line and not line.startswith("#")]
        assert len(commands) == 2
        assert commands[0].endswith("broker dev") and commands[1].endswith("pytest")

    def test_ci_runs_the_readme_test_command(self, repo_root: Path) -> None:
        """.ci/run installs the same extras and runs the README's test runner without extra selection."""
        ci = (repo_root / ".ci" / "run").read_text()
        assert "pip install -q -e '.[test]'" in ci
        assert re.search(r"^\.venv/bin/pytest\s*$", ci, re.M)
