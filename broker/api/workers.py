"""``broker serve`` with ``server.workers`` > 1: N worker processes on one port.

Python runs one thread of Python at a time, so one process uses one core.
With ``workers: N`` the ``broker serve`` process becomes a small supervisor:

- it starts N workers, each ``python -m broker serve --worker I
  --listen-fd FD`` with the same environment and a listening socket of its
  own, all bound to the one port with ``SO_REUSEPORT``: the kernel spreads
  new connections evenly over them by a hash of the client address. (With
  one shared socket, whichever worker called ``accept`` first took every
  connection waiting, and a benchmark's 32 connections sometimes all went to
  one worker.) A worker's socket dies with it, so while it restarts its
  share goes to the others instead of waiting in a queue nobody accepts
  from;
- each worker is a whole broker (``Runtime``): its own key cache, identity
  cache and policy set; its own audit chain (worker 0 writes the configured
  file, worker I the same name in ``<audit dir>/worker-I/``: one writer per
  chain); its own leader-election candidacy, exactly as N replicas would be
  (correctness rests on the store's CAS intents, not on who leads);
- metrics are aggregated across workers (Prometheus multiprocess files in a
  private directory), so ``/metrics`` answers the same whichever worker
  serves the scrape;
- SIGTERM / SIGINT are passed to every worker, which drains and stops as a
  single broker would; the supervisor exits when they have, 0 if all did;
- a worker that dies is logged and started again, after a pause that
  doubles from 1 s up to 30 s while it keeps dying young; but one that
  fails at start-up, before it ever served (each worker says when it
  serves, through a pipe), stops them all with its exit status: that is a
  configuration error, which restarting would only repeat.

What changes with N workers: coalescing is per worker (N concurrent cold
requests for one integration may read each secret up to N times), and an
auditor verifies N chains (``broker audit verify`` with no paths does).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from broker.api.balance import BalanceChannels
from broker.audit import worker_audit_path
from broker.errors import ConfigError
from broker.log import get_logger
from broker.metrics import MULTIPROC_ENV, mark_worker_dead
from broker.settings import Settings

log = get_logger("workers")

RESTART_DELAY_SECONDS = 1.0
MAX_RESTART_DELAY_SECONDS = 30.0
HEALTHY_AFTER_SECONDS = 60.0  # a worker that lived this long resets the restart delay
POLL_SECONDS = 0.2
# How a worker is started: this command, then ``serve --worker I --listen-fd FD`` (a benchmark swaps it).
WORKER_COMMAND: tuple[str, ...] = (sys.executable, "-m", "broker")


def worker_settings(settings: Settings, index: int) -> Settings:
    """``settings`` as worker ``index`` uses them (its own audit file)."""
    if settings.audit.file_path is None or index == 0:
        return settings
    audit = settings.audit.model_copy(update={"file_path": worker_audit_path(settings.audit.file_path, index)})
    return settings.model_copy(update={"audit": audit})


def _bound(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``SO_REUSEADDR``, and ``SO_REUSEPORT`` if asked), not listening."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(info[4])
    except BaseException:
        sock.close()
        raise
    return sock


def listen_socket(host: str, port: int) -> socket.socket:
    """A worker's listening socket, one of the ``SO_REUSEPORT`` group on the port (inheritable: it passes by number)."""
    sock = _bound(host, port, reuse_port=True)
    try:
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def claim_port(host: str, port: int) -> int:
    """Check that nothing listens on ``host:port`` and return the port (the one the kernel picked for 0).

    The probe binds without ``SO_REUSEPORT``, so a listener of any kind,
    even another broker's ``SO_REUSEPORT`` group, makes it fail: two brokers
    never silently share a port.
    """
    with _bound(host, port, reuse_port=False) as probe:
        return int(probe.getsockname()[1])


def balance_channels(workers: int) -> BalanceChannels | None:
    """The workers' balancing channels; None (and a warning) where the system refuses them (a memfd, socketpairs).

    Without them the workers serve what the kernel's hash gives each, as before balancing existed.
    """
    try:
        return BalanceChannels(workers)
    except OSError as exc:
        log.warning(
            "connection balancing unavailable; each worker keeps what it accepts", error=exc.strerror or str(exc)
        )
        return None


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float = 0.0
    delay: float = RESTART_DELAY_SECONDS
    runs: int = 0
    ready_fd: int | None = None  # read end of the pipe the worker writes one byte to once serving
    serving: bool = False

    def check_ready(self) -> None:
        if self.ready_fd is None:
            return
        try:
            data = os.read(self.ready_fd, 1)
        except BlockingIOError:
            return
        self.serving = data == b"1"
        os.close(self.ready_fd)
        self.ready_fd = None


class Supervisor:
    """Start, watch, restart and stop the worker processes (module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._workers = [_Worker(i) for i in range(settings.server.workers)]
        self._stopping = threading.Event()
        self._failed_at_start: int | None = None
        self._port = settings.server.port
        self._balance: BalanceChannels | None = None

    def run(self) -> int:
        """Serve until a signal stops the workers; the exit status for the process."""
        server = self._settings.server
        try:
            self._port = claim_port(server.host, server.port)
            first = listen_socket(server.host, self._port)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {server.host}:{server.port}: {exc.strerror or exc}") from None
        balance = self._balance = balance_channels(len(self._workers))
        metrics_dir = Path(tempfile.mkdtemp(prefix="mspc-broker-metrics-"))
        env = dict(os.environ)
        env[MULTIPROC_ENV] = str(metrics_dir)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        log.info("workers starting", workers=len(self._workers), host=server.host, port=self._port)
        try:
            for worker in self._workers:
                self._start(worker, env, first if worker.index == 0 else None)
            while not self._stopping.is_set():
                self._watch(env, metrics_dir)
                self._stopping.wait(POLL_SECONDS)
            status = self._stop(metrics_dir)
            return self._failed_at_start if self._failed_at_start is not None else status
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            first.close()
            for worker in self._workers:  # never leave a worker behind, whatever happened above
                if worker.process is not None and worker.process.poll() is None:
                    worker.process.kill()
                    worker.process.wait()
                if worker.ready_fd is not None:
                    os.close(worker.ready_fd)
            shutil.rmtree(metrics_dir, ignore_errors=True)
            if balance is not None:
                balance.close()

    def _start(self, worker: _Worker, env: dict[str, str], sock: socket.socket | None = None) -> None:
        """Start ``worker`` on ``sock`` or a new socket of the group; the worker owns it from then on."""
        if sock is None:
            try:
                sock = listen_socket(self._settings.server.host, self._port)
            except OSError as exc:
                worker.restart_at = time.monotonic() + worker.delay
                log.error("worker cannot listen; retrying", worker=worker.index, error=exc.strerror or str(exc))
                return
        fd = sock.fileno()
        ready_read, ready_write = os.pipe()
        os.set_blocking(ready_read, False)
        argv = [*WORKER_COMMAND, "serve", "--worker", str(worker.index), "--listen-fd", str(fd)]
        argv += ["--ready-fd", str(ready_write)]
        balance_fds: tuple[int, ...] = ()
        if self._balance is not None:
            spec, balance_fds = self._balance.spec(worker.index)
            argv += ["--balance", spec]
        try:
            worker.process = subprocess.Popen(  # noqa: S603 - our own command
                argv, env=env, pass_fds=(fd, ready_write, *balance_fds), stdin=subprocess.DEVNULL
            )
        finally:
            os.close(ready_write)
            sock.close()  # the worker's copy is the only one left: it closes when the worker dies
        if worker.ready_fd is not None:
            os.close(worker.ready_fd)
        worker.ready_fd, worker.serving = ready_read, False
        worker.runs += 1
        worker.started_at = time.monotonic()
        log.info("worker started", worker=worker.index, pid=worker.process.pid)

    def _watch(self, env: dict[str, str], metrics_dir: Path) -> None:
        now = time.monotonic()
        for worker in self._workers:
            worker.check_ready()
            process = worker.process
            if process is not None and process.poll() is not None:
                worker.process = None
                if self._balance is not None:
                    self._balance.mark_not_serving(worker.index)
                if not worker.serving and worker.runs == 1:
                    # Failing before it ever served, at start-up: a configuration problem (the worker said which
                    # on stderr). Restarting would only repeat it: stop, as a single broker process would.
                    log.error("worker failed at start-up; stopping", worker=worker.index, exit_code=process.returncode)
                    self._failed_at_start = process.returncode or 1
                    self._on_signal(signal.SIGTERM, None)
                    return
                lived = now - worker.started_at
                if lived >= HEALTHY_AFTER_SECONDS:
                    worker.delay = RESTART_DELAY_SECONDS
                worker.restart_at = now + worker.delay
                log.error(
                    "worker exited; restarting",
                    worker=worker.index,
                    pid=process.pid,
                    exit_code=process.returncode,
                    lived_seconds=round(lived, 1),
                    restart_in_seconds=worker.delay,
                )
                worker.delay = min(worker.delay * 2, MAX_RESTART_DELAY_SECONDS)
                mark_worker_dead(metrics_dir, process.pid)
            if worker.process is None and now >= worker.restart_at and not self._stopping.is_set():
                self._start(worker, env)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stopping.set()
        for worker in self._workers:  # a second signal reaches the workers too: they skip the rest of the drain
            if worker.process is not None and worker.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signum)

    def _stop(self, metrics_dir: Path) -> int:
        server = self._settings.server
        deadline = time.monotonic() + server.drain_seconds + server.shutdown_grace_seconds + 10
        status = 0
        for worker in self._workers:
            process = worker.process
            if process is None:
                continue
            try:
                code = process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker did not stop in time; killing it", worker=worker.index, pid=process.pid)
                process.kill()
                code = process.wait()
            mark_worker_dead(metrics_dir, process.pid)
            if code != 0:
                log.error("worker stopped with an error", worker=worker.index, pid=process.pid, exit_code=code)
                status = 1
        log.info("workers stopped", workers=len(self._workers), exit_code=status)
        return status
