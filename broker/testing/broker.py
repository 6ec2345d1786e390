"""Run the broker's HTTP app under uvicorn in a background thread (tests, benchmarks, ``broker dev``).

``start_broker_thread(runtime)`` binds a free loopback port, starts the app
(whose lifespan starts the runtime), polls ``/livez`` until it answers, and
returns a handle whose ``stop()`` shuts uvicorn down (running the lifespan's
shutdown: reconcile loop stopped, lease released, audit stop record).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from broker.api.app import RuntimeLike, create_app
from broker.testing.servers import ServerStartError


@dataclass
class BrokerThread:
    """A broker app served from a thread of this process."""

    url: str
    runtime: Any
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout_seconds: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_seconds)


def start_broker_thread(
    runtime: RuntimeLike, *, host: str = "127.0.0.1", port: int = 0, timeout_seconds: float = 30.0
) -> BrokerThread:
    """Serve ``create_app(runtime)`` on ``host:port`` (0 = a free port); return once ``/livez`` answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    config = uvicorn.Config(create_app(runtime), log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="broker-http", daemon=True)
    thread.start()
    url = f"http://{host}:{bound}"
    deadline = time.monotonic() + timeout_seconds
    while True:
        if not thread.is_alive():
            raise ServerStartError("the broker thread exited before it was ready")
        try:
            if server.started and httpx.get(f"{url}/livez", timeout=1.0).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.should_exit = True
            raise ServerStartError(f"the broker was not ready after {timeout_seconds:.0f}s")
        time.sleep(0.01)
    return BrokerThread(url=url, runtime=runtime, server=server, thread=thread)
