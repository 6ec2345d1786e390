"""A small HTTP/1.1 client on the standard library, for the broker's busiest outbound calls.

The Vault store (under hvac) and the OEM client (as an httpx transport) send
through a ``Pool``. It exists for CPU: the engine runs many threads under one
interpreter lock, and a call through requests, urllib3 or httpcore costs
several times the Python work of this one.

What it does, and nothing more:

* HTTP/1.1 over TCP or TLS (``ssl.SSLContext`` given by the caller: CA
  bundle and host-name check are the caller's choice), keep-alive, one
  request per connection at a time; idle connections are kept per origin
  (up to ``max_idle_per_origin``, most recently used first) and dropped if
  the server closed them meanwhile (the connection is readable while idle)
  or if they sat idle ``IDLE_SECONDS``: servers end idle keep-alive
  connections on their own clock (uvicorn after 5 s), and one that does so
  just as a request goes out turns a harmless reuse into an ambiguous failure
  (httpx keeps idle connections 5 s for the same reason).
* A request is written in one ``sendall``: request line, ``Host``,
  ``Accept-Encoding: identity``, ``Content-Length`` (when there is a body or
  the method has one), then the caller's headers (any it gives for those
  four names, or ``Transfer-Encoding`` / ``Connection``, are dropped). A
  space or control character in the request line or a header is refused,
  so nothing can be injected.
* An answer is read by ``Content-Length``, chunked coding or until close,
  with bounded line, header and body sizes; 1xx interim answers are
  skipped. Nothing is retried and no redirect is followed (callers decide).
* Errors are ``WireError`` (an ``OSError``) naming the phase: ``ConnectFailed``
  (nothing was sent), ``SendFailed`` and ``AnswerFailed`` (the request may
  have been acted on), with ``timed_out`` and ``protocol`` flags and the
  original exception as ``__cause__``.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_SET_HERE = frozenset({"host", "content-length", "accept-encoding", "transfer-encoding", "connection"})
_MAX_LINE_BYTES = 65536
_MAX_HEADERS = 100
_MAX_BODY_BYTES = 64 * 1024 * 1024
IDLE_SECONDS = 4.0


class WireError(OSError):
    """A call failed; ``cause_name`` names what failed underneath (``ConnectionRefusedError`` ...)."""

    def __init__(self, cause_name: str, *, timed_out: bool = False, protocol: bool = False) -> None:
        super().__init__(cause_name)
        self.cause_name = cause_name
        self.timed_out = timed_out
        self.protocol = protocol


class ConnectFailed(WireError):
    """No connection (refused, unresolvable, TLS handshake or verification, connect timeout): nothing was sent."""


class SendFailed(WireError):
    """Writing the request failed part-way: the server may have acted on it."""


class AnswerFailed(WireError):
    """The answer did not arrive whole or was not HTTP/1.1: the server may have acted on the request."""


class Headers(dict[str, str]):
    """Answer headers by lower-case name (repeated ones joined with ", "); lookups ignore case."""

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())


@dataclass(frozen=True, slots=True)
class Answer:
    """One HTTP answer, read whole."""

    status: int
    reason: str
    headers: Headers
    content: bytes


class _Connection:
    """One keep-alive connection to one origin, used by one thread at a time."""

    __slots__ = ("idle_since", "reader", "sock")

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None, timeout: float | None) -> None:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise ConnectFailed(type(exc).__name__, timed_out=isinstance(exc, TimeoutError)) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=host)
        except OSError as exc:
            sock.close()
            raise ConnectFailed(type(exc).__name__, timed_out=isinstance(exc, TimeoutError)) from exc
        self.sock = sock
        self.reader = sock.makefile("rb")
        self.idle_since = 0.0

    def dropped(self, now: float) -> bool:
        """True if the idle connection is too old, or readable: the server closed it (or sent what nobody asked for)."""
        if now - self.idle_since >= IDLE_SECONDS:
            return True
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class Pool:
    """Keep-alive connections per origin; ``send`` is safe to call from many threads."""

    def __init__(self, tls: ssl.SSLContext | None, *, max_idle_per_origin: int) -> None:
        self._tls = tls
        self._max_idle = max_idle_per_origin
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def send(
        self,
        method: str,
        url: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | None,
        *,
        connect_timeout: float | None,
        read_timeout: float | None,
        write_timeout: float | None,
    ) -> Answer:
        """Send one request and read its answer (see the module docstring)."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConnectFailed(f"cannot send to a {parts.scheme or 'relative'} URL")
        if parts.scheme == "https" and self._tls is None:
            raise ConnectFailed("no TLS context for an https URL")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        target = urllib.parse.quote(parts.path or "/", safe=_PATH_SAFE) + (f"?{parts.query}" if parts.query else "")
        host = parts.netloc.rpartition("@")[2]  # never send userinfo
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Accept-Encoding: identity"]
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body or b'')}")
        lines.extend(f"{k}: {v}" for k, v in headers if k.lower() not in _SET_HERE)
        if " " in target or any(_CONTROL.search(line) for line in lines):
            raise ConnectFailed("refusing to send a request line or header with a space or control character")
        payload = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
        key = (parts.scheme, parts.hostname, port)
        conn = self._checkout(key, connect_timeout)
        try:
            try:
                conn.sock.settimeout(write_timeout)
                conn.sock.sendall(payload)
            except OSError as exc:
                raise SendFailed(type(exc).__name__, timed_out=isinstance(exc, TimeoutError)) from exc
            try:
                conn.sock.settimeout(read_timeout)
                answer, keep = _read_answer(conn.reader, method)
            except AnswerFailed:
                raise
            except OSError as exc:
                raise AnswerFailed(type(exc).__name__, timed_out=isinstance(exc, TimeoutError)) from exc
        except BaseException:
            conn.close()
            raise
        if keep:
            self._checkin(key, conn)
        else:
            conn.close()
        return answer

    def _checkout(self, key: tuple[str, str, int], timeout: float | None) -> _Connection:
        now = time.monotonic()
        with self._lock:
            idle = self._idle.get(key) or []
            while idle:
                conn = idle.pop()
                if not conn.dropped(now):
                    return conn
                conn.close()
        return _Connection(key[1], key[2], self._tls if key[0] == "https" else None, timeout)

    def _checkin(self, key: tuple[str, str, int], conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if not self._closed and len(idle) < self._max_idle:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close the idle connections; connections in use close when their call ends."""
        with self._lock:
            self._closed = True
            idle = [c for conns in self._idle.values() for c in conns]
            self._idle.clear()
        for conn in idle:
            conn.close()


def _broken(what: str) -> AnswerFailed:
    return AnswerFailed(what, protocol=True)


def _line(reader: Any) -> bytes:
    line: bytes = reader.readline(_MAX_LINE_BYTES + 1)
    if not line:
        raise _broken("connection closed in the middle of an answer")
    if len(line) > _MAX_LINE_BYTES:
        raise _broken("answer line too long")
    return line


def _read_answer(reader: Any, method: str) -> tuple[Answer, bool]:
    """Read one answer; returns it and whether the connection may carry another request."""
    while True:
        version, _, rest = _line(reader).decode("latin-1").rstrip("\r\n").partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise _broken("not an HTTP/1.x status line")
        status = int(code)
        headers = Headers()
        for _ in range(_MAX_HEADERS + 1):
            line = _line(reader)
            if line in (b"\r\n", b"\n"):
                break
            name, colon, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if not colon or not name:
                raise _broken("malformed header line")
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        else:
            raise _broken("too many headers")
        if status >= 200 or status == 101:
            break  # 1xx interim answers (100 Continue ...) are skipped
    keep = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
    if method == "HEAD" or status in (101, 204, 304):
        return Answer(status, reason, headers, b""), keep and status != 101
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return Answer(status, reason, headers, _read_chunked(reader)), keep
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit() or int(length) > _MAX_BODY_BYTES:
            raise _broken("bad Content-Length")
        content: bytes = reader.read(int(length))
        if len(content) != int(length):
            raise _broken("answer shorter than its Content-Length")
        return Answer(status, reason, headers, content), keep
    content = reader.read(_MAX_BODY_BYTES + 1)
    if len(content) > _MAX_BODY_BYTES:
        raise _broken("answer too long")
    return Answer(status, reason, headers, content), False


def _read_chunked(reader: Any) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        size_text = _line(reader).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _broken("bad chunk size") from None
        if size == 0:
            while _line(reader) not in (b"\r\n", b"\n"):
                pass  # trailers
            return b"".join(chunks)
        total += size
        if size < 0 or total > _MAX_BODY_BYTES:
            raise _broken("answer too long")
        chunk: bytes = reader.read(size)
        if len(chunk) != size or _line(reader) not in (b"\r\n", b"\n"):
            raise _broken("chunk broke off")
        chunks.append(chunk)
