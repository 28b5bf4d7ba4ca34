"""An HTTP reverse proxy that injects registry faults, for retry/integrity tests.

``FaultProxy(upstream_url)`` listens on ``http://127.0.0.1:PORT`` and forwards every
request (method, path, query, headers including Authorization, body) to the upstream
registry, streaming the response back. Rules added with ``add_rule()`` replace or
distort the answer to the first N requests matching a method and a path regex; after
that the rule passes requests through. Rules are checked in the order they were added;
the first one with hits left applies.

Actions: ``respond()`` / ``rate_limit()`` / ``fail()`` (answer without forwarding),
``CutBody`` (full Content-Length, then only K bytes, then close), ``Corrupt`` (same
length, flipped bytes), ``IgnoreRange`` (drop Range: 200 with the whole body),
``Redirect`` (307 to a second "blob host" that records what it received and serves the
blob from upstream itself), ``Reset`` (close the connection with a TCP RST, no
response) and ``Delay`` (sleep, then pass).

Every request is recorded (``requests``) with all its headers and the status sent, so
tests can assert what a client did (retries, Range headers, which credentials went
where). ``Location`` headers that point at the upstream are rewritten to the proxy, so
upload sessions keep going through it. Request bodies are read whole before they are
forwarded (fine for test-sized blobs); response bodies stream.
"""

from __future__ import annotations

import email.utils
import io
import json
import math
import re
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from requests import Response, Session

from tests.harness.httpserver import LoopbackHTTPServer, QuietHandler
from tests.harness.net import LOOPBACK

# RFC 9110 7.6.1 hop-by-hop fields, plus what requests/http.server compute themselves.
_HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "transfer-encoding", "upgrade", "host", "content-length",
        # http.server already answered "100 Continue"; the upstream gets the body anyway.
        "expect",
    }
)
_CHUNK = 256 * 1024


# -- actions -------------------------------------------------------------------------


@dataclass(frozen=True)
class Respond:
    """Answer with this status, headers and body; the upstream never sees the request."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


@dataclass(frozen=True)
class CutBody:
    """Forward, send the upstream headers (full Content-Length), ``keep`` bytes, close."""

    keep: int


@dataclass(frozen=True)
class Corrupt:
    """Forward, but flip (XOR 0xFF) ``count`` body bytes from the middle; same length."""

    count: int = 1


@dataclass(frozen=True)
class IgnoreRange:
    """Forward without Range/If-Range, so a ranged GET gets 200 and the whole body."""


@dataclass(frozen=True)
class Redirect:
    """Answer ``status`` with a Location on the blob host, like a storage redirect."""

    status: int = 307


@dataclass(frozen=True)
class Reset:
    """Close the connection with a TCP reset, without any response."""


@dataclass(frozen=True)
class Delay:
    """Sleep ``seconds``, then pass the request through (for client timeouts)."""

    seconds: float


Action = Respond | CutBody | Corrupt | IgnoreRange | Redirect | Reset | Delay


def http_date(seconds_from_now: float) -> str:
    """An IMF-fixdate at least ``seconds_from_now`` in the future (for Retry-After).

    The format has whole seconds: the time is rounded up, so a client honouring it
    waits at least ``seconds_from_now`` (and less than one second more).
    """
    return email.utils.formatdate(math.ceil(time.time() + seconds_from_now), usegmt=True)


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()


def rate_limit(retry_after: str | int | float = 1) -> Respond:
    """429 TOOMANYREQUESTS with ``Retry-After`` (seconds, or a string such as an
    ``http_date()``)."""
    value = retry_after if isinstance(retry_after, str) else f"{retry_after:g}"
    return Respond(
        429,
        (("Retry-After", value), ("Content-Type", "application/json")),
        _error_body("TOOMANYREQUESTS", "too many requests"),
    )


def fail(status: int = 503) -> Respond:
    """A server error (500/502/503...) with a distribution-style JSON body."""
    return Respond(
        status,
        (("Content-Type", "application/json"),),
        _error_body("UNAVAILABLE", f"injected {status}"),
    )


# -- records ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyRequest:
    """A request the proxy (or its blob host) received and what it did with it.

    ``headers`` are all request headers as received, in order; ``status`` is the status
    sent to the client (None after a reset); ``action`` names the rule's action class
    that applied, None for plain pass-through.
    """

    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body_size: int
    status: int | None
    action: str | None

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None

    @property
    def range(self) -> str | None:
        return self.header("Range")


class Rule:
    """A fault applied to the first ``times`` requests matching ``method``, ``path`` and
    ``query``.

    ``path`` and ``query`` are regexes searched in the request's path and query string;
    ``method`` None matches any method, ``query`` None any query. ``hits`` counts the
    requests it applied to. Mutable, guarded by the proxy's lock.
    """

    def __init__(self, action: Action, *, method: str | None, path: str, times: int,
                 query: str | None = None) -> None:
        self.action = action
        self.method = method.upper() if method else None
        self.pattern = re.compile(path)
        self.query = re.compile(query) if query is not None else None
        self.times = times
        self.hits = 0

    def matches(self, method: str, path: str, query: str = "") -> bool:
        return (
            self.hits < self.times
            and (self.method is None or self.method == method)
            and self.pattern.search(path) is not None
            and (self.query is None or self.query.search(query) is not None)
        )

    @property
    def exhausted(self) -> bool:
        return self.hits >= self.times

    def __repr__(self) -> str:
        return (
            f"Rule({self.action!r}, method={self.method}, path={self.pattern.pattern!r},"
            f" hits={self.hits}/{self.times})"
        )


@dataclass(frozen=True)
class _Ticket:
    path: str
    query: str
    authorization: str | None


# -- the proxy -------------------------------------------------------------------------


class FaultProxy:
    """A fault-injecting reverse proxy in front of ``upstream`` (an http(s) base URL).

    ``verify`` is requests' ``verify`` for an https upstream. Call order: construct
    (binds the ports), ``start()``, ``add_rule()`` as needed, ``stop()``; a context
    manager does start/stop. Thread-safe: clients may use it from several threads.
    """

    def __init__(self, upstream: str, *, verify: bool | str | Path = True) -> None:
        self.upstream = upstream.rstrip("/")
        self.verify: bool | str = str(verify) if isinstance(verify, Path) else verify
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._requests: list[ProxyRequest] = []
        self._blob_requests: list[ProxyRequest] = []
        self._tickets: dict[str, _Ticket] = {}
        self._local = threading.local()
        self._server = LoopbackHTTPServer(_ProxyHandler, self)
        self._blob_server = LoopbackHTTPServer(_BlobHostHandler, self)

    # -- addresses and lifecycle ----------------------------------------------------

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def blob_host_url(self) -> str:
        """Base URL of the redirect target server."""
        return f"http://{LOOPBACK}:{self._blob_server.port}"

    def start(self) -> FaultProxy:
        self._server.start(f"fault-proxy:{self.port}")
        self._blob_server.start(f"fault-proxy-blobs:{self._blob_server.port}")
        return self

    def stop(self) -> None:
        """Stop both servers and cut their open connections. Idempotent."""
        self._server.stop()
        self._blob_server.stop()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- rules ----------------------------------------------------------------------

    def add_rule(
        self, action: Action, *, method: str | None = None, path: str = "",
        query: str | None = None, times: int = 1,
    ) -> Rule:
        """Apply ``action`` to the next ``times`` requests matching; returns the rule."""
        rule = Rule(action, method=method, path=path, query=query, times=times)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    def _take_rule(self, method: str, path: str, query: str = "") -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.matches(method, path, query):
                    rule.hits += 1
                    return rule
        return None

    # -- records --------------------------------------------------------------------

    @property
    def requests(self) -> list[ProxyRequest]:
        """Every request the proxy received, in arrival order of their answers."""
        with self._lock:
            return list(self._requests)

    @property
    def blob_requests(self) -> list[ProxyRequest]:
        """Every request the blob host (redirect target) received."""
        with self._lock:
            return list(self._blob_requests)

    def mark(self) -> int:
        with self._lock:
            return len(self._requests)

    def since(self, mark: int) -> list[ProxyRequest]:
        with self._lock:
            return self._requests[mark:]

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()
            self._blob_requests.clear()

    def _record(self, entry: ProxyRequest, *, blob_host: bool = False) -> None:
        with self._lock:
            (self._blob_requests if blob_host else self._requests).append(entry)

    # -- upstream -------------------------------------------------------------------

    def _session(self) -> Session:
        # One session per handler thread: requests.Session is not thread-safe.
        session: Session | None = getattr(self._local, "session", None)
        if session is None:
            session = Session()
            # Forward exactly what the client sent: no default Accept, User-Agent or
            # Accept-Encoding, no proxies from the environment, no cookies kept.
            session.headers.clear()
            session.trust_env = False
            self._local.session = session
        return session

    def _forward(
        self, method: str, path_query: str, headers: list[tuple[str, str]], body: bytes
    ) -> Response:
        return self._session().request(
            method,
            self.upstream + path_query,
            headers=dict(_merge_headers(headers)),
            data=body if body else None,
            stream=True,
            allow_redirects=False,
            verify=self.verify,
            timeout=60,
        )

    def _rewrite_location(self, value: str) -> str:
        if value.startswith(self.upstream):
            return self.url + value[len(self.upstream):]
        return value

    def _new_ticket(self, path: str, query: str, authorization: str | None) -> str:
        ticket = uuid.uuid4().hex
        with self._lock:
            self._tickets[ticket] = _Ticket(path, query, authorization)
        return ticket

    def _ticket(self, ticket: str) -> _Ticket | None:
        with self._lock:
            return self._tickets.get(ticket)


def _merge_headers(headers: list[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """Fold repeated request headers into one comma-joined value (RFC 9110 5.3)."""
    merged: dict[str, tuple[str, list[str]]] = {}
    for name, value in headers:
        merged.setdefault(name.lower(), (name, []))[1].append(value)
    for name, values in merged.values():
        yield name, ", ".join(values)


def _forwardable(headers: Any) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers.items() if k.lower() not in _HOP_BY_HOP]


class _ProxyHandler(QuietHandler):
    server: LoopbackHTTPServer

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_GET
    do_POST = do_GET
    do_PUT = do_GET
    do_PATCH = do_GET
    do_DELETE = do_GET

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.owner
        split = urlsplit(self.path)
        path, query = split.path, split.query
        received = list(self.headers.items())
        rule = proxy._take_rule(self.command, path, query)
        action = rule.action if rule is not None else None
        action_name = type(action).__name__ if action is not None else None

        if isinstance(action, Reset):
            proxy._record(self._entry(path, query, received, 0, None, action_name))
            self._reset()
            return
        body = self.read_body()

        def record(status: int | None) -> None:
            proxy._record(self._entry(path, query, received, len(body), status, action_name))

        if isinstance(action, Respond):
            record(action.status)
            self.send_bytes(action.status, action.body, dict(action.headers))
            return
        if isinstance(action, Redirect):
            ticket = proxy._new_ticket(path, query, self.headers.get("Authorization"))
            location = f"{proxy.blob_host_url}/{ticket}{path}" + (f"?{query}" if query else "")
            record(action.status)
            self.send_bytes(action.status, b"", {"Location": location})
            return
        if isinstance(action, Delay):
            time.sleep(action.seconds)

        forward = _forwardable(self.headers)
        if isinstance(action, IgnoreRange):
            forward = [(k, v) for k, v in forward if k.lower() not in ("range", "if-range")]
        path_query = path + (f"?{query}" if query else "")
        try:
            upstream = proxy._forward(self.command, path_query, forward, body)
        except requests.RequestException as exc:
            # What a real proxy does when its upstream is gone.
            record(502)
            self.send_bytes(502, f"upstream unreachable: {exc}".encode(),
                            {"Content-Type": "text/plain"})
            return
        with upstream:
            self._relay(proxy, upstream, action, record)

    def _relay(
        self,
        proxy: FaultProxy,
        upstream: Response,
        action: Action | None,
        record: Callable[[int | None], None],
    ) -> None:
        headers = [
            (k, proxy._rewrite_location(v) if k.lower() == "location" else v)
            for k, v in upstream.raw.headers.items()
            if k.lower() not in _HOP_BY_HOP
        ]
        has_body = self.command != "HEAD" and upstream.status_code not in (204, 304)
        length = upstream.headers.get("Content-Length")
        chunks: Iterator[bytes] = upstream.raw.stream(_CHUNK, decode_content=False)
        if isinstance(action, Corrupt) and has_body:
            data = _flip(b"".join(chunks), action.count)
            chunks = iter([data])
            length = str(len(data))

        # send_response_only: the upstream's own Date and Server headers are relayed.
        self.send_response_only(upstream.status_code)
        for name, value in headers:
            self.send_header(name, value)
        chunked = has_body and length is None
        if length is not None:
            self.send_header("Content-Length", length)
        elif chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", "0")
        # Record before the headers go out: once a client has the response, the record
        # is there to assert on.
        record(upstream.status_code)
        self.end_headers()
        if not has_body:
            return
        budget = action.keep if isinstance(action, CutBody) else None
        try:
            for chunk in chunks:
                if budget is not None:
                    chunk = chunk[:budget]
                    budget -= len(chunk)
                if chunked and chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                elif chunk:
                    self.wfile.write(chunk)
                if budget == 0:
                    break
        except (OSError, urllib3.exceptions.HTTPError):
            # The client went away or the upstream died mid-body: the response is
            # incomplete either way, so the connection cannot carry another one.
            self.close_connection = True
            return
        if budget is not None:
            # The promised length was not sent: the connection cannot be reused.
            self.wfile.flush()
            self.close_connection = True
            return
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _entry(
        self,
        path: str,
        query: str,
        headers: list[tuple[str, str]],
        body_size: int,
        status: int | None,
        action: str | None,
    ) -> ProxyRequest:
        return ProxyRequest(
            method=self.command, path=path, query=query, headers=tuple(headers),
            body_size=body_size, status=status, action=action,
        )

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN. The
        # socket's file objects hold references to it: close them first so close()
        # really closes.
        conn = self.connection
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.rfile.close()
        self.wfile.close()
        conn.close()
        # http.server flushes and closes these after the handler returns.
        self.rfile = io.BytesIO()
        self.wfile = io.BytesIO()


class _BlobHostHandler(QuietHandler):
    """The redirect target: ``/<ticket>/v2/...`` served from upstream with the
    credentials the proxy saw on the original request (a pre-signed URL, in effect)."""

    server: LoopbackHTTPServer

    def do_GET(self) -> None:
        proxy: FaultProxy = self.server.owner
        split = urlsplit(self.path)
        ticket_id, _, rest = split.path.lstrip("/").partition("/")
        received = tuple(self.headers.items())
        ticket = proxy._ticket(ticket_id)

        def record(status: int) -> None:
            proxy._record(
                ProxyRequest(
                    method=self.command, path=split.path, query=split.query,
                    headers=received, body_size=0, status=status, action="BlobHost",
                ),
                blob_host=True,
            )

        if ticket is None or "/" + rest != ticket.path:
            record(404)
            self.send_bytes(404, b"unknown ticket", {"Content-Type": "text/plain"})
            return
        forward: dict[str, str] = {}
        if ticket.authorization:
            forward["Authorization"] = ticket.authorization
        for name in ("Range", "If-Range", "Accept"):
            value = self.headers.get(name)
            if value is not None:
                forward[name] = value
        path_query = ticket.path + (f"?{ticket.query}" if ticket.query else "")
        try:
            upstream = proxy._session().request(
                self.command, proxy.upstream + path_query, headers=forward, stream=True,
                allow_redirects=False, verify=proxy.verify, timeout=60,
            )
        except requests.RequestException as exc:
            record(502)
            self.send_bytes(502, f"upstream unreachable: {exc}".encode())
            return
        with upstream:
            length = upstream.headers.get("Content-Length")
            whole: bytes | None = None
            if length is None and self.command != "HEAD":
                # A body without a length: buffer it to send one.
                whole = upstream.raw.read(decode_content=False) or b""
                length = str(len(whole))
            self.send_response(upstream.status_code)
            # Only content headers: a storage host knows nothing of registry headers.
            for name in ("Content-Type", "Content-Range", "Accept-Ranges", "ETag",
                         "Docker-Content-Digest"):
                value = upstream.headers.get(name)
                if value is not None:
                    self.send_header(name, value)
            self.send_header("Content-Length", length or "0")
            record(upstream.status_code)
            self.end_headers()
            if self.command == "HEAD":
                return
            if whole is not None:
                self.wfile.write(whole)
                return
            try:
                for chunk in upstream.raw.stream(_CHUNK, decode_content=False):
                    self.wfile.write(chunk)
            except (OSError, urllib3.exceptions.HTTPError):
                self.close_connection = True

    do_HEAD = do_GET


def _flip(data: bytes, count: int) -> bytes:
    if not data:
        return data
    start = len(data) // 2
    end = min(len(data), start + max(1, count))
    flipped = bytes(b ^ 0xFF for b in data[start:end])
    return data[:start] + flipped + data[end:]


def respond(status: int, body: bytes = b"", headers: Mapping[str, str] | None = None) -> Respond:
    """A custom canned answer."""
    return Respond(status, tuple((headers or {}).items()), body)
