"""Shared set-up of the benchmarks: real servers on loopback, started here and stopped by PID.

``Processes`` is a context manager that remembers every child it starts
(OpenBao, the simulator, broker processes) and stops each by PID on exit,
whatever happened; SIGTERM / SIGINT / SIGHUP to the benchmark become
``KeyboardInterrupt`` so the same clean-up runs. Nothing here binds anything
but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import yaml

from broker.testing.jwt import DevIssuer
from broker.testing.servers import RunningServer, ServerStartError, free_port, start_openbao
from broker.testing.simulator import SimulatorProcess, start_simulator_process

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
CLIENT_ID = "bench-client"
CLIENT_SECRET = "bench-client-secret"
VENDOR_ID = "acme-crm"
VENDOR_KEY = "acme-crm-vendor-key-bench"
AUDIT_KEY = "bench-audit-key-0123456789abcdef0123456789abcdef"
# The shipped policy set: billing/invoicer may issue tokens for any organization's acme-* vendors.
POLICY_DIR = REPO / "policies"
SUBJECT = ("billing", "invoicer")


def org_id(i: int) -> str:
    return f"org-{i:05d}"


def write_seed(path: Path, organizations: int) -> Path:
    """A simulator seed: one OEM client, one vendor, ``organizations`` organizations allowing it."""
    seed = {
        "clients": [{"id": CLIENT_ID, "secret": CLIENT_SECRET, "scopes": ["vendor_manage", "oem:partner_token"]}],
        "vendors": [
            {
                "id": VENDOR_ID,
                "name": "Acme CRM",
                "vendor_key": VENDOR_KEY,
                "integration_type": "external",
                "credential_template": {"api key": ""},
            }
        ],
        "organizations": [
            {
                "id": org_id(i),
                "name": f"Bench MSP {i}",
                "oem_token": f"oem-token-{i:05d}",
                "allowed_vendor_ids": [VENDOR_ID],
            }
            for i in range(1, organizations + 1)
        ],
    }
    path.write_text(yaml.safe_dump(seed, sort_keys=False))
    return path


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@dataclass
class Processes:
    """Every child process the benchmark started; ``close()`` stops them all by PID (also on error)."""

    workdir: Path
    servers: list[RunningServer] = field(default_factory=list)
    simulators: list[SimulatorProcess] = field(default_factory=list)
    issuers: list[DevIssuer] = field(default_factory=list)

    def __enter__(self) -> Processes:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _interrupt)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        for sim in reversed(self.simulators):
            with contextlib.suppress(Exception):
                sim.stop()
        for server in reversed(self.servers):
            with contextlib.suppress(Exception):
                server.stop()
        for issuer in self.issuers:
            with contextlib.suppress(Exception):
                issuer.stop()
        self.simulators.clear()
        self.servers.clear()
        self.issuers.clear()

    # -- starters ------------------------------------------------------------------------

    def openbao(self) -> RunningServer:
        server = start_openbao(workdir=self._dir("openbao"))
        self.servers.append(server)
        return server

    def simulator(self, seed_path: Path, *extra_args: str) -> SimulatorProcess:
        sim = start_simulator_process(seed_path=seed_path, extra_args=extra_args, workdir=self._dir("simulator"))
        self.simulators.append(sim)
        return sim

    def issuer(self) -> DevIssuer:
        issuer = DevIssuer().start()
        self.issuers.append(issuer)
        return issuer

    def spawn(self, name: str, argv: list[str], env: Mapping[str, str], ready_path: str = "/livez") -> RunningServer:
        """Start a server process whose URL is ``http://127.0.0.1:{env port}``; wait for ``ready_path``."""
        port = int(env["BROKER_SERVER__PORT"])
        workdir = self._dir(name)
        log_path = workdir / f"{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(env), cwd=workdir
            )
        server = RunningServer(
            name=name, url=f"http://127.0.0.1:{port}", process=process, log_path=log_path, workdir=workdir
        )
        self.servers.append(server)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServerStartError(f"{name} exited with {process.returncode}:\n{server.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(server.url + ready_path, timeout=1.0).status_code == 200:
                    return server
            time.sleep(0.05)
        raise ServerStartError(f"{name} not ready after 60s:\n{server.log_tail()}")

    def _dir(self, name: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir))
        return path


@contextlib.contextmanager
def bench_workdir(prefix: str) -> Iterator[Path]:
    """A scratch directory on disk (the audit file lives here, so fsync is real), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def broker_settings(
    *,
    vault: RunningServer,
    sim: SimulatorProcess,
    issuer: DevIssuer | None,
    workdir: Path,
    desired_file: Path | None = None,
    audit_file: Path | None = None,
    port: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Settings groups (as for ``load_settings(**groups)``) of a broker against this stack."""
    groups: dict[str, dict[str, Any]] = {
        "store": {"backend": "vault"},
        "vault": {"url": vault.url, "token": vault.extra["root_token"]},
        "oem": {"base_url": sim.url, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
        "policy": {"dir": str(POLICY_DIR)},
        "audit": {"file_path": str(audit_file or workdir / "audit" / "audit.jsonl"), "hmac_key": AUDIT_KEY},
        "engine": {},
        "server": {"host": "127.0.0.1", "port": port or free_port()},
        "log": {"level": "info", "format": "json"},
    }
    if issuer is not None:
        groups["identity"] = {"mode": "jwks", "issuer": issuer.issuer, "audience": "mspc-broker"}
    if desired_file is not None:
        groups["engine"]["desired_file"] = str(desired_file)
    return groups


def env_of(groups: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """``BROKER_<GROUP>__<FIELD>`` variables for the settings groups, on top of a clean environment."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(("BROKER_", "VAULT_", "BAO_", "AWS_", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"))
    }
    for group, values in groups.items():
        for name, value in values.items():
            env[f"BROKER_{group.upper()}__{name.upper()}"] = (
                str(value).lower() if isinstance(value, bool) else str(value)
            )
    return env


def seed_vendor_key(vault: RunningServer, path: str, value: str) -> None:
    """Write the vendor key with plain HTTP, as a platform team's tooling would (KV v2 at secret/)."""
    response = httpx.post(
        f"{vault.url}/v1/secret/data/{path}",
        headers={"X-Vault-Token": vault.extra["root_token"]},
        json={"data": {"vendor_api_key": value}},
        timeout=10,
    )
    response.raise_for_status()


def rss_peak_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def proc_rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) RSS of another process from /proc, in MiB."""
    values = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, amount = line.split(":", 1)
                values[key] = int(amount.split()[0]) / 1024
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds another process has used so far (/proc/<pid>/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the fallback load generator (used only when wrk cannot be installed) ------------------


async def _loadgen(
    url: str, method: str, body: bytes, headers: Mapping[str, str], connections: int, duration_seconds: float
) -> dict[str, Any]:
    """Closed-loop HTTP/1.1 keep-alive load: ``connections`` clients, each one request at a time."""
    import asyncio

    parsed = httpx.URL(url)
    host, port = parsed.host, parsed.port or 80
    target = parsed.raw_path.decode()
    head = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    latencies: list[float] = []
    errors = {"connect": 0, "read": 0, "status": 0}
    stop_at = time.monotonic() + duration_seconds

    async def client() -> None:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            errors["connect"] += 1
            return
        try:
            while time.monotonic() < stop_at:
                start = time.perf_counter()
                writer.write(request)
                status_line = await reader.readline()
                length = 0
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                if not status_line or int(status_line.split()[1]) >= 400:
                    errors["status"] += 1
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            errors["read"] += 1
        finally:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(connections)))
    elapsed = time.monotonic() - started
    latencies.sort()

    def pct(p: float) -> int:
        return int(latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1e6) if latencies else 0

    return {
        "requests": len(latencies),
        "duration_us": int(elapsed * 1e6),
        "p50_us": pct(50),
        "p90_us": pct(90),
        "p99_us": pct(99),
        "max_us": pct(100),
        "mean_us": sum(latencies) / len(latencies) * 1e6 if latencies else 0.0,
        "errors_connect": errors["connect"],
        "errors_read": errors["read"],
        "errors_write": 0,
        "errors_status": errors["status"],
        "errors_timeout": 0,
    }


def _loadgen_main(argv: list[str]) -> None:
    import asyncio
    import json

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    url, connections, duration = argv[0], int(argv[1]), float(argv[2])
    method = os.environ.get("BENCH_METHOD", "GET")
    body = os.environ.get("BENCH_BODY", "").encode()
    headers = {}
    for line in os.environ.get("BENCH_HEADERS", "").splitlines():
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip()] = value.strip()
    result = asyncio.run(_loadgen(url, method, body, headers, connections, duration))
    print("BENCH_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    _loadgen_main(sys.argv[1:])
