"""`bmsync fetch` and `bmsync publish` resume: what a second run moves, seen on the wire.

A TCP relay on loopback sits between bmsync and SeaweedFS. It passes bytes through
unchanged (so SigV4 signatures, made for the relay's address, still verify), counts
every byte in each direction, and can cut the connection that carries a given ranged
GET after a few bytes of its body. The tests count what crosses the relay, never what
bmsync says about itself, to show that:

- a fetch interrupted on one range keeps the ranges that completed, and the next run
  downloads only the missing one;
- when the object was replaced between the two runs (new ETag), the next run starts
  over from the first byte: bytes of the old and new objects are never stitched;
- a publish that finds the parts of an interrupted multipart upload on the server sends
  only the parts missing, and the object it completes is the archive, byte for byte;
  parts of another size (S3's part limit made them grow) are all sent again.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.objstore import RANGE_SIZE, part_size_for
from pipeline.store import Store
from tests.cli import Run, bmsync
from tests.harness import S3Server
from tests.harness.net import LOOPBACK
from tests.integration.test_objstore import (
    BIG_IMAGE,
    BIG_LAYER,
    Built,
    add_image,
    build,
    sha256_file,
)

# Headers and the small objects (catalog, sidecar, bundle.json) that a fetch reads
# besides the archive's bytes.
OVERHEAD = 256 * 1024


class Relay:
    """A TCP relay from ``127.0.0.1:PORT`` to ``upstream_port``, counting bytes sent back.

    ``cut_range(start)`` arms a one-shot rule: the connection whose request asks for
    ``Range: bytes=START-`` is closed after ``keep`` bytes came back on it (headers and
    the start of the body), mid-body, as a dropped link would. Thread-safe; ``stop()``
    closes the listener and every connection.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._down = 0
        self._up_bytes = 0
        self._cut: bytes | None = None
        self._keep = 0
        self._sockets: list[socket.socket] = []
        self._stopped = False
        self.cuts = 0

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> Relay:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            sockets, self._sockets = self._sockets, []
        self._listener.close()
        for s in sockets:
            self._close(s)

    def take(self) -> int:
        """Bytes sent back by the server since the last call."""
        with self._lock:
            down, self._down = self._down, 0
        return down

    def take_sent(self) -> int:
        """Bytes the client sent to the server since the last call."""
        with self._lock:
            up, self._up_bytes = self._up_bytes, 0
        return up

    def cut_range(self, start: int, *, keep: int = 256 * 1024) -> None:
        with self._lock:
            self._cut = f"bytes={start}-".encode()
            self._keep = keep

    @staticmethod
    def _close(s: socket.socket) -> None:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((LOOPBACK, self.upstream_port))
            with self._lock:
                if self._stopped:
                    self._close(client)
                    self._close(upstream)
                    return
                self._sockets += [client, upstream]
            doomed = threading.Event()
            threading.Thread(target=self._up, args=(client, upstream, doomed),
                             daemon=True).start()
            threading.Thread(target=self._back, args=(upstream, client, doomed),
                             daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket,
            doomed: threading.Event) -> None:
        """Client to server; marks the connection doomed when it asks for the range."""
        while True:
            try:
                data = client.recv(256 * 1024)
            except OSError:
                data = b""
            if not data:
                self._close(upstream)
                return
            with self._lock:
                if self._cut is not None and self._cut in data.lower():
                    self._cut = None
                    doomed.set()
            try:
                upstream.sendall(data)
            except OSError:
                self._close(client)
                return
            with self._lock:
                self._up_bytes += len(data)

    def _back(self, upstream: socket.socket, client: socket.socket,
              doomed: threading.Event) -> None:
        """Server to client, counted; a doomed connection is closed after ``keep``."""
        sent_doomed = 0
        while True:
            try:
                data = upstream.recv(256 * 1024)
            except OSError:
                data = b""
            if not data:
                self._close(client)
                return
            if doomed.is_set():
                data = data[: max(0, self._keep - sent_doomed)]
                sent_doomed += len(data)
            try:
                client.sendall(data)
            except OSError:
                self._close(upstream)
                return
            with self._lock:
                self._down += len(data)
            if doomed.is_set() and sent_doomed >= self._keep:
                with self._lock:
                    self.cuts += 1
                self._close(client)
                self._close(upstream)
                return


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """An archive of over 100 MB (several ranges): one 101 MiB random layer."""
    root = tmp_path_factory.mktemp("big")
    store = Store(root / "store")
    add_image(store, BIG_IMAGE, (BIG_LAYER,))
    return build(store, [BIG_IMAGE], root / "out", "big", day=0, level=1)


@pytest.fixture
def relay(s3_server: S3Server) -> Iterator[Relay]:
    r = Relay(s3_server.port).start()
    try:
        yield r
    finally:
        r.stop()


def _env(server: S3Server, relay: Relay) -> dict[str, str]:
    return {**server.env(), "AWS_ENDPOINT_URL": relay.endpoint}


def _fetch(server: S3Server, relay: Relay, url: str, dest: Path) -> Run:
    return bmsync("fetch", "--from", url, "--release", "big", "--to", str(dest), "--json",
                  env=_env(server, relay))


def _published(server: S3Server, built: Built) -> str:
    """``built`` published (straight to the server) under a fresh prefix; its URL."""
    url = f"s3://{server.bucket}/t-{uuid.uuid4().hex[:12]}"
    done = bmsync("publish", str(built.archive), "--to", url, env=server.env())
    assert done.code == 0, done.output
    return url


def _interrupted(server: S3Server, relay: Relay, url: str, dest: Path, built: Built) -> int:
    """A fetch whose first range loses its connection mid-body. The ranges being read
    then complete (a range not started yet when the cut lands is dropped). Returns the
    bytes the record says are kept."""
    assert built.size > 2 * RANGE_SIZE, "the archive must span several ranges"
    relay.cut_range(0)
    first = _fetch(server, relay, url, dest)
    assert relay.cuts == 1, "the relay never saw the first range's request"
    assert first.code == 4, first.output
    assert "connection lost" in first.stderr
    assert "run the same command again" in first.stderr
    assert not (dest / built.name).exists(), "an unverified archive has its final name"
    partial = dest / f".{built.name}.partial"
    assert partial.exists()
    record = json.loads(partial.with_name(partial.name + ".ranges").read_text())
    assert 0 not in record["done"]
    assert record["done"], "no range was kept"
    return sum(min(RANGE_SIZE, built.size - s) for s in record["done"])


def test_resumed_fetch_downloads_only_the_missing_range(
        s3_server: S3Server, relay: Relay, big: Built, tmp_path: Path) -> None:
    url = _published(s3_server, big)
    dest = tmp_path / "fetched"
    kept = _interrupted(s3_server, relay, url, dest, big)
    relay.take()

    again = _fetch(s3_server, relay, url, dest)
    assert again.code == 0, again.output
    on_the_wire = relay.take()
    # Only the ranges the record lacks (the first one at least) cross the wire again,
    # with a little overhead.
    missing = big.size - kept
    assert RANGE_SIZE <= missing
    assert missing <= on_the_wire <= missing + OVERHEAD, on_the_wire
    assert again.json()["bytesDownloaded"] == missing
    assert sha256_file(dest / big.name) == big.sha256
    assert not list(dest.glob(".*")), "fetch left hidden partial files"


def test_object_replaced_between_runs_is_fetched_again_whole(
        s3_server: S3Server, relay: Relay, big: Built, tmp_path: Path) -> None:
    url = _published(s3_server, big)
    dest = tmp_path / "fetched"
    _interrupted(s3_server, relay, url, dest, big)

    # The version is replaced behind bmsync's back by other bytes of the same size (one
    # byte changed in every range, so any range kept from the old object would show),
    # with its sidecar and catalog entry to match.
    prefix = url.removeprefix(f"s3://{s3_server.bucket}/")
    client = s3_server.client()
    data = bytearray(big.archive.read_bytes())
    for at in range(0, len(data), RANGE_SIZE):
        data[at + 100] ^= 0xFF
    new_sha = hashlib.sha256(data).hexdigest()
    client.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/big/{big.name}", Body=bytes(data))
    client.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/big/{big.name}.sha256",
                      Body=f"{new_sha}  {big.name}\n".encode())
    catalog_key = f"{prefix}/catalog.json"
    catalog = json.loads(client.get_object(Bucket=s3_server.bucket,
                                           Key=catalog_key)["Body"].read())
    catalog["versions"]["big"]["digest"] = f"sha256:{new_sha}"
    client.put_object(Bucket=s3_server.bucket, Key=catalog_key,
                      Body=json.dumps(catalog).encode())
    relay.take()

    again = _fetch(s3_server, relay, url, dest)
    assert again.code == 0, again.output
    assert len(data) <= relay.take() <= len(data) + OVERHEAD
    assert again.json()["bytesDownloaded"] == len(data)
    assert sha256_file(dest / big.name) == new_sha
    assert not list(dest.glob(".*")), "fetch left hidden partial files"


def test_resumed_publish_sends_only_the_missing_parts(
        s3_server: S3Server, relay: Relay, big: Built, tmp_path: Path) -> None:
    """An interrupted publish left a multipart upload with its first parts on the
    server (made here with the harness's own client, as a killed run leaves them, plus
    one part whose bytes are not the archive's, as a run of another archive under the
    same name could leave): the re-run keeps the matching parts, sends the rest, and
    the object is the archive."""
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    url = f"s3://{s3_server.bucket}/{prefix}"
    key = f"{prefix}/big/{big.name}"
    part = part_size_for(big.size)
    parts = -(-big.size // part)
    assert parts >= 5, "the archive must span several parts"
    data = big.archive.read_bytes()
    client = s3_server.client()
    upload = client.create_multipart_upload(Bucket=s3_server.bucket, Key=key)["UploadId"]
    kept = 3
    for number in range(1, kept + 1):
        body = data[(number - 1) * part:number * part]
        client.upload_part(Bucket=s3_server.bucket, Key=key, UploadId=upload,
                           PartNumber=number, Body=body)
    wrong = bytearray(data[kept * part:(kept + 1) * part])
    wrong[0] ^= 0xFF
    client.upload_part(Bucket=s3_server.bucket, Key=key, UploadId=upload,
                       PartNumber=kept + 1, Body=bytes(wrong))
    relay.take_sent()

    done = bmsync("publish", str(big.archive), "--to", url, "--json",
                  env=_env(s3_server, relay))
    assert done.code == 0, done.output
    sent = relay.take_sent()
    missing = big.size - kept * part  # the wrong part is sent again
    assert missing <= sent <= missing + OVERHEAD, (sent, missing)
    assert "resuming an upload with 4 parts already sent" in done.stderr
    assert done.json()["bytesUploaded"] == missing
    body = client.get_object(Bucket=s3_server.bucket, Key=key)["Body"]
    h = hashlib.sha256()
    while chunk := body.read(8 * 1024 * 1024):
        h.update(chunk)
    assert h.hexdigest() == big.sha256
    assert client.list_multipart_uploads(Bucket=s3_server.bucket,
                                         Prefix=f"{prefix}/").get("Uploads", []) == []


def test_parts_grow_past_the_part_limit_and_parts_of_another_size_are_sent_again(
        s3_server: S3Server, relay: Relay, big: Built, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """With S3's part limit lowered to 4, the archive goes up in 4 parts of a whole
    number of MiB. An interrupted upload left parts of the default size: none of them
    can be kept (their sizes do not match), so every byte is sent again."""
    from pipeline import objstore

    monkeypatch.setattr(objstore, "MAX_PARTS", 4)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    part = objstore.part_size_for(big.size)
    assert part > objstore.PART_SIZE and part % (1024 * 1024) == 0
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    key = f"{prefix}/{big.name}"
    data = big.archive.read_bytes()
    client = s3_server.client()
    upload = client.create_multipart_upload(Bucket=s3_server.bucket, Key=key)["UploadId"]
    for number in (1, 2):
        at = (number - 1) * objstore.PART_SIZE
        client.upload_part(Bucket=s3_server.bucket, Key=key, UploadId=upload,
                           PartNumber=number, Body=data[at:at + objstore.PART_SIZE])
    relay.take_sent()

    store = objstore.S3Store(s3_server.bucket, prefix, endpoint_url=relay.endpoint)
    with caplog.at_level("INFO", logger="bmsync.objstore"):
        done = store.upload_file(big.name, big.archive)
    # The old parts are not even taken as candidates (their md5 would refuse them later
    # too): the resumed upload starts with none of them.
    assert "resuming an upload with 0 parts already sent" in caplog.text
    assert done.sent == big.size
    assert big.size <= relay.take_sent() <= big.size + OVERHEAD
    head = client.head_object(Bucket=s3_server.bucket, Key=key)
    assert head["ETag"].strip('"').endswith("-4"), head["ETag"]
    body = client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == big.sha256
    assert client.list_multipart_uploads(Bucket=s3_server.bucket,
                                         Prefix=f"{prefix}/").get("Uploads", []) == []
