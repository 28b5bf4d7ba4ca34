"""A forward HTTP proxy on loopback, to prove a client really goes through a proxy.

``ForwardProxy()`` listens on ``http://127.0.0.1:PORT`` and serves the two ways a
client uses a forward proxy (RFC 9110 9.3.6 and 7.1):

- absolute-form requests (``GET http://127.0.0.1:5000/v2/ HTTP/1.1``) for plain-http
  targets: forwarded with their method, end-to-end headers and body; the response is
  streamed back;
- ``CONNECT host:port`` tunnels: answered ``200``, then bytes are relayed both ways,
  untouched, until either side closes. TLS runs end to end inside the tunnel, so the
  client still verifies the target's certificate.

With ``auth=(user, password)`` every request must carry a matching Basic
``Proxy-Authorization`` header; a missing or wrong one gets ``407`` with a
``Proxy-Authenticate`` challenge.

The proxy only ever connects to loopback targets (``127.0.0.0/8``, ``::1``,
``localhost``, which is taken as ``127.0.0.1`` without any name lookup): any other
target gets ``403`` and no connection is attempted. The test machine must never send
traffic elsewhere, whatever a client asks for.

Every request and tunnel is recorded (``records``) with its method, target, whether a
proxy credential was sent (never the credential itself), the status answered and the
bytes relayed, so tests can assert that traffic went through the proxy.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import http.client
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass, replace
from urllib.parse import quote, urlsplit

from tests.harness.httpserver import LoopbackHTTPServer, QuietHandler
from tests.harness.net import LOOPBACK

# RFC 9110 7.6.1 hop-by-hop fields, the de-facto Proxy-Connection, and what this proxy
# recomputes itself (the body is re-framed towards each side).
_HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
        "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
        "content-length",
        # http.server has already answered "100 Continue"; the target gets the body anyway.
        "expect",
    }
)
_CHUNK = 64 * 1024
# How long a connection to a target may stay silent before the proxy gives up on it.
_TARGET_TIMEOUT = 60.0
REALM = "bmsync-test-proxy"


class TargetRefused(Exception):
    """A target the proxy will not connect to (not loopback, or not parseable)."""


@dataclass(frozen=True)
class ProxyRecord:
    """One request or tunnel the proxy handled.

    ``method`` is the request method (``CONNECT`` for a tunnel); ``target`` is the
    request target as received: the absolute URI, or ``host:port`` for a tunnel.
    ``proxy_auth`` says whether a ``Proxy-Authorization`` header was sent at all (right
    or wrong). ``status`` is the status the proxy answered (for a forwarded request,
    the target's status; 502 when the target could not be reached). ``bytes_up`` and
    ``bytes_down`` count body (or tunnel) bytes relayed client->target and
    target->client; ``finished`` turns True once the exchange is over, so the counts
    are final.
    """

    method: str
    target: str
    proxy_auth: bool
    status: int
    bytes_up: int = 0
    bytes_down: int = 0
    finished: bool = False

    @property
    def tunnel(self) -> bool:
        return self.method == "CONNECT"

    @property
    def path(self) -> str:
        """The path of an absolute-form target ("" for a tunnel)."""
        return "" if self.tunnel else urlsplit(self.target).path


class ForwardProxy:
    """A threaded forward proxy on 127.0.0.1 (port 0 picks a free one).

    Call order: construct (binds the port, so ``url`` is known), ``start()``, then
    ``stop()`` (idempotent; cuts open connections and tunnels); a context manager does
    start/stop. ``auth`` turns on Basic proxy authentication. Thread-safe: clients may
    use it from several threads and processes at once.
    """

    def __init__(self, *, auth: tuple[str, str] | None = None, port: int = 0) -> None:
        self.auth = auth
        self._lock = threading.Condition()
        self._records: list[ProxyRecord] = []
        self._active = 0
        self._server = LoopbackHTTPServer(_ForwardHandler, self, port=port)

    # -- addresses and lifecycle ----------------------------------------------------

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, without credentials."""
        return f"http://{self.host}"

    @property
    def url_with_credentials(self) -> str:
        """``http://USER:PASSWORD@127.0.0.1:PORT`` (userinfo percent-encoded).

        Raises ValueError when the proxy has no ``auth``.
        """
        if self.auth is None:
            raise ValueError("this proxy has no credentials")
        user, password = (quote(part, safe="") for part in self.auth)
        return f"http://{user}:{password}@{self.host}"

    def start(self) -> ForwardProxy:
        self._server.start(f"forward-proxy:{self.port}")
        return self

    def stop(self) -> None:
        """Stop accepting, cut every open connection and tunnel. Idempotent."""
        self._server.stop()

    def __enter__(self) -> ForwardProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- records --------------------------------------------------------------------

    @property
    def records(self) -> list[ProxyRecord]:
        """Every request and tunnel, in the order the proxy answered them."""
        with self._lock:
            return list(self._records)

    @property
    def tunnels(self) -> list[ProxyRecord]:
        """The CONNECT records only."""
        return [r for r in self.records if r.tunnel]

    def clear(self) -> None:
        """Forget the records (exchanges still open keep counting into a dropped entry)."""
        with self._lock:
            self._records = []

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Block until no request or tunnel is in progress, so byte counts are final.

        A client that has exited has closed its sockets, but the relay threads see that
        a moment later. Raises ``TimeoutError`` when exchanges are still open after
        ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._active:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self._active} proxy exchange(s) still open")
                self._lock.wait(left)

    def _begin(self, record: ProxyRecord) -> _Slot:
        with self._lock:
            self._records.append(record)
            self._active += 1
            return _Slot(self._records, len(self._records) - 1)

    def _finish(self, slot: _Slot, bytes_up: int, bytes_down: int) -> None:
        with self._lock:
            entry = slot.records[slot.index]
            slot.records[slot.index] = replace(
                entry, bytes_up=bytes_up, bytes_down=bytes_down, finished=True
            )
            self._active -= 1
            self._lock.notify_all()

    def _record_refusal(self, method: str, target: str, proxy_auth: bool, status: int) -> None:
        with self._lock:
            self._records.append(
                ProxyRecord(method, target, proxy_auth, status, finished=True)
            )

    def _authorized(self, header: str | None) -> bool:
        if self.auth is None:
            return True
        if header is None:
            return False
        scheme, _, encoded = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        expected = f"{self.auth[0]}:{self.auth[1]}".encode()
        return hmac.compare_digest(decoded, expected)


@dataclass(frozen=True)
class _Slot:
    # The list the record went into: ``clear()`` swaps the list, so a late finish
    # updates the dropped list instead of someone else's entry.
    records: list[ProxyRecord]
    index: int


def loopback_address(host: str) -> str:
    """The address to connect to for ``host``, which must be a loopback target.

    IP literals in 127.0.0.0/8 or ``::1`` are returned as they are; ``localhost`` maps
    to 127.0.0.1 without a name lookup (a lookup could answer anything). Raises
    ``TargetRefused`` for every other host.
    """
    if host.lower() == "localhost":
        return LOOPBACK
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise TargetRefused(f"{host!r} is not a loopback address") from None
    if not address.is_loopback:
        raise TargetRefused(f"{host} is not a loopback address")
    return str(address)


def _split_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    parts = urlsplit("//" + authority)
    try:
        port = parts.port
    except ValueError:
        raise TargetRefused(f"bad port in {authority!r}") from None
    host = parts.hostname
    if not host or parts.username is not None:
        raise TargetRefused(f"bad target {authority!r}")
    if port is None:
        if default_port is None:
            raise TargetRefused(f"no port in {authority!r}")
        port = default_port
    return host, port


class _BodyReader:
    """Reads exactly ``length`` bytes of a request body from the client, counting them."""

    def __init__(self, handler: _ForwardHandler, length: int) -> None:
        self._handler = handler
        self._left = length
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        want = self._left if size is None or size < 0 else min(size, self._left)
        data = self._handler.rfile.read(want)
        self._left -= len(data)
        self.count += len(data)
        if len(data) < want:
            # The client went away mid-body: do not let the target wait for the rest.
            self._left = 0
            raise ConnectionError("client closed the connection during the request body")
        return data


class _ForwardHandler(QuietHandler):
    server: LoopbackHTTPServer

    @property
    def proxy(self) -> ForwardProxy:
        owner: ForwardProxy = self.server.owner
        return owner

    # -- common ----------------------------------------------------------------------

    def _refuse(self, status: int, message: str, *, challenge: bool = False) -> None:
        """Answer an error and close: the request body (if any) was not read."""
        self.proxy._record_refusal(
            self.command, self.path, "Proxy-Authorization" in self.headers, status
        )
        headers = {"Content-Type": "text/plain", "Connection": "close"}
        if challenge:
            headers["Proxy-Authenticate"] = f'Basic realm="{REALM}"'
        self.close_connection = True
        self.send_bytes(status, message.encode() + b"\n", headers)

    def _check_auth(self) -> bool:
        if self.proxy._authorized(self.headers.get("Proxy-Authorization")):
            return True
        self._refuse(407, "proxy authentication required", challenge=True)
        return False

    # -- CONNECT tunnels -----------------------------------------------------------------

    def do_CONNECT(self) -> None:
        if not self._check_auth():
            return
        try:
            host, port = _split_authority(self.path, None)
            address = loopback_address(host)
        except TargetRefused as exc:
            self._refuse(403, f"refused: {exc}")
            return
        try:
            target = socket.create_connection((address, port), timeout=_TARGET_TIMEOUT)
        except OSError as exc:
            self._refuse(502, f"cannot connect to {self.path}: {exc}")
            return
        slot = self.proxy._begin(
            ProxyRecord("CONNECT", self.path, "Proxy-Authorization" in self.headers, 200)
        )
        # The connection becomes the tunnel: it can never carry another request.
        self.close_connection = True
        counts = [0, 0]
        try:
            self.send_response(200, "Connection established")
            self.end_headers()
            self._relay(target, counts)
        finally:
            target.close()
            self.proxy._finish(slot, counts[0], counts[1])

    def _relay(self, target: socket.socket, counts: list[int]) -> None:
        """Copy bytes both ways until either side closes; ``counts`` = [up, down]."""
        client = self.connection

        def upstream() -> None:
            try:
                while True:
                    # read1: bytes the client sent right after the CONNECT head may
                    # already sit in rfile's buffer; they must not be lost.
                    data = self.rfile.read1(_CHUNK)
                    if not data:
                        break
                    target.sendall(data)
                    counts[0] += len(data)
            except OSError:
                pass  # either side went away: the tunnel is over
            finally:
                _shutdown(target)
                _shutdown(client)

        pump = threading.Thread(target=upstream, name="forward-proxy-up", daemon=True)
        pump.start()
        try:
            while True:
                data = target.recv(_CHUNK)
                if not data:
                    break
                client.sendall(data)
                counts[1] += len(data)
        except OSError:
            pass  # either side went away: the tunnel is over
        finally:
            _shutdown(client)
            _shutdown(target)
            pump.join(timeout=_TARGET_TIMEOUT)

    # -- absolute-form requests ------------------------------------------------------

    def _forward(self) -> None:
        if not self._check_auth():
            return
        parts = urlsplit(self.path)
        if parts.scheme != "http" or not parts.netloc:
            # Origin-form requests are for servers, not proxies; https targets need
            # CONNECT so that TLS stays end to end.
            self._refuse(400, "a forward proxy needs an absolute http:// URI or CONNECT")
            return
        try:
            host, port = _split_authority(parts.netloc, 80)
            address = loopback_address(host)
        except TargetRefused as exc:
            self._refuse(403, f"refused: {exc}")
            return
        origin_form = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = [
            (name, value) for name, value in self.headers.items()
            if name.lower() not in _HOP_BY_HOP
        ]
        if "Host" not in self.headers:
            # An HTTP/1.0 client may omit Host; the target still needs one.
            headers.append(("Host", parts.netloc))
        body: _BodyReader | bytes | None = None
        declared = self.headers.get("Content-Length")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = self.read_body()
            headers.append(("Content-Length", str(len(body))))
        elif declared is not None:
            if not declared.strip().isdigit():
                self._refuse(400, f"bad Content-Length {declared!r}")
                return
            body = _BodyReader(self, int(declared))
            headers.append(("Content-Length", str(int(declared))))

        conn = http.client.HTTPConnection(address, port, timeout=_TARGET_TIMEOUT)
        try:
            try:
                conn.putrequest(self.command, origin_form, skip_host=True,
                                skip_accept_encoding=True)
                for name, value in headers:
                    conn.putheader(name, value)
                conn.endheaders()
                if isinstance(body, bytes):
                    conn.send(body)
                elif body is not None:
                    while chunk := body.read(_CHUNK):
                        conn.send(chunk)
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                self._refuse(502, f"cannot forward to {parts.netloc}: {exc}")
                return
            sent = body.count if isinstance(body, _BodyReader) else len(body or b"")
            self._send_back(response, sent)
        finally:
            conn.close()

    def _send_back(self, response: http.client.HTTPResponse, bytes_up: int) -> None:
        has_body = self.command != "HEAD" and response.status not in (204, 304) and not (
            100 <= response.status < 200
        )
        length = response.getheader("Content-Length")
        chunked = has_body and length is None
        slot = self.proxy._begin(
            ProxyRecord(
                self.command, self.path, "Proxy-Authorization" in self.headers,
                response.status, bytes_up,
            )
        )
        down = 0
        try:
            # send_response_only: the target's own Date and Server headers are relayed.
            self.send_response_only(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            if length is not None:
                self.send_header("Content-Length", length)
            elif chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if not has_body:
                return
            try:
                while chunk := response.read1(_CHUNK):
                    if chunked:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    else:
                        self.wfile.write(chunk)
                    down += len(chunk)
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")
            except (OSError, http.client.HTTPException):
                # The client left or the target died mid-body: the response is
                # incomplete, so the connection cannot carry another one.
                self.close_connection = True
                return
            if length is not None and down != int(length):
                # The target promised more than it sent: the client must see a cut.
                self.close_connection = True
        finally:
            self.proxy._finish(slot, bytes_up, down)

    do_GET = _forward
    do_HEAD = _forward
    do_POST = _forward
    do_PUT = _forward
    do_PATCH = _forward
    do_DELETE = _forward
    do_OPTIONS = _forward


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or never connected
