"""Serving the app: uvicorn with a drain phase before the graceful shutdown.

On the first SIGTERM/SIGINT the broker keeps serving for ``drain_seconds``
while ``/readyz`` answers 503, so Kubernetes (or any load balancer) stops
sending new requests; then uvicorn stops accepting, lets in-flight requests
finish (``shutdown_grace_seconds``) and runs the lifespan shutdown (reconcile
loop stopped, leader lease released, audit stop record). A second signal
skips what is left of the drain. The process then exits 0.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType

import uvicorn

from broker.api.balance import Balancer


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` whose exit signal first drains (see the module docstring)."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        drain_seconds: float,
        on_drain: Callable[[], None],
        on_started: Callable[[], None] | None = None,
        balancer: Balancer | None = None,
    ) -> None:
        super().__init__(config)
        self._balancer = balancer
        self._drain_seconds = drain_seconds
        self._on_drain = on_drain
        self._on_started = on_started
        self._draining = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's start-up (lifespan, listeners), then ``on_started`` once it is serving."""
        await super().startup(sockets)
        if self.started and self._balancer is not None:
            self._balancer.start(
                self.server_state.connections,
                config=self.config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
            )
        if self.started and self._on_started is not None:
            self._on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._balancer is not None:
            self._balancer.stop_accepting()
        await super().shutdown(sockets)
        if self._balancer is not None:
            self._balancer.close()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            self.force_exit = sig == signal.SIGINT
            return
        if self._draining or self._drain_seconds <= 0:
            self.should_exit = True
            return
        self._draining = True
        if self._balancer is not None:
            self._balancer.stop_accepting()
        self._on_drain()
        timer = threading.Timer(self._drain_seconds, self._finish_drain)
        timer.daemon = True
        timer.start()

    def _finish_drain(self) -> None:
        self.should_exit = True
