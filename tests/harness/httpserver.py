"""A threaded loopback HTTP server that can be stopped cleanly, for harness servers.

``http.server.ThreadingHTTPServer`` leaves keep-alive connections (and the threads
blocked reading them) alive after ``shutdown()``; a test that stops a server must not
leave a client talking to it, so this one tracks its open connections and shuts them
down on ``stop()``.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.harness.net import LOOPBACK


class LoopbackHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer on 127.0.0.1 (port 0 picks a free one) run in a thread.

    Call order: construct (binds the port, so ``port`` is known and reserved), then
    ``start()``, then ``stop()``; ``stop()`` is idempotent. Handlers reach the owning
    harness object through ``server.owner``.
    """

    daemon_threads = True
    # Keep reuse off: two servers must never share a port by accident.
    allow_reuse_address = False

    def __init__(
        self, handler: type[BaseHTTPRequestHandler], owner: Any, *, port: int = 0
    ) -> None:
        super().__init__((LOOPBACK, port), handler)
        self.owner = owner
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False

    @property
    def port(self) -> int:
        port: int = self.server_address[1]
        return port

    def start(self, name: str) -> None:
        """Serve in a daemon thread named ``name``."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, cut every open connection, close the listening socket."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=5)
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its handler
        self.server_close()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)


class QuietHandler(BaseHTTPRequestHandler):
    """Base handler: HTTP/1.1 keep-alive, no stderr access log, bounded idle reads."""

    protocol_version = "HTTP/1.1"
    # A client that goes silent must not pin a handler thread forever.
    timeout = 60

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        return

    def read_body(self) -> bytes:
        """The request body, from Content-Length or chunked transfer coding."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size_line = self.rfile.readline(1024)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # Trailer section ends with an empty line.
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send_bytes(
        self, status: int, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        """Send a complete response with a Content-Length (no body for HEAD)."""
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
