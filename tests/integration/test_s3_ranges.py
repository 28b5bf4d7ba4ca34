"""The S3 download's ranged GETs against answers SeaweedFS never gives.

A loopback HTTP/1.1 server answers ``GET /bucket/obj`` with ``Range`` like an S3 server
would (206, ``Content-Range``, the ETag), in one of three ways:

- ``chunked``: the range's bytes in several chunks (``Transfer-Encoding: chunked``), as
  a proxy or gateway in front of a bucket may send them. The last, empty chunk comes
  a moment after the range's bytes: a reader that hands the connection back before
  reading it leaves it on the socket, and the next request on that connection reads
  it as its status line (and is sent again) or finds the connection unusable (and
  opens another): the server sees more requests or more connections;
- ``surplus``: chunked, with one byte more than the range;
- ``long``: a ``Content-Length`` one byte over the range.

The witness is the server's own log of requests and connections, and the bytes of the
downloaded file against the object's.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import objstore
from pipeline.errors import TransportError
from pipeline.objstore import ObjectInfo, S3Store
from tests.harness.httpserver import LoopbackHTTPServer, QuietHandler

SIZE = 5 * 64 * 1024 + 100  # six ranges of 64 KiB, the last one short
ETAG = "0123456789abcdef0123456789abcdef"
DATA = bytes((i * 7 + i // 251) % 256 for i in range(SIZE))


class RangeServer:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests: list[tuple[int, str]] = []  # (client port: the connection, Range)
        self.lock = threading.Lock()
        self.http = LoopbackHTTPServer(_Handler, self)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http.port}"

    def connections(self) -> int:
        with self.lock:
            return len({c for c, _ in self.requests})


class _Handler(QuietHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        server: RangeServer = self.server.owner  # type: ignore[attr-defined]
        wanted = self.headers.get("Range", "")
        with server.lock:
            server.requests.append((self.client_address[1], wanted))
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", wanted)
        if self.path.split("?")[0] != "/bucket/obj" or match is None:
            self.send_response(400)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = int(match[1]), int(match[2])
        body = DATA[start:end + 1]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{SIZE}")
        self.send_header("ETag", f'"{ETAG}"')
        self.send_header("Content-Type", "application/octet-stream")
        if server.mode == "long":
            self.send_header("Content-Length", str(len(body) + 1))
            self.end_headers()
            self.wfile.write(body + b"x")
            return
        if server.mode == "surplus":
            body += b"x"
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for at in range(0, len(body), 10_000):
            piece = body[at:at + 10_000]
            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        # The last chunk comes a moment later, on its own, so it is still on the
        # socket (not read ahead into the client's buffer) when the range's bytes are.
        time.sleep(0.05)
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setattr(objstore, "RANGE_SIZE", 64 * 1024)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    started: list[RangeServer] = []

    def start(mode: str) -> RangeServer:
        server = RangeServer(mode)
        server.http.start(f"range-{mode}")
        started.append(server)
        return server

    yield start
    for server in started:
        server.http.stop()


def download(server: RangeServer, dest: Path) -> objstore.Downloaded:
    store = S3Store("bucket", "", endpoint_url=server.endpoint)
    return store.download("obj", dest / ".obj.partial", info=ObjectInfo("obj", SIZE, ETAG))


def test_chunked_ranges_leave_every_connection_clean(serve: Any, tmp_path: Path) -> None:
    server = serve("chunked")
    got = download(server, tmp_path)
    assert got.sha256 == hashlib.sha256(DATA).hexdigest()
    assert (tmp_path / ".obj.partial").read_bytes() == DATA
    # One request per range and no retry: a connection handed back with the last chunk
    # unread makes the next request on it fail and be sent again.
    ranges = sorted(r for _, r in server.requests)
    assert len(ranges) == 6, server.requests
    assert len(set(ranges)) == 6
    assert server.connections() <= objstore.RANGE_STREAMS


@pytest.mark.parametrize(("mode", "message"), [
    ("surplus", "sent more than range"),
    ("long", "came with a body of"),
])
def test_a_body_longer_than_its_range_fails(serve: Any, tmp_path: Path, mode: str,
                                            message: str) -> None:
    server = serve(mode)
    with pytest.raises(TransportError, match=message):
        download(server, tmp_path)
    record = objstore.partial_record(tmp_path / ".obj.partial")
    done = record.read_text() if record.exists() else ""
    assert '"done":[]' in done or not done, "a range with a wrong body was recorded"
