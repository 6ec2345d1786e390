"""Start and stop the MSPC simulator for tests: in a thread or as a subprocess.

``start_simulator_thread()`` runs uvicorn in a background thread of the
test process (fast; the request log's monotonic timestamps share the test's
clock). ``start_simulator_process()`` runs ``python -m broker simulator``
(restartable, for state persistence and staging-like runs). Both bind a
free loopback port and poll ``/_sim/health`` until ready; both return a
handle with the ``/_sim`` controls.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from broker.simulator import FaultSpec, RateLimitSpec, Simulator, SimulatorConfig, fingerprint, load_seed
from broker.simulator.seed import Seed
from broker.simulator.server import bind_socket, uvicorn_config
from broker.testing.servers import RunningServer, ServerStartError, _spawn, _wait_ready, free_port

DEFAULT_START_TIMEOUT_SECONDS = 30.0
ADMIN_TIMEOUT_SECONDS = 5.0

__all__ = [
    "SimulatorHandle",
    "SimulatorProcess",
    "SimulatorThread",
    "fingerprint",
    "self_signed_certificate",
    "start_simulator_process",
    "start_simulator_thread",
]


@dataclass
class SimulatorHandle:
    """A running simulator: its URL, seed, and the ``/_sim`` test controls."""

    url: str
    seed: Seed
    admin_token: str | None = None
    ca_file: Path | None = None

    _client: httpx.Client | None = field(default=None, init=False, repr=False)
    _client_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def http(self) -> httpx.Client:
        """A shared HTTP client for the simulator (trusts its certificate when it serves HTTPS)."""
        with self._client_lock:
            if self._client is None:
                verify: ssl.SSLContext | bool = (
                    ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else False
                )
                self._client = httpx.Client(
                    base_url=self.url, verify=verify, timeout=ADMIN_TIMEOUT_SECONDS, trust_env=False
                )
            return self._client

    def close_client(self) -> None:
        """Close the shared HTTP client (``stop()`` does this)."""
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _admin(self, method: str, path: str, json: Any = None) -> Any:
        headers = {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}
        response = self.http().request(method, f"/_sim/{path}", json=json, headers=headers)
        response.raise_for_status()
        return response.json()

    def health(self) -> bool:
        """True if the simulator answers ``GET /_sim/health``."""
        try:
            return self.http().get("/_sim/health", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def reset(self) -> None:
        """Back to the seed and the start-up faults / limits / duplicate mode."""
        self._admin("POST", "reset")

    def integrations(self) -> list[dict[str, Any]]:
        """Every integration ever created (live and revoked), without keys."""
        items: list[dict[str, Any]] = self._admin("GET", "integrations")["integrations"]
        return items

    def live_integrations(self) -> list[dict[str, Any]]:
        """Integrations that are not revoked."""
        return [i for i in self.integrations() if i["live"]]

    def organizations(self) -> list[dict[str, Any]]:
        """Organizations (seeded and created) with their users."""
        items: list[dict[str, Any]] = self._admin("GET", "organizations")["organizations"]
        return items

    def requests(self, endpoint: str | None = None) -> list[dict[str, Any]]:
        """The request log (oldest first), optionally for one endpoint name."""
        entries: list[dict[str, Any]] = self._admin("GET", "requests")["requests"]
        return [e for e in entries if endpoint is None or e["endpoint"] == endpoint]

    def request_counts(self) -> dict[str, int]:
        """Requests seen per endpoint name."""
        counts: dict[str, int] = self._admin("GET", "requests")["counts"]
        return counts

    def add_fault(self, **spec: Any) -> int:
        """Activate one fault (fields of ``FaultSpec``); return its id."""
        FaultSpec.model_validate(spec)
        fault_id: int = self._admin("POST", "faults", spec)["id"]
        return fault_id

    def set_faults(self, faults: Iterable[dict[str, Any]], seed: int | None = None) -> None:
        """Replace every fault (and optionally reseed the fault RNG)."""
        body: dict[str, Any] = {"faults": list(faults)}
        if seed is not None:
            body["seed"] = seed
        self._admin("PUT", "faults", body)

    def faults(self) -> list[dict[str, Any]]:
        """The active faults with their remaining request counts."""
        items: list[dict[str, Any]] = self._admin("GET", "faults")["faults"]
        return items

    def clear_faults(self) -> None:
        """Remove every fault."""
        self._admin("DELETE", "faults")

    def configure(
        self, *, duplicate_mode: str | None = None, rate_limit: RateLimitSpec | bool | None = False
    ) -> dict[str, Any]:
        """Change the duplicate mode and/or the rate limit (``None`` switches it off)."""
        body: dict[str, Any] = {}
        if duplicate_mode is not None:
            body["duplicateMode"] = duplicate_mode
        if rate_limit is None or isinstance(rate_limit, RateLimitSpec):
            body["rateLimit"] = rate_limit.model_dump() if rate_limit else None
        result: dict[str, Any] = self._admin("POST", "config", body)
        return result

    def stop(self) -> None:  # pragma: no cover - overridden
        """Stop the simulator."""
        raise NotImplementedError


@dataclass
class SimulatorThread(SimulatorHandle):
    """The simulator under uvicorn in a daemon thread of this process."""

    simulator: Simulator | None = None
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    def stop(self, timeout_seconds: float = 10.0) -> None:
        """Ask uvicorn to exit, force it after ``timeout_seconds``, and join the thread."""
        self.close_client()
        if self._server is None or self._thread is None:
            return
        if self.simulator is not None:
            self.simulator.release_waiting()
        self._server.should_exit = True
        self._thread.join(timeout_seconds / 2)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout_seconds / 2)


@dataclass
class SimulatorProcess(SimulatorHandle):
    """``python -m broker simulator`` as a child process, stopped by PID."""

    server: RunningServer | None = None
    argv: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """PID of the simulator process."""
        assert self.server is not None
        return self.server.pid

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the process's combined stdout / stderr."""
        return self.server.log_tail(chars) if self.server else ""

    def stop(self, timeout_seconds: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_seconds``."""
        self.close_client()
        if self.server is not None:
            self.server.stop(timeout_seconds)

    def kill(self) -> None:
        """SIGKILL at once (crash simulation)."""
        self.close_client()
        if self.server is not None:
            self.server.kill()


def start_simulator_thread(
    *,
    seed: Seed | None = None,
    seed_path: Path | None = None,
    state_path: Path | None = None,
    duplicate_mode: str = "new",
    faults: Sequence[FaultSpec] = (),
    fault_seed: int = 0,
    rate_limit: RateLimitSpec | None = None,
    admin_token: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    tls_cert_file: Path | None = None,
    tls_key_file: Path | None = None,
    timeout_seconds: float = DEFAULT_START_TIMEOUT_SECONDS,
) -> SimulatorThread:
    """Run the simulator under uvicorn in a background thread; return once it answers.

    With ``tls_cert_file`` / ``tls_key_file`` it serves HTTPS, and the handle
    trusts that certificate (see ``self_signed_certificate``).
    """
    if seed is None:
        seed = load_seed(seed_path)
    config = SimulatorConfig(
        duplicate_mode="conflict" if duplicate_mode == "conflict" else "new",
        faults=tuple(faults),
        fault_seed=fault_seed,
        rate_limit=rate_limit,
        admin_token=admin_token,
    )
    simulator = Simulator(seed, config, state_path)
    uv_config = uvicorn_config(simulator, tls_cert_file=tls_cert_file, tls_key_file=tls_key_file)
    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(uv_config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="mspc-simulator", daemon=True)
    thread.start()
    handle = SimulatorThread(
        url=f"{'https' if tls_cert_file else 'http'}://{host}:{bound_port}",
        seed=seed,
        admin_token=admin_token,
        ca_file=tls_cert_file,
        simulator=simulator,
        _server=server,
        _thread=thread,
    )
    deadline = time.monotonic() + timeout_seconds
    delay = 0.01
    while not (server.started and handle.health()):
        if not thread.is_alive():
            sock.close()
            raise ServerStartError("the simulator thread exited before it was ready")
        if time.monotonic() > deadline:
            handle.stop()
            sock.close()
            raise ServerStartError(f"the simulator was not ready after {timeout_seconds:.0f}s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.1)
    return handle


def start_simulator_process(
    *,
    seed_path: Path | None = None,
    state_path: Path | None = None,
    duplicate_mode: str = "new",
    extra_args: Sequence[str] = (),
    admin_token: str | None = None,
    port: int | None = None,
    workdir: Path | None = None,
    tls_cert_file: Path | None = None,
    tls_key_file: Path | None = None,
    timeout_seconds: float = DEFAULT_START_TIMEOUT_SECONDS,
) -> SimulatorProcess:
    """Start ``python -m broker simulator`` on a free loopback port; return once it answers."""
    port = port or free_port()
    workdir = workdir or Path(tempfile.mkdtemp(prefix="mspc-simulator-"))
    argv = [sys.executable, "-m", "broker", "simulator", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--duplicate-mode", duplicate_mode]
    if seed_path is not None:
        argv += ["--seed", str(seed_path)]
    if state_path is not None:
        argv += ["--state", str(state_path)]
    if tls_cert_file is not None and tls_key_file is not None:
        argv += ["--tls-cert-file", str(tls_cert_file), "--tls-key-file", str(tls_key_file)]
    argv += list(extra_args)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    if admin_token is not None:
        env["MSPC_SIMULATOR_ADMIN_TOKEN"] = admin_token
    url = f"{'https' if tls_cert_file else 'http'}://127.0.0.1:{port}"
    server = _spawn("mspc-simulator", argv, url, env, workdir)
    handle = SimulatorProcess(
        url=url, seed=load_seed(seed_path), admin_token=admin_token, ca_file=tls_cert_file, server=server, argv=argv
    )
    try:
        _wait_ready(server, handle.health, timeout_seconds)
    except ServerStartError:
        with contextlib.suppress(Exception):
            server.stop()
        raise
    return handle


def self_signed_certificate(directory: Path, host: str = "127.0.0.1", days: int = 2) -> tuple[Path, Path]:
    """Write a self-signed certificate for ``host`` (IP or DNS name) and its key; return (cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alt = x509.DNSName(host)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / "simulator-cert.pem"
    key_path = directory / "simulator-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path
