"""The download engine (``pipeline.objstore._download_ranges``) under stress.

Driven through the real ``FileStore`` (file://, no server), through
``pipeline.publish.fetch`` and, where a test needs to interrupt or slow a range at a
chosen point, by calling the engine with an ``open_range`` of its own that serves the
object's bytes the way a store does (into the engine's own buffers, in pieces that do
not line up with the engine's chunks). The module's sizes are made small (monkeypatch)
so that a few hundred KiB span many ranges, buffers and a short last chunk.

The witness is always independent of the engine: ``hashlib.sha256`` of the source
bytes, the destination file's bytes compared with the source, the record beside the
partial read as JSON, the threads and file descriptors of this process.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline import objstore
from pipeline.errors import Conflict, TransportError
from pipeline.objstore import FileStore, ObjectInfo, _download_ranges, partial_record
from pipeline.publish import fetch

C = 8192  # CHUNK in these tests: two pages
R = 4 * C  # RANGE_SIZE: four chunks

SIZES = [0, 1, 4095, 4096, 4097, C - 1, C, C + 1, C + 4096, R - 1, R, R + 1, 3 * R,
         3 * R + 3 * 4096 + 17, 10 * R + 5]


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small engine sizes: many ranges and a pool that runs short in a few hundred KiB."""
    monkeypatch.setattr(objstore, "CHUNK", C)
    monkeypatch.setattr(objstore, "RANGE_SIZE", R)
    monkeypatch.setattr(objstore, "POOL_BUFFERS", 6)
    monkeypatch.setattr(objstore, "POOL_RESERVE", 2)
    monkeypatch.setattr(objstore, "HASH_CHUNK", 3 * 4096)  # resumed ranges: several reads


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("download")]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Every test ends with the engine's threads gone and no descriptor left open."""
    before = open_fds()
    yield
    assert engine_threads() == [], "the engine left threads running"
    leaked = open_fds() - before
    assert not leaked, f"descriptors left open: {sorted(leaked)}"


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed * 1_000_003 + size).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ranges_of(size: int) -> list[int]:
    return list(range(0, size, R))


def recorded(partial: Path) -> set[int]:
    """The ranges the record beside ``partial`` lists as written (witness: the JSON)."""
    return set(json.loads(partial_record(partial).read_bytes())["done"])


def kept_bytes(done: set[int], size: int) -> int:
    return sum(min(R, size - s) for s in done)


def put_object(root: Path, key: str, data: bytes) -> tuple[FileStore, ObjectInfo]:
    store = FileStore(root)
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    info = store.head(key)
    assert info is not None
    return store, info


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@dataclass
class Served:
    """An object's bytes served by range, like a store's ``open_range``: each
    ``readinto`` gives at most ``piece`` bytes, so the engine's buffers fill over
    several reads that do not line up with its chunks. ``hook(start, k)`` runs before
    piece ``k`` of the range at ``start``: it may sleep or raise."""

    data: bytes
    piece: int = 5000
    hook: Callable[[int, int], None] | None = None
    started: list[int] = field(default_factory=list)
    consumed: dict[int, int] = field(default_factory=dict)  # pieces the engine took
    lock: threading.Lock = field(default_factory=threading.Lock)

    def open_range(self, start: int, length: int) -> ServedRange:
        with self.lock:
            self.started.append(start)
        return ServedRange(self, start, start + length)


@dataclass
class ServedRange:
    served: Served
    start: int
    end: int
    k: int = 0
    at: int = -1

    def readinto(self, view: memoryview) -> int:
        if self.at < 0:
            self.at = self.start
        if self.at >= self.end:
            return 0
        served = self.served
        if served.hook:
            served.hook(self.start, self.k)
        n = min(served.piece, self.end - self.at, len(view))
        view[:n] = served.data[self.at:self.at + n]
        with served.lock:
            served.consumed[self.start] = self.k + 1
        self.at += n
        self.k += 1
        return n

    def close(self) -> None:
        pass


@dataclass
class Pieces:
    """A range served from a list of byte strings, one ``readinto`` each (a reader
    that may end early or send more than the range)."""

    pieces: list[bytes]

    def readinto(self, view: memoryview) -> int:
        if not self.pieces:
            return 0
        piece = self.pieces.pop(0)
        n = min(len(piece), len(view))
        view[:n] = piece[:n]
        if n < len(piece):
            self.pieces.insert(0, piece[n:])
        return n

    def close(self) -> None:
        pass


def run_engine(partial: Path, served: Served, *, streams: int, etag: str = "etag-1",
               on_bytes: Callable[[int], None] | None = None) -> objstore.Downloaded:
    info = ObjectInfo("obj", len(served.data), etag)
    return _download_ranges(partial, info, "test://obj", served.open_range, streams=streams,
                            on_bytes=on_bytes)


class Progress:
    def __init__(self) -> None:
        self.total = 0
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            self.total += n


def check_complete(partial: Path, data: bytes, got: objstore.Downloaded) -> None:
    assert got.sha256 == sha256(data)
    assert partial.read_bytes() == data
    assert not partial_record(partial).exists(), "the record outlived a finished download"


# -- sizes, through the real FileStore ------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", SIZES)
def test_filestore_download_sizes(small: None, tmp_path: Path, size: int) -> None:
    data = payload(size)
    store, info = put_object(tmp_path / "objects", "v/archive", data)
    dest = tmp_path / "dest"
    dest.mkdir()
    partial = dest / ".archive.partial"
    progress = Progress()
    got = store.download("v/archive", partial, info=info, on_bytes=progress)
    check_complete(partial, data, got)
    assert (got.fetched, got.kept) == (size, 0)
    assert progress.total == size
    assert leftovers(dest) == [".archive.partial"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("size", [0, 4097, objstore.RANGE_SIZE,
                                  objstore.RANGE_SIZE + objstore.CHUNK + 4097])
def test_filestore_download_default_sizes(tmp_path: Path, size: int) -> None:
    """The module's own sizes (32 MiB ranges, 1 MiB chunks): one range and a short tail."""
    data = payload(size, seed=2)
    store, info = put_object(tmp_path / "objects", "v/archive", data)
    partial = tmp_path / ".archive.partial"
    got = store.download("v/archive", partial, info=info)
    check_complete(partial, data, got)
    assert got.fetched == size


# -- streams and order -------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("streams", [1, 2, 3, 16])
@pytest.mark.parametrize("size", [1, C + 1, R, R + 1, 5 * R + 4097])
def test_engine_streams(small: None, tmp_path: Path, streams: int, size: int) -> None:
    """One stream, several, and more streams than ranges: the same file and hash."""
    data = payload(size, seed=3)
    partial = tmp_path / ".obj.partial"
    progress = Progress()
    got = run_engine(partial, Served(data), streams=streams, on_bytes=progress)
    check_complete(partial, data, got)
    assert (got.fetched, got.kept, progress.total) == (size, 0, size)


@pytest.mark.timeout(60)
def test_ranges_finishing_in_reverse_order_hash_in_object_order(small: None,
                                                                tmp_path: Path) -> None:
    size = 8 * R + 4097
    data = payload(size, seed=4)
    count = len(ranges_of(size))

    def later_first(start: int, k: int) -> None:
        time.sleep(0.002 * (count - start // R))  # the first range is the slowest

    partial = tmp_path / ".obj.partial"
    got = run_engine(partial, Served(data, hook=later_first), streams=8)
    check_complete(partial, data, got)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("buffers", "reserve"), [(1, 1), (2, 1), (3, 2), (6, 2), (2, 5)])
def test_small_pools_do_not_deadlock(small: None, monkeypatch: pytest.MonkeyPatch,
                                     tmp_path: Path, buffers: int, reserve: int) -> None:
    """Readers ahead of the hasher fill the pool; the range it waits for still gets a
    buffer. Random delays shuffle which range runs short."""
    monkeypatch.setattr(objstore, "POOL_BUFFERS", buffers)
    monkeypatch.setattr(objstore, "POOL_RESERVE", reserve)
    size = 9 * R + 123
    data = payload(size, seed=5)
    rng = random.Random(buffers * 10 + reserve)
    delays = {s: rng.random() * 0.003 for s in ranges_of(size)}

    def shuffle(start: int, k: int) -> None:
        time.sleep(delays[start])

    partial = tmp_path / ".obj.partial"
    got = run_engine(partial, Served(data, piece=3000, hook=shuffle), streams=4)
    check_complete(partial, data, got)


# -- O_DIRECT and the page cache ---------------------------------------------------------


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bmsync-engine-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [4095, C + 4096, 3 * R, 3 * R + 3 * 4096 + 17])
def test_destination_on_tmpfs(small: None, tmp_path: Path, shm_dir: Path, size: int) -> None:
    """tmpfs refuses O_DIRECT on older kernels (open fails with EINVAL) and accepts it on
    newer ones: either way the file and the hash are the object's."""
    data = payload(size, seed=6)
    store, info = put_object(tmp_path / "objects", "v/archive", data)
    partial = shm_dir / ".archive.partial"
    got = store.download("v/archive", partial, info=info)
    check_complete(partial, data, got)
    streamed = run_engine(shm_dir / ".other.partial", Served(data), streams=3)
    check_complete(shm_dir / ".other.partial", data, streamed)


@pytest.mark.timeout(60)
def test_platform_without_o_direct(small: None, monkeypatch: pytest.MonkeyPatch,
                                   tmp_path: Path) -> None:
    """Where ``os`` has no O_DIRECT every write goes through the page cache."""
    monkeypatch.delattr(os, "O_DIRECT")
    size = 4 * R + 4096 + 1
    data = payload(size, seed=7)
    partial = tmp_path / ".obj.partial"
    check_complete(partial, data, run_engine(partial, Served(data), streams=3))


@pytest.mark.timeout(60)
def test_o_direct_write_refused_falls_back_to_the_page_cache(
        small: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A chunk size that is not a multiple of the page puts a whole-page chunk at an
    unaligned offset: the kernel refuses that O_DIRECT write (EINVAL) and the engine
    writes it, and every later one, through the page cache."""
    chunk = 4096 + 100
    monkeypatch.setattr(objstore, "CHUNK", chunk)
    monkeypatch.setattr(objstore, "RANGE_SIZE", 4 * chunk)
    size = 4 * chunk + chunk + 4096  # the last range: a chunk, then 4096 bytes at +chunk
    data = payload(size, seed=8)

    # Witness that this file system does refuse that write (so the fallback is taken).
    probe = tmp_path / "probe"
    probe.write_bytes(b"\0" * size)
    refused = False
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        refused = True
    else:
        page = mmap.mmap(-1, 4096)
        try:
            os.pwrite(fd, page, 4 * chunk + chunk)
        except OSError as e:
            refused = e.errno == errno.EINVAL
        finally:
            os.close(fd)
            page.close()
    assert refused, "this file system accepted an unaligned O_DIRECT write"

    partial = tmp_path / ".obj.partial"
    check_complete(partial, data, run_engine(partial, Served(data), streams=2))
    store, info = put_object(tmp_path / "objects", "v/archive", data)
    partial2 = tmp_path / ".archive.partial"
    check_complete(partial2, data, store.download("v/archive", partial2, info=info))


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache, as util-linux's ``fincore`` counts them."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


@pytest.mark.timeout(60)
def test_whole_chunks_bypass_the_page_cache(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    """Whole chunks are written with O_DIRECT: after the download only the short tail
    of the file is in the page cache. The same download with O_DIRECT unavailable
    leaves the whole file there (so the witness can see the difference here)."""
    size = 3 * objstore.CHUNK + 100
    data = payload(size, seed=9)
    store, info = put_object(tmp_path / "objects", "v/archive", data)
    probe = tmp_path / "probe"
    probe.touch()
    os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))  # fails where O_DIRECT is refused

    # The residency is read before the file's bytes are compared (reading them back
    # brings them into the page cache).
    direct = tmp_path / ".direct.partial"
    got = store.download("v/archive", direct, info=info)
    assert resident_bytes(direct) <= 4096, "whole chunks went through the page cache"
    check_complete(direct, data, got)

    monkeypatch.delattr(os, "O_DIRECT")
    cached = tmp_path / ".cached.partial"
    got = store.download("v/archive", cached, info=info)
    assert resident_bytes(cached) >= size - 4096
    check_complete(cached, data, got)


# -- interrupted, then resumed ---------------------------------------------------------------


def fail_at(target: int, piece: int) -> Callable[[int, int], None]:
    def hook(start: int, k: int) -> None:
        if start == target and k == piece:
            raise TransportError(f"connection lost in range {start}")
    return hook


def fail_from(target: int, piece: int) -> Callable[[int, int], None]:
    """Every range from ``target`` on fails: what is recorded does not depend on how
    quickly the engine drops the ranges not started (see
    test_first_failure_drops_ranges_not_started)."""
    def hook(start: int, k: int) -> None:
        if start >= target and k == piece:
            raise TransportError(f"connection lost in range {start}")
    return hook


@pytest.mark.timeout(60)
def test_interrupted_download_resumes_through_the_filestore(small: None,
                                                            tmp_path: Path) -> None:
    size = 8 * R + 4096 + 17
    data = payload(size, seed=9)
    store, info = put_object(tmp_path / "objects", "v/archive", data)
    partial = tmp_path / ".archive.partial"

    served = Served(data, hook=fail_at(4 * R, 1))
    with pytest.raises(TransportError, match="range 131072"):
        _download_ranges(partial, info, "test://obj", served.open_range, streams=3, on_bytes=None)
    done = recorded(partial)
    # Ranges 0-3 started before range 4 and run to their end; range 4 failed.
    assert {0, R, 2 * R, 3 * R} <= done
    assert 4 * R not in done
    assert partial.stat().st_size == size
    for s in done:
        assert partial.read_bytes()[s:s + R] == data[s:s + R], f"range {s} recorded, not there"

    progress = Progress()
    got = store.download("v/archive", partial, info=info, on_bytes=progress)
    check_complete(partial, data, got)
    assert got.kept == kept_bytes(done, size)
    assert got.fetched == size - got.kept
    assert progress.total == size  # kept bytes first, then the chunks fetched


@pytest.mark.timeout(60)
def test_resume_twice_with_kept_ranges_between_fetched_ones(small: None,
                                                            tmp_path: Path) -> None:
    """Kept ranges (read back from the file) interleave with fetched ones (hashed from
    the buffers): the hash still follows the object's order. Later calls ask only for
    the ranges the record lacks."""
    size = 6 * R + 4095
    data = payload(size, seed=10)
    partial = tmp_path / ".obj.partial"

    with pytest.raises(TransportError):
        run_engine(partial, Served(data, hook=fail_from(R, 2)), streams=1)
    assert recorded(partial) == {0}

    second = Served(data, hook=fail_from(3 * R, 0))
    with pytest.raises(TransportError):
        run_engine(partial, second, streams=1)
    assert second.started[:3] == [R, 2 * R, 3 * R]
    assert recorded(partial) == {0, R, 2 * R}

    # Make the fetched and the kept ranges alternate: forget range R in the record (the
    # engine then fetches it again; its bytes are the same).
    doc = json.loads(partial_record(partial).read_bytes())
    doc["done"] = [0, 2 * R]
    partial_record(partial).write_text(json.dumps(doc))

    third = Served(data)
    got = run_engine(partial, third, streams=3)
    check_complete(partial, data, got)
    assert sorted(third.started) == [R, 3 * R, 4 * R, 5 * R, 6 * R]
    assert got.kept == 2 * R
    assert got.fetched == size - 2 * R


@pytest.mark.timeout(60)
def test_resume_with_another_etag_starts_afresh(small: None, tmp_path: Path) -> None:
    size = 5 * R
    old, new = payload(size, seed=11), payload(size, seed=12)
    partial = tmp_path / ".obj.partial"
    with pytest.raises(TransportError):
        run_engine(partial, Served(old, hook=fail_from(3 * R, 0)), streams=1, etag="old")
    assert recorded(partial) == {0, R, 2 * R}
    served = Served(new)
    got = run_engine(partial, served, streams=3, etag="new")
    check_complete(partial, new, got)
    assert (got.kept, got.fetched) == (0, size)
    assert sorted(served.started) == ranges_of(size)


# -- failures: no hang, nothing lost ---------------------------------------------------------


@pytest.mark.timeout(60)
def test_later_range_fails_while_the_first_is_slow(small: None, tmp_path: Path) -> None:
    """Range 2 fails at once while range 0 trickles in: the hasher, waiting for range 0,
    must give up; range 0's reader must not wait for it; the call raises the failure and
    what finished stays recorded."""
    size = 6 * R + 100
    data = payload(size, seed=13)

    def hook(start: int, k: int) -> None:
        if start == 0:
            time.sleep(0.03)
        if start == 2 * R and k == 0:
            raise TransportError("connection lost in range 2")

    partial = tmp_path / ".obj.partial"
    began = time.monotonic()
    with pytest.raises(TransportError, match="range 2"):
        run_engine(partial, Served(data, piece=2000, hook=hook), streams=3)
    assert time.monotonic() - began < 30
    done = recorded(partial)
    assert 0 in done and 2 * R not in done  # range 0 went on to its end and was kept
    content = partial.read_bytes()
    for s in done:
        assert content[s:s + R] == data[s:s + R]

    got = run_engine(partial, Served(data), streams=3)
    check_complete(partial, data, got)
    assert got.kept == kept_bytes(done, size)


@pytest.mark.timeout(60)
def test_every_range_failing_leaves_an_empty_record(small: None, tmp_path: Path) -> None:
    size = 4 * R + 1
    data = payload(size, seed=14)

    def hook(start: int, k: int) -> None:
        if k == 1:
            raise TransportError(f"lost {start}")

    partial = tmp_path / ".obj.partial"
    with pytest.raises(TransportError):
        run_engine(partial, Served(data, hook=hook), streams=8)
    assert recorded(partial) == set()
    got = run_engine(partial, Served(data), streams=8)
    check_complete(partial, data, got)


@pytest.mark.timeout(60)
def test_short_and_overlong_ranges_fail(small: None, tmp_path: Path) -> None:
    """A range that ends early, or one that sends more than asked, fails the call (and
    is not recorded): the file is never reported whole."""
    size = 3 * R
    data = payload(size, seed=15)

    def short(start: int, length: int) -> Pieces:
        return Pieces([data[start:start + length - (1 if start == R else 0)]])

    partial = tmp_path / ".obj.partial"
    info = ObjectInfo("obj", size, "e")
    with pytest.raises(TransportError, match="short read"):
        _download_ranges(partial, info, "test://obj", short, streams=2, on_bytes=None)
    assert R not in recorded(partial)

    def overlong(start: int, length: int) -> Pieces:
        return Pieces([data[start:start + length], *([b"x"] if start == 2 * R else [])])

    partial2 = tmp_path / ".obj2.partial"
    with pytest.raises(TransportError, match="more than range"):
        _download_ranges(partial2, info, "test://obj", overlong, streams=2, on_bytes=None)
    assert 2 * R not in recorded(partial2)


@pytest.mark.timeout(60)
def test_conflict_removes_the_partial_and_its_record(small: None, tmp_path: Path) -> None:
    size = 4 * R
    data = payload(size, seed=16)

    def hook(start: int, k: int) -> None:
        if start == 2 * R and k == 1:
            raise Conflict("the object changed")

    partial = tmp_path / ".obj.partial"
    with pytest.raises(Conflict):
        run_engine(partial, Served(data, hook=hook), streams=2)
    assert not partial.exists() and not partial_record(partial).exists()


@pytest.mark.timeout(60)
def test_filestore_object_replaced_before_download_is_a_conflict(small: None,
                                                                 tmp_path: Path) -> None:
    data = payload(2 * R, seed=17)
    store, info = put_object(tmp_path / "objects", "v/archive", data)
    partial = tmp_path / ".archive.partial"
    (tmp_path / "objects" / "v" / "archive").write_bytes(payload(2 * R, seed=18))
    os.utime(tmp_path / "objects" / "v" / "archive", ns=(1, 1))  # another mtime: another ETag
    with pytest.raises(Conflict):
        store.download("v/archive", partial, info=info)
    assert not partial.exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("error", [TransportError, Conflict])
def test_first_failure_drops_ranges_not_started(small: None, tmp_path: Path,
                                                error: type[Exception]) -> None:
    """Contract: "The first failure drops the ranges not started yet". Range 1 fails at
    once while range 0 is slow; with two streams, ranges 2-9 should not be fetched."""
    size = 10 * R
    data = payload(size, seed=19)

    def hook(start: int, k: int) -> None:
        if start == 0:
            time.sleep(0.05)
        if start == R and k == 0:
            raise error("range 1 failed")

    served = Served(data, piece=4096, hook=hook)
    with pytest.raises(error):
        run_engine(tmp_path / ".obj.partial", served, streams=2)
    # One range may slip in between the failure and the halt; not eight.
    assert len(set(served.started) - {0, R}) <= 1, f"started after the failure: {served.started}"


@pytest.mark.timeout(60)
def test_conflict_stops_running_ranges_at_once(small: None, tmp_path: Path) -> None:
    """Contract: after a Conflict the ranges being read stop at their next chunk, even
    when the range that saw it is not the first one the engine waits for."""
    size = 3 * R
    data = payload(size, seed=20)
    pieces = R // 2048

    def hook(start: int, k: int) -> None:
        if start == 0:
            time.sleep(0.03)
        if start == R and k == 0:
            raise Conflict("the object changed")

    served = Served(data, piece=2048, hook=hook)
    with pytest.raises(Conflict):
        run_engine(tmp_path / ".obj.partial", served, streams=2)
    assert served.consumed.get(0, 0) < pieces, "range 0 was read to its end after a Conflict"


@pytest.mark.timeout(60)
def test_keyboard_interrupt_stops_the_threads_and_keeps_what_finished(
        small: None, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the main thread) while ranges are being read: the call raises
    KeyboardInterrupt once its threads have ended, the record stays, and the next call
    completes the file."""
    size = 6 * R + 5
    data = payload(size, seed=21)
    main = threading.main_thread().ident
    assert main is not None and threading.get_ident() == main
    sent = threading.Event()

    def hook(start: int, k: int) -> None:
        if start == 2 * R:
            if k == 1 and not sent.is_set():
                sent.set()
                signal.pthread_kill(main, signal.SIGINT)
            time.sleep(0.02)

    partial = tmp_path / ".obj.partial"
    served = Served(data, piece=2048, hook=hook)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_engine(partial, served, streams=3)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sent.is_set()
    assert engine_threads() == []
    assert served.consumed.get(2 * R, 0) < R // 2048, "range 2 went on after Ctrl-C"
    done = recorded(partial)
    assert 2 * R not in done
    content = partial.read_bytes()
    for s in done:
        assert content[s:s + R] == data[s:s + R]
    got = run_engine(partial, Served(data), streams=3)
    check_complete(partial, data, got)
    assert got.kept == kept_bytes(done, size)


# -- through publish.fetch -------------------------------------------------------------------


def publish_layout(root: Path, version: str, name: str, parts: list[bytes]) -> FileStore:
    """The layout ``publish`` writes (objects, the sha256 sidecar, then the catalog),
    written here by hand so the archive's bytes can be anything."""
    store = FileStore(root)
    whole = b"".join(parts)
    files = [name] if len(parts) == 1 else [f"{name}.part-{i:04d}" for i in
                                            range(1, len(parts) + 1)]
    lines = [f"{sha256(whole)}  {name}"]
    for f, part in zip(files, parts, strict=True):
        (root / version).mkdir(parents=True, exist_ok=True)
        (root / version / f).write_bytes(part)
        if len(parts) > 1:
            lines.append(f"{sha256(part)}  {f}")
    store.put_bytes(f"{version}/{name}.sha256", ("\n".join(lines) + "\n").encode())
    catalog = {"schemaVersion": 1, "latest": version, "versions": {version: {
        "digest": f"sha256:{sha256(whole)}", "size": len(whole), "created": "2026-01-01",
        "base": None, "archive": name, "files": files}}}
    store.put_bytes("catalog.json", json.dumps(catalog).encode())
    return store


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sizes", [[0], [1], [R], [3 * R + 4097], [2 * R, R + 1, 0]])
def test_publish_fetch(small: None, tmp_path: Path, sizes: list[int]) -> None:
    parts = [payload(s, seed=22 + i) for i, s in enumerate(sizes)]
    store = publish_layout(tmp_path / "objects", "1.0", "bmpackages_1.0.tar.zst", parts)
    to = tmp_path / "site"
    report = fetch(store, "latest", to)
    assert report.bytes == sum(sizes)
    assert [f.read_bytes() for f in report.files] == parts
    for f, part in zip(report.files, parts, strict=True):
        assert sha256(f.read_bytes()) == sha256(part)
    assert leftovers(to) == []


@pytest.mark.timeout(60)
def test_publish_fetch_resumes_an_interrupted_download(small: None, tmp_path: Path) -> None:
    size = 7 * R + 4096 + 9
    data = payload(size, seed=30)
    name = "bmpackages_1.0.tar.zst"
    store = publish_layout(tmp_path / "objects", "1.0", name, [data])
    info = store.head(f"1.0/{name}")
    assert info is not None
    to = tmp_path / "site"
    to.mkdir()
    partial = to / f".{name}.partial"
    served = Served(data, hook=fail_at(4 * R, 1))
    with pytest.raises(TransportError):
        _download_ranges(partial, info, "test://obj", served.open_range, streams=3, on_bytes=None)
    kept = kept_bytes(recorded(partial), size)
    assert 0 < kept < size

    report = fetch(store, "latest", to)
    assert report.bytes == size - kept
    assert sha256((to / name).read_bytes()) == sha256(data)
    assert leftovers(to) == []


@pytest.mark.timeout(60)
def test_publish_fetch_redownloads_a_resume_that_does_not_verify(small: None,
                                                                 tmp_path: Path) -> None:
    """The record names a range whose bytes are not in the partial (a machine that
    stopped before writing them back): fetch notices the hash and starts over once."""
    size = 5 * R + 3
    data = payload(size, seed=31)
    name = "bmpackages_1.0.tar.zst"
    store = publish_layout(tmp_path / "objects", "1.0", name, [data])
    info = store.head(f"1.0/{name}")
    assert info is not None
    to = tmp_path / "site"
    to.mkdir()
    partial = to / f".{name}.partial"
    with pytest.raises(TransportError):
        failing = Served(data, hook=fail_from(2 * R, 0))
        _download_ranges(partial, info, "test://obj", failing.open_range, streams=1,
                         on_bytes=None)
    done = recorded(partial)
    assert done == {0, R}
    with open(partial, "r+b") as f:  # the kept range 1 lost its bytes
        f.seek(R)
        f.write(b"\0" * R)

    report = fetch(store, "latest", to)
    assert report.bytes == (size - 2 * R) + size
    assert (to / name).read_bytes() == data
    assert leftovers(to) == []


@pytest.mark.timeout(60)
def test_publish_fetch_object_rewritten_since_the_partial(small: None, tmp_path: Path) -> None:
    """The transfer system wrote the same object again (a new ETag): the partial's
    record no longer applies and the file is fetched whole."""
    size = 4 * R + 1
    data = payload(size, seed=32)
    name = "bmpackages_1.0.tar.zst"
    root = tmp_path / "objects"
    store = publish_layout(root, "1.0", name, [data])
    info = store.head(f"1.0/{name}")
    assert info is not None
    to = tmp_path / "site"
    to.mkdir()
    partial = to / f".{name}.partial"
    with pytest.raises(TransportError):
        failing = Served(data, hook=fail_from(2 * R, 0))
        _download_ranges(partial, info, "test://obj", failing.open_range, streams=1,
                         on_bytes=None)
    assert recorded(partial) == {0, R}
    obj = root / "1.0" / name
    obj.write_bytes(data)
    os.utime(obj, ns=(10**18, 10**18))
    report = fetch(store, "latest", to)
    assert report.bytes == size
    assert (to / name).read_bytes() == data


@pytest.mark.timeout(60)
def test_a_full_disk_is_a_store_error_not_a_lost_connection(
        small: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write of the download's own file that fails (here ENOSPC, injected into
    pwrite) names the file and says to check the disk; it is not retried as a network
    failure, and the partial stays resumable."""
    from pipeline.errors import StoreError

    data = payload(3 * objstore.RANGE_SIZE)
    store, info = put_object(tmp_path / "objects", "v/archive", data)
    dest = tmp_path / "dest"
    dest.mkdir()
    partial = dest / ".archive.partial"
    real = os.pwrite

    def full(fd: int, buf: object, offset: int) -> int:
        if offset >= objstore.RANGE_SIZE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, buf, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(objstore.os, "pwrite", full)
    with pytest.raises(StoreError) as info_:
        store.download("v/archive", partial, info=info, on_bytes=None)
    assert str(partial) in str(info_.value) and "free space" in str(info_.value)
    monkeypatch.setattr(objstore.os, "pwrite", real)
    got = store.download("v/archive", partial, info=info, on_bytes=None)
    check_complete(partial, data, got)
