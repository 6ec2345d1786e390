"""Connection balancing between workers: none holds more than one connection above the least loaded.

With ``SO_REUSEPORT`` the kernel gives each new connection to a worker by a
hash of its addresses, so 32 connections opened together split 19/13 about
as often as 16/16. Clients that keep their connections (a sidecar, a
gateway, a load generator) then keep the fuller worker fuller, and its
requests wait longer: the tail latency is the fuller worker's. (Envoy's
``exact_balance`` answers the same problem between threads.) Here:

- each worker publishes its load in an array the supervisor shares with all
  of them (a memfd): the connections it holds and those it is adopting, or
  -1 for "send me nothing" (not serving yet, draining, dead);
- a worker that accepts a connection while its load is above the least
  loaded worker's hands it over before reading a byte: the descriptor goes
  through that worker's inbox (a Unix datagram socket, ``SCM_RIGHTS``), and
  the worker adopts it as if it had accepted it itself;
- connections on their way count for their receiver: the array also holds,
  per pair of workers, how many the one sent and how many the other took
  (each counter written by one worker only). Without that, a worker that
  accepted its share of a burst before the other woke up would hand over
  half of it, and the other would then add its own share on top;
- a connection is handed over at most once; if the hand-over fails (inbox
  full, worker gone) it stays where it was accepted. An inbox holds
  ``net.unix.max_dgram_qlen`` connections not yet taken (10 by default),
  which the receiving worker empties on each turn of its event loop.

A worker republishes its load on every decision, every adoption and every
connection it closes (and every ``PUBLISH_SECONDS`` besides), so a decision
rests on the loads of that moment: a burst that follows closed connections
is not judged by the closed ones.
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

PUBLISH_SECONDS = 0.05  # how often a worker republishes its load
NOT_SERVING = -1
_ITEM = 8  # bytes per counter (signed 64-bit)


def _cells(workers: int) -> int:
    """Counters in the shared array: a load per worker, then ``sent[i][j]``, then ``taken[i][j]``."""
    return workers + 2 * workers * workers


def hand_off_target(index: int, held: int, loads: Sequence[int]) -> int | None:
    """The worker a new connection of worker ``index`` (whose load is ``held``) should go to; None: keep it.

    The least loaded serving worker (the lowest index among equals), if its
    load is below ``held``: after the hand-over neither is more than one
    above the other.
    """
    best: int | None = None
    for worker, load in enumerate(loads):
        if worker != index and load >= 0 and (best is None or load < loads[best]):
            best = worker
    return best if best is not None and loads[best] < held else None


class _Counters:
    """The shared array, seen through a memoryview of signed 64-bit integers."""

    def __init__(self, memfd: int, workers: int) -> None:
        self.workers = workers
        self._map = mmap.mmap(memfd, _ITEM * _cells(workers))
        self.cells = memoryview(self._map).cast("q")

    def sent(self, sender: int, receiver: int) -> int:
        return self.workers + sender * self.workers + receiver

    def taken(self, sender: int, receiver: int) -> int:
        return self.workers + self.workers * self.workers + sender * self.workers + receiver

    def loads(self) -> list[int]:
        """Each worker's published load plus the connections on their way to it (-1: not serving)."""
        cells = self.cells.tolist()
        loads = cells[: self.workers]
        for receiver, load in enumerate(loads):
            if load >= 0:
                for sender in range(self.workers):
                    loads[receiver] += cells[self.sent(sender, receiver)] - cells[self.taken(sender, receiver)]
        return loads

    def close(self) -> None:
        self.cells.release()
        self._map.close()


class BalanceChannels:
    """The supervisor's side: the shared counters and one inbox per worker, kept for the supervisor's life.

    Inboxes and counters outlive their workers: a restarted worker reads the
    same inbox (and takes what was sent to its predecessor).
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._memfd = os.memfd_create("mspc-broker-balance", 0)
        os.ftruncate(self._memfd, _ITEM * _cells(workers))
        self._counters = _Counters(self._memfd, workers)
        self._inboxes = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(workers)]
        for receive, send in self._inboxes:
            receive.setblocking(False)
            send.setblocking(False)
        for worker in range(workers):
            self.mark_not_serving(worker)

    def spec(self, index: int) -> tuple[str, tuple[int, ...]]:
        """(the ``--balance`` argument of worker ``index``, the descriptors it must inherit)."""
        inbox = self._inboxes[index][0].fileno()
        peers = [NOT_SERVING if worker == index else send.fileno() for worker, (_, send) in enumerate(self._inboxes)]
        fds = (self._memfd, inbox, *(fd for fd in peers if fd != NOT_SERVING))
        return ",".join(str(n) for n in (index, self._memfd, inbox, *peers)), fds

    def mark_not_serving(self, index: int) -> None:
        """Worker ``index`` is gone (or not started): nobody hands it connections."""
        self._counters.cells[index] = NOT_SERVING

    def loads(self) -> list[int]:
        """Each worker's load as the workers see it (tests and logs)."""
        return self._counters.loads()

    def close(self) -> None:
        self._counters.close()
        os.close(self._memfd)
        for receive, send in self._inboxes:
            receive.close()
            send.close()


class Balancer:
    """A worker's side: decides on each accepted connection, adopts what others hand over (module docstring)."""

    def __init__(self, index: int, memfd: int, inbox: int, peers: Sequence[int]) -> None:
        self.index = index
        self._counters = _Counters(memfd, len(peers))
        os.close(memfd)
        self._inbox = socket.socket(fileno=inbox)
        self._peers = {i: socket.socket(fileno=fd) for i, fd in enumerate(peers) if fd != NOT_SERVING}
        self._connections: set[Any] | None = None  # uvicorn's set of this worker's open connections
        self._protocol_arguments: dict[str, Any] | None = None  # uvicorn's, for the protocols of adopted connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._adopting = 0  # received, not yet connected
        self._http = self._counted_http_protocol()

    @classmethod
    def from_spec(cls, spec: str) -> Balancer:
        """The balancer of a worker started with ``--balance SPEC`` (``BalanceChannels.spec``)."""
        index, memfd, inbox, *peers = (int(part) for part in spec.split(","))
        return cls(index, memfd, inbox, peers)

    # -- serving -------------------------------------------------------------------

    def _counted_http_protocol(self) -> type[asyncio.Protocol]:
        """uvicorn's HTTP protocol, publishing this worker's load when one of its connections closes."""
        balancer = self

        def connection_lost(protocol: Any, exc: Exception | None) -> None:
            AutoHTTPProtocol.connection_lost(protocol, exc)
            if balancer._connections is not None:
                balancer._held()

        return cast(
            "type[asyncio.Protocol]",
            type("CountedHTTPProtocol", (AutoHTTPProtocol,), {"connection_lost": connection_lost}),
        )

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
                protocol = balancer._http(**self._arguments)
                transport.set_protocol(protocol)
                protocol.connection_made(transport)

        return BalancedProtocol

    def start(self, connections: set[Any], **protocol_arguments: Any) -> None:
        """Serving: publish the load, read the inbox (in the event loop that serves).

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
        self._counters.cells[self.index] = NOT_SERVING

    def close(self) -> None:
        self.stop_accepting()
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._inbox.fileno())
        self._counters.close()
        self._inbox.close()
        for peer in self._peers.values():
            peer.close()

    def _held(self) -> int:
        """This worker's own load (connections held and being adopted), published as it is computed."""
        assert self._connections is not None
        held = len(self._connections) + self._adopting
        self._counters.cells[self.index] = held
        return held

    def _publish(self) -> None:
        if self._connections is None or self._loop is None:
            return
        self._held()
        self._timer = self._loop.call_later(PUBLISH_SECONDS, self._publish)

    # -- handing over and adopting -------------------------------------------------

    def hand_off(self, transport: asyncio.Transport) -> bool:
        """Give a just-accepted connection to a less loaded worker; True if it went (the transport is let go)."""
        if self._connections is None:
            return False
        if self._try_hand_off(transport):
            return True
        self._counters.cells[self.index] = self._held() + 1  # kept: counted before uvicorn's protocol adds it
        return False

    def _try_hand_off(self, transport: asyncio.Transport) -> bool:
        self._held()
        loads = self._counters.loads()  # this worker's own includes what is on its way here
        target = hand_off_target(self.index, loads[self.index], loads)
        if target is None:
            return False
        sock = transport.get_extra_info("socket")
        if sock is None:
            return False
        sent = self._counters.sent(self.index, target)  # this worker's own counter, counted before it can be taken
        self._counters.cells[sent] += 1
        duplicate = os.dup(sock.fileno())
        try:
            socket.send_fds(self._peers[target], [b"%d" % self.index], [duplicate])
        except OSError:  # inbox full, or its worker gone: keep the connection here
            self._counters.cells[sent] -= 1
            return False
        finally:
            os.close(duplicate)
        transport.abort()  # closes this worker's descriptor only: the connection lives on in the target's
        return True

    def _adopt(self) -> None:
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self._inbox, 16, 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("connection inbox failed", error=type(exc).__name__)
                return
            if not fds:
                return
            for fd in fds:
                self._adopt_one(socket.socket(fileno=fd))
            # Published with them before they stop counting as on their way: the load never reads low.
            if self._connections is not None:
                self._held()
            sender = int(message) if message.isdigit() else -1
            if 0 <= sender < self._counters.workers:
                self._counters.cells[self._counters.taken(sender, self.index)] += len(fds)

    def _adopt_one(self, sock: socket.socket) -> None:
        arguments = self._protocol_arguments
        if self._loop is None or arguments is None:
            sock.close()
            return
        sock.setblocking(False)
        self._adopting += 1
        task = self._loop.create_task(self._loop.connect_accepted_socket(lambda: self._http(**arguments), sock))
        task.add_done_callback(self._adopted)

    def _adopted(self, task: asyncio.Task[Any]) -> None:
        self._adopting -= 1
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not adopt a handed-over connection", error=type(task.exception()).__name__)


__all__ = ["BalanceChannels", "Balancer", "hand_off_target"]
