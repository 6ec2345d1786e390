"""Run the simulator under uvicorn (the ``broker simulator`` command)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

from broker.errors import ConfigError
from broker.log import configure_logging
from broker.simulator.app import Simulator, SimulatorConfig
from broker.simulator.control import FaultSpec, RateLimitSpec
from broker.simulator.seed import load_seed


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind a listening TCP socket (port 0 = any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def uvicorn_config(
    app: Simulator,
    *,
    log_level: str = "warning",
    access_log: bool = False,
    tls_cert_file: Path | None = None,
    tls_key_file: Path | None = None,
) -> uvicorn.Config:
    """The uvicorn configuration used by the CLI and the test helpers (HTTPS with a cert and key)."""
    if (tls_cert_file is None) != (tls_key_file is None):
        raise ConfigError("give both a TLS certificate file and its key file, or neither")
    return uvicorn.Config(
        app,
        log_level=log_level,
        access_log=access_log,
        lifespan="off",
        timeout_graceful_shutdown=1,
        timeout_keep_alive=5,
        ssl_certfile=str(tls_cert_file) if tls_cert_file else None,
        ssl_keyfile=str(tls_key_file) if tls_key_file else None,
    )


def serve(
    *,
    host: str,
    port: int,
    seed_path: Path | None,
    state_path: Path | None,
    config: SimulatorConfig,
    announce: Callable[[str], None] = print,
    log_level: str = "info",
    tls_cert_file: Path | None = None,
    tls_key_file: Path | None = None,
) -> None:
    """Serve until SIGINT / SIGTERM; ``announce`` gets one line naming the URL."""
    simulator = Simulator(load_seed(seed_path), config, state_path)
    uv_config = uvicorn_config(
        simulator,
        log_level=log_level,
        access_log=log_level == "debug",
        tls_cert_file=tls_cert_file,
        tls_key_file=tls_key_file,
    )
    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    scheme = "https" if tls_cert_file else "http"
    announce(f"MSPC simulator listening on {scheme}://{shown_host}:{bound_port}")
    uvicorn.Server(uv_config).run(sockets=[sock])


def config_from_options(
    *,
    duplicate_mode: str = "new",
    latency_ms: float = 0.0,
    error_rate: float = 0.0,
    error_status: int = 503,
    hang_seconds: float = 0.0,
    lose_response: bool = False,
    fault_endpoint: str | None = None,
    fault_requests: int | None = None,
    fault_seed: int = 0,
    rate_limit_capacity: int | None = None,
    rate_limit_refill_per_second: float = 1.0,
    admin_token: str | None = None,
) -> SimulatorConfig:
    """Build a ``SimulatorConfig`` from CLI options (one fault, if any fault option is set)."""
    faults: tuple[FaultSpec, ...] = ()
    if latency_ms or error_rate or hang_seconds or lose_response:
        faults = (
            FaultSpec(
                latency_ms=latency_ms,
                error_rate=error_rate,
                error_status=error_status,
                hang_seconds=hang_seconds,
                lose_response=lose_response,
                endpoint=fault_endpoint,
                requests=fault_requests,
            ),
        )
    rate_limit = (
        RateLimitSpec(capacity=rate_limit_capacity, refill_per_second=rate_limit_refill_per_second)
        if rate_limit_capacity
        else None
    )
    return SimulatorConfig(
        duplicate_mode="conflict" if duplicate_mode == "conflict" else "new",
        faults=faults,
        fault_seed=fault_seed,
        rate_limit=rate_limit,
        admin_token=admin_token or None,
    )


def serve_from_options(
    *,
    host: str,
    port: int,
    seed_path: str | None,
    state_path: str | None,
    log_level: str = "info",
    announce: Callable[[str], None] = print,
    tls_cert_file: str | None = None,
    tls_key_file: str | None = None,
    **options: Any,
) -> None:
    """The ``broker simulator`` command: configure logging, then ``serve``."""
    configure_logging(level=log_level)
    serve(
        host=host,
        port=port,
        seed_path=Path(seed_path) if seed_path else None,
        state_path=Path(state_path) if state_path else None,
        config=config_from_options(**options),
        announce=announce,
        log_level=log_level,
        tls_cert_file=Path(tls_cert_file) if tls_cert_file else None,
        tls_key_file=Path(tls_key_file) if tls_key_file else None,
    )
