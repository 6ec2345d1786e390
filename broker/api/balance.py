"""Connection balancing between workers: none holds more than one connection above the least loaded.

With ``SO_REUSEPORT`` the kernel gives each new connection to a worker by a
hash of its addresses, so 32 connections opened together split 19/13 about
as often as 16/16. Clients that keep their connections (a sidecar, a
gateway, a load generator) then keep the fuller worker fuller, and its
requests wait longer: the tail latency is the fuller worker's. (Envoy's
``exact_balance`` answers the same problem between threads.) Here:

- every worker publishes how many connections it holds in a shared array
  (a memfd the supervisor creates and passes to each worker); -1 means
  "send me nothing": not serving yet, draining, or dead;
- a worker that accepts a connection while it already holds more than the
  least loaded worker hands it over before reading a byte: the descriptor
  goes through that worker's inbox (a Unix datagram socket, ``SCM_RIGHTS``)
  and the worker adopts it as if it had accepted it itself;
- a connection is handed over at most once, and if the hand-over fails
  (inbox full, worker gone) it stays where it was accepted.

The counts are refreshed on every decision and every ``PUBLISH_SECONDS``
(connections that close are not observed one by one), so a decision may
rest on a count that is that old: the balance is exact for connections
opened together, which is the case it is for.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import socket
from collections.abc import Sequence
from typing import Any, cast

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from broker.log import get_logger

log = get_logger("workers")

PUBLISH_SECONDS = 0.05  # how often a worker republishes its connection count
_SLOT = 8  # bytes per worker in the shared array (a signed 64-bit count)
NOT_SERVING = -1


def hand_off_target(index: int, held: int, counts: Sequence[int]) -> int | None:
    """The worker a new connection of worker ``index`` (holding ``held`` others) should go to; None: keep it.

    The least loaded serving worker (the lowest index among equals), if it
    holds fewer than ``held``: after the hand-over neither is more than one
    above the other.
    """
    best: int | None = None
    for worker, count in enumerate(counts):
        if worker != index and count >= 0 and (best is None or count < counts[best]):
            best = worker
    return best if best is not None and counts[best] < held else None


class BalanceChannels:
    """The supervisor's side: the shared counts and one inbox per worker, kept for the supervisor's life.

    Inboxes outlive their workers: a restarted worker reads the same one.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._memfd = os.memfd_create("mspc-broker-balance", 0)
        os.ftruncate(self._memfd, _SLOT * workers)
        self._map = mmap.mmap(self._memfd, _SLOT * workers)
        self._counts = memoryview(self._map).cast("q")
        self._inboxes = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(workers)]
        for receive, send in self._inboxes:
            receive.setblocking(False)
            send.setblocking(False)
        for worker in range(workers):
            self.mark_not_serving(worker)

    def spec(self, index: int) -> tuple[str, tuple[int, ...]]:
        """(the ``--balance`` argument of worker ``index``, the descriptors it must inherit)."""
        peers = [NOT_SERVING if worker == index else send.fileno() for worker, (_, send) in enumerate(self._inboxes)]
        fds = (self._memfd, self._inboxes[index][0].fileno(), *(fd for fd in peers if fd != NOT_SERVING))
        return ",".join(str(n) for n in (index, self._memfd, self._inboxes[index][0].fileno(), *peers)), fds

    def mark_not_serving(self, index: int) -> None:
        """Worker ``index`` is gone (or not started): nobody hands it connections."""
        self._counts[index] = NOT_SERVING

    def counts(self) -> list[int]:
        """Each worker's published connection count (tests and logs)."""
        return self._counts.tolist()

    def close(self) -> None:
        self._counts.release()
        self._map.close()
        os.close(self._memfd)
        for receive, send in self._inboxes:
            receive.close()
            send.close()


class Balancer:
    """A worker's side: decides on each accepted connection, adopts what others hand over (module docstring)."""

    def __init__(self, index: int, memfd: int, inbox: int, peers: Sequence[int]) -> None:
        self.index = index
        self._map = mmap.mmap(memfd, _SLOT * len(peers))
        os.close(memfd)
        self._counts = memoryview(self._map).cast("q")
        self._inbox = socket.socket(fileno=inbox)
        self._peers = {i: socket.socket(fileno=fd) for i, fd in enumerate(peers) if fd != NOT_SERVING}
        self._connections: set[Any] | None = None  # uvicorn's set of this worker's open connections
        self._protocol_arguments: dict[str, Any] | None = None  # uvicorn's, for the protocols of adopted connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.handed_off = 0
        self.adopted = 0

    @classmethod
    def from_spec(cls, spec: str) -> Balancer:
        """The balancer of a worker started with ``--balance SPEC`` (``BalanceChannels.spec``)."""
        index, memfd, inbox, *peers = (int(part) for part in spec.split(","))
        return cls(index, memfd, inbox, peers)

    # -- serving -------------------------------------------------------------------

    def protocol_class(self) -> type[asyncio.Protocol]:
        """The ``http`` protocol class for uvicorn: decides on each connection, then runs uvicorn's own."""
        balancer = self

        class BalancedProtocol(asyncio.Protocol):
            def __init__(self, **arguments: Any) -> None:
                self._arguments = arguments

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                # uvloop's transports are not asyncio.Transport subclasses, but have its methods
                if balancer.hand_off(cast("asyncio.Transport", transport)):
                    return
                protocol = AutoHTTPProtocol(**self._arguments)
                transport.set_protocol(protocol)
                protocol.connection_made(transport)

        return BalancedProtocol

    def start(self, connections: set[Any], **protocol_arguments: Any) -> None:
        """Serving: publish the count, read the inbox (in the event loop that serves).

        ``connections`` is uvicorn's set of this worker's open connections;
        ``protocol_arguments`` are those uvicorn gives its protocol.
        """
        self._connections = connections
        self._protocol_arguments = protocol_arguments
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._inbox.fileno(), self._adopt)
        self._publish()

    def stop_accepting(self) -> None:
        """Draining: other workers stop handing connections here (the inbox is still read)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._connections = None
        self._counts[self.index] = NOT_SERVING

    def close(self) -> None:
        self.stop_accepting()
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._inbox.fileno())
        self._counts.release()
        self._map.close()
        self._inbox.close()
        for peer in self._peers.values():
            peer.close()

    def _publish(self) -> None:
        if self._connections is None or self._loop is None:
            return
        self._counts[self.index] = len(self._connections)
        self._timer = self._loop.call_later(PUBLISH_SECONDS, self._publish)

    # -- handing over and adopting -------------------------------------------------

    def hand_off(self, transport: asyncio.Transport) -> bool:
        """Give a just-accepted connection to a less loaded worker; True if it went (the transport is let go)."""
        if self._connections is None:
            return False
        held = len(self._connections)
        self._counts[self.index] = held + 1
        counts = self._counts.tolist()
        target = hand_off_target(self.index, held, counts)
        if target is None:
            return False
        sock = transport.get_extra_info("socket")
        if sock is None:
            return False
        duplicate = os.dup(sock.fileno())
        try:
            socket.send_fds(self._peers[target], [b"c"], [duplicate])
        except OSError:  # inbox full, or its worker gone: keep the connection here
            return False
        finally:
            os.close(duplicate)
        self._counts[target] = counts[target] + 1  # until the target publishes its own count
        self._counts[self.index] = held
        self.handed_off += 1
        transport.abort()  # closes this worker's descriptor only: the connection lives on in the target's
        return True

    def _adopt(self) -> None:
        while True:
            try:
                _, fds, _, _ = socket.recv_fds(self._inbox, 16, 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("connection inbox failed", error=type(exc).__name__)
                return
            if not fds:
                return
            for fd in fds:
                self._adopt_one(socket.socket(fileno=fd))

    def _adopt_one(self, sock: socket.socket) -> None:
        arguments = self._protocol_arguments
        if self._loop is None or arguments is None:
            sock.close()
            return
        sock.setblocking(False)
        self.adopted += 1
        task = self._loop.create_task(self._loop.connect_accepted_socket(lambda: AutoHTTPProtocol(**arguments), sock))
        task.add_done_callback(_report_adoption)


def _report_adoption(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not adopt a handed-over connection", error=type(task.exception()).__name__)


__all__ = ["BalanceChannels", "Balancer", "hand_off_target"]
