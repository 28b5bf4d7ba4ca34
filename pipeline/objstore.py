"""Object storage for the air gap: one interface, two backends (DESIGN.md §6).

``s3://bucket/prefix`` goes through one shared botocore client (any S3 endpoint: the
``endpoint_url`` argument or ``AWS_ENDPOINT_URL``, standard AWS environment and
profiles; path-style addressing for on-premises servers; standard retries; checksums
only when required, so non-AWS servers work). ``file:///path`` is the embedded default:
a directory, no server.

Both offer: small objects read and written whole (with conditional writes: create only
if absent, replace only if unchanged), large files uploaded and downloaded with
progress, resumable in both directions, heads, listings and deletes. Keys are relative
to the URL's prefix. Every error names the URL and key; credentials never appear.

S3 uploads are multipart with a tuned part size and concurrency; each part carries its
``Content-MD5`` and the final ETag is compared with the one computed locally (md5 of
the parts' md5s, then ``-N``). An interrupted upload is resumed: parts already on the
server whose ETag matches the local part are kept.

Downloads (both backends) go through one engine, :func:`_download_ranges`: the partial
file is preallocated to the object's size, several ranges are fetched at once (ranged
GETs pinned to the object's ETag with ``If-Match`` on S3), each written at its offset
with ``pwrite``; a small record beside the partial (``<partial>.ranges``, replaced
atomically) names the object's ETag and size and the ranges already written, so an
interrupted download resumes without fetching them again, and a partial whose record
names another ETag (the object was replaced) is started afresh: bytes of two objects
are never stitched. The SHA-256 of the file is computed while it arrives, by a thread
that hashes the received buffers in the object's order; the buffers are written with
O_DIRECT where possible, so the bytes are not copied into the page cache at all.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from pipeline.errors import (
    BmsyncError,
    Conflict,
    CredentialError,
    IntegrityError,
    NotFound,
    StoreError,
    TransportError,
    UsageError,
)

log = logging.getLogger("bmsync.objstore")

CHUNK = 1024 * 1024
# A multipart upload's parts: PART_SIZE each (larger when the file would need more than
# MAX_PARTS of them, S3's limit), PART_CONCURRENCY in flight. Measured on 2 cores
# against a loopback SeaweedFS (bench/transfer.py, 500 MB): what costs is the server's
# CPU, and it grows with the bytes in flight (each request's body is buffered and
# garbage-collected server-side): with 16 MiB x 8 the server spent 6.3 s per upload,
# with 8 MiB x 4 5.5 s (boto3's 8 MiB x 10: 5.8 s); one part at a time leaves the
# server idle while a part's MD5 is computed. Four streams is also rclone's default.
PART_SIZE = 8 * 1024 * 1024
PART_CONCURRENCY = 4
MAX_PARTS = 10_000
# A download's ranges, RANGE_STREAMS at once. Measured on 2 cores against a loopback
# SeaweedFS (bench/transfer.py): 32 MiB ranges cost the client and the server less CPU
# per byte than 8 or 16 MiB ones (fewer requests, fewer chunk lookups), and more than 4
# streams gain nothing. The range is also what a resumed download may fetch twice.
RANGE_SIZE = 32 * 1024 * 1024
RANGE_STREAMS = 4
HASH_CHUNK = 8 * 1024 * 1024
# A download's chunks wait in these buffers between their write and the hasher, which
# takes them in the object's order: POOL_BUFFERS * CHUNK bytes at most.
POOL_BUFFERS = 48
POOL_RESERVE = 4  # at least 1: the buffers only the range being hashed may take
MAX_SMALL_OBJECT = 64 * 1024 * 1024
RECORD_SCHEMA = 1


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str | None  # without quotes


@dataclass(frozen=True)
class Downloaded:
    """A finished download: the file's sha256 (hex), bytes fetched by this call, and
    bytes kept from an interrupted earlier one (resumed, not fetched again)."""

    sha256: str
    fetched: int
    kept: int


@dataclass(frozen=True)
class Uploaded:
    """A finished upload: the object, and the bytes this call sent (parts an
    interrupted earlier upload left on the server are kept, not sent again)."""

    info: ObjectInfo
    sent: int


class ObjectStore(Protocol):
    url: str

    def get_bytes(self, key: str, *, limit: int = MAX_SMALL_OBJECT) -> tuple[bytes, str] | None:
        """The object's bytes and ETag, or None when absent."""

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False,
                  if_match: str | None = None) -> str:
        """Write an object whole; returns its ETag. Conflict when the condition fails."""

    def head(self, key: str) -> ObjectInfo | None: ...

    def upload_file(self, key: str, path: Path, *,
                    on_bytes: Callable[[int], None] | None = None) -> Uploaded:
        """Upload the file whole as ``key``, resuming an interrupted multipart upload
        of the same file where the backend has one; ``on_bytes`` sees kept bytes too."""

    def download(self, key: str, dest: Path, *, info: ObjectInfo,
                 on_bytes: Callable[[int], None] | None = None) -> Downloaded:
        """Download the object into the partial file ``dest``, resuming from the record
        beside it (:func:`partial_record`) when that names the same ETag and size;
        every read is pinned to ``info.etag``. On success ``dest`` holds the object,
        fsynced, its record is gone, and the returned sha256 is that of ``dest``'s
        bytes (the caller checks it before renaming). Conflict when the object changed
        meanwhile (``dest`` and its record are removed); TransportError when the
        connection is lost (what was written stays, recorded, for the next call).
        ``on_bytes`` sees kept bytes first, then every chunk written; it is called from
        several threads."""

    def list_objects(self, prefix: str = "") -> list[ObjectInfo]: ...

    def delete(self, key: str) -> None: ...


def open_store(url: str, *, endpoint_url: str | None = None) -> ObjectStore:
    """An object store for ``s3://bucket[/prefix]`` or ``file:///path``."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise UsageError(f"{url}: a file:// URL has no host (write file:///path)")
        return FileStore(Path(unquote(parts.path)))
    if parts.scheme == "s3":
        if not parts.netloc:
            raise UsageError(f"{url}: no bucket (write s3://BUCKET/PREFIX)")
        return S3Store(parts.netloc, parts.path.strip("/"), endpoint_url=endpoint_url)
    raise UsageError(f"{url}: object storage URLs are s3://BUCKET/PREFIX or file:///PATH")


def partial_record(partial: Path) -> Path:
    """The record of the ranges already in ``partial`` (a hidden file beside it)."""
    return partial.with_name(partial.name + ".ranges")


def discard_partial(partial: Path) -> None:
    """Remove a partial download and its record (either may be absent)."""
    partial_record(partial).unlink(missing_ok=True)
    partial.unlink(missing_ok=True)


def _load_record(partial: Path, info: ObjectInfo) -> set[int]:
    """Starts of the ranges a previous download wrote into ``partial``, when its record
    names this very object (ETag and size) and range size and the partial has the
    object's size; otherwise none (the caller starts afresh)."""
    try:
        doc = json.loads(partial_record(partial).read_bytes())
        if (doc.get("schemaVersion") != RECORD_SCHEMA or doc.get("etag") != info.etag
                or doc.get("size") != info.size or doc.get("rangeSize") != RANGE_SIZE
                or partial.stat().st_size != info.size):
            return set()
        done = {int(s) for s in doc["done"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {s for s in done if 0 <= s < info.size and s % RANGE_SIZE == 0}


def _write_record(partial: Path, info: ObjectInfo, done: set[int]) -> None:
    """Replace the record atomically (readers see the old or the new one).

    Not fsynced: the record is a hint for resuming. After a crash of the machine it may
    name ranges whose bytes never reached the disk; the sha256 check at the end catches
    that and the caller starts afresh (see ``publish.fetch``). A killed process loses
    nothing: its writes are in the page cache.
    """
    record = partial_record(partial)
    tmp = record.with_name(record.name + ".tmp")
    doc = {"schemaVersion": RECORD_SCHEMA, "etag": info.etag, "size": info.size,
           "rangeSize": RANGE_SIZE, "done": sorted(done)}
    tmp.write_bytes(json.dumps(doc, separators=(",", ":")).encode())
    os.replace(tmp, record)


def _preallocate(fd: int, size: int) -> None:
    """Give the partial its final size, reserving the blocks where the file system can
    (a full disk then fails at the start, not near the end)."""
    os.ftruncate(fd, 0)
    if size:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError:  # not supported here (e.g. some network file systems)
            os.ftruncate(fd, size)


def _start_writeback() -> Callable[[int, int, int], None]:
    """``sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)``: start writing a
    finished range to disk without waiting, so the fsync at the end finds little left
    to do (it measured 0.15 s of 0.9 s for 500 MB here). A no-op where libc lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return lambda fd, offset, length: None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start(fd: int, offset: int, length: int) -> None:
        fn(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE; errors only lose the head start

    return start


_writeback = _start_writeback()


DIRECT_ALIGN = 4096  # O_DIRECT: offsets, lengths and buffers aligned to this


def aligned_buffer(size: int) -> memoryview:
    """A writable buffer whose address is page-aligned (an anonymous mapping), so a
    chunk read into it can be written with O_DIRECT."""
    return memoryview(mmap.mmap(-1, size))


def _open_direct(path: Path) -> int | None:
    """A second descriptor of ``path`` with O_DIRECT, or None where the file system
    refuses it (tmpfs, some network file systems)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC | flag)
    except OSError:
        return None


@contextlib.contextmanager
def _local_disk(partial: Path) -> Iterator[None]:
    """An OSError of the download's own file is a StoreError naming it (a full disk
    must not read as "connection lost, run it again")."""
    try:
        yield
    except OSError as e:
        raise StoreError(f"cannot write {partial}: {e.strerror or e}",
                         hint=f"check the free space and permissions of {partial.parent}"
                         ) from None


def _close(fd: int, direct: int | None) -> None:
    if direct is not None:
        with contextlib.suppress(OSError):
            os.close(direct)
    os.close(fd)


class _Stopped(Exception):
    """Another range failed: this one stops early (never seen outside the engine)."""


class RangeBody(Protocol):
    """One range of an object being read: ``readinto`` fills the start of ``view`` with
    the next bytes and returns how many (0 once the range has been read whole; a
    connection lost before that raises); ``close`` ends the read, finished or not."""

    def readinto(self, view: memoryview) -> int: ...

    def close(self) -> None: ...


class _FileRange:
    """A range of an open file, read with ``preadv`` (the file:// store's ranges)."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        self._fd, self._at, self._end = fd, start, start + length

    def readinto(self, view: memoryview) -> int:
        if self._at >= self._end:
            return 0
        n = os.preadv(self._fd, [view[:self._end - self._at]], self._at)
        self._at += n
        return n

    def close(self) -> None:
        pass


def _download_ranges(partial: Path, info: ObjectInfo, where: str,
                     open_range: Callable[[int, int], RangeBody],
                     *, streams: int,
                     on_bytes: Callable[[int], None] | None) -> Downloaded:
    """Fetch the object's ranges not yet in ``partial`` (``open_range(start, length)``
    gives a range's bytes in order), ``streams`` at once, each written at its offset;
    hash the file in order meanwhile. Contract of ``ObjectStore.download``.

    Threads: ``streams`` readers and one hasher. A reader receives straight into 1 MiB
    page-aligned buffers of a shared pool (no copy in between), writes each full buffer
    at its offset (O_DIRECT where the file system allows: no copy into the page cache),
    and queues it for the hasher; it marks its range done (in memory, then in the
    record) only once every byte of it is written. The hasher takes the ranges in the
    object's order, hashing queued buffers and returning them to the pool (ranges an
    earlier run wrote are read back from the file), so the hash ends soon after the
    last byte arrives. Readers of ranges ahead of the hasher leave a few buffers free
    for the range it waits for, so memory stays at POOL_BUFFERS MiB. Ranges already
    done stay recorded.

    The first failure drops the ranges not started yet; those being read go on to
    their end (a lost connection on one does not waste the others' bytes), except
    after a Conflict, which stops them at once. Then the failure is raised.
    """
    size = info.size
    starts = range(0, size, RANGE_SIZE)
    done = _load_record(partial, info)
    with _local_disk(partial):
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    direct: list[int | None] = [None]  # None: write through the page cache
    opened_direct: int | None = None
    try:
        if not done:
            with _local_disk(partial):
                _preallocate(fd, size)
                _write_record(partial, info, done)
        kept = sum(min(RANGE_SIZE, size - s) for s in done)
        if kept and on_bytes:
            on_bytes(kept)
        if kept:
            log.info("%s: resuming a download, %d of %d bytes already here", where, kept, size)
        direct[0] = _open_direct(partial)
        opened_direct = direct[0]
        cond = threading.Condition()
        stop = threading.Event()
        fetched = [0]
        hashing = [0]  # the range the hasher is at
        free = [aligned_buffer(CHUNK) for _ in range(POOL_BUFFERS)]
        queued: dict[int, deque[tuple[memoryview, int]]] = {s: deque() for s in starts}

        abandoned = threading.Event()  # a range failed: no hash, buffers go straight back

        def take(start: int) -> memoryview:
            # The range being hashed may always take a buffer; the others leave
            # POOL_RESERVE free for it, so waiting for the hasher cannot deadlock.
            with cond:
                while not (free and (len(free) > POOL_RESERVE or start == hashing[0]
                                     or abandoned.is_set())):
                    if stop.is_set():
                        raise _Stopped
                    cond.wait()
                return free.pop()

        def put(buf: memoryview, n: int, offset: int) -> None:
            # Whole chunks go around the page cache (O_DIRECT) from page-aligned
            # buffers: copying a download into the page cache, and hashing it back
            # from there, was most of its CPU on small VMs (perf: copy_folio_from_iter
            # and inode-lock spinning between the streams). The short last chunk of
            # the object goes through the page cache.
            chunk = buf[:n]
            target = fd
            if direct[0] is not None and n % DIRECT_ALIGN == 0:
                target = direct[0]
            with _local_disk(partial):
                try:
                    written = os.pwrite(target, chunk, offset)
                except OSError as e:
                    if target == fd or e.errno != errno.EINVAL:
                        raise
                    direct[0] = None  # refused after all: the page cache from now on
                    written = os.pwrite(fd, chunk, offset)
                while written < n:  # pwrite may write less (signals, quotas)
                    written += os.pwrite(fd, chunk[written:], offset + written)

        def give_up(conflict: bool) -> None:
            # The file will not be whole: the hasher stops, ranges not started are
            # dropped, and those being read finish without waiting for the hasher
            # (kept for a resume), except after a Conflict, which stops them at once.
            with cond:
                abandoned.set()
                if conflict:
                    stop.set()
                for q in queued.values():
                    free.extend(b for b, _ in q)
                    q.clear()
                cond.notify_all()

        def fetch(start: int) -> None:
            if abandoned.is_set():
                raise _Stopped
            try:
                fetch_range(start)
            except BaseException as e:
                give_up(isinstance(e, Conflict))
                raise

        def fetch_range(start: int) -> None:
            length = min(RANGE_SIZE, size - start)
            offset = start  # of the buffer being filled
            buf: memoryview | None = None
            filled = 0

            def flush() -> None:
                nonlocal buf, filled, offset
                assert buf is not None
                put(buf, filled, offset)
                with cond:
                    if abandoned.is_set():
                        free.append(buf)
                    else:
                        queued[start].append((buf, filled))
                    cond.notify_all()
                offset += filled
                buf, filled = None, 0

            got = 0
            try:
                with contextlib.closing(open_range(start, length)) as body:
                    while got < length:
                        if stop.is_set():
                            raise _Stopped
                        if buf is None:
                            buf = take(start)
                        want = min(CHUNK - filled, length - got)
                        n = body.readinto(buf[filled:filled + want])
                        if not n:
                            raise TransportError(
                                f"{where}: short read of range {start}-{start + length - 1}"
                                f" ({got} of {length} bytes)",
                                hint="run the same command again: it resumes")
                        filled += n
                        got += n
                        if on_bytes:
                            on_bytes(n)
                        if filled == CHUNK:
                            flush()
                    if body.readinto(memoryview(bytearray(1))):
                        raise TransportError(f"{where}: the server sent more than range"
                                             f" {start}-{start + length - 1}")
            except BaseException:
                if buf is not None:  # the buffer being filled goes back to the pool
                    with cond:
                        free.append(buf)
                        cond.notify_all()
                raise
            if filled:
                flush()
            _writeback(fd, start, length)
            with cond:
                done.add(start)
                fetched[0] += length
                _write_record(partial, info, done)
                cond.notify_all()

        resumed = set(done)

        def digest() -> str | None:
            try:
                return hash_in_order()
            except BaseException:
                give_up(False)  # readers must not wait for a hasher that is gone
                raise

        def hash_in_order() -> str | None:
            h = hashlib.sha256()
            scratch: memoryview | None = None
            for start in starts:
                end = min(start + RANGE_SIZE, size)
                with cond:
                    hashing[0] = start
                    cond.notify_all()
                if start in resumed:  # written by an earlier run: read it back
                    scratch = scratch if scratch is not None else aligned_buffer(HASH_CHUNK)
                    at = start
                    while at < end:
                        n = os.preadv(fd, [scratch[:min(HASH_CHUNK, end - at)]], at)
                        if not n:
                            raise IntegrityError(f"{partial}: shorter than its record says")
                        h.update(scratch[:n])
                        at += n
                    continue
                at = start
                while at < end:
                    with cond:
                        while not queued[start]:
                            if stop.is_set() or abandoned.is_set():
                                return None
                            cond.wait()
                        buf, n = queued[start].popleft()
                    h.update(buf[:n])
                    at += n
                    with cond:
                        free.append(buf)
                        cond.notify_all()
            return h.hexdigest()

        todo = [s for s in starts if s not in done]
        error: Exception | None = None
        with ThreadPoolExecutor(streams + 1, thread_name_prefix="download") as pool:
            running: list[Future[None]] = []

            def halt(*, now: bool) -> None:
                # Ranges not started are dropped; with ``now`` the running ones stop at
                # their next chunk too, else they finish (and are kept for a resume).
                for other in running:
                    other.cancel()
                if now:
                    stop.set()

            try:
                hashed = pool.submit(digest)
                running += [pool.submit(fetch, s) for s in todo]
                for f in running:
                    try:
                        f.result()
                    except (_Stopped, CancelledError):
                        pass
                    except Exception as e:  # noqa: BLE001 - the first one is re-raised below
                        if error is None:
                            error = e
                            halt(now=isinstance(e, Conflict))
                stop.set()  # all readers are done: a hasher still waiting gives up
                with cond:
                    cond.notify_all()
                sha = hashed.result()
            except BaseException:  # e.g. KeyboardInterrupt: let the threads end first
                halt(now=True)
                with cond:
                    cond.notify_all()
                raise
        if error is not None:
            raise error
        assert sha is not None  # every range is done
        os.fsync(fd)
    except Conflict:
        _close(fd, opened_direct)
        discard_partial(partial)
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.fdatasync(fd)  # what is recorded as done is on disk for the next run
        _close(fd, opened_direct)
        raise
    _close(fd, opened_direct)
    partial_record(partial).unlink(missing_ok=True)
    return Downloaded(sha, fetched[0], kept)


# -- file:// --------------------------------------------------------------------------------


class FileStore:
    """A directory standing in for a bucket. ETags are the md5 of the content."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = f"file://{root}"

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise UsageError(f"{self.url}: invalid key {key!r}")
        return self.root / key

    def _mkdir(self, directory: Path) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{self.url}: cannot create {directory}: {e.strerror}",
                             hint="check the object store's path and its permissions") from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._mkdir(self.root)
        with open(self.root / ".bmsync-lock", "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def get_bytes(self, key: str, *, limit: int = MAX_SMALL_OBJECT) -> tuple[bytes, str] | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise TransportError(f"{self.url}/{key}: cannot read: {e.strerror}") from None
        if len(data) > limit:
            raise IntegrityError(f"{self.url}/{key} is over the {limit}-byte limit")
        return data, hashlib.md5(data).hexdigest()

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False,
                  if_match: str | None = None) -> str:
        from pipeline.store import atomic_write

        path = self._path(key)
        with self._locked():
            if if_none_match or if_match is not None:
                current = self.get_bytes(key)
                if if_none_match and current is not None:
                    raise Conflict(f"{self.url}/{key} already exists")
                if if_match is not None and (current is None or current[1] != if_match):
                    raise Conflict(f"{self.url}/{key} changed since it was read")
            self._mkdir(path.parent)
            atomic_write(path, data)
        return hashlib.md5(data).hexdigest()

    def head(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(key, st.st_size, f"{int(st.st_mtime_ns)}-{st.st_size}")

    def upload_file(self, key: str, path: Path, *,
                    on_bytes: Callable[[int], None] | None = None) -> Uploaded:
        target = self._path(key)
        self._mkdir(target.parent)
        # A fixed name: a publish killed mid-copy leaves a partial the next one replaces.
        tmp = target.parent / f".{target.name}.partial"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            with open(path, "rb") as src, os.fdopen(fd, "wb") as out:
                while chunk := src.read(CHUNK * 8):
                    out.write(chunk)
                    if on_bytes:
                        on_bytes(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        info = self.head(key)
        assert info is not None
        return Uploaded(info, info.size)

    def download(self, key: str, dest: Path, *, info: ObjectInfo,
                 on_bytes: Callable[[int], None] | None = None) -> Downloaded:
        where = f"{self.url}/{key}"
        try:
            src = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"{where} is gone") from None
        try:
            # Every range reads this one open file: a publish that replaces the object
            # meanwhile (a new file renamed over it) does not mix into this download.
            st = os.fstat(src)
            if f"{int(st.st_mtime_ns)}-{st.st_size}" != info.etag:
                discard_partial(dest)
                raise Conflict(f"{where} changed during the download")

            def open_range(start: int, length: int) -> RangeBody:
                return _FileRange(src, start, length)

            return _download_ranges(dest, info, where, open_range, streams=1,
                                    on_bytes=on_bytes)
        finally:
            os.close(src)

    def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        out = []
        for p in sorted(base.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                key = str(p.relative_to(self.root))
                st = p.stat()
                out.append(ObjectInfo(key, st.st_size, f"{int(st.st_mtime_ns)}-{st.st_size}"))
        return out

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        # Folders are not objects: one emptied by the delete goes too (not the root).
        with contextlib.suppress(OSError):
            if path.parent != self.root:
                path.parent.rmdir()


# -- s3:// ----------------------------------------------------------------------------------


def part_size_for(size: int) -> int:
    """The part size of a multipart upload of ``size`` bytes: PART_SIZE, or the
    smallest whole number of MiB that keeps the parts within MAX_PARTS."""
    mib = 1024 * 1024
    needed = -(-size // MAX_PARTS)
    return max(PART_SIZE, -(-needed // mib) * mib)


_clients: dict[str | None, Any] = {}
_clients_lock = threading.Lock()


def s3_client(endpoint_url: str | None = None) -> Any:
    """The one shared S3 client (botocore clients are thread-safe) per endpoint.

    Made from botocore's session, which is what ``boto3.client`` does underneath (same
    credentials chain, profiles, region and environment), without importing boto3
    itself: boto3 imports s3transfer for its managed transfers, which bmsync does not
    use, and that import was a quarter of a short command's start-up.
    """
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    with _clients_lock:
        client = _clients.get(endpoint)
        if client is None:
            import botocore.session
            from botocore.config import Config

            config = Config(
                # Bodies are not hashed into the signature: every request with one
                # carries a Content-MD5 that the signature covers and the server
                # checks (parts and objects; the multipart ETag is compared at the
                # end), and the archive's SHA-256 is checked at fetch. botocore would
                # otherwise SHA-256 every byte over plain http, and the server again.
                s3={"addressing_style": "path", "payload_signing_enabled": False},
                retries={"mode": "standard", "max_attempts": 5},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                max_pool_connections=PART_CONCURRENCY * 2,
            )
            session = botocore.session.get_session()
            region = session.get_config_variable("region") or "us-east-1"
            client = session.create_client("s3", endpoint_url=endpoint, config=config,
                                           region_name=region)
            _clients[endpoint] = client
        return client


class _S3Range:
    """The body of a ranged GET, read into the engine's buffers.

    http.client's ``readinto`` fills the caller's buffer straight from the socket: no
    new 1 MiB objects per read (fresh memory is slow on small VMs) and no copy (urllib3's
    ``read(amt)`` allocates and copies twice per chunk). It says EOF with 0 where
    ``read`` raises, so 0 before the range's end is raised as a lost connection."""

    def __init__(self, body: Any, length: int) -> None:
        self._body = body
        self._left = length
        raw: Any = getattr(body, "_raw_stream", None)
        fp = getattr(raw, "_fp", None)
        self._raw = raw
        self._fp = fp if fp is not None and hasattr(fp, "readinto") else None

    def readinto(self, view: memoryview) -> int:
        if not self._left:
            # The range is read: the body must end here. Reading on finishes a chunked
            # body (its last chunk) or finds the byte a server sent beyond the range.
            if self._fp is not None and not self._fp.isclosed():
                return int(self._fp.readinto(view[:1]))
            return 0
        want = view[:self._left]
        if self._fp is not None:
            n = self._fp.readinto(want)
        else:
            chunk = self._body.read(len(want))
            n = len(chunk)
            want[:n] = chunk
        if not n:
            from urllib3.exceptions import ProtocolError

            raise ProtocolError(f"connection closed {self._left} bytes before the end")
        self._left -= n
        return int(n)

    def close(self) -> None:
        try:
            # Only a body read to its very end leaves the connection fit for the next
            # request; any other is closed with the body.
            if self._fp is not None and self._fp.isclosed() and self._raw is not None:
                self._raw.release_conn()
        finally:
            self._body.close()


class _NoSuchObject(NotFound):
    """The bucket answered that the key is absent (not that the bucket is)."""


class S3Store:
    def __init__(self, bucket: str, prefix: str, *, endpoint_url: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._endpoint = endpoint_url
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client(self._endpoint)
        return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, e: Exception, key: str, what: str) -> BmsyncError:
        """One line naming the URL and key and what to do; never a credential."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        where = f"{self.url}/{key}" if key else self.url
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchBucket",):
                return NotFound(f"{where}: bucket {self.bucket} does not exist",
                                hint="create it, or check the URL")
            if code in ("NoSuchKey", "404", "NotFound"):
                return _NoSuchObject(f"{where}: no such object")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                        "ExpiredToken", "InvalidToken") or status in (401, 403):
                return CredentialError(
                    f"{where}: {what} refused: {code or status}",
                    hint="check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile",
                )
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
                return Conflict(f"{where} changed since it was read")
            return TransportError(f"{where}: {what} failed: {code or status}")
        if isinstance(e, NoCredentialsError):
            return CredentialError(f"{where}: no AWS credentials",
                                   hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        if isinstance(e, BotoCoreError):
            return TransportError(f"{where}: {what} failed: {type(e).__name__}",
                                  hint="check --endpoint-url and that the server is up")
        return TransportError(f"{where}: {what} failed: {type(e).__name__}")

    def _call_or_none(self, key: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, or None when the object is absent (any other error raises)."""
        try:
            return self._call(key, "read", fn)
        except _NoSuchObject:
            return None

    def _call(self, key: str, what: str, fn: Callable[[], Any]) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, key, what) from None

    def get_bytes(self, key: str, *, limit: int = MAX_SMALL_OBJECT) -> tuple[bytes, str] | None:

        resp = self._call_or_none(
            key, lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key)))
        if resp is None:
            return None
        if resp.get("ContentLength", 0) > limit:
            resp["Body"].close()
            raise IntegrityError(f"{self.url}/{key} is over the {limit}-byte limit")
        data = resp["Body"].read(limit + 1)
        return data, str(resp.get("ETag", "")).strip('"')

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False,
                  if_match: str | None = None) -> str:
        args: dict[str, Any] = {
            "Bucket": self.bucket, "Key": self._key(key), "Body": data,
            "ContentMD5": base64.b64encode(hashlib.md5(data).digest()).decode(),
        }
        if if_none_match:
            args["IfNoneMatch"] = "*"
        if if_match is not None:
            args["IfMatch"] = f'"{if_match}"'
        resp = self._call(key, "write", lambda: self.client.put_object(**args))
        return str(resp.get("ETag", "")).strip('"')

    def head(self, key: str) -> ObjectInfo | None:

        resp = self._call_or_none(
            key, lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)))
        if resp is None:
            return None
        return ObjectInfo(key, int(resp["ContentLength"]), str(resp.get("ETag", "")).strip('"'))

    def upload_file(self, key: str, path: Path, *,
                    on_bytes: Callable[[int], None] | None = None) -> Uploaded:
        size = path.stat().st_size
        if size <= PART_SIZE:
            data = path.read_bytes()
            etag = self.put_bytes(key, data)
            if on_bytes:
                on_bytes(size)
            if etag and etag != hashlib.md5(data).hexdigest():
                raise IntegrityError(f"{self.url}/{key}: the server stored other bytes (ETag"
                                     f" {etag})")
            return Uploaded(ObjectInfo(key, size, etag), size)
        return self._multipart(key, path, size, on_bytes)

    def _multipart(self, key: str, path: Path, size: int,
                   on_bytes: Callable[[int], None] | None) -> Uploaded:
        full = self._key(key)
        part_size = part_size_for(size)
        upload_id, done = self._resumable(key, size, part_size)
        if upload_id is None:
            resp = self._call(key, "start upload", lambda: self.client.create_multipart_upload(
                Bucket=self.bucket, Key=full))
            upload_id = resp["UploadId"]
        offsets = list(range(0, size, part_size))
        results: dict[int, tuple[str, bytes]] = {}
        sent = [0]
        lock = threading.Lock()
        fd = os.open(path, os.O_RDONLY)
        buffers = threading.local()

        def read_part(offset: int, length: int) -> bytearray:
            # One buffer per sending thread, reused for its parts: fresh part-sized objects
            # for every part cost page faults here (0.4 s of CPU per 500 MB), and a
            # bytearray Body is hashed (SigV4) and sent by botocore as it is, where bytes
            # are wrapped in BytesIO and copied twice more.
            buf: bytearray | None = getattr(buffers, "buf", None)
            if length != part_size:
                buf = bytearray(length)  # the last part
            elif buf is None:
                buf = buffers.buf = bytearray(part_size)
            got = os.preadv(fd, [buf], offset)
            if got != length:
                raise IntegrityError(f"{path}: changed while being uploaded (short read at"
                                     f" {offset})")
            return buf

        def send(number: int, offset: int) -> None:
            length = min(part_size, size - offset)
            data = read_part(offset, length)
            md5 = hashlib.md5(data).digest()
            if number in done and done[number] == md5.hex():
                with lock:
                    results[number] = (md5.hex(), md5)
                if on_bytes:
                    on_bytes(length)
                return
            resp = self._call(key, f"upload part {number}", lambda: self.client.upload_part(
                Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=data,
                ContentMD5=base64.b64encode(md5).decode()))
            etag = str(resp.get("ETag", "")).strip('"')
            if etag and etag != md5.hex():
                raise IntegrityError(f"{self.url}/{key}: part {number} stored as {etag},"
                                     f" not {md5.hex()}")
            with lock:
                results[number] = (md5.hex(), md5)
                sent[0] += length
            if on_bytes:
                on_bytes(length)

        try:
            with ThreadPoolExecutor(PART_CONCURRENCY, thread_name_prefix="s3-part") as pool:
                for f in [pool.submit(send, n, off) for n, off in enumerate(offsets, 1)]:
                    f.result()
        finally:
            os.close(fd)
        parts = [{"PartNumber": n, "ETag": f'"{results[n][0]}"'} for n in sorted(results)]
        resp = self._call(key, "complete upload", lambda: self.client.complete_multipart_upload(
            Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": parts}))
        expected = (hashlib.md5(b"".join(results[n][1] for n in sorted(results))).hexdigest()
                    + f"-{len(results)}")
        etag = str(resp.get("ETag", "")).strip('"')
        if etag and etag != expected:
            raise IntegrityError(f"{self.url}/{key}: the server's ETag {etag} is not the"
                                 f" {expected} computed locally")
        return Uploaded(ObjectInfo(key, size, etag or expected), sent[0])

    def _resumable(self, key: str, size: int,
                   part_size: int) -> tuple[str | None, dict[int, str]]:
        """An unfinished upload of ``key`` to resume (its parts' md5 by number: those of
        this part size only, so an upload begun with other parts keeps none); others
        for the same key are aborted."""
        full = self._key(key)
        resp = self._call(key, "list uploads", lambda: self.client.list_multipart_uploads(
            Bucket=self.bucket, Prefix=full))
        uploads = [u for u in resp.get("Uploads", []) if u.get("Key") == full]
        uploads.sort(key=lambda u: u.get("Initiated") or 0)
        keep = uploads[-1]["UploadId"] if uploads else None
        for u in uploads[:-1]:
            self._abort(key, u["UploadId"])
        if keep is None:
            return None, {}
        from botocore.exceptions import BotoCoreError, ClientError

        done: dict[int, str] = {}
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": full, "UploadId": keep}
        while True:  # S3 lists at most 1000 parts a page
            try:
                listed = self.client.list_parts(**args)
            except (ClientError, BotoCoreError):  # an upload we cannot list starts afresh
                self._abort(key, keep)
                return None, {}
            for p in listed.get("Parts", []):
                expected = min(part_size, size - (p["PartNumber"] - 1) * part_size)
                if p.get("Size") == expected:
                    done[int(p["PartNumber"])] = str(p.get("ETag", "")).strip('"')
            marker = listed.get("NextPartNumberMarker")
            if not listed.get("IsTruncated") or not marker:
                break
            args["PartNumberMarker"] = marker
        log.info("%s/%s: resuming an upload with %d parts already sent", self.url, key,
                 len(done))
        return keep, done

    def _abort(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(Exception):
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(key),
                                               UploadId=upload_id)

    def download(self, key: str, dest: Path, *, info: ObjectInfo,
                 on_bytes: Callable[[int], None] | None = None) -> Downloaded:
        """Ranged GETs, RANGE_STREAMS at once, each with ``If-Match`` on the ETag (a
        replaced object answers 412: Conflict). Bodies are read in 1 MiB chunks and
        written as they come, so memory holds a few chunks, not whole ranges."""
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        where = f"{self.url}/{key}"

        def open_range(start: int, length: int) -> RangeBody:
            end = start + length - 1
            args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key),
                                    "Range": f"bytes={start}-{end}"}
            if info.etag:
                args["IfMatch"] = f'"{info.etag}"'
            resp = self._call(key, "read", lambda: self.client.get_object(**args))
            body = resp["Body"]
            # A server that ignores Range answers 200 with the whole object.
            got = str(resp.get("ContentRange", ""))
            sent = resp.get("ContentLength")
            if not got.startswith(f"bytes {start}-{end}/"):
                body.close()
                raise TransportError(f"{where}: asked for bytes {start}-{end}, got"
                                     f" {got or 'the whole object'}")
            if sent is not None and int(sent) != length:
                body.close()
                raise TransportError(f"{where}: range {start}-{end} came with a body of"
                                     f" {sent} bytes, not {length}")
            return _S3Range(body, length)

        try:
            return _download_ranges(dest, info, where, open_range, streams=RANGE_STREAMS,
                                    on_bytes=on_bytes)
        except (BotoCoreError, HTTPError, OSError) as e:
            kept = sum(min(RANGE_SIZE, info.size - s) for s in _load_record(dest, info))
            raise TransportError(
                f"{where}: connection lost during the download ({type(e).__name__});"
                f" {kept} bytes kept",
                hint="run the same command again: it resumes",
            ) from None

    def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        out: list[ObjectInfo] = []
        token: str | None = None
        while True:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full}
            if token:
                args["ContinuationToken"] = token
            resp = self._list_page(prefix, args)
            strip = len(self.prefix) + 1 if self.prefix else 0
            for o in resp.get("Contents", []):
                out.append(ObjectInfo(o["Key"][strip:], int(o["Size"]),
                                      str(o.get("ETag", "")).strip('"')))
            token = resp.get("NextContinuationToken")
            if not resp.get("IsTruncated") or not token:
                return out

    def _list_page(self, prefix: str, args: dict[str, Any]) -> Any:
        return self._call(prefix, "list", lambda: self.client.list_objects_v2(**args))

    def delete(self, key: str) -> None:
        self._call(key, "delete", lambda: self.client.delete_object(
            Bucket=self.bucket, Key=self._key(key)))
