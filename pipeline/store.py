"""The content store: one OCI image layout on disk, shared by every image and release.

Layout (OCI image-layout spec 1.0.0)::

    ROOT/oci-layout            {"imageLayoutVersion": "1.0.0"}
    ROOT/index.json            one entry per image, annotated
                               org.opencontainers.image.ref.name = full source reference
    ROOT/blobs/sha256/<hex>    every blob once, whichever images share it
    ROOT/.bmsync/              bmsync's own bookkeeping, on the same filesystem so that
        locks/<hex>.lock         renames from here into the layout are atomic:
        locks/index.lock         flock(2) targets (never deleted: unlinking a lock file
                                 that another process is waiting on breaks the lock)
        partial/<hex>            interrupted downloads, resumed by the next ensure_blob
        verified/<hex>           "bmsync hashed this file when it was written" (its size)
        tmp/                     temp files of atomic writes

A blob file in ``blobs/`` only ever appears by rename of a complete, hashed file, so
readers never see a partial blob. Its marker is written after the rename: a file without
a marker (left by a crash between the two, or put there by another tool) is re-hashed
once before it is trusted, and deleted if it does not match its name.

Concurrency: a :class:`Store` may be shared by threads, and several processes may open
the same root (Luigi runs parallel workers as processes). Every change to one blob, and
every index.json update, runs under a per-process ``threading.Lock`` plus an exclusive
``flock`` on its lock file, so a blob is fetched once and index updates never lose one
another. Reads need no lock: index.json and blobs are replaced atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from pipeline.errors import IntegrityError, StoreError
from pipeline.manifest import OCI_INDEX, Manifest, parse_manifest

if TYPE_CHECKING:
    from hashlib import _Hash

log = logging.getLogger("bmsync.store")

LAYOUT_VERSION = "1.0.0"
INDEX_MEDIA_TYPE = OCI_INDEX
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
# bmsync's own annotations on index.json entries (reverse-DNS, as the OCI spec asks): the
# manifest digest upstream (differs after a platform filter) and the platforms kept.
UPSTREAM_DIGEST = "dev.bmsync.upstream-digest"
# The oci-layout file's bytes as bmsync writes them outside a store (archives, extracts).
OCI_LAYOUT_BYTES = b'{"imageLayoutVersion":"1.0.0"}'
PLATFORMS = "dev.bmsync.platforms"

# Algorithms the store accepts and the length of their hex encoding (OCI image spec,
# "Digests": registered algorithms sha256 and sha512, lowercase hex).
_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_DIGEST = re.compile(r"^(sha256|sha512):([0-9a-f]+)$")

# Fields of an OCI content descriptor (image spec, descriptor.md) that add_image keeps.
_DESCRIPTOR_FIELDS = frozenset(
    {"mediaType", "digest", "size", "platform", "annotations", "urls", "artifactType", "data"}
)

_DISK_HINT = "check free space and permissions of the store directory"


def stored_upstream(entry: Mapping[str, Any], platforms: str) -> str | None:
    """The upstream manifest digest an ``index.json`` entry was pulled from, when it
    was pulled for ``platforms`` (comma-joined; "" means every platform); else None.
    The one rule for "this stored image is that upstream image"."""
    annotations = entry.get("annotations") or {}
    if annotations.get(PLATFORMS, "") != platforms:
        return None
    upstream = annotations.get(UPSTREAM_DIGEST, entry.get("digest"))
    return str(upstream) if upstream else None


def split_digest(digest: str) -> tuple[str, str]:
    """``"sha256:<hex>"`` -> ``("sha256", "<hex>")``.

    Only sha256 (64 lowercase hex digits) and sha512 (128) are accepted, which also
    rules out anything that could escape ``blobs/`` as a path ("sha256:../../x").
    Raises StoreError naming the digest.
    """
    match = _DIGEST.match(digest) if isinstance(digest, str) else None
    if match is None or len(match.group(2)) != _HEX_LENGTH[match.group(1)]:
        raise StoreError(
            f"invalid digest {digest!r}",
            hint="expected sha256:<64 hex digits> or sha512:<128 hex digits>",
        )
    return match.group(1), match.group(2)


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a mix.

    The temp file lives in the destination directory (so the rename is atomic), is
    fsynced before the rename and given ``mode`` (0o600 for files holding credentials);
    the directory is fsynced after it so the rename survives a crash. On any failure
    ``path`` is unchanged, the temp file is removed and the OSError propagates.
    """
    target = Path(path)
    _replace(target, data, tmp_dir=target.parent, mode=mode, durable=True)


def _replace(target: Path, data: bytes, *, tmp_dir: Path, mode: int, durable: bool) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=tmp_dir)
    try:
        with open(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fchmod(tmp.fileno(), mode)
            if durable:
                os.fsync(tmp.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    if durable:
        fsync_dir(target.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_file(path: Path, algorithm: str) -> tuple[str, int]:
    """Hex digest and byte count of a file, read in chunks."""
    with open(path, "rb") as f:
        hasher = hashlib.file_digest(f, algorithm)
        return hasher.hexdigest(), f.tell()


@contextlib.contextmanager
def _disk_errors(what: str) -> Iterator[None]:
    """Turn an OSError of the store's own file operations into a StoreError saying what failed."""
    try:
        yield
    except OSError as exc:
        raise StoreError(f"{what}: {exc.strerror or exc}", hint=_DISK_HINT) from exc


class _KeyedLock:
    """One threading.Lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


# Module-wide so that two Store objects on the same root in one process also exclude
# each other. flock alone would do on Linux (locks belong to the open file description,
# and every holder opens the file anew), but the thread lock keeps waiting threads off
# the kernel lock and makes in-process exclusion independent of that detail.
_THREAD_LOCKS = _KeyedLock()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold the in-process lock and then an exclusive flock on ``lock_path``."""
    with _THREAD_LOCKS.hold(str(lock_path)):
        with _disk_errors(f"cannot open lock file {lock_path}"):
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            # Blocks until the other holder closes its descriptor (or dies: the kernel
            # releases flocks of a dead process, so a crash never leaves a stale lock).
            with _disk_errors(f"cannot lock {lock_path}"):
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


class BlobSink(Protocol):
    """What a fetch callback of :meth:`Store.ensure_blob` writes into.

    ``offset`` is read-only for callers (a property here, so that wrappers may forward
    it from the sink they wrap).
    """

    @property
    def offset(self) -> int:
        """Bytes held so far: when the fetch starts, the point to resume from (send
        ``Range: bytes=<offset>-``); it grows with every write and drops to 0 on restart."""
        ...

    def write(self, data: bytes) -> None:
        """Append ``data`` (hashed and counted). Raises IntegrityError at once, writing
        nothing, when the blob would exceed its expected size."""
        ...

    def restart(self) -> None:
        """Drop every byte held (the server ignored ``Range`` and sends the whole blob)."""
        ...


class _PartialSink:
    """Writes into the open partial file of one blob while hashing it.

    The hash is updated from the caller's buffer and the buffered file passes chunks
    larger than its buffer straight to write(2), so each chunk is touched only by the
    hash and the kernel copy.
    """

    def __init__(
        self, file: BinaryIO, hasher: _Hash, offset: int, size: int | None, digest: str
    ) -> None:
        self.offset = offset
        self.overflowed = False
        self._file = file
        self._hasher = hasher
        self._size = size
        self._digest = digest

    def write(self, data: bytes | bytearray | memoryview) -> None:
        count = len(data)
        if self._size is not None and self.offset + count > self._size:
            self.overflowed = True
            raise IntegrityError(
                f"blob {self._digest}: received more than the {self._size} bytes expected",
                expected=str(self._size),
                actual=f"more than {self._size}",
            )
        self._hasher.update(data)
        try:
            self._file.write(data)
        except OSError as exc:
            raise StoreError(
                f"cannot write partial download of {self._digest}: {exc.strerror or exc}",
                hint=_DISK_HINT,
            ) from exc
        self.offset += count

    def restart(self) -> None:
        with _disk_errors(f"cannot truncate partial download of {self._digest}"):
            self._file.seek(0)
            self._file.truncate()
        self._hasher = hashlib.new(self._hasher.name)
        self.offset = 0

    def hexdigest(self) -> str:
        return str(self._hasher.hexdigest())


class Store:
    """An OCI image layout at ``root``, safe to share between threads and processes.

    Opening creates the layout when ``root`` is absent or empty, opens an existing one,
    and refuses anything else with a StoreError. Disk failures of the store's own files
    raise StoreError; bytes that do not match their digest or size raise IntegrityError.
    """

    root: Path

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self._meta = self.root / ".bmsync"
        self._open_layout()

    # -- layout ---------------------------------------------------------------------

    def _open_layout(self) -> None:
        root = self.root
        with _disk_errors(f"cannot open store {root}"):
            if root.exists() and not root.is_dir():
                raise StoreError(
                    f"store {root} is not a directory", hint="give a directory for the store"
                )
            root.mkdir(parents=True, exist_ok=True)
            # .bmsync may already be there from a creation that crashed before oci-layout.
            foreign = set(os.listdir(root)) - {".bmsync"}
        if foreign and "oci-layout" not in foreign:
            raise StoreError(
                f"{root} is not empty and is not an OCI image layout (it has no oci-layout file)",
                hint="give an empty or new directory, or an existing OCI layout, for the store",
            )
        with _disk_errors(f"cannot create {self._meta}"):
            for sub in ("locks", "partial", "verified", "tmp"):
                (self._meta / sub).mkdir(parents=True, exist_ok=True)
        # Creation runs under the index lock so that processes opening a new store at the
        # same time create it once and none overwrites an index another has written to.
        # oci-layout is written first and temp files live in .bmsync/tmp, so another
        # opener never sees a root holding something other than .bmsync and oci-layout.
        with _exclusive(self._meta / "locks" / "index.lock"):
            layout_file = root / "oci-layout"
            if not layout_file.exists():
                self._write_json(layout_file, {"imageLayoutVersion": LAYOUT_VERSION})
            self._check_layout_version(layout_file)
            index_file = root / "index.json"
            if not index_file.exists():
                # Also repairs a creation interrupted between the two files.
                self._write_json(
                    index_file,
                    {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": []},
                )
            self._read_index()
            with _disk_errors(f"cannot create {root / 'blobs'}"):
                (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)

    def _check_layout_version(self, layout_file: Path) -> None:
        try:
            layout = json.loads(layout_file.read_bytes())
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"cannot read {layout_file}: {exc}",
                hint="repair the file or give a new directory for the store",
            ) from exc
        version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
        if version != LAYOUT_VERSION:
            raise StoreError(
                f"{layout_file}: unsupported imageLayoutVersion {version!r}",
                hint=f"bmsync reads OCI image layout {LAYOUT_VERSION}; give a new directory",
            )

    def _read_index(self) -> dict[str, Any]:
        index_file = self.root / "index.json"
        try:
            index = json.loads(index_file.read_bytes())
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"cannot read {index_file}: {exc}",
                hint="repair the file or give a new directory for the store",
            ) from exc
        manifests = index.get("manifests", []) if isinstance(index, dict) else None
        if not isinstance(manifests, list) or not all(isinstance(m, dict) for m in manifests):
            raise StoreError(
                f"{index_file} is not an OCI image index (no list of manifest descriptors)",
                hint="repair the file or give a new directory for the store",
            )
        index["manifests"] = manifests
        return index

    def _write_json(self, path: Path, value: Mapping[str, Any]) -> None:
        data = (json.dumps(value, indent=2) + "\n").encode()
        with _disk_errors(f"cannot write {path}"):
            _replace(path, data, tmp_dir=self._meta / "tmp", mode=0o644, durable=True)

    # -- blobs ----------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Where the blob lives (whether or not it is present). StoreError on a bad digest."""
        algorithm, hexdigest = split_digest(digest)
        return self.root / "blobs" / algorithm / hexdigest

    def _lock(self, hexdigest: str) -> contextlib.AbstractContextManager[None]:
        return _exclusive(self._meta / "locks" / f"{hexdigest}.lock")

    def _marker(self, hexdigest: str) -> Path:
        return self._meta / "verified" / hexdigest

    def _verified_size(self, algorithm: str, hexdigest: str) -> int | None:
        """Size of the blob if it is at its final name with a marker of the same size.

        Lock-free: both files only ever change by atomic rename or unlink.
        """
        try:
            marked = int(self._marker(hexdigest).read_bytes())
            held = os.stat(self.root / "blobs" / algorithm / hexdigest).st_size
        except (OSError, ValueError):
            return None
        return held if held == marked else None

    def _write_marker(self, hexdigest: str, size: int) -> None:
        # Not fsynced: a marker lost or emptied by a crash only costs one re-hash, and
        # an unreadable marker is treated as absent.
        _replace(
            self._marker(hexdigest),
            b"%d\n" % size,
            tmp_dir=self._meta / "tmp",
            mode=0o644,
            durable=False,
        )

    def _forget(self, algorithm: str, hexdigest: str) -> None:
        for path in (self.root / "blobs" / algorithm / hexdigest, self._marker(hexdigest)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _settle(self, algorithm: str, hexdigest: str, *, trust_marker: bool = True) -> int | None:
        """Under the blob's lock: the size of the blob if present and sound, else None.

        A file whose marker is missing or stale (or any file when ``trust_marker`` is
        false) is re-hashed: a match writes the marker, a mismatch deletes the file.
        """
        path = self.root / "blobs" / algorithm / hexdigest
        with _disk_errors(f"cannot check blob {path}"):
            if trust_marker:
                held = self._verified_size(algorithm, hexdigest)
                if held is not None:
                    return held
            if not path.exists():
                # A marker without its file (blob deleted by hand) must not linger.
                with contextlib.suppress(FileNotFoundError):
                    self._marker(hexdigest).unlink()
                return None
            actual, size = _hash_file(path, algorithm)
            if actual != hexdigest:
                log.warning("deleting %s: its content hashes to %s:%s", path, algorithm, actual)
                self._forget(algorithm, hexdigest)
                return None
            self._write_marker(hexdigest, size)
            return size

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        """Whether the blob is present and verified (and ``size`` bytes long when given).

        A file at the blob's name that bmsync did not verify is re-hashed once (under the
        blob's lock): kept and marked if it matches, deleted if not.
        """
        algorithm, hexdigest = split_digest(digest)
        held = self._verified_size(algorithm, hexdigest)
        if held is None:
            if not (self.root / "blobs" / algorithm / hexdigest).exists():
                return False
            with self._lock(hexdigest):
                held = self._settle(algorithm, hexdigest)
        return held is not None and (size is None or held == size)

    def ensure_blob(
        self, digest: str, size: int | None, fetch: Callable[[int, BlobSink], None]
    ) -> bool:
        """Make the blob present; True if this call fetched it, False if it was there.

        ``fetch(offset, sink)`` must write the blob's bytes from ``offset`` on into
        ``sink`` (or call ``sink.restart()`` and write all of them). It runs at most once
        per digest at a time across the threads and processes sharing the store; a
        caller that waited for another's fetch gets False without fetching.

        The download goes to ``.bmsync/partial/<hex>``, resumed from where a previous
        call stopped. If ``fetch`` raises, the partial is kept for the next call and the
        exception propagates. Once it returns, a size or digest mismatch deletes the
        partial and raises IntegrityError naming the digest; otherwise the file is
        fsynced, renamed into ``blobs/`` and marked verified. A stored blob whose size
        differs from ``size`` also raises IntegrityError (the caller's descriptor is
        wrong: a digest determines its size).
        """
        algorithm, hexdigest = split_digest(digest)
        if size is not None and size < 0:
            raise ValueError(f"negative size {size} for blob {digest}")
        held = self._verified_size(algorithm, hexdigest)
        if held is None:
            with self._lock(hexdigest):
                held = self._settle(algorithm, hexdigest)
                if held is None:
                    self._download(algorithm, hexdigest, digest, size, fetch)
                    return True
        if size is not None and held != size:
            raise IntegrityError(
                f"blob {digest} in the store has {held} bytes, not the {size} expected",
                expected=str(size),
                actual=str(held),
            )
        return False

    def _download(
        self,
        algorithm: str,
        hexdigest: str,
        digest: str,
        size: int | None,
        fetch: Callable[[int, BlobSink], None],
    ) -> None:
        """Under the blob's lock: fetch into the partial file, check it, publish it."""
        partial = self._meta / "partial" / hexdigest
        final = self.root / "blobs" / algorithm / hexdigest
        with _disk_errors(f"cannot open partial download {partial}"):
            fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            file = open(fd, "r+b")
        with file:
            with _disk_errors(f"cannot read partial download {partial}"):
                if size is not None and os.fstat(fd).st_size > size:
                    file.truncate(0)
                # Resuming: the bytes already held go into the hash before new ones.
                hasher = hashlib.file_digest(file, algorithm)
                held = file.tell()
            sink = _PartialSink(file, hasher, held, size, digest)
            if held and held == size and sink.hexdigest() != hexdigest:
                # Complete but wrong (a crash garbled it): start over rather than fail.
                sink.restart()
            if size is None or sink.offset != size:
                try:
                    fetch(sink.offset, sink)
                except BaseException:
                    if sink.overflowed:
                        # The source sends more than the blob holds: what we have is
                        # not a prefix to trust.
                        file.close()
                        partial.unlink(missing_ok=True)
                    raise
            with _disk_errors(f"cannot write partial download {partial}"):
                file.flush()
            if size is not None and sink.offset != size:
                file.close()
                partial.unlink(missing_ok=True)
                raise IntegrityError(
                    f"blob {digest}: received {sink.offset} bytes, expected {size}",
                    expected=str(size),
                    actual=str(sink.offset),
                )
            actual = f"{algorithm}:{sink.hexdigest()}"
            if actual != digest:
                file.close()
                partial.unlink(missing_ok=True)
                raise IntegrityError(
                    f"blob {digest}: received content hashes to {actual}",
                    expected=digest,
                    actual=actual,
                )
            with _disk_errors(f"cannot write partial download {partial}"):
                os.fsync(fd)
        with _disk_errors(f"cannot move {partial} to {final}"):
            final.parent.mkdir(exist_ok=True)
            os.replace(partial, final)
            fsync_dir(final.parent)
            self._write_marker(hexdigest, sink.offset)

    def write_blob(self, data: bytes, digest: str | None = None) -> str:
        """Store a small blob held in memory (manifest, config); returns its digest.

        With ``digest`` given, ``data`` must hash to it (IntegrityError otherwise);
        without, it is stored under its sha256. Writing a blob already present is a
        no-op.
        """
        if digest is None:
            algorithm, hexdigest = "sha256", hashlib.sha256(data).hexdigest()
            digest = f"sha256:{hexdigest}"
        else:
            algorithm, hexdigest = split_digest(digest)
            actual = hashlib.new(algorithm, data).hexdigest()
            if actual != hexdigest:
                raise IntegrityError(
                    f"data given for blob {digest} hashes to {algorithm}:{actual}",
                    expected=digest,
                    actual=f"{algorithm}:{actual}",
                )
        if self._verified_size(algorithm, hexdigest) is not None:
            return digest
        with self._lock(hexdigest):
            if self._settle(algorithm, hexdigest) is None:
                final = self.root / "blobs" / algorithm / hexdigest
                with _disk_errors(f"cannot write blob {final}"):
                    final.parent.mkdir(exist_ok=True)
                    _replace(final, data, tmp_dir=self._meta / "tmp", mode=0o644, durable=True)
                    self._write_marker(hexdigest, len(data))
        return digest

    def _read_bytes(self, digest: str) -> bytes:
        """A blob's bytes, unchecked; StoreError naming it when absent or unreadable."""
        path = self.blob_path(digest)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise StoreError(
                f"blob {digest} is not in the store {self.root}", hint="pull the image first"
            ) from None
        except OSError as exc:
            raise StoreError(f"cannot read blob {path}: {exc.strerror}", hint=_DISK_HINT) from exc

    def read_blob(self, digest: str) -> bytes:
        """The bytes of a small blob, hashed against its digest on every read.

        StoreError if the blob is absent; IntegrityError if its bytes do not match
        (the file is then deleted so that the next pull fetches it again).
        """
        algorithm, hexdigest = split_digest(digest)
        data = self._read_bytes(digest)
        actual = hashlib.new(algorithm, data).hexdigest()
        if actual != hexdigest:
            with self._lock(hexdigest):
                self._settle(algorithm, hexdigest, trust_marker=False)
            raise IntegrityError(
                f"blob {digest} in the store {self.root} is corrupt (hashes to "
                f"{algorithm}:{actual}); it was deleted",
                expected=digest,
                actual=f"{algorithm}:{actual}",
                hint="pull the image again",
            )
        return data

    def read_manifest(self, digest: str, media_type: str | None = None) -> Manifest:
        """A stored manifest, parsed and checked against its digest (hashed once).

        Errors as :meth:`read_blob`; a manifest whose bytes do not match is deleted.
        """
        raw = self._read_bytes(digest)
        try:
            return parse_manifest(raw, media_type, expected_digest=digest)
        except IntegrityError:
            self.read_blob(digest)  # deletes the corrupt file and raises with the store's words
            raise

    def open_blob(self, digest: str) -> BinaryIO:
        """An open binary file on a present blob; the caller closes it.

        The bytes are not re-hashed here: a caller that sends them across a boundary
        passes them through its verifying reader. StoreError if the blob is absent.
        """
        path = self.blob_path(digest)
        if not self.has_blob(digest):
            raise StoreError(
                f"blob {digest} is not in the store {self.root}", hint="pull the image first"
            )
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise StoreError(
                f"blob {digest} is not in the store {self.root}", hint="pull the image first"
            ) from None
        except OSError as exc:
            raise StoreError(f"cannot read blob {path}: {exc.strerror}", hint=_DISK_HINT) from exc

    def verify_blob(self, digest: str) -> None:
        """Re-hash a blob whatever its marker says.

        StoreError if absent; IntegrityError if its bytes do not match, in which case
        the file and its marker are deleted so that the next pull fetches it again.
        """
        algorithm, hexdigest = split_digest(digest)
        path = self.root / "blobs" / algorithm / hexdigest
        with self._lock(hexdigest):
            with _disk_errors(f"cannot read blob {path}"):
                try:
                    actual, size = _hash_file(path, algorithm)
                except FileNotFoundError:
                    raise StoreError(
                        f"blob {digest} is not in the store {self.root}",
                        hint="pull the image first",
                    ) from None
                if actual == hexdigest:
                    self._write_marker(hexdigest, size)
                    return
                self._forget(algorithm, hexdigest)
        raise IntegrityError(
            f"blob {digest} in the store {self.root} is corrupt (hashes to "
            f"{algorithm}:{actual}); it was deleted",
            expected=digest,
            actual=f"{algorithm}:{actual}",
            hint="pull the image again",
        )

    # -- images ---------------------------------------------------------------------

    def add_image(self, ref_name: str, descriptor: Mapping[str, Any]) -> None:
        """Point ``ref_name`` (the full source reference) at a manifest in index.json.

        ``descriptor`` is an OCI descriptor: ``mediaType``, ``digest``, ``size`` and
        optionally ``platform``, ``annotations`` (kept, plus the ref-name annotation),
        ``urls``, ``artifactType``, ``data``; other keys raise ValueError. The manifest
        blob must already be present with that size, else StoreError: no entry ever
        points at a missing manifest. An entry with the same ref name is replaced;
        entries stay sorted by ref name. Atomic and safe against concurrent writers.
        """
        self.add_images([(ref_name, descriptor)])

    def add_images(self, images: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
        """:meth:`add_image` for several images at once: every descriptor is checked
        first (nothing is written if one is refused), then index.json is rewritten once,
        under the index lock."""
        entries = [self._index_entry(ref_name, descriptor) for ref_name, descriptor in images]
        with _exclusive(self._meta / "locks" / "index.lock"):
            self._write_json(self.root / "index.json", merge_index(self._read_index(), entries))

    def _index_entry(self, ref_name: str, descriptor: Mapping[str, Any]) -> dict[str, Any]:
        """The index.json entry for ``ref_name``, checked as :meth:`add_image` says."""
        if not ref_name:
            raise ValueError("empty ref name")
        unknown = set(descriptor) - _DESCRIPTOR_FIELDS
        if unknown:
            raise ValueError(f"unknown descriptor fields for {ref_name}: {sorted(unknown)}")
        media_type, digest, size = (descriptor.get(k) for k in ("mediaType", "digest", "size"))
        if not isinstance(media_type, str) or not media_type:
            raise ValueError(f"descriptor for {ref_name} has no mediaType")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"descriptor for {ref_name} has no valid size: {size!r}")
        if not isinstance(digest, str):
            raise ValueError(f"descriptor for {ref_name} has no digest")
        if not self.has_blob(digest, size):
            raise StoreError(
                f"cannot add {ref_name} to the store index: manifest {digest} "
                f"({size} bytes) is not in the store",
                hint="write the manifest blob before adding the image",
            )
        entry: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
        for key in ("platform", "urls", "artifactType", "data"):
            if key in descriptor:
                entry[key] = descriptor[key]
        annotations = dict(descriptor.get("annotations") or {})
        annotations[REF_NAME_ANNOTATION] = ref_name
        entry["annotations"] = annotations
        return entry

    def images(self) -> list[dict[str, Any]]:
        """The index.json entries (fresh copies), sorted by ref name as stored."""
        manifests: list[dict[str, Any]] = self._read_index()["manifests"]
        return manifests

    def images_by_name(self) -> dict[str, dict[str, Any]]:
        """The index.json entries by ref name: one read for a whole release."""
        return {name: e for e in self.images() if (name := _ref_name(e)) is not None}

    def find_image(self, ref_name: str) -> dict[str, Any] | None:
        """The index.json entry annotated with ``ref_name``, or None."""
        return self.images_by_name().get(ref_name)


def merge_index(index: Mapping[str, Any], entries: Iterable[Mapping[str, Any]]
                ) -> dict[str, Any]:
    """``index`` (an OCI index.json document) with ``entries`` in it: each replaces the
    entry of the same ref name, and the manifests are sorted by ref name (then digest).
    The one rule for updating an image layout's index, locked or not."""
    incoming = list(entries)
    names = {_ref_name(e) for e in incoming}
    kept = [m for m in index.get("manifests", []) if _ref_name(m) not in names or
            _ref_name(m) is None]
    kept.extend(incoming)
    kept.sort(key=lambda m: (_ref_name(m) or "", str(m.get("digest", ""))))
    return {**index, "schemaVersion": index.get("schemaVersion", 2),
            "mediaType": index.get("mediaType", INDEX_MEDIA_TYPE), "manifests": kept}


def _ref_name(entry: Mapping[str, Any]) -> str | None:
    annotations = entry.get("annotations")
    if isinstance(annotations, dict):
        value = annotations.get(REF_NAME_ANNOTATION)
        if isinstance(value, str):
            return value
    return None
