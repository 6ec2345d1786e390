"""``broker dev``: the README's first command, run as a new user would (``--once`` to stop by itself)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie that nobody reaped yet is not running anything.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


class TestBrokerDev:
    @pytest.mark.parametrize("backend", ["vault", "aws"])
    def test_once_runs_the_demo_and_leaves_nothing(self, backend: str, repo_root: Path, tmp_path: Path) -> None:
        """The stack comes up, provisions, a workload gets a token the Vendor API accepts, then all stops."""
        result = subprocess.run(
            [sys.executable, "-m", "broker", "dev", "--once", "--port", "0", "--backend", backend],
            cwd=repo_root,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        out = result.stdout + result.stderr
        assert result.returncode == 0, out
        assert out.count("provisioned ") >= 3
        assert "GET /api/vendor-api/organization/accounts -> 200" in out
        assert "curl -s -X POST" in out and "broker status" in out and "broker audit query" in out
        assert "stopped; nothing left running" in out
        pids = [int(p) for p in re.findall(r"\(pid (\d+)", out)]
        assert len(pids) == 3  # store backend, simulator, broker
        assert not [p for p in pids if _alive(p)]
        workdir = re.search(r"log (/\S+)/broker\.log", out)
        assert workdir and not Path(workdir.group(1)).exists(), "the temporary workdir was not removed"

    def test_port_in_use_is_a_clear_error(self, repo_root: Path) -> None:
        """A taken broker port fails at once with one line saying what to do."""
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            port = sock.getsockname()[1]
            result = subprocess.run(
                [sys.executable, "-m", "broker", "dev", "--once", "--port", str(port)],
                cwd=repo_root,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        assert result.returncode == 1
        assert f"port {port} is in use" in result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr
