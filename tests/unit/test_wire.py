"""broker.wire, the HTTP/1.1 client under the Vault store and the OEM client: exact parsing, safe reuse."""

from __future__ import annotations

import http.server
import io
import socket
import threading
from collections.abc import Iterator

import pytest

from broker import wire
from broker.errors import StoreUnavailable
from broker.stores import vault


def answer(raw: bytes, method: str = "GET") -> tuple[int, str, dict[str, str], bytes, bool]:
    got, keep = wire._read_answer(io.BufferedReader(io.BytesIO(raw)), method)
    return got.status, got.reason, dict(got.headers), got.content, keep


class TestReadResponse:
    def test_content_length_keeps_the_connection(self) -> None:
        """A Content-Length body is read exactly and the connection stays reusable."""
        raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}EXTRA"
        assert answer(raw) == (200, "OK", {"content-type": "application/json", "content-length": "2"}, b"{}", True)

    def test_chunked_with_extension_and_trailer(self) -> None:
        """Chunked answers are joined; chunk extensions and trailers are skipped."""
        raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n"
        assert answer(raw)[3:] == (b"abcde", True)

    @pytest.mark.parametrize(
        "raw",
        [
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx",
            b"HTTP/1.1 200 OK\r\n\r\nx",
        ],
    )
    def test_answers_that_end_the_connection(self, raw: bytes) -> None:
        """Connection: close, HTTP/1.0 and a body read until close leave the connection unusable."""
        assert answer(raw)[3:] == (b"x", False)

    def test_no_body_answers_and_interim_answers(self) -> None:
        """204 has no body; a 100 Continue before the answer is skipped; HEAD has no body."""
        assert answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")[::4] == (204, True)
        assert answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", method="HEAD")[3] == b""

    def test_header_lookup_ignores_case(self) -> None:
        """hvac asks for Content-Type; the server may spell it any way."""
        reader = io.BufferedReader(io.BytesIO(b"HTTP/1.1 200 OK\r\ncOnTeNt-TyPe: a\r\n\r\n"))
        headers = wire._read_answer(reader, "HEAD")[0].headers
        assert headers.get("Content-Type") == "a" and headers["CONTENT-TYPE"] == "a" and "content-type" in headers

    @pytest.mark.parametrize(
        "raw",
        [
            b"",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
            b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        ],
    )
    def test_broken_answers_are_store_unavailable(self, raw: bytes) -> None:
        """A truncated or non-HTTP answer is AnswerFailed (protocol); the store reports it as STORE_UNAVAILABLE."""
        with pytest.raises(wire.AnswerFailed) as info:
            answer(raw)
        assert info.value.protocol
        with pytest.raises(StoreUnavailable), vault._translated("read", "secret/x"):
            answer(raw)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    connections = 0
    dropped = threading.Event()

    def setup(self) -> None:
        super().setup()
        _Handler.connections += 1  # one per accepted connection

    def do_GET(self) -> None:
        if self.path == "/moved":
            self.send_response(307)
            self.send_header("Location", "/v1/here?x=1")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = f"{self.path} {self.headers.get('X-Vault-Token')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if self.path.startswith("/drop"):
            # Close without saying so, as a server does when its idle timeout ends a keep-alive connection.
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            _Handler.dropped.set()

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Handler.connections = 0
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


class TestHttp:
    def test_keep_alive_reuses_one_connection(self, server: str) -> None:
        """Consecutive requests from one thread travel on one connection."""
        http = vault._Http(True)
        for _ in range(3):
            assert http.request("GET", server + "/v1/a", headers={"X-Vault-Token": "t"}, timeout=5).text == "/v1/a t"
        assert _Handler.connections == 1
        http.close()

    def test_connection_closed_by_the_server_is_not_reused(self, server: str) -> None:
        """A connection the server closed while idle is noticed and replaced, not written into."""
        http = vault._Http(True)
        for _ in range(3):
            _Handler.dropped.clear()
            assert http.request("GET", server + "/drop", timeout=5).status_code == 200
            assert _Handler.dropped.wait(5)
        assert _Handler.connections == 3
        http.close()

    def test_connection_idle_too_long_is_not_reused(self, server: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """An idle connection older than IDLE_SECONDS is closed, not risked against the server's own timeout."""
        monkeypatch.setattr(wire, "IDLE_SECONDS", 0.0)
        http = vault._Http(True)
        for _ in range(3):
            assert http.request("GET", server + "/v1/a", timeout=5).status_code == 200
        assert _Handler.connections == 3
        http.close()

    def test_redirect_is_followed_with_params(self, server: str) -> None:
        """A 307 is followed (hvac allows redirects); params reach the final URL."""
        http = vault._Http(True)
        got = http.request("GET", server + "/moved", timeout=5)
        assert (got.status_code, got.text) == (200, "/v1/here?x=1 None")
        assert http.request("GET", server + "/v1/p", params={"version": 2}, timeout=5).text == "/v1/p?version=2 None"
        assert http.request("GET", server + "/moved", allow_redirects=False, timeout=5).status_code == 307
        http.close()

    def test_header_injection_is_refused(self, server: str) -> None:
        """A header value or path with a line break is never sent."""
        http = vault._Http(True)
        with pytest.raises(OSError, match="control character"):
            http.request("GET", server + "/v1/a", headers={"X-Vault-Token": "t\r\nX-Evil: 1"}, timeout=5)
        assert http.request("GET", server + "/v1/a b", timeout=5).text == "/v1/a%20b None"
        http.close()
